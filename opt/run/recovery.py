"""What a restarted training job must finish, read from its logbook.

A rollback is logged before it is carried out (``Intervention.rolled_back_to_step``), and
its lowered factors and data skips live only in that log line until the next checkpoint.
A job that resumes from the very checkpoint the newest rollback went to therefore died
between the rollback and its next checkpoint: the factors and skips logged since must be
applied again. This module decides that from the typed events; the trainer applies it.
"""

from __future__ import annotations

from dataclasses import dataclass

from opt.run.logbook.events import (
    Event,
    Hyperparameters,
    Intervention,
    InterventionCompletedAfterRestart,
    ManualIntervention,
)


@dataclass(frozen=True)
class PendingRollback:
    """A logged rollback whose effects the checkpoint resumed from does not hold."""

    from_step: int
    """The step at which the rollback was logged."""
    after: Hyperparameters
    """The newest factors logged since the rollback (its own, or a later intervention's)."""
    skipped_data: list[tuple[int, int]]
    """Every data skip logged since the rollback, its own included, in log order."""
    furthest_step: int
    """The furthest step the dead job logged: a drill fires only the first time through."""


def pending_rollback(events: list[Event], resumed_step: int) -> PendingRollback | None:
    """The rollback to finish after resuming at ``resumed_step``, or None.

    A restart that already finished the rollback logged an
    ``InterventionCompletedAfterRestart``; if that job died too before its next checkpoint,
    the same rollback is pending again. Its re-applied skips repeat the ones logged with the
    rollback, so they are not counted twice.
    """
    last = max(
        (i for i, e in enumerate(events)
         if isinstance(e, Intervention) and e.rolled_back_to_step is not None),
        default=None,
    )  # fmt: skip
    if last is None or events[last].rolled_back_to_step != resumed_step:
        return None
    since = events[last:]
    changed = (Intervention, ManualIntervention, InterventionCompletedAfterRestart)
    after = next(e.after for e in reversed(since) if isinstance(e, changed) and e.after is not None)
    skips = [
        e.skipped_data
        for e in since
        if isinstance(e, (Intervention, ManualIntervention)) and e.skipped_data
    ]
    return PendingRollback(
        from_step=events[last].step,
        after=after,
        skipped_data=skips,
        furthest_step=max(e.step or 0 for e in since),
    )
