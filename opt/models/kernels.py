"""Where the model's matmuls and attention run: one switch for CPUs without native bf16.

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
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from opt.device import native_bf16_cpu

CPU_BF16_COMPUTE = ("auto", "native", "fp32")
_policy = {"cpu_bf16_compute": "auto"}


def set_cpu_bf16_compute(mode: str) -> None:
    """Process-wide, like ``torch.backends`` flags: the trainer sets it from its config."""
    if mode not in CPU_BF16_COMPUTE:
        raise ValueError(f"cpu_bf16_compute must be one of {CPU_BF16_COMPUTE}, got {mode!r}")
    _policy["cpu_bf16_compute"] = mode


def cpu_bf16_via_fp32_enabled(device: torch.device) -> bool:
    """Whether bf16 matmuls on ``device`` run as fp32 ones under the current policy."""
    mode = _policy["cpu_bf16_compute"]
    return device.type == "cpu" and (mode == "fp32" or (mode == "auto" and not native_bf16_cpu()))


def cpu_bf16_via_fp32() -> bool:
    """True when the current CPU autocast region should compute bf16 ops in fp32."""
    if not torch.is_autocast_enabled("cpu") or torch.get_autocast_dtype("cpu") != torch.bfloat16:
        return False
    return cpu_bf16_via_fp32_enabled(torch.device("cpu"))


def gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in their common dtype, outside autocast, bf16 on CPU following the policy."""
    if a.dtype == torch.bfloat16 and cpu_bf16_via_fp32_enabled(a.device):
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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    if cpu_bf16_via_fp32() and not _is_dtensor(weight):
        with torch.autocast("cpu", enabled=False):
            return _LinearViaFp32.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def attention(q, k, v, dropout_p: float, is_causal: bool = True) -> torch.Tensor:
    """Causal SDPA; under the fp32 policy on exact fp32 copies, output rounded to bf16."""
    if cpu_bf16_via_fp32() and not _is_dtensor(q):
        with torch.autocast("cpu", enabled=False):
            q, k, v = (_bf16_exact_fp32(t) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal)
            return y.to(torch.bfloat16)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal)


_SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def attention_backend(name: str) -> contextlib.AbstractContextManager:
    """Restrict SDPA to one kernel (``train.attention``); ``auto`` lets PyTorch choose."""
    if name == "auto":
        return contextlib.nullcontext()
    return sdpa_kernel(_SDPA_BACKENDS[name])


def _is_dtensor(t: torch.Tensor) -> bool:
    # Tensor-parallel weights are DTensors; their sharding propagation is left to PyTorch.
    return isinstance(t, DTensor)


class Linear(nn.Linear):
    """``nn.Linear`` (so tensor-parallel plans recognise it) that follows the policy above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
