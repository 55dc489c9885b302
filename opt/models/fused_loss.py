"""Cross-entropy of the tied output head without the whole batch's logits.

The plain path materialises (tokens x vocab) logits, their fp32 copy, the log-softmax and the
gradient: buffers of 103 MB each for 512 tokens of OPT's 50272-token vocabulary, 800 MB each
at 4096 tokens. Here the head and the loss run over chunks of ``chunk`` tokens. A chunk's
gradient (softmax minus one-hot, over the token count) is known in the forward pass, so the
forward also computes the chunk's share of the hidden-state and weight gradients and frees
its logits; backward only scales the two by the incoming gradient. The head's three GEMMs
(forward, grad-input, grad-weight) are those of the plain path, split by rows.

Numerics follow the plain path under autocast: logits in the autocast dtype, log-softmax in
fp32, the gradient GEMMs in the autocast dtype (in fp32 under fp16, whose unscaled
gradients would underflow), the weight gradient summed over chunks in fp32. Under
``bf16_via_fp32`` (opt/models/kernels.py) the bf16 GEMMs run as fp32 ones on exact copies.

``ChunkedLossHead`` is the tied head with this loss: a run swaps it in for the model's
``LMHead`` (opt/parallel/compute.py) where the whole head is on one rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from opt.models.kernels import gemm, linear_via_fp32
from opt.models.model import LMHead

IGNORE_INDEX = -100  # F.cross_entropy's default: a position whose target is not scored


def _autocast_dtype(device: torch.device) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return torch.float32


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, dtype: torch.dtype, via_fp32: bool):
        n = hidden.shape[0]
        grad_dtype = torch.float32 if dtype == torch.float16 else dtype
        w = weight.to(dtype)
        w_for_grad = w if grad_dtype == dtype else weight.to(grad_dtype)  # one 154 MB cast
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
        grad_weight = None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        rows = torch.arange(min(chunk, n), device=hidden.device)
        for start in range(0, n, chunk):
            h = hidden[start : start + chunk].to(dtype)
            h_for_grad = h if grad_dtype == dtype else hidden[start : start + chunk].to(grad_dtype)
            t = targets[start : start + chunk]
            logits = gemm(h, w.t(), via_fp32).float()  # (c, V)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            # d(mean loss)/d(logits) = (softmax - onehot) / n, built in place of the logits.
            grad_logits = logits.sub_(lse[:, None]).exp_()
            grad_logits[rows[: len(t)], t] -= 1.0
            g = grad_logits.div_(n).to(grad_dtype)
            grad_hidden[start : start + chunk] = gemm(g, w_for_grad, via_fp32)
            chunk_grad_weight = gemm(g.t(), h_for_grad, via_fp32)
            if grad_weight is None:  # no zero-filled buffer and no add for the first chunk
                grad_weight = chunk_grad_weight.float()
            else:
                grad_weight += chunk_grad_weight
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total / n

    @staticmethod
    def backward(ctx, grad):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        # In place: the weight gradient is vocab x d (154 MB at 125M); a scaled copy of it
        # cost 0.18 s a step on the benchmark CPU. Backward runs once, so nothing else reads it.
        return (
            grad_hidden.mul_(grad).to(hidden_dtype),
            grad_weight.mul_(grad).to(weight_dtype),
            None,
            None,
            None,
            None,
        )


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk: int,
    bf16_via_fp32: bool = False,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``: hidden (B, T, D),
    weight (V, D), targets (B, T) -> a scalar, as ``F.cross_entropy`` of the full logits,
    over the targets that are not ``IGNORE_INDEX``."""
    dtype = _autocast_dtype(hidden.device)
    hidden, targets = hidden.flatten(0, 1), targets.flatten()
    scored = targets != IGNORE_INDEX
    if not bool(scored.all()):
        # Fine-tuning scores the answers only: the other positions' rows never reach the
        # head (their hidden-state gradient is zero), which also saves their GEMMs.
        hidden, targets = hidden[scored], targets[scored]
    with torch.autocast(hidden.device.type, enabled=False):
        if not torch.is_grad_enabled():  # evaluation: the loss alone, no gradient buffers
            return _chunked_loss(hidden, weight, targets, chunk, dtype, bf16_via_fp32)
        return _ChunkedLinearCrossEntropy.apply(
            hidden, weight, targets, chunk, dtype, bf16_via_fp32
        )


def _chunked_loss(hidden, weight, targets, chunk: int, dtype: torch.dtype, via_fp32: bool):
    """The forward of ``_ChunkedLinearCrossEntropy`` without its gradients: the same
    logits and the same sums, chunk by chunk."""
    n = hidden.shape[0]
    w = weight.to(dtype)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, n, chunk):
        logits = gemm(hidden[start : start + chunk].to(dtype), w.t(), via_fp32).float()  # (c, V)
        t = targets[start : start + chunk]
        total += (torch.logsumexp(logits, dim=-1) - logits.gather(1, t[:, None]).squeeze(1)).sum()
    return total / n


class ChunkedLossHead(LMHead):
    """The tied head whose loss (forward with targets) runs over chunks of ``chunk`` tokens;
    without targets it returns the logits, as ``LMHead`` does."""

    def __init__(self, chunk: int, bf16_via_fp32: bool = False):
        super().__init__()
        if chunk < 1:
            raise ValueError(f"loss chunk must be at least 1 token, got {chunk}")
        self.chunk = chunk
        self.bf16_via_fp32 = bf16_via_fp32

    def forward(
        self, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        if targets is not None:
            return chunked_cross_entropy(h, weight, targets, self.chunk, self.bf16_via_fp32)
        return linear_via_fp32(h, weight) if self.bf16_via_fp32 else F.linear(h, weight)

    def extra_repr(self) -> str:
        return f"chunk={self.chunk}, bf16_via_fp32={self.bf16_via_fp32}"
