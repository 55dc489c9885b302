"""Gradient bookkeeping across parallel layouts: the gradient layouts, the tied-embedding
sum between the first and last pipeline stage, the norm of a stage's gradients, clipping."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def align_grad_placements(params: list[torch.nn.Parameter]) -> None:
    """Give every DTensor gradient its parameter's layout. DTensor's embedding backward
    yields a replicated gradient for the vocab-sharded tied weight; slicing it to the shard
    is local (no communication) and keeps optimizer work and collectives shard-sized."""
    for param in params:
        grad = param.grad
        if isinstance(grad, DTensor) and grad.placements != param.placements:
            param.grad = grad.redistribute(param.device_mesh, param.placements)


def sync_tied_embedding_grads(params: list[torch.nn.Parameter], group) -> None:
    """Sum the first and last stage's gradients of the tied embedding (Megatron's embedding
    group): afterwards both copies take the same update and stay identical."""
    if group is None:
        return
    for param in params:
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        dist.all_reduce(_local(grad), group=group)
        param.grad = grad


@torch.no_grad()
def stage_grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """L2 norm of the gradients of this rank's pipeline stage(s), over every shard (a tensor:
    reading it is left to the step's one host synchronisation)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


@torch.no_grad()
def clip_grads_(params: list[torch.nn.Parameter], max_norm: float, total_norm: float) -> None:
    """Scale gradients by max_norm / total_norm when that is below 1 (as clip_grad_norm_)."""
    if not math.isfinite(total_norm) or max_norm <= 0:
        return
    coef = max_norm / (total_norm + 1e-6)
    if coef < 1.0:
        # A Python scalar, not a tensor: it multiplies plain and DTensor gradients alike.
        torch._foreach_mul_([p.grad for p in params if p.grad is not None], coef)
