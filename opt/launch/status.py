"""`opt status RUN`: where a run is, from files that are always there.

The run directory (status.json written by rank 0 every step, the resolved config), the
checkpoint directory and the public logbook give the step, the last checkpoint, restarts
and interventions. The Slurm state comes from squeue, or scontrol for a job that has just
left the queue; never from sacct, which many clusters disable.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from opt.checkpoint import latest_checkpoint, verify_checkpoint
from opt.config import load_config
from opt.errors import OptError
from opt.launch.job_history import requeue_counts
from opt.run.logbook import MARKDOWN, Logbook
from opt.run.logbook.codec import to_json
from opt.run.logbook.describe import describe
from opt.run.logbook.events import AllocationStart, JobSubmitted
from opt.run.logbook.summary import INTERVENTIONS, by_cause_text
from opt.run.status import read_status
from opt.train.evaluate import perplexity


def _run_dir(run: str, runs_dir: str) -> Path:
    for candidate in (Path(run), Path(runs_dir) / run):
        if (candidate / "config.toml").is_file() or (candidate / "slurm" / "config.toml").is_file():
            return candidate
    raise OptError(f"no run {run!r} (looked for {Path(runs_dir) / run}/config.toml)")


def slurm_job_state(job_id: str) -> dict:
    """The job's state from squeue, then scontrol (for a job that just left the queue)."""
    if shutil.which("squeue") is None:
        return {"state": "unknown", "source": "squeue not found on this machine"}
    queue = _run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T|%R|%N|%L"])
    if queue:
        state, reason, nodes, left = (queue.splitlines()[0].split("|") + [""] * 4)[:4]
        return {"state": state, "reason": reason, "nodes": nodes, "time_left": left,
                "source": "squeue"}  # fmt: skip
    shown = _run(["scontrol", "-o", "show", "job", job_id])
    if shown:
        fields = dict(f.split("=", 1) for f in shown.split() if "=" in f)
        return {"state": fields.get("JobState", "unknown"), "reason": fields.get("Reason", ""),
                "nodes": fields.get("NodeList", ""), "source": "scontrol"}  # fmt: skip
    return {"state": "not in the queue", "source": "squeue/scontrol no longer know it"}


def _run(command: list[str]) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return result.stdout.strip() if result.returncode == 0 else ""


def run_status_report(run: str, runs_dir: str = "runs") -> dict:
    run_dir = _run_dir(run, runs_dir)
    config = run_dir / "config.toml"
    cfg = load_config(config if config.is_file() else run_dir / "slurm" / "config.toml")
    book = Logbook(cfg.logbook.dir, cfg.run.name)
    events = book.events() if book.events_path.is_file() else []
    status = read_status(run_dir)
    job = next((e for e in reversed(events) if isinstance(e, (JobSubmitted, AllocationStart))),
               None)  # fmt: skip
    newest = latest_checkpoint(cfg.checkpoint_dir)
    checkpoint = None
    if newest is not None:
        try:
            manifest = verify_checkpoint(newest, checksums=False)
            checkpoint = {"path": str(newest), "step": manifest.get("step"),
                          "saved_at": manifest.get("saved_at"), "complete": True}  # fmt: skip
        except OptError as err:
            checkpoint = {"path": str(newest), "complete": False, "problem": str(err)}
    return {
        "run": cfg.run.name,
        "run_dir": str(run_dir),
        "job": {"id": job.job_id, **slurm_job_state(job.job_id)} if job else None,
        "training": status or None,
        "checkpoint": checkpoint,
        "restarts": dict(requeue_counts(events)),
        "interventions": [e for e in events if isinstance(e, INTERVENTIONS)][-3:],
        "last_event": events[-1] if events else None,
        "logbook": str(book.dir / MARKDOWN),
    }


def status_json(report: dict) -> str:
    """The report as JSON, its events as the objects of their logbook lines."""
    return json.dumps(report, indent=1, default=to_json)


def _age(unix_time: float | None) -> str:
    if not unix_time:
        return "?"
    seconds = max(0, time.time() - unix_time)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit} ago"
    return f"{seconds:.0f} s ago"


def format_status(report: dict) -> str:
    lines = [f"run {report['run']} ({report['run_dir']})"]
    job = report["job"]
    if job:
        where = f" on {job['nodes']}" if job.get("nodes") else ""
        # squeue's %R is the reason only while pending (the node list otherwise).
        why = f" ({job['reason']})" if job["state"] == "PENDING" and job.get("reason") else ""
        lines.append(f"slurm job {job['id']}: {job['state']}{why}{where} [from {job['source']}]")
    else:
        lines.append("slurm job: none recorded (not launched with `opt launch slurm`)")
    training = report["training"]
    if training:
        lines.append(
            f"training: {training.get('state')} at step {training.get('step')} of "
            f"{training.get('max_steps')} ({training.get('tokens', 0):,} tokens), updated "
            f"{_age(training.get('updated'))}"
        )
        if training.get("valid_loss") is not None:
            loss = training["valid_loss"]
            lines.append(
                f"validation: loss {loss:.4f} (perplexity {perplexity(loss):.2f}) at step "
                f"{training.get('valid_step')}"
            )
    else:
        lines.append("training: not started yet")
    ckpt = report["checkpoint"]
    if ckpt is None:
        lines.append("last checkpoint: none")
    elif ckpt["complete"]:
        lines.append(
            f"last checkpoint: step {ckpt['step']} ({ckpt['path']}), {_age(ckpt['saved_at'])}"
        )
    else:
        lines.append(f"last checkpoint: {ckpt['path']} is INCOMPLETE: {ckpt['problem']}")
    restarts = report["restarts"]
    lines.append(f"restarts: {sum(restarts.values())}{by_cause_text(restarts)}")
    if report["interventions"]:
        lines.append("latest interventions:")
        for event in report["interventions"]:
            lines.append(f"  step {event.step}: {describe(event)}")
    else:
        lines.append("latest interventions: none")
    if report["last_event"]:
        lines.append(f"last logbook event: {describe(report['last_event'])}")
    lines.append(f"logbook: {report['logbook']}")
    return "\n".join(lines)
