"""Rollback planning: which checkpoint to go back to, what changes, what data to skip.

Pure functions of the run's numbers. Carrying the plan out (hiding checkpoints, loading,
logging first) is the trainer's (opt/train/interventions.py); the plan is decided before
anything changes, so that it can be logged first and finished from the logbook if the job
dies half-way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from opt.config import SupervisorConfig


@dataclass
class Factors:
    """The multipliers the supervisor lowers, kept in every checkpoint so that they survive
    restarts: the LR scale (the schedule is scaled, never reset) and the clip threshold."""

    lr_scale: float = 1.0
    grad_clip: float = 1.0

    def state_dict(self) -> dict:
        return {"lr_scale": self.lr_scale, "grad_clip": self.grad_clip}

    def load_state_dict(self, state: dict) -> None:
        self.lr_scale = float(state["lr_scale"])
        self.grad_clip = float(state["grad_clip"])


@dataclass(frozen=True)
class RollbackPlan:
    target_step: int
    tokens_lost: int
    lr_scale: float
    grad_clip: float
    skipped_data: tuple[int, int] | None = None
    """Stream positions [start, end) to skip after loading the target."""
    skipped_steps: tuple[int, int] | None = None
    """The steps (first, last) whose data that is."""
    reset_optimizer: bool = False


def rollback_limit(incident_start: int, cfg: SupervisorConfig) -> int:
    """The newest step a rollback target may have: before the incident, with a margin
    (the divergence may have been brewing before it showed), and never before the start:
    a fresh run's step-0 checkpoint is always healthy."""
    return max(0, incident_start - cfg.healthy_margin)


def protected_step(checkpoint_steps: list[int], step: int, cfg: SupervisorConfig) -> int | None:
    """The checkpoint retention must keep: the newest one old enough to be a rollback target
    if an incident began now (until a newer one is)."""
    old_enough = [s for s in checkpoint_steps if s <= step - cfg.healthy_margin]
    return old_enough[-1] if old_enough else None


def step_samples(
    pos: int, done_steps: int, first: int, last: int, per_step: int,
    skips: Sequence[Sequence[int]] = (),
) -> tuple[int, int]:  # fmt: skip
    """Stream positions [start, end) that steps ``first..last`` (1-based, inclusive) read,
    given the stream stands at ``pos`` after ``done_steps`` steps and never yields the
    positions in ``skips`` ([start, end) ranges; a range inside the result is moot)."""
    ranges = sorted((int(s), int(e)) for s, e in skips)

    def advance(p: int, n: int) -> int:
        """The position after reading ``n`` positions from ``p``, past the skipped ones."""
        for s, e in ranges:
            if e <= p:
                continue
            if s <= p:  # inside a skipped range: reading resumes at its end
                p = e
                continue
            if n <= s - p:
                return p + n
            n, p = n - (s - p), e
        return p + n

    before = advance(pos, (first - done_steps - 1) * per_step)
    start = advance(before, 1) - 1  # the first position step ``first`` reads
    return start, advance(before, (last - first + 1) * per_step)


def plan_rollback(
    cfg: SupervisorConfig,
    moves: tuple[str, ...],
    anomaly_step: int,
    target_step: int,
    factors: Factors,
    batch_tokens: int,
    step_range: Callable[[int, int], tuple[int, int]],
) -> RollbackPlan:
    """What rolling back from ``anomaly_step`` to the checkpoint of ``target_step`` does,
    for a rung's ``moves``; ``step_range(first, last)``: the stream positions [start, end)
    that steps first..last read from the target (the loader's ``step_positions``).

    skip_data drops the samples of the ``skip_data_steps`` steps up to the anomaly (the
    steps that led to it, the anomalous one included: a bad batch spikes its own step) and
    of the ``skip_data_ahead`` steps after it, which a block of bad documents fills too."""
    lower = "lower_lr_clip" in moves
    skipped_data = skipped_steps = None
    if "skip_data" in moves:
        first = max(anomaly_step - cfg.skip_data_steps, target_step) + 1
        last = anomaly_step + cfg.skip_data_ahead
        skipped_data = step_range(first, last)
        skipped_steps = (first, last)
    return RollbackPlan(
        target_step=target_step,
        tokens_lost=(anomaly_step - target_step) * batch_tokens,
        lr_scale=factors.lr_scale * (cfg.lr_factor if lower else 1.0),
        grad_clip=factors.grad_clip * (cfg.clip_factor if lower else 1.0),
        skipped_data=skipped_data,
        skipped_steps=skipped_steps,
        reset_optimizer="reset_optimizer" in moves,
    )
