"""`opt plan --calibrate`: what this machine achieves, stored for later estimates.

Two measurements: the matmul peak of the training dtype (bf16 on a GPU, fp32 on a CPU
without native bf16), and the model FLOP/s of real training steps of the chosen shape on
one device (forward, backward and AdamW on one micro-batch). The second is the figure
`opt plan` divides the work by: when the calibration was taken on the same accelerator
type as ``--gpu``, it replaces the default fraction of peak.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import statistics
import time
from pathlib import Path

import torch

from opt.errors import OptError
from opt.models.model import build_model
from opt.models.sizes import ModelArgs
from opt.plan.hardware import ACCELERATORS
from opt.train.flops import measure_matmul_peak, training_flops_per_token
from opt.train.optim import build_optimizer

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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_training_step(
    args: ModelArgs, seq_len: int, micro_batch: int, device: torch.device, steps: int = 3
) -> float:
    """Median model FLOP/s of ``steps`` training steps (after one warm-up)."""
    from opt.config import OptimConfig

    model = build_model(args, device)
    optimizer = build_optimizer(model, OptimConfig())
    dtype = torch.bfloat16 if device.type == "cuda" else None
    tokens = torch.randint(0, args.vocab_size, (micro_batch, seq_len + 1), device=device)
    times = []
    for _ in range(steps + 1):
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), tokens[:, 1:].flatten()
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - start)
    flops = training_flops_per_token(args, seq_len) * micro_batch * seq_len
    return flops / statistics.median(times[1:])


def calibrate(args: ModelArgs, model: str, seq_len: int, micro_batch: int, path: Path) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name, accelerator = accelerator_of(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = measure_matmul_peak(dtype, device, size=8192 if device.type == "cuda" else 2048)
    try:
        step = measure_training_step(args, seq_len, micro_batch, device)
    except torch.OutOfMemoryError:
        raise OptError(f"{model} does not fit on one {name} for calibration; "
                       "calibrate a smaller shape (e.g. --layers 2)") from None  # fmt: skip
    result = {
        "device": name,
        "accelerator": accelerator,
        "dtype": str(dtype).removeprefix("torch."),
        "matmul_peak_tflops": peak / 1e12,
        "model": model,
        "seq_len": seq_len,
        "micro_batch": micro_batch,
        "achieved_tflops": step / 1e12,
        "fraction_of_matmul_peak": step / peak,
        "measured_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if accelerator is not None:
        result["fraction_of_vendor_peak"] = step / 1e12 / ACCELERATORS[accelerator].peak_tflops
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)
    return result


def load_calibration(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise OptError(
            f"corrupt calibration file {path}; run `opt plan --calibrate` again"
        ) from None
