"""Per-GPU bytes of weights, gradients and AdamW state under a parallel layout, exactly.

The parameter list comes from the real model and the real pipeline split (built on the
meta device, so nothing is allocated); each tensor is then cut the way the parallel code
cuts it: the Megatron TP plan divides one dimension by tp (tensor_parallel.py), and FSDP2
chunks dim 0 of what is left over dp_shard, the first rank holding ceil(rows / dp_shard)
rows. The numbers are those of the first rank of each pipeline rank, the largest one, as
the dry run reports them; tests hold them equal to the dry run's sharded tensors.
"""

from __future__ import annotations

import math
from functools import cache

import torch

from opt.dry_run import GRAD_BYTES, OPTIM_BYTES, PARAM_BYTES
from opt.models.model import OPTModel
from opt.models.sizes import ModelArgs
from opt.parallel.pipeline import build_stage_model, split_layers, stage_costs, stage_ids

# Which dimension the TP plan splits: column-parallel weights (and biases) by output rows,
# row-parallel weights by input columns, the embedding by vocabulary. Others: replicated.
_TP_DIM = {
    "embed_tokens.weight": 0,
    "q_proj.weight": 0, "q_proj.bias": 0, "k_proj.weight": 0, "k_proj.bias": 0,
    "v_proj.weight": 0, "v_proj.bias": 0, "fc1.weight": 0, "fc1.bias": 0,
    "out_proj.weight": 1, "fc2.weight": 1,
}  # fmt: skip


def tp_dim(name: str) -> int | None:
    return _TP_DIM.get(".".join(name.split(".")[-2:]))


def local_numel(name: str, shape: tuple[int, ...], tp: int, dp_shard: int) -> int:
    dims = list(shape)
    split = tp_dim(name)
    if tp > 1 and split is not None:
        dims[split] //= tp
    if dp_shard > 1:
        dims[0] = math.ceil(dims[0] / dp_shard)
    return math.prod(dims)


@cache
def pipeline_parameters(
    args: ModelArgs, pp: int, stages_per_rank: int, seq_len: int
) -> tuple[tuple[tuple[str, tuple[int, ...]], ...], ...]:
    """(name, shape) of every parameter each pipeline rank holds, over its stages."""
    with torch.device("meta"):
        full = OPTModel(args)
    if pp == 1:
        return (tuple((n, tuple(p.shape)) for n, p in full.named_parameters()),)
    n_stages = pp * stages_per_rank
    split = split_layers(args.n_layers, n_stages, stage_costs(args, seq_len))
    ranks = []
    for pp_rank in range(pp):
        params = []
        for stage in stage_ids(pp_rank, pp, stages_per_rank):
            model = build_stage_model(full, split[stage], stage, n_stages)
            params += [(n, tuple(p.shape)) for n, p in model.named_parameters()]
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
