"""Pipeline parallelism: a balanced split of the model into stages, each stage the model
with the other stages' layers removed, run by a torch.distributed.pipelining schedule."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import cache

import torch
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)

from opt.config import PP_SCHEDULES
from opt.errors import OptError
from opt.models.flops import (
    block_forward_flops_per_token,
    embedding_forward_flops_per_token,
    head_forward_flops_per_token,
)
from opt.models.model import OPTModel
from opt.models.sizes import ModelArgs


@dataclass(frozen=True)
class StageCosts:
    """Forward FLOPs per token of each piece: what a stage's time is proportional to."""

    embedding: float
    layer: float
    head: float


def stage_costs(args: ModelArgs, seq_len: int) -> StageCosts:
    # The lookup is almost free; its backward scatter-adds a D-vector per token.
    lookup = 2 * args.word_embed_dim
    return StageCosts(
        embedding=lookup + embedding_forward_flops_per_token(args),
        layer=block_forward_flops_per_token(args, seq_len),
        head=head_forward_flops_per_token(args),
    )


def split_layers(n_layers: int, n_stages: int, costs: StageCosts) -> list[range]:
    """Contiguous layer ranges, one per stage, minimising the most expensive stage; the
    first stage also pays for the embedding and the last for the head. Every stage gets at
    least one layer."""
    return list(_split_layers(n_layers, n_stages, costs))


@cache  # `opt plan` asks for the same split for every layout with the same pipeline
def _split_layers(n_layers: int, n_stages: int, costs: StageCosts) -> tuple[range, ...]:
    if n_layers < n_stages:
        raise OptError(
            f"{n_stages} pipeline stages need at least {n_stages} layers, the model has {n_layers}"
        )

    def cost(stage: int, lo: int, hi: int) -> float:
        extra = (costs.embedding if stage == 0 else 0.0) + (
            costs.head if stage == n_stages - 1 else 0.0
        )
        return (hi - lo) * costs.layer + extra

    # best[s][i]: the smallest max-stage-cost of putting layers [0, i) into stages [0, s).
    inf = float("inf")
    best = [[inf] * (n_layers + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n_layers + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, n_stages + 1):
        for i in range(s, n_layers - (n_stages - s) + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], cost(s - 1, j, i))
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    bounds, i = [], n_layers
    for s in range(n_stages, 0, -1):
        bounds.append(range(cut[s][i], i))
        i = cut[s][i]
    return tuple(bounds[::-1])


def stage_ids(pp_rank: int, pp: int, stages_per_rank: int) -> list[int]:
    """Looped assignment: rank r runs stages r, r + pp, r + 2pp, ... (interleaved 1F1B)."""
    return [pp_rank + v * pp for v in range(stages_per_rank)]


def build_stage_model(full: OPTModel, layers: range, stage: int, n_stages: int) -> OPTModel:
    """A copy of ``full`` (on meta) keeping only this stage's layers and ends: a stage
    without ``lm_head`` returns hidden states.

    The last stage keeps its own ``embed_tokens`` for the tied head; its gradient is summed
    with the first stage's copy every step, so the two copies stay identical.
    """
    model = copy.deepcopy(full)
    for layer_id in list(model.layers):
        if int(layer_id) not in layers:
            del model.layers[layer_id]
    first, last = stage == 0, stage == n_stages - 1
    if not first:
        model.embed_positions = None
        model.project_in = None
        if not last:
            model.embed_tokens = None
    if not last:
        model.final_norm = None
        model.project_out = None
        model.lm_head = None
    return model


# One per choice of parallel.pp_schedule (opt.config.PP_SCHEDULES); a test holds them equal.
SCHEDULES = {
    "1f1b": Schedule1F1B,
    "gpipe": ScheduleGPipe,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
}


def build_schedule(
    stage_models: list[torch.nn.Module],
    stage_indices: list[int],
    n_stages: int,
    device: torch.device,
    pp_group,
    schedule: str,
    n_microbatches: int,
    loss_fn,
):
    stages = [
        PipelineStage(model, index, n_stages, device, group=pp_group)
        for model, index in zip(stage_models, stage_indices, strict=True)
    ]
    if schedule not in PP_SCHEDULES:
        raise ValueError(f"pipeline schedule must be one of {PP_SCHEDULES}, got {schedule!r}")
    cls = SCHEDULES[schedule]
    # Gradients are averaged over microbatches (scale_grads), as gradient accumulation does.
    if schedule == "interleaved_1f1b":
        return cls(stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=True)
    (stage,) = stages
    return cls(stage, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=True)
