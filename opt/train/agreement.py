"""One agreed vector per step: everything the ranks must decide on together.

After backward, every rank puts into one small tensor what only it may know: its share of
the step's loss and gradient norm, its sums over the last block's activations (the
supervisor's early warning, opt/train/activation_watch.py), whether it received the
scheduler's stop signal, and (on rank 0) whether the operator's STOP file or an
`opt intervene` request is there. One
all-reduce (SUM) and one copy to the host later, every rank holds the same bits: the same
loss and norm for the supervisor's detectors and the clipping, and the same flags, so every
rank takes the same branch. That is the step's only host synchronisation.

Shares are set so that the sum is the agreed value: the loss is held by the last pipeline
stage's first tensor-parallel rank of each data-parallel replica (the sum over replicas,
divided by their number, is the mean); the gradient norm, already reduced within a
pipeline stage, by one rank per stage: as itself without a pipeline, squared with one (the
square root of the sum is the norm over every stage). The activations' sum of squares and
element count are contributed by every rank that holds the last block: their ratio is the
mean square over the whole batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from opt.parallel.dims import ParallelDims
from opt.train.build import Placement


@dataclass(frozen=True)
class Agreed:
    loss: float
    grad_norm: float
    stop_signal: bool
    stop_file: bool
    intervention_waiting: bool
    activation_rms: float = math.nan  # the last block's output; NaN where nothing was seen


@dataclass(frozen=True)
class Shares:
    """Which of the step's values this rank contributes (see the module docstring)."""

    holds_loss: bool
    holds_norm: bool
    squared_norm: bool  # with pipeline stages: the norm's square is summed over them
    data_parallel: int

    @classmethod
    def of(cls, where: Placement, dims: ParallelDims, has_last_stage: bool) -> Shares:
        """This rank's shares, from its place in the layout."""
        pipelined = dims.pp > 1
        first_of_stage = (where.dp_rank, where.tp_rank) == (0, 0)
        return cls(
            holds_loss=has_last_stage and where.tp_rank == 0,
            holds_norm=first_of_stage if pipelined else where.rank == 0,
            squared_norm=pipelined,
            data_parallel=dims.dp,
        )


def agree(
    shares: Shares,
    loss: torch.Tensor,
    grad_norm: torch.Tensor,
    stop_signal: bool,
    stop_file: bool,
    intervention_waiting: bool,
    activations: tuple[torch.Tensor, float] | None = None,
) -> Agreed:
    """One all-reduce and one host copy: the step's agreed values (collective)."""
    device = loss.device
    zero = torch.zeros((), dtype=torch.float32, device=device)
    norm = grad_norm.detach().float().to(device)
    vector = torch.stack(
        [
            loss.detach().float().reshape(()) if shares.holds_loss else zero,
            (norm.square() if shares.squared_norm else norm) if shares.holds_norm else zero,
            torch.tensor(float(stop_signal), device=device),
            torch.tensor(float(stop_file), device=device),
            torch.tensor(float(intervention_waiting), device=device),
            activations[0].float().to(device).reshape(()) if activations else zero,
            torch.tensor(activations[1] if activations else 0.0, device=device),
        ]
    )
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(vector)
    if shares.squared_norm:
        vector[1] = vector[1].sqrt()
    loss_sum, norm_value, signal, stop, waiting, sum_sq, count = vector.tolist()
    rms = math.sqrt(sum_sq / count) if count > 0 else math.nan
    return Agreed(
        loss_sum / shares.data_parallel, norm_value, signal > 0, stop > 0, waiting > 0, rms
    )
