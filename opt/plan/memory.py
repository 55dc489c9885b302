"""Per-GPU bytes of weights, gradients and AdamW state under a parallel layout, exactly.

The parameter list comes from the real model and the real pipeline split (built on the
meta device, so nothing is allocated); each tensor is then cut the way the parallel code
cuts it: the Megatron TP plan divides one dimension by tp (the table in
opt/parallel/tensor_parallel.py, which the plan is built from), and FSDP2 chunks dim 0 of
what is left over dp_shard, the first rank holding ceil(rows / dp_shard)
rows. The numbers are those of the first rank of each pipeline rank, the largest one, as
the dry run reports them; tests hold them equal to the dry run's sharded tensors.
"""

from __future__ import annotations

import dataclasses
import math
from functools import cache

import torch

from opt.models.model import OPTModel
from opt.models.sizes import ModelArgs
from opt.parallel.data_parallel import GRAD_BYTES, OPTIM_BYTES, PARAM_BYTES
from opt.parallel.pipeline import build_stage_model, split_layers, stage_costs, stage_ids
from opt.parallel.tensor_parallel import tp_shard_dim


def local_numel(name: str, shape: tuple[int, ...], tp: int, dp_shard: int) -> int:
    dims = list(shape)
    split = tp_shard_dim(name)
    if tp > 1 and split is not None:
        dims[split] //= tp
    if dp_shard > 1:
        dims[0] = math.ceil(dims[0] / dp_shard)
    return math.prod(dims)


@cache
def pipeline_parameters(
    args: ModelArgs, pp: int, stages_per_rank: int, seq_len: int
) -> tuple[tuple[tuple[str, tuple[int, ...]], ...], ...]:
    """(name, shape) of every parameter each pipeline rank holds, over its stages.

    Every block has the same parameters, so the stages are cut from a one-block model (the
    pipeline's own ``build_stage_model`` decides which ends a stage keeps) and each stage's
    blocks are added by name: copying a 100-layer model per stage took seconds a layout."""
    with torch.device("meta"):
        one = OPTModel(dataclasses.replace(args, n_layers=1))
    block = [(n.removeprefix("layers.0."), tuple(p.shape))
             for n, p in one.named_parameters() if n.startswith("layers.0.")]  # fmt: skip
    n_stages = pp * stages_per_rank
    if n_stages == 1:
        split = [range(args.n_layers)]
    else:
        split = split_layers(args.n_layers, n_stages, stage_costs(args, seq_len))
    ranks = []
    for pp_rank in range(pp):
        params = []
        for stage in stage_ids(pp_rank, pp, stages_per_rank):
            ends = build_stage_model(one, range(0), stage, n_stages)
            params += [(n, tuple(p.shape)) for n, p in ends.named_parameters()]
            params += [(f"layers.{i}.{n}", shape) for i in split[stage] for n, shape in block]
        ranks.append(tuple(params))
    return tuple(ranks)


def training_state_bytes(
    args: ModelArgs, tp: int, pp: int, dp_shard: int, stages_per_rank: int, seq_len: int
) -> list[dict[str, int]]:
    """Per pipeline rank: local parameters and the bytes of weights, gradients, AdamW."""
    result = []
    for params in pipeline_parameters(args, pp, stages_per_rank, seq_len):
        numel = sum(local_numel(name, shape, tp, dp_shard) for name, shape in params)
        result.append({
            "parameters": numel,
            "weights": numel * PARAM_BYTES,
            "gradients": numel * GRAD_BYTES,
            "optimizer": numel * OPTIM_BYTES,
        })  # fmt: skip
    return result
