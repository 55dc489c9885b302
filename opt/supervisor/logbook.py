"""The public logbook of a run: ``logbook/<run>/events.jsonl`` (append-only, one JSON object
per line) and ``LOGBOOK.md`` (the same events for people, regenerated after every append).

Durability: each event is one ``write`` to a file opened with O_APPEND, followed by fsync,
so a crash (kill -9 included) leaves every earlier line intact; a torn last line, if the
machine itself dies mid-write, is skipped by the reader and never rewritten. LOGBOOK.md is
replaced atomically (temp file + rename), so it is always a complete rendering.

The logbook is meant to be published, so every event passes through ``redact`` first.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
from pathlib import Path

from opt.errors import OptError
from opt.fsutil import atomic_write, fsync_dir

EVENTS = "events.jsonl"
MARKDOWN = "LOGBOOK.md"

# Names whose values are secrets wherever they appear (environment or config keys).
SECRET_NAME = re.compile(
    r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|AUTH)($|_)",
    re.I,
)
# Well-known credential shapes, redacted even when we do not know where they came from.
SECRET_PATTERNS = [
    re.compile(r"hf_[A-Za-z0-9]{20,}"),  # Hugging Face
    re.compile(r"gh[pousr]_[A-Za-z0-9]{30,}"),  # GitHub
    re.compile(r"AKIA[0-9A-Z]{16}"),  # AWS access key id
    re.compile(r"xox[baprs]-[A-Za-z0-9-]{10,}"),  # Slack
    re.compile(r"sk-[A-Za-z0-9_-]{20,}"),  # OpenAI-style keys
    re.compile(r"(?i)bearer\s+[A-Za-z0-9._~+/=-]{10,}"),
    re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+(?=@)"),  # user:password@ in URLs
]
REDACTED = "[redacted]"


def _secret_values() -> list[str]:
    """Values of this process's environment variables whose names mark them as secrets."""
    return sorted(
        (v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= 6),
        key=len,
        reverse=True,
    )


def redact(value, secrets: list[str] | None = None):
    """A copy of ``value`` (JSON-like) with secrets replaced by ``[redacted]``."""
    secrets = _secret_values() if secrets is None else secrets
    if isinstance(value, dict):
        return {
            k: REDACTED
            if SECRET_NAME.search(str(k)) and value[k] not in (None, "")
            else redact(v, secrets)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact(v, secrets) for v in value]
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
        for pattern in SECRET_PATTERNS:
            value = pattern.sub(REDACTED, value)
        return value
    return value


def _plain(value):
    """Strict JSON: NaN and infinities (a diverged loss) become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class Logbook:
    """Append events of one run; only rank 0 writes (callers guarantee that)."""

    def __init__(self, root: str | Path, run: str):
        self.dir = Path(root) / run
        self.run = run
        self.events_path = self.dir / EVENTS

    def append(self, kind: str, **fields) -> dict:
        event = _plain(redact({"time": _now(), "run": self.run, "kind": kind, **fields}))
        line = (json.dumps(event, allow_nan=False) + "\n").encode()
        self.dir.mkdir(parents=True, exist_ok=True)
        new = not self.events_path.exists()
        fd = os.open(self.events_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, line)
            if written != len(line):  # a short write to a regular file means a full disk
                raise OptError(f"logbook {self.events_path}: short write ({written}/{len(line)})")
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:
            fsync_dir(self.dir)
        self.render_markdown()
        return event

    def events(self) -> list[dict]:
        return read_events(self.events_path)

    def render_markdown(self) -> None:
        atomic_write(self.dir / MARKDOWN, markdown(self.run, self.events()))


def read_events(path: str | Path) -> list[dict]:
    """Every complete event; a torn final line (a crash mid-write) is skipped."""
    path = Path(path)
    if not path.is_file():
        raise OptError(f"no logbook at {path}")
    events = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


# ----- rendering for people ----------------------------------------------------------------
def describe(event: dict) -> str:
    """One line of prose for an event."""
    kind = event.get("kind", "?")
    if kind == "run_start":
        text = (
            f"run started ({event.get('reason', 'fresh')}) on {event.get('world_size', 1)} rank(s)"
        )
        if event.get("checkpoint"):
            text += f" from {Path(event['checkpoint']).name}"
        if "lost_steps" in event:
            text += (
                f"; the interruption cost {event['lost_steps']} step(s), "
                f"{event.get('lost_tokens', 0):,} tokens and {_duration(event.get('lost_s'))}"
            )
        return text
    if kind in HARDWARE_KINDS:
        return _describe_hardware(event)
    if kind == "run_stop":
        text = f"run stopped: {event.get('reason', '')}"
        if event.get("energy_kwh") is not None:
            text += (f" ({event['gpu_hours']:.2f} GPU-hours, {event['energy_kwh']:.2f} kWh, "
                     f"{event.get('co2e_kg', 0):.2f} kg CO2e)")  # fmt: skip
        return text
    if kind == "resume":
        return f"resumed from {event.get('checkpoint')}"
    if kind in ("intervention", "manual_intervention"):
        cause = event.get("detector") or "an operator's request"
        parts = [f"**{event.get('action')}** after {cause}"]
        if event.get("reason") and kind == "manual_intervention":
            parts.append(f"({event['reason']})")
        if event.get("detail"):
            parts.append(f"({event['detail']})")
        if event.get("checkpoint"):
            parts.append(f"rolled back to {event['checkpoint']}")
        if event.get("before") and event.get("after"):
            changes = [
                f"{k} {event['before'][k]:g} → {event['after'][k]:g}"
                for k in event["after"]
                if event["before"].get(k) != event["after"][k]
            ]
            if changes:
                parts.append("; ".join(changes))
        if event.get("skipped_data"):
            parts.append(f"skipped data {event['skipped_data']}")
        return " ".join(parts)
    if kind == "outcome":
        return f"outcome of intervention at step {event.get('intervention_step')}: {event.get('result')}"
    if kind == "intervention_completed_after_restart":
        after = event.get("after", {})
        return (
            f"restart finished the rollback logged at step {event.get('from_step')}: lr_scale "
            f"{after.get('lr_scale')}, grad_clip {after.get('grad_clip')}, "
            f"{len(event.get('skipped_data', []))} data skip(s) re-applied"
        )
    if kind == "note":
        return f"note: {event.get('text', '')}"
    if kind == "stop_for_human":
        return f"**stopped for a human**: {event.get('reason', '')}"
    return json.dumps({k: v for k, v in event.items() if k not in ("time", "run", "kind")})


HARDWARE_KINDS = (
    "job_submitted", "allocation_start", "allocation_end", "requeue", "node_excluded",
    "gave_up", "checkpoint_skipped",
)  # fmt: skip


def _duration(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "an unknown time"
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def _describe_hardware(event: dict) -> str:
    """Launcher and checkpoint events: what happened to the job, and where."""
    kind, job = event["kind"], event.get("job_id")
    hosts = ", ".join(event.get("hosts") or []) or "unknown host"
    if kind == "job_submitted":
        return (
            f"Slurm job {job} submitted: {event.get('nodes')} node(s), {event.get('ranks')} ranks"
        )
    if kind == "allocation_start":
        return (f"allocation of job {job} started on {hosts} (restart "
                f"{event.get('restart', 0)})")  # fmt: skip
    if kind == "allocation_end":
        return f"allocation of job {job} ended: {event.get('result')}"
    if kind == "requeue":
        cause = event.get("cause", "?").replace("_", " ")
        where = f" on {hosts} (rank(s) {event.get('ranks')}: {event.get('detail')})" if (
            event.get("cause") in ("process_failure", "node_failure")
        ) else ""  # fmt: skip
        ckpt = event.get("checkpoint")
        return (f"**{cause}**{where}; job {job} requeued by {event.get('requeued_by', 'opt')}"
                + (f", last checkpoint {Path(ckpt).name}" if ckpt else ""))  # fmt: skip
    if kind == "node_excluded":
        applied = (
            "" if event.get("applied", True) else f" (scontrol refused: {event.get('detail')})"
        )
        return f"excluded {hosts} from later allocations after repeated failures{applied}"
    if kind == "gave_up":
        return (f"**gave up** after {event.get('cause', '?').replace('_', ' ')}: "
                f"{event.get('requeues_used', 0)} of {event.get('limit', 0)} requeues used"
                if "limit" in event else f"**gave up**: {event.get('detail')}")  # fmt: skip
    return (f"skipped incomplete checkpoint {Path(event.get('checkpoint', '')).name}: "
            f"{event.get('problem')}")  # fmt: skip


def markdown(run: str, events: list[dict]) -> str:
    lines = [
        f"# Logbook: {run}",
        "",
        "Written by opt's supervisor; every automatic and manual intervention, restart and note "
        f"of the run, newest last. Machine-readable copy: `{EVENTS}`.",
        "",
        "| time (UTC) | step | tokens | event |",
        "| --- | ---: | ---: | --- |",
    ]
    for event in events:
        step = event.get("step", "")
        tokens = event.get("tokens")
        tokens = f"{tokens:,}" if isinstance(tokens, int) else ""
        text = describe(event).replace("|", "\\|")
        lines.append(f"| {event.get('time', '')} | {step} | {tokens} | {text} |")
    return "\n".join(lines) + "\n"
