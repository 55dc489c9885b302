"""Divergence detectors over the agreed per-step values and robust running statistics.

Three kinds, because divergence comes in three shapes:
- **at once, from the first step**: a non-finite loss or gradient norm, or a loss above a
  multiple of the loss of predicting uniformly (ln V) — a model that has learnt anything is
  far below it, and one that blew up in warmup is far above it; no history is needed;
- **against a short history**: a loss spike (robust z-score over the last ``window`` healthy
  steps), a gradient-norm explosion (a multiple of its running median, armed after a few
  steps), the early warning of the last block's activation norm growing (a multiple of its
  running median: the OPT-175B team saw it grow before divergences), an fp16
  loss-scale collapse (the floor, or ``scale_collapses`` overflows within the window);
- **slowly**: the median of the last ``trend_window`` healthy losses creeping above the best
  such median seen, by ``trend_rise`` (each step looks healthy; the curve does not).

The validation loss has its own detector in the supervisor (``Supervisor.validated``).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

from opt.config import SupervisorConfig

# Index of each detector in the flag list ``flags`` returns.
(NONFINITE, LOSS_SPIKE, GRAD_EXPLOSION, SCALE_COLLAPSE, LOSS_BLOWUP, SLOW_DIVERGENCE,
 ACTIVATION_GROWTH) = range(7)  # fmt: skip
NAMES = (
    "nonfinite", "loss_spike", "grad_norm_explosion", "loss_scale_collapse", "loss_blowup",
    "slow_divergence", "activation_growth",
)  # fmt: skip
# When several fire, the anomaly is named after the first of these: the likeliest cause.
# A spike against an armed history says more than a loss above ln V, which names the
# blow-ups no history can see yet.
PRIORITY = (
    NONFINITE, SCALE_COLLAPSE, LOSS_SPIKE, LOSS_BLOWUP, GRAD_EXPLOSION, ACTIVATION_GROWTH,
    SLOW_DIVERGENCE,
)  # fmt: skip
# Divergences that skipping one step cannot help: their incidents start at a rollback rung.
GRADUAL = ("slow_divergence", "validation_regression")


@dataclass
class Anomaly:
    detector: str
    numbers: dict = field(default_factory=dict)
    since: int | None = None  # for gradual ones: the step the curve was last at its best

    @property
    def gradual(self) -> bool:
        return self.detector in GRADUAL

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
        if self.detector == "loss_blowup":
            return (
                f"loss {n['loss']:.4f} above {n['blowup_level']:.4f} (uniform prediction x factor)"
            )
        if self.detector == "activation_growth":
            return (
                f"last block's activation RMS {n['activation_rms']:.3g} vs median "
                f"{n['activation_rms_median']:.3g}"
            )
        if self.detector == "slow_divergence":
            return (
                f"median loss {n['trend_median']:.4f} over the last {n['trend_window']} steps, "
                f"above its best {n['trend_best']:.4f} (at step {n['trend_best_step']})"
            )
        if self.detector == "validation_regression":
            return (
                f"validation loss {n['val_loss']:.4f} above its best {n['val_best']:.4f} "
                f"(at step {n['val_best_step']})"
            )
        return f"loss {n['loss']}, grad norm {n['grad_norm']}"


class Detectors:
    """The per-step detectors; their history holds healthy steps only."""

    def __init__(self, cfg: SupervisorConfig, reference_loss: float | None = None):
        self.cfg = cfg
        self.reference_loss = reference_loss  # ln V: the loss of predicting uniformly
        self.losses: deque[float] = deque(maxlen=cfg.window)
        self.norms: deque[float] = deque(maxlen=cfg.window)
        self.steps: deque[int] = deque(maxlen=cfg.window)  # the step of each loss and norm
        self.activations: deque[float] = deque(maxlen=cfg.activation_window)
        self.activation_steps = 0  # measured healthy steps since the start or a rollback
        self.overflow_steps: deque[int] = deque()
        self.trend: deque[float] = deque(maxlen=cfg.trend_window)
        self.trend_best = math.inf
        self.trend_best_step = 0

    @property
    def armed(self) -> bool:
        return len(self.losses) >= self.cfg.min_steps

    @property
    def blowup_level(self) -> float:
        if self.reference_loss is None or self.cfg.blowup_factor <= 0:
            return math.inf
        return self.cfg.blowup_factor * self.reference_loss

    def flags(
        self, step: int, loss: float, grad_norm: float, overflow: bool, at_floor: bool,
        activation_rms: float = math.nan,
    ) -> list[float]:  # fmt: skip
        """1.0 for each detector that fires on this step (``activation_rms``: of the last
        block's output; NaN where the trainer measured none)."""
        cfg = self.cfg
        flags = [0.0] * len(NAMES)
        if not math.isfinite(loss) or (not math.isfinite(grad_norm) and not overflow):
            flags[NONFINITE] = 1.0
        if math.isfinite(loss) and loss > self.blowup_level:
            flags[LOSS_BLOWUP] = 1.0
        if overflow:
            self.overflow_steps.append(step)
        while self.overflow_steps and self.overflow_steps[0] <= step - cfg.window:
            self.overflow_steps.popleft()
        # The count is judged on an overflowing step: once the overflows stop, the clean
        # steps after them are healthy even while the old ones are still in the window.
        if at_floor or (overflow and len(self.overflow_steps) >= cfg.scale_collapses):
            flags[SCALE_COLLAPSE] = 1.0
        if self.armed and math.isfinite(loss):
            median = statistics.median(self.losses)
            if loss - median > max(cfg.spike_min_rise, cfg.spike_z * self._robust_std(self.losses)):
                flags[LOSS_SPIKE] = 1.0
        armed = len(self.norms) >= cfg.norm_min_steps and cfg.grad_norm_factor > 0
        explosive = armed and math.isfinite(grad_norm)  # a non-finite one is `nonfinite`
        if explosive and grad_norm > cfg.grad_norm_factor * statistics.median(self.norms):
            flags[GRAD_EXPLOSION] = 1.0
        if self._grown(activation_rms):
            flags[ACTIVATION_GROWTH] = 1.0
        if self._trend_rising():
            flags[SLOW_DIVERGENCE] = 1.0
        return flags

    def _grown(self, activation_rms: float) -> bool:
        factor = self.cfg.activation_factor
        # Armed after min_steps: the activations grow fast from their initialisation in
        # the first steps of healthy runs too (a blow-up there is the loss detectors' case).
        # Against the last few steps only: healthy runs grow them for thousands of steps,
        # several times over in a few dozen early on (BENCHMARKS.md, divergence suite).
        armed = factor > 0 and self.activation_steps >= self.cfg.min_steps
        return (
            armed and math.isfinite(activation_rms)
            and activation_rms > factor * statistics.median(self.activations)
        )  # fmt: skip

    def _trend_rising(self) -> bool:
        cfg = self.cfg
        if cfg.trend_rise <= 0 or len(self.trend) < cfg.trend_window:
            return False
        return statistics.median(self.trend) > self.trend_best * (1 + cfg.trend_rise)

    def describe(
        self, flags: list[float], loss: float, grad_norm: float, scale: float,
        activation_rms: float = math.nan,
    ) -> Anomaly:  # fmt: skip
        """The likeliest cause among the detectors that fired, with the numbers behind it."""
        name = NAMES[next(i for i in PRIORITY if flags[i] > 0)]
        numbers = {"loss": loss, "grad_norm": grad_norm, "loss_scale": scale}
        if math.isfinite(activation_rms):
            numbers["activation_rms"] = activation_rms
        if self.activations:
            numbers["activation_rms_median"] = statistics.median(self.activations)
        if self.losses:
            numbers["loss_median"] = statistics.median(self.losses)
            numbers["loss_robust_std"] = self._robust_std(self.losses)
        if self.norms:
            numbers["grad_norm_median"] = statistics.median(self.norms)
        numbers["overflows_in_window"] = len(self.overflow_steps)
        if math.isfinite(self.blowup_level):
            numbers["blowup_level"] = self.blowup_level
        since = None
        if flags[SLOW_DIVERGENCE]:
            numbers["trend_median"] = statistics.median(self.trend)
            numbers["trend_best"] = self.trend_best
            numbers["trend_best_step"] = self.trend_best_step
            numbers["trend_window"] = self.cfg.trend_window
            since = self.trend_best_step
        numbers["fired"] = [NAMES[i] for i, f in enumerate(flags) if f > 0]
        return Anomaly(name, numbers, since)

    def observe(
        self, step: int, loss: float, grad_norm: float, activation_rms: float = math.nan
    ) -> None:
        """Add a healthy step to the history (anomalous steps never enter it)."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return
        self.losses.append(loss)
        self.norms.append(grad_norm)
        self.steps.append(step)
        if math.isfinite(activation_rms):
            self.activations.append(activation_rms)
            self.activation_steps += 1
        self.trend.append(loss)
        if len(self.trend) == self.trend.maxlen:
            median = statistics.median(self.trend)
            if median < self.trend_best:
                self.trend_best, self.trend_best_step = median, step

    def restart(self) -> None:
        """After a rollback: the trend is judged afresh (its best is kept), and the
        activations' history, of steps now undone, is measured again."""
        self.trend.clear()
        self.activations.clear()
        self.activation_steps = 0

    def forget_after(self, step: int) -> None:
        """After a rollback to ``step``: the losses and norms of the steps undone leave the
        spike history, which then holds only what the restored weights had seen, and a trend
        best set by an undone step is no yardstick for the replay (a slow divergence is judged
        against the best the restored run reaches). (A
        rollback far back, to the weights a fine-tuning run started from, say, finds a loss
        level far from the undone steps': judged against them, every step would spike.)"""
        keep = [i for i, s in enumerate(self.steps) if s <= step]
        self.losses = deque((self.losses[i] for i in keep), maxlen=self.cfg.window)
        self.norms = deque((self.norms[i] for i in keep), maxlen=self.cfg.window)
        self.steps = deque((self.steps[i] for i in keep), maxlen=self.cfg.window)
        self.overflow_steps = deque(s for s in self.overflow_steps if s <= step)
        if self.trend_best_step > step:  # a best the restored weights never reached
            self.trend_best, self.trend_best_step = math.inf, 0

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
            "steps": list(self.steps),
            "activations": list(self.activations),
            "activation_steps": self.activation_steps,
            "overflows": list(self.overflow_steps),
            "trend": list(self.trend),
            "trend_best": self.trend_best,
            "trend_best_step": self.trend_best_step,
        }

    def load_state_dict(self, state: dict) -> None:
        self.losses = deque(state["losses"], maxlen=self.cfg.window)
        self.norms = deque(state["norms"], maxlen=self.cfg.window)
        # Checkpoints from before the steps were kept: -1 (before any step) keeps them all.
        steps = state.get("steps", [-1] * len(self.losses))
        self.steps = deque(steps, maxlen=self.cfg.window)
        self.overflow_steps = deque(state["overflows"])
        # Checkpoints written before a detector existed have none of its history.
        self.activations = deque(state.get("activations", []), maxlen=self.cfg.activation_window)
        self.activation_steps = int(state.get("activation_steps", len(self.activations)))
        self.trend = deque(state.get("trend", []), maxlen=self.cfg.trend_window)
        self.trend_best = float(state.get("trend_best", math.inf))
        self.trend_best_step = int(state.get("trend_best_step", 0))
