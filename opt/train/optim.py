"""AdamW with OPT's settings, and the warmup + linear-decay learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from opt.config import OptimConfig, ScheduleConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW; matrices and embeddings decay, biases and LayerNorm parameters do not.

    Excluding 1-D parameters from weight decay is the Megatron-LM convention: decaying a
    LayerNorm gain towards zero fights the normalisation it exists for.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=cfg.fused or None
    )


class LinearWarmupDecay:
    """LR at a step: linear warmup to the peak, then linear decay to min_lr_ratio * peak.

    A pure function of the step, so it needs no state of its own in a checkpoint; the
    supervisor's persistent LR factor multiplies its output instead of resetting it.
    """

    def __init__(self, peak_lr: float, cfg: ScheduleConfig, batch_tokens: int):
        self.peak_lr = peak_lr
        self.min_lr = peak_lr * cfg.min_lr_ratio
        self.warmup_steps = math.ceil(cfg.warmup_tokens / batch_tokens)
        self.decay_steps = max(math.ceil(cfg.decay_tokens / batch_tokens), self.warmup_steps + 1)

    def __call__(self, step: int) -> float:
        """LR for the update that takes the model from ``step`` to ``step + 1``."""
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        if step >= self.decay_steps:
            return self.min_lr
        progress = (step - self.warmup_steps) / (self.decay_steps - self.warmup_steps)
        return self.peak_lr - (self.peak_lr - self.min_lr) * progress
