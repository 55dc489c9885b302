"""FLOP accounting for MFU."""

from __future__ import annotations

from opt.models.sizes import ModelArgs


def training_flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Model FLOPs of one training token (forward + backward = 3 x forward), no recompute.

    Matmuls: 2 FLOPs per weight per token in the forward, over the blocks, the projections
    of 350M and the tied output head. Attention: QK^T and AV cost 2 * 2 * seq_len * d_model
    per layer and token, counted in full as in Megatron's and PaLM's MFU formula.
    """
    d, ffn = args.d_model, args.ffn_dim
    block = 4 * d * d + 2 * d * ffn
    projections = 2 * d * args.word_embed_dim if args.projects_embeddings else 0
    head = args.word_embed_dim * args.vocab_size
    matmul = args.n_layers * block + projections + head
    attention = args.n_layers * 2 * seq_len * d
    return 3 * 2 * (matmul + attention)
