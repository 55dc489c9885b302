"""The logbook's events: one typed record per kind, a schema version in every line.

The logbook is the public record of a run and also what recovery reads back (a rollback
finished after a crash, the launcher's requeue counts), so a writer must not be able to
misspell a field and a reader must not guess at one. Every kind is a pydantic model with
``extra="forbid"``: an unknown field is an error when the event is made and when it is
read. ``v`` is the schema version; lines written before it existed (the committed
``logbook/demo/``) have none and are read as version 0 and upgraded (see ``codec.parse_event``).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class Record(BaseModel):
    """A typed value inside an event."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Hyperparameters(Record):
    """What the supervisor changes, before and after an intervention."""

    lr_scale: float
    grad_clip: float
    adam_eps: float
    adam_beta2: float


class ValidLoss(Record):
    """An evaluation of the held-out loss: the mean over the tokens it read, at ``step``."""

    step: int
    loss: float


class TaskAccuracy(Record):
    """A downstream task's accuracy over its prompts (the T0 view): the spread of the
    per-prompt accuracies, over ``prompts`` prompts of ``examples`` examples each (at most)."""

    median: float
    iqr: float
    min: float
    max: float
    prompts: int
    examples: int


class Event(Record):
    v: int = SCHEMA_VERSION
    time: str = Field(default_factory=utc_now)
    run: str = ""  # filled in by Logbook.append
    step: int | None = None
    tokens: int | None = None


# ----- the training run ------------------------------------------------------------------
class RunStart(Event):
    kind: Literal["run_start"] = "run_start"
    reason: Literal["fresh", "resumed"]
    checkpoint: str | None = None
    world_size: int
    layout: dict[str, int | bool]
    model: str
    run_dir: str
    # What the interruption before a resume cost (absent when nothing was lost).
    previous_state: str | None = None
    previous_step: int | None = None
    lost_steps: int | None = None
    lost_tokens: int | None = None
    lost_s: float | None = None
    # How long the start took: from the process's start to training (imports, rendezvous,
    # building the model, finding, verifying and loading the checkpoint), and the load alone.
    startup_s: float | None = None
    load_s: float | None = None


class ConfigChange(Event):
    kind: Literal["config_change"] = "config_change"
    changes: dict[str, tuple[Any, Any]]
    """{key: (old value, new value)} against the previous start of the run."""


class RunStop(Event):
    kind: Literal["run_stop"] = "run_stop"
    reason: str
    gpu_hours: float | None = None
    energy_kwh: float | None = None
    energy_source: str | None = None
    co2e_kg: float | None = None


class CheckpointSkipped(Event):
    kind: Literal["checkpoint_skipped"] = "checkpoint_skipped"
    checkpoint: str
    problem: str
    set_aside_as: str


class StragglerDetected(Event):
    """A rank whose own compute (mean seconds per block forward) was at least
    ``resilience.straggler_factor`` times the median of every rank's for ``windows``
    consecutive windows of ``every`` steps; ``step`` ends the last of them."""

    kind: Literal["straggler"] = "straggler"
    rank: int
    host: str
    seconds_per_block: float
    median_seconds_per_block: float
    ratio: float
    windows: int
    every: int


class DownstreamEval(Event):
    """Downstream accuracy of the weights at ``step`` (``[downstream]``): rank
    classification of ``split`` under every chosen prompt, ``shots``-shot."""

    kind: Literal["downstream_eval"] = "downstream_eval"
    split: str
    shots: int
    tasks: dict[str, TaskAccuracy]
    seconds: float


class DataEpoch(Event):
    """A source of the training mixture (``data.sources``) has been drawn ``epochs`` times
    over, as of ``step``: its draws reached ``epochs`` times its samples (a skipped draw
    counts: its sample is used up unread). After a rollback the same epoch may end again."""

    kind: Literal["data_epoch"] = "data_epoch"
    source: str
    epochs: int
    samples: int


# ----- the supervisor --------------------------------------------------------------------
class Intervention(Event):
    """An automatic intervention. The rollback fields are set when the action rolled back;
    they are written before the rollback is carried out, so a job that dies half-way
    finishes it from here at the next start."""

    kind: Literal["intervention"] = "intervention"
    detector: str
    numbers: dict[str, Any] = {}
    action: str
    before: Hyperparameters
    after: Hyperparameters
    detail: str = ""
    drill: bool = False
    """The anomaly was a fault drill (``supervisor.drill``) the run injected into itself."""
    checkpoint: str | None = None
    rolled_back_to_step: int | None = None
    tokens_lost: int | None = None
    discarded_checkpoints: list[str] = []
    skipped_data: tuple[int, int] | None = None
    """Stream positions [start, end) never read again."""
    skipped_steps: tuple[int, int] | None = None
    """The steps (first, last) whose data that was."""
    valid_before: ValidLoss | None = None
    """The last validation before the intervention (none without a held-out set)."""
    valid_after: ValidLoss | None = None
    """A validation right after a rollback was carried out (of the weights rolled back to)."""


class ManualIntervention(Event):
    kind: Literal["manual_intervention"] = "manual_intervention"
    action: Literal["manual"] = "manual"
    reason: str = ""
    before: Hyperparameters
    after: Hyperparameters | None = None  # None: the request could not be read
    detail: str = ""
    skipped_data: tuple[int, int] | None = None
    skipped_steps: tuple[int, int] | None = None
    valid_before: ValidLoss | None = None
    """The last validation before the request was applied."""
    valid_after: ValidLoss | None = None
    """A validation right after it was applied."""


class StopForHuman(Event):
    kind: Literal["stop_for_human"] = "stop_for_human"
    detector: str
    numbers: dict[str, Any] = {}
    action: str
    before: Hyperparameters
    detail: str = ""
    drill: bool = False
    reason: str
    valid_before: ValidLoss | None = None
    """The last validation before the stop."""


class Outcome(Event):
    """An incident judged after ``recovery_steps`` healthy steps."""

    kind: Literal["outcome"] = "outcome"
    intervention_step: int
    incident_start: int
    rungs: list[str]
    pre_incident_loss: float
    result: str
    recovered: bool
    recovered_at_step: int | None = None
    judged_at_step: int
    verdict: Literal["recovered", "not_recovered", "no_harm_done"] | None = None
    """None in logbooks written before skipped-only incidents were told apart."""
    judged_by: str | None = None
    drill: bool = False
    """The incident was started by a fault drill the run injected into itself."""


class InterventionCompletedAfterRestart(Event):
    """A rollback logged by a job that died before its next checkpoint, re-applied."""

    kind: Literal["intervention_completed_after_restart"] = "intervention_completed_after_restart"
    from_step: int
    before: Hyperparameters
    after: Hyperparameters
    skipped_data: list[tuple[int, int]] = []


class Note(Event):
    kind: Literal["note"] = "note"
    text: str
    author: str = "unknown"
    extra: dict[str, Any] = {}
    """Keys a version-0 note carried besides these (kept as they were, not interpreted)."""


# ----- the launcher ----------------------------------------------------------------------
class JobSubmitted(Event):
    kind: Literal["job_submitted"] = "job_submitted"
    job_id: str
    nodes: int
    ranks: int
    partition: str | None = None
    time_minutes: int


class AllocationStart(Event):
    kind: Literal["allocation_start"] = "allocation_start"
    job_id: str
    restart: int = 0
    hosts: list[str] = []
    ranks: int | None = None


class AllocationEnd(Event):
    kind: Literal["allocation_end"] = "allocation_end"
    job_id: str
    result: str


RequeueCause = Literal[
    "timeout", "preemption", "process_failure", "node_failure", "hang", "straggler",
    "excluded_host",
]  # fmt: skip


class Requeue(Event):
    kind: Literal["requeue"] = "requeue"
    cause: RequeueCause
    job_id: str
    requeued_by: Literal["opt", "slurm"]
    checkpoint: str | None = None
    hosts: list[str] = []
    """The hosts blamed for a failure (none for a timeout or preemption)."""
    allocation_hosts: list[str] = []
    ranks: str | None = None
    detail: str | None = None


class NodeExcluded(Event):
    kind: Literal["node_excluded"] = "node_excluded"
    job_id: str
    hosts: list[str]
    exclude: str
    failures: dict[str, int] = {}
    applied: bool = True
    detail: str | None = None


class GaveUp(Event):
    kind: Literal["gave_up"] = "gave_up"
    job_id: str
    cause: str
    requeues_used: int | None = None
    limit: int | None = None
    detail: str | None = None
    hosts: list[str] = []
    allocation_hosts: list[str] = []
    ranks: str | None = None
    checkpoint: str | None = None


AnyEvent = Annotated[
    RunStart | ConfigChange | RunStop | CheckpointSkipped | Intervention | ManualIntervention
    | StopForHuman | Outcome | InterventionCompletedAfterRestart | Note | JobSubmitted
    | AllocationStart | AllocationEnd | Requeue | NodeExcluded | GaveUp | StragglerDetected
    | DownstreamEval | DataEpoch,
    Field(discriminator="kind"),
]  # fmt: skip
