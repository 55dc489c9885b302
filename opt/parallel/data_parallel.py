"""Sharded data parallelism (FSDP2 ``fully_shard``: ZeRO-3, or HSDP on a 2-D mesh) and
activation checkpointing, both applied block by block from outside the model."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from opt.config import ParallelConfig
from opt.models.model import OPTModel

# The training state FSDP shards, in bytes per parameter: fp32 master weights and
# gradients; AdamW keeps two fp32 moments. (The dry run and `opt plan` count with these.)
PARAM_BYTES, GRAD_BYTES, OPTIM_BYTES = 4, 4, 8

# Selective recompute keeps what is expensive to recompute (matmuls, attention) and
# recomputes the cheap element-wise work (LayerNorm, ReLU, dropout, residual adds).
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: OPTModel, mode: str) -> None:
    """Wrap each block: ``full`` keeps only the block's input, ``selective`` also keeps the
    matmul and attention outputs. Dropout masks are replayed (the RNG state is saved)."""
    if mode == "none":
        return
    for layer_id, block in list(model.layers.items()):
        if mode == "full":
            wrapped = checkpoint_wrapper(block, preserve_rng_state=True)
        else:
            wrapped = checkpoint_wrapper(
                block,
                preserve_rng_state=True,
                context_fn=partial(create_selective_checkpoint_contexts, _selective_policy),
            )
        model.layers[layer_id] = wrapped


def fsdp_param_dtype(precision: str, par: ParallelConfig) -> torch.dtype | None:
    """The dtype FSDP gathers block parameters in, or None to gather the fp32 masters."""
    if precision == "bf16" and par.fsdp_mixed_precision:
        return torch.bfloat16
    return None


def apply_fsdp(
    model: OPTModel,
    dp_mesh: DeviceMesh,
    reshard_after_forward: bool,
    param_dtype: torch.dtype | None = None,
) -> None:
    """One FSDP unit per block, and the root (embeddings, final norm, tied head) as one.

    ``dp_mesh`` is 1-D for ZeRO-3 or (replicate, shard) for HSDP. With pipeline
    parallelism the blocks stay unsharded between the microbatches of a step
    (``reshard_after_forward=False``), trading memory for one all-gather per step.

    With ``param_dtype`` (bf16 training) the blocks gather their matmul weights and biases
    in that dtype, half the traffic and memory of fp32, and reduce gradients in fp32. Their
    LayerNorms are FSDP units of their own that stay fp32: autocast runs LayerNorm in fp32,
    and the CPU kernel refuses bf16 parameters on fp32 input. The blocks' inputs are not
    cast, so the residual stream stays fp32 as under plain autocast; the root (embeddings,
    final norm, head) keeps fp32 parameters, as autocast would use them.
    """
    shard = partial(fully_shard, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
    block_policy = MixedPrecisionPolicy()
    if param_dtype is not None:
        block_policy = MixedPrecisionPolicy(
            param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
    for block in model.layers.values():
        if param_dtype is not None:
            for norm in [m for m in block.modules() if isinstance(m, nn.LayerNorm)]:
                shard(norm)
        shard(block, mp_policy=block_policy)
    shard(model)
