"""Where the model's matmuls and attention run: bf16 on CPUs without native bf16, and the
choice of SDPA kernel.

Under bf16 autocast, PyTorch runs CPU matmuls and attention with bf16 kernels. On CPUs
without bf16 instructions (no AVX-512 BF16, no AMX) those kernels are slow: on the 2-core
AVX2 machine of BENCHMARKS.md a bf16 ``F.linear`` reaches 19 GFLOP/s and a bf16 ``a @ b``
0.3, against 140-180 GFLOP/s in fp32, and bf16 SDPA is 5x slower than fp32.

``train.cpu_bf16_compute = "fp32"`` (what ``auto`` picks on such CPUs) computes those ops
from exact fp32 copies of their bf16-rounded operands with fp32 kernels, and rounds the
result to bf16. A bf16 GEMM accumulates in fp32 anyway, so the values are a bf16 GEMM's up
to summation order; inputs and outputs stay bf16, and everything outside these ops
(LayerNorm, softmax statistics, the loss, the optimizer) is as under plain autocast. Linears
save their bf16 inputs for backward, as a bf16 linear does, and an fp32 copy of each
bf16-rounded weight (twice a bf16 weight's bytes); attention saves the fp32 copies it ran
on, twice the bytes of bf16 (the activation model of `opt plan`, which is for GPUs, does
not count them). On GPUs and bf16-capable CPUs nothing changes.

The choice is made once per run (``cpu_bf16_via_fp32``) and applied by swapping the modules
below into the plain model (opt/parallel/compute.py): the blocks' linears, their attention
and the tied head. Each still computes natively outside CPU bf16 autocast, and for DTensor
operands, whose sharding propagation is left to PyTorch.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from opt.config import ATTENTION, CPU_BF16_COMPUTE
from opt.device import native_bf16_cpu
from opt.models.model import LMHead, ScaledDotProductAttention, cross_entropy


def cpu_bf16_via_fp32(device: torch.device, precision: str, cpu_bf16_compute: str) -> bool:
    """Whether a run's bf16 matmuls and attention compute from fp32 copies: bf16 training
    on a CPU, with ``train.cpu_bf16_compute`` fp32, or auto on a CPU without bf16 kernels."""
    if cpu_bf16_compute not in CPU_BF16_COMPUTE:
        raise ValueError(
            f"cpu_bf16_compute must be one of {CPU_BF16_COMPUTE}, got {cpu_bf16_compute!r}"
        )
    if precision != "bf16" or device.type != "cpu":
        return False
    return cpu_bf16_compute == "fp32" or (cpu_bf16_compute == "auto" and not native_bf16_cpu())


def _in_cpu_bf16_autocast() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def gemm(a: torch.Tensor, b: torch.Tensor, bf16_via_fp32: bool = False) -> torch.Tensor:
    """``a @ b`` in their common dtype, outside autocast; bf16 on a CPU from fp32 copies when
    ``bf16_via_fp32``."""
    if bf16_via_fp32 and a.dtype == torch.bfloat16 and a.device.type == "cpu":
        return (a.float() @ b.float()).to(torch.bfloat16)
    return a @ b


def _bf16_exact_fp32(t: torch.Tensor) -> torch.Tensor:
    """fp32 holding exactly the bf16-rounded values of ``t``."""
    return t.to(torch.bfloat16).float()


class _LinearViaFp32(torch.autograd.Function):
    """bf16 ``x @ w.T + b`` computed by fp32 kernels, gradients rounded to bf16 as autocast's
    would be. Saves the input in bf16 (a bf16 linear's activation memory) and the weight as
    the fp32 copy of its bf16 rounding, which backward multiplies by as it is: converting
    the weight again there was a third of the conversion traffic, and on a short sequence
    the weights, not the activations, are most of the bytes converted."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        x16, w32 = x.to(torch.bfloat16), _bf16_exact_fp32(weight)
        b32 = None if bias is None else _bf16_exact_fp32(bias)
        ctx.save_for_backward(x16, w32)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return F.linear(x16.float(), w32, b32).to(torch.bfloat16)

    @staticmethod
    def backward(ctx, grad):
        x16, w32 = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        g = _bf16_exact_fp32(grad)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ w32).to(torch.bfloat16).to(x_dtype)
        if ctx.needs_input_grad[1]:
            flat_g, flat_x = g.reshape(-1, g.shape[-1]), x16.reshape(-1, x16.shape[-1]).float()
            grad_w = (flat_g.T @ flat_x).to(torch.bfloat16).to(w_dtype)
        if b_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = g.reshape(-1, g.shape[-1]).sum(0).to(torch.bfloat16).to(b_dtype)
        return grad_x, grad_w, grad_b


def linear_via_fp32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """``F.linear``; under CPU bf16 autocast from fp32 copies (not for DTensor weights)."""
    if _in_cpu_bf16_autocast() and not isinstance(weight, DTensor):
        with torch.autocast("cpu", enabled=False):
            return _LinearViaFp32.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def attention_via_fp32(
    q, k, v, dropout_p: float, is_causal: bool = True, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal SDPA (or under ``mask``); under CPU bf16 autocast on exact fp32 copies, output
    rounded to bf16 (not for DTensor queries)."""
    kwargs = {"is_causal": is_causal} if mask is None else {"attn_mask": mask}
    if _in_cpu_bf16_autocast() and not isinstance(q, DTensor):
        with torch.autocast("cpu", enabled=False):
            q, k, v = (_bf16_exact_fp32(t) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, **kwargs)
            return y.to(torch.bfloat16)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, **kwargs)


class Bf16ViaFp32Linear(nn.Linear):
    """``nn.Linear`` (so tensor-parallel plans recognise it) computing bf16 from fp32 copies."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_via_fp32(x, self.weight, self.bias)


class Bf16ViaFp32Attention(ScaledDotProductAttention):
    def forward(self, q, k, v, dropout_p: float, mask: torch.Tensor | None = None) -> torch.Tensor:
        return attention_via_fp32(q, k, v, dropout_p, mask=mask)


class Bf16ViaFp32Head(LMHead):
    def forward(
        self, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        logits = linear_via_fp32(h, weight)  # (B, T, D) -> (B, T, V)
        return logits if targets is None else cross_entropy(logits, targets)


# Every choice of train.attention (opt.config.ATTENTION) but auto; a test holds them equal.
SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def attention_backend(name: str) -> contextlib.AbstractContextManager:
    """Restrict SDPA to one kernel (``train.attention``); ``auto`` lets PyTorch choose."""
    if name not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {name!r}")
    if name == "auto":
        return contextlib.nullcontext()
    return sdpa_kernel(SDPA_BACKENDS[name])
