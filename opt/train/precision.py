"""Mixed precision: autocast contexts and the dynamic fp16 loss scaler OPT trained with."""

from __future__ import annotations

import contextlib

import torch

from opt.config import LossScaleConfig

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """fp32 master weights always; bf16/fp16 only inside the forward pass."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


class DynamicLossScaler:
    """Scale the loss up so fp16 gradients don't underflow; back off on overflow.

    Halve on a step whose gradients overflow (the step is skipped), double after
    ``growth_interval`` clean steps, never below ``min_scale``. ``enabled=False`` (fp32,
    bf16) makes every method an identity so the trainer has one code path.
    """

    def __init__(self, cfg: LossScaleConfig, enabled: bool):
        self.enabled = enabled
        self.scale = cfg.init_scale if enabled else 1.0
        self.growth_interval = cfg.growth_interval
        self.min_scale = cfg.min_scale
        self.clean_steps = 0
        self.overflows = 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    @torch.no_grad()
    def unscale_(self, params: list[torch.Tensor]) -> None:
        if self.enabled:
            grads = [p.grad for p in params if p.grad is not None]
            torch._foreach_mul_(grads, 1.0 / self.scale)

    def update(self, overflow: bool) -> None:
        if not self.enabled:
            return
        if overflow:
            self.scale = max(self.scale / 2.0, self.min_scale)
            self.clean_steps = 0
            self.overflows += 1
            return
        self.clean_steps += 1
        if self.clean_steps % self.growth_interval == 0:
            self.scale *= 2.0

    @property
    def at_floor(self) -> bool:
        return self.enabled and self.scale <= self.min_scale

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps, "overflows": self.overflows}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
        self.overflows = int(state["overflows"])
