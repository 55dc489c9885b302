"""Training FLOPs with activation recompute: model FLOPs (what MFU divides by) and hardware
FLOPs (what the accelerator executes, recompute included)."""

from __future__ import annotations

from dataclasses import dataclass

from opt.models.sizes import ModelArgs
from opt.plan.activations import check_checkpoint_mode
from opt.train.flops import training_flops_per_token


@dataclass(frozen=True)
class TrainingFlops:
    model: float
    """Forward + backward, no recompute: opt.train.flops' count, the numerator of MFU."""
    hardware: float
    """Model FLOPs plus those of the forward work that checkpointing redoes in backward."""


def block_forward_flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """One block's forward per token: its matmuls, and QK^T and AV counted in full (not
    halved for the causal mask), the convention of training_flops_per_token."""
    h, f = args.d_model, args.ffn_dim
    return 2 * (4 * h * h + 2 * h * f) + 2 * 2 * seq_len * h


def training_flops(args: ModelArgs, seq_len: int, tokens: int, checkpoint: str) -> TrainingFlops:
    """FLOPs of training on ``tokens`` tokens with the given activation checkpointing.

    ``full`` reruns each block's forward in backward (embedding and head are not wrapped),
    up to the last tensor backward needs: non-reentrant checkpointing stops there. In a
    pre-LN block without dropout that is fc2's input, so fc2 itself is not rerun; dropout's
    mask or post-LN's final LayerNorm need fc2's output. ``selective`` keeps the outputs of
    every matmul and of attention and reruns only LayerNorm, ReLU, dropout and the adds:
    element-wise work, no matmul FLOPs. Not counted either way: the QK^T that the
    flash-attention backward kernel recomputes by design.
    """
    check_checkpoint_mode(checkpoint)
    model = training_flops_per_token(args, seq_len) * tokens
    recompute = 0.0
    if checkpoint == "full":
        per_block = block_forward_flops_per_token(args, seq_len)
        if args.pre_norm and args.dropout == 0:
            per_block -= 2 * args.d_model * args.ffn_dim  # fc2, past the early stop
        recompute = args.n_layers * per_block * tokens
    return TrainingFlops(model=model, hardware=model + recompute)
