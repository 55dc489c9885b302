"""The FLOP model: what one token costs the model, from its shape alone.

One home for every user: MFU (model FLOPs per token, the trainer's metrics and the
benchmarks), the pipeline split (forward cost of the embedding, a block and the head),
`opt plan` (hardware FLOPs, activation recompute included) and `opt plan --calibrate`.

Conventions: 2 FLOPs per weight per token for every matmul, over the blocks, 350M's
projections and the tied output head; attention's QK^T and AV cost 2 * 2 * seq_len *
d_model per layer and token, counted in full (not halved for the causal mask), as in
Megatron's and PaLM's MFU formula; backward costs twice the forward. LayerNorm, softmax,
ReLU, dropout and the embedding lookup are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from opt.config import ACTIVATION_CHECKPOINT
from opt.errors import OptError
from opt.models.sizes import ModelArgs


def block_forward_flops_per_token(args: ModelArgs, seq_len: int) -> int:
    """One block's forward: q, k, v, out_proj, fc1 and fc2, and attention in full."""
    h, f = args.d_model, args.ffn_dim
    return 2 * (4 * h * h + 2 * h * f) + 2 * 2 * seq_len * h


def projection_forward_flops_per_token(args: ModelArgs) -> int:
    """One of 350M's embedding projections (project_in, project_out); 0 for the others."""
    return 2 * args.d_model * args.word_embed_dim if args.projects_embeddings else 0


def embedding_forward_flops_per_token(args: ModelArgs) -> int:
    """What the first pipeline stage computes before the blocks: 350M's project_in (the
    lookup itself is not a matmul)."""
    return projection_forward_flops_per_token(args)


def head_forward_flops_per_token(args: ModelArgs) -> int:
    """What the last pipeline stage computes after the blocks: 350M's project_out and the
    tied head's matmul."""
    return projection_forward_flops_per_token(args) + 2 * args.word_embed_dim * args.vocab_size


def forward_flops_per_token(args: ModelArgs, seq_len: int) -> int:
    return (
        embedding_forward_flops_per_token(args)
        + args.n_layers * block_forward_flops_per_token(args, seq_len)
        + head_forward_flops_per_token(args)
    )


def training_flops_per_token(args: ModelArgs, seq_len: int) -> int:
    """Model FLOPs of one training token (forward + backward = 3 x forward), no recompute:
    the numerator of MFU."""
    return 3 * forward_flops_per_token(args, seq_len)


@dataclass(frozen=True)
class TrainingFlops:
    model: float
    """Forward + backward, no recompute: ``training_flops_per_token``, the numerator of MFU."""
    hardware: float
    """Model FLOPs plus those of the forward work that checkpointing redoes in backward."""


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


def check_checkpoint_mode(checkpoint: str) -> None:
    """``checkpoint`` is one of parallel.activation_checkpoint's choices."""
    if checkpoint not in ACTIVATION_CHECKPOINT:
        choices = ", ".join(ACTIVATION_CHECKPOINT)
        raise OptError(f"checkpoint must be one of {choices}: {checkpoint!r}")
