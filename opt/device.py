"""What this process runs on: its accelerator type, whether its CPU has bf16 instructions,
and a measured matmul peak to divide MFU by. (The accelerator table is opt/hardware.py,
which does not import torch, so that the CLI starts fast.)"""

from __future__ import annotations

import statistics
import time

import torch

# Substrings of torch.cuda.get_device_name() that identify our accelerator types.
DEVICE_NAMES = {"h200": "h200", "h100": "h100-80gb", "a100-sxm4-80gb": "a100-80gb",
                "a100 80gb": "a100-80gb", "a100-sxm4-40gb": "a100-40gb"}  # fmt: skip


def accelerator_of(device: torch.device) -> tuple[str, str | None]:
    """(the device's own name, our accelerator type or None)."""
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    lowered = name.lower()
    return name, next((ours for key, ours in DEVICE_NAMES.items() if key in lowered), None)


def native_bf16_cpu() -> bool:
    """Whether this CPU has bf16 matmul instructions (AVX-512 BF16 or AMX)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(
    dtype: torch.dtype,
    device: torch.device,
    size: int = 2048,
    repeats: int = 5,
    bf16_via_fp32: bool = False,
) -> float:
    """Median FLOP/s of a square matmul: the achievable peak MFU is measured against.

    ``bf16_via_fp32`` times bf16 the way the model computes it on a CPU without bf16
    instructions (exact fp32 copies, fp32 kernel, result rounded to bf16; see
    opt/models/kernels.py). The operands come from a private generator: this runs after a
    resume has restored the global RNG, and drawing from that stream would shift every
    dropout mask after it (a resumed run would no longer equal an uninterrupted one).
    """
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=generator).to(dtype)
    b = torch.randn(size, size, device=device, generator=generator).to(dtype)
    via_fp32 = bf16_via_fp32 and dtype == torch.bfloat16

    def matmul() -> torch.Tensor:
        return (a.float() @ b.float()).to(dtype) if via_fp32 else a @ b

    times = []
    for _ in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        matmul()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times[1:])


def mfu_peak(dtype: torch.dtype, device: torch.device, bf16_via_fp32: bool = False) -> float:
    """FLOP/s to divide MFU by: on a GPU of a known type training in 16-bit, its datasheet
    dense peak, as OPT, Megatron-LM and torchtitan quote MFU; elsewhere (CPUs, unknown GPUs,
    fp32) a matmul measured here, since no datasheet figure applies."""
    from opt.hardware import ACCELERATORS

    _, accelerator = accelerator_of(device)
    if accelerator is not None and dtype in (torch.bfloat16, torch.float16):
        return ACCELERATORS[accelerator].peak_tflops * 1e12
    return measure_matmul_peak(dtype, device, bf16_via_fp32=bf16_via_fp32)
