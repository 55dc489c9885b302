"""INTERIM (the logbook helper's version replaces it at merge): what recovery reads back
from the typed logbook."""

from __future__ import annotations

from dataclasses import dataclass

from opt.run.logbook.events import Event, Intervention, ManualIntervention


@dataclass(frozen=True)
class PendingRollback:
    from_step: int
    lr_scale: float
    grad_clip: float
    skipped_data: list[tuple[int, int]]
    furthest_step: int


def pending_rollback(events: list[Event], resumed_step: int) -> PendingRollback | None:
    """The rollback a dead job logged but never saved: the last one in the logbook, if it
    went to ``resumed_step``, with every factor change and data skip logged after it."""
    rollbacks = [
        i for i, e in enumerate(events) if getattr(e, "rolled_back_to_step", None) is not None
    ]
    if not rollbacks or events[rollbacks[-1]].rolled_back_to_step != resumed_step:
        return None
    later = events[rollbacks[-1] :]
    changes = [e for e in later if isinstance(e, (Intervention, ManualIntervention)) and e.after]
    skips = [e.skipped_data for e in changes if e.skipped_data is not None]
    return PendingRollback(
        from_step=later[0].step,
        lr_scale=changes[-1].after.lr_scale,
        grad_clip=changes[-1].after.grad_clip,
        skipped_data=[tuple(s) for s in skips],
        furthest_step=max(e.step or 0 for e in later),
    )
