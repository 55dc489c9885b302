"""Divergence detectors over robust running statistics of the agreed per-step values."""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

from opt.config import SupervisorConfig

# Index of each detector in the per-step flag vector that ranks agree on (all-reduce MAX).
NONFINITE, LOSS_SPIKE, GRAD_EXPLOSION, SCALE_COLLAPSE = range(4)
NAMES = ("nonfinite", "loss_spike", "grad_norm_explosion", "loss_scale_collapse")


@dataclass
class Anomaly:
    detector: str
    numbers: dict = field(default_factory=dict)

    @property
    def detail(self) -> str:
        """The numbers behind it, in one line for people."""
        n = self.numbers
        if self.detector == "loss_spike":
            return (
                f"loss {n['loss']:.4f} vs median {n['loss_median']:.4f} "
                f"(robust std {n['loss_robust_std']:.4f})"
            )
        if self.detector == "grad_norm_explosion":
            return f"grad norm {n['grad_norm']:.3g} vs median {n['grad_norm_median']:.3g}"
        if self.detector == "loss_scale_collapse":
            return f"loss scale {n['loss_scale']:g}, {n['overflows_in_window']} overflows in the window"
        return f"loss {n['loss']}, grad norm {n['grad_norm']}"


class Detectors:
    """Robust statistics (median and MAD) over the last ``window`` healthy steps."""

    def __init__(self, cfg: SupervisorConfig):
        self.cfg = cfg
        self.losses: deque[float] = deque(maxlen=cfg.window)
        self.norms: deque[float] = deque(maxlen=cfg.window)
        self.overflow_steps: deque[int] = deque()

    @property
    def armed(self) -> bool:
        return len(self.losses) >= self.cfg.min_steps

    def flags(
        self, step: int, loss: float, grad_norm: float, overflow: bool, at_floor: bool
    ) -> list[float]:
        """1.0 for each detector that fires on this step (the vector ranks agree on)."""
        cfg = self.cfg
        flags = [0.0] * len(NAMES)
        if not math.isfinite(loss) or (not math.isfinite(grad_norm) and not overflow):
            flags[NONFINITE] = 1.0
        if overflow:
            self.overflow_steps.append(step)
        while self.overflow_steps and self.overflow_steps[0] <= step - cfg.window:
            self.overflow_steps.popleft()
        # Judged on the step that overflows: once the scale has come down, the clean steps
        # that follow are healthy, though the overflows are still in the window.
        if at_floor or (overflow and len(self.overflow_steps) >= cfg.scale_collapses):
            flags[SCALE_COLLAPSE] = 1.0
        if self.armed and math.isfinite(loss):
            median = statistics.median(self.losses)
            if loss - median > max(cfg.spike_min_rise, cfg.spike_z * self._robust_std(self.losses)):
                flags[LOSS_SPIKE] = 1.0
        explosive = self.armed and cfg.grad_norm_factor > 0 and math.isfinite(grad_norm)
        if explosive and grad_norm > cfg.grad_norm_factor * statistics.median(self.norms):
            flags[GRAD_EXPLOSION] = 1.0
        return flags

    def describe(self, flags: list[float], loss: float, grad_norm: float, scale: float) -> Anomaly:
        """The first firing detector, with the numbers behind it."""
        name = NAMES[next(i for i, f in enumerate(flags) if f > 0)]
        numbers = {"loss": loss, "grad_norm": grad_norm, "loss_scale": scale}
        if self.losses:
            numbers["loss_median"] = statistics.median(self.losses)
            numbers["loss_robust_std"] = self._robust_std(self.losses)
            numbers["grad_norm_median"] = statistics.median(self.norms)
        numbers["overflows_in_window"] = len(self.overflow_steps)
        numbers["fired"] = [NAMES[i] for i, f in enumerate(flags) if f > 0]
        return Anomaly(name, numbers)

    def observe(self, loss: float, grad_norm: float) -> None:
        """Add a healthy step to the history (anomalous steps never enter it)."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.losses.append(loss)
            self.norms.append(grad_norm)

    def pre_incident_level(self) -> float:
        return statistics.median(self.losses) if self.losses else math.inf

    @staticmethod
    def _robust_std(values) -> float:
        median = statistics.median(values)
        return 1.4826 * statistics.median(abs(v - median) for v in values)

    def state_dict(self) -> dict:
        return {
            "losses": list(self.losses),
            "norms": list(self.norms),
            "overflows": list(self.overflow_steps),
        }

    def load_state_dict(self, state: dict) -> None:
        self.losses = deque(state["losses"], maxlen=self.cfg.window)
        self.norms = deque(state["norms"], maxlen=self.cfg.window)
        self.overflow_steps = deque(state["overflows"])
