"""One line of prose per event, for LOGBOOK.md, the terminal timeline, the HTML report and
`opt status`."""

from __future__ import annotations

import json
from functools import singledispatch
from pathlib import Path

from opt.run.logbook.codec import to_json
from opt.run.logbook.events import (
    AllocationEnd,
    AllocationStart,
    CheckpointSkipped,
    DataEpoch,
    DownstreamEval,
    Event,
    GaveUp,
    Hyperparameters,
    Intervention,
    InterventionCompletedAfterRestart,
    JobSubmitted,
    ManualIntervention,
    NodeExcluded,
    Note,
    Outcome,
    Requeue,
    RunStart,
    RunStop,
    StopForHuman,
    StragglerDetected,
    ValidLoss,
)

FAILURE_CAUSES = ("process_failure", "node_failure", "hang", "straggler")


@singledispatch
def describe(event: Event) -> str:
    """One line of prose for an event; a kind without its own words shows its fields."""
    fields = {k: v for k, v in to_json(event).items() if k not in ("v", "time", "run", "kind")}
    return json.dumps(fields)


@describe.register
def _(e: RunStart) -> str:
    text = f"run started ({e.reason}) on {e.world_size} rank(s)"
    if e.checkpoint:
        text += f" from {Path(e.checkpoint).name}"
    if e.lost_steps is not None:
        text += (
            f"; the interruption cost {e.lost_steps} step(s), "
            f"{e.lost_tokens or 0:,} tokens and {_duration(e.lost_s)}"
        )
    if e.startup_s is not None:
        load = f", {e.load_s:.1f} s of it loading the checkpoint" if e.checkpoint else ""
        text += f"; ready to train {e.startup_s:.1f} s after the process started{load}"
    return text


@describe.register
def _(e: RunStop) -> str:
    text = f"run stopped: {e.reason}"
    if e.energy_kwh is not None:
        text += (f" ({e.gpu_hours or 0:.2f} GPU-hours, {e.energy_kwh:.2f} kWh, "
                 f"{e.co2e_kg or 0:.2f} kg CO2e)")  # fmt: skip
    return text


@describe.register(Intervention)
@describe.register(ManualIntervention)
def _(e: Intervention | ManualIntervention) -> str:
    manual = isinstance(e, ManualIntervention)
    cause = "an operator's request" if manual else e.detector or "an operator's request"
    drill = "" if manual or not e.drill else "drill: "
    parts = [f"{drill}**{e.action}** after {cause}"]
    if manual and e.reason:
        parts.append(f"({e.reason})")
    if e.detail:
        parts.append(f"({e.detail})")
    if not manual and e.checkpoint:
        parts.append(f"rolled back to {e.checkpoint}")
    if e.after is not None and (changes := _changes(e.before, e.after)):
        parts.append(changes)
    if e.skipped_data:
        parts.append(f"skipped data {list(e.skipped_data)}")
    if validation := _validation(e.valid_before, e.valid_after):
        parts.append(validation)
    return " ".join(parts)


def _validation(before: ValidLoss | None, after: ValidLoss | None) -> str:
    """ "validation loss 4.1234 (step 100) → 4.0567 (step 95)"; empty without either."""
    if before is None and after is None:
        return ""
    text = "validation loss " + (_valid(before) if before is not None else "not yet evaluated")
    return text + (f" → {_valid(after)}" if after is not None else "")


def _valid(v: ValidLoss) -> str:
    return f"{v.loss:.4f} (step {v.step})"


def _changes(before: Hyperparameters, after: Hyperparameters) -> str:
    return "; ".join(
        f"{k} {getattr(before, k):g} → {getattr(after, k):g}"
        for k in Hyperparameters.model_fields
        if getattr(before, k) != getattr(after, k)
    )


@describe.register
def _(e: Outcome) -> str:
    drill = "drill: " if e.drill else ""
    return f"{drill}outcome of intervention at step {e.intervention_step}: {e.result}"


@describe.register
def _(e: InterventionCompletedAfterRestart) -> str:
    return (
        f"restart finished the rollback logged at step {e.from_step}: lr_scale "
        f"{e.after.lr_scale}, grad_clip {e.after.grad_clip}, "
        f"{len(e.skipped_data)} data skip(s) re-applied"
    )


@describe.register
def _(e: Note) -> str:
    return f"note: {e.text}"


@describe.register
def _(e: StopForHuman) -> str:
    text = f"**stopped for a human**: {e.reason}"
    if e.valid_before is not None:
        text += f"; last {_validation(e.valid_before, None)}"
    return text


# ----- the launcher and the checkpoints: what happened to the job, and where ----------------
def _hosts(hosts: list[str]) -> str:
    return ", ".join(hosts) or "unknown host"


@describe.register
def _(e: JobSubmitted) -> str:
    return f"Slurm job {e.job_id} submitted: {e.nodes} node(s), {e.ranks} ranks"


@describe.register
def _(e: AllocationStart) -> str:
    return f"allocation of job {e.job_id} started on {_hosts(e.hosts)} (restart {e.restart})"


@describe.register
def _(e: AllocationEnd) -> str:
    return f"allocation of job {e.job_id} ended: {e.result}"


@describe.register
def _(e: Requeue) -> str:
    where = ""
    if e.cause in FAILURE_CAUSES:
        ranks = f"rank(s) {e.ranks}: " if e.ranks else ""
        where = f" on {_hosts(e.hosts)} ({ranks}{e.detail})"
    elif e.cause == "excluded_host":
        where = f": the allocation included {_hosts(e.hosts)}, excluded after failures"
    last = f", last checkpoint {Path(e.checkpoint).name}" if e.checkpoint else ""
    return (
        f"**{e.cause.replace('_', ' ')}**{where}; job {e.job_id} requeued by {e.requeued_by}{last}"
    )


@describe.register
def _(e: NodeExcluded) -> str:
    applied = "" if e.applied else f" ({e.detail})"
    return f"excluded {_hosts(e.hosts)} from later allocations{applied}"


@describe.register
def _(e: GaveUp) -> str:
    if e.limit is None:
        return f"**gave up**: {e.detail}"
    return (f"**gave up** after {e.cause.replace('_', ' ')}: "
            f"{e.requeues_used or 0} of {e.limit} requeues used")  # fmt: skip


@describe.register
def _(e: StragglerDetected) -> str:
    return (
        f"**straggler**: rank {e.rank} on {e.host} spent {e.seconds_per_block * 1e3:.3g} ms "
        f"per block forward, {e.ratio:.2f}x the median {e.median_seconds_per_block * 1e3:.3g} ms, "
        f"for {e.windows} consecutive windows of {e.every} steps"
    )


@describe.register
def _(e: DownstreamEval) -> str:
    tasks = "; ".join(
        f"{name} {t.median:.1%} (IQR {t.iqr:.1%}, {t.min:.1%}-{t.max:.1%}, {t.prompts} prompts "
        f"x {t.examples} examples)"
        for name, t in e.tasks.items()
    )
    return f"downstream accuracy ({e.split}, {e.shots}-shot, median over prompts): {tasks}"


@describe.register
def _(e: DataEpoch) -> str:
    passes = "once" if e.epochs == 1 else f"{e.epochs} times"
    return f"data source {e.source!r}: all {e.samples:,} of its samples drawn {passes} over"


@describe.register
def _(e: CheckpointSkipped) -> str:
    return f"skipped incomplete checkpoint {Path(e.checkpoint).name}: {e.problem}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "an unknown time"
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"
