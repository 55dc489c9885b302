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
import statistics
import time
from pathlib import Path

import torch

from opt.config import OptimConfig
from opt.device import accelerator_of, measure_matmul_peak, synchronize
from opt.errors import OptError
from opt.fsutil import atomic_write
from opt.hardware import ACCELERATORS
from opt.models.flops import training_flops_per_token
from opt.models.model import build_model
from opt.models.sizes import ModelArgs
from opt.parallel.compute import use_sparse_embedding_grad
from opt.train.optim import build_optimizer


def measure_training_step(
    args: ModelArgs, seq_len: int, micro_batch: int, device: torch.device, steps: int = 3
) -> float:
    """Median model FLOP/s of ``steps`` training steps (after one warm-up)."""
    model = build_model(args, device)
    use_sparse_embedding_grad(model)  # as the trainer runs one device
    optimizer = build_optimizer(model, OptimConfig())
    dtype = torch.bfloat16 if device.type == "cuda" else None
    tokens = torch.randint(0, args.vocab_size, (micro_batch, seq_len + 1), device=device)
    times = []
    for _ in range(steps + 1):
        synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), tokens[:, 1:].flatten()
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
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
    atomic_write(path, json.dumps(result, indent=1))
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
