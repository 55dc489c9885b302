"""FLOP accounting for MFU, and a measured matmul peak to divide by."""

from __future__ import annotations

import statistics
import time

import torch

from opt.models.kernels import gemm
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


def measure_matmul_peak(
    dtype: torch.dtype, device: torch.device, size: int = 2048, repeats: int = 5
) -> float:
    """Median FLOP/s of a square matmul: the achievable peak MFU is measured against. It goes
    through ``kernels.gemm``, so bf16 on a CPU without bf16 instructions is measured the way
    the model computes it under ``train.cpu_bf16_compute`` (native kernels or fp32 ones)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        gemm(a, b)
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times[1:])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
