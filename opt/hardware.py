"""The accelerators `opt plan` knows: dense bf16 peak, memory, links and power.

Peaks are the vendors' dense (no sparsity) bf16 tensor-core figures for the SXM parts;
links are per GPU and per direction. ``achieved`` is the fraction of peak that large
bf16 matmuls reach in training (OPT-175B: 147 of 312 TFLOP/s on A100 = 0.47); `opt plan
--calibrate` replaces it with a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from opt.errors import OptError

# Where `opt plan --calibrate` stores what this machine measured. Defined here, not in
# calibrate.py, so that building the CLI's parser does not import torch.
DEFAULT_FILE = Path.home() / ".cache" / "opt" / "plan-calibration.json"

GiB = 2**30


@dataclass(frozen=True)
class Accelerator:
    name: str
    peak_tflops: float  # dense bf16
    memory_bytes: int
    nvlink_gbps: float  # GB/s per GPU within a node
    network_gbps: float  # GB/s per GPU between nodes (InfiniBand)
    tdp_watts: float
    achieved: float = 0.47  # fraction of peak reached by training matmuls


ACCELERATORS = {
    a.name: a
    for a in (
        Accelerator("a100-40gb", 312.0, 40 * GiB, 300.0, 25.0, 400.0),
        Accelerator("a100-80gb", 312.0, 80 * GiB, 300.0, 25.0, 400.0),
        Accelerator("h100-80gb", 989.0, 80 * GiB, 450.0, 50.0, 700.0, achieved=0.45),
        Accelerator("h200", 989.0, 141 * 10**9, 450.0, 50.0, 700.0, achieved=0.45),
    )
}


def get_accelerator(name: str) -> Accelerator:
    if name not in ACCELERATORS:
        raise OptError(f"unknown --gpu {name!r}; known: {', '.join(ACCELERATORS)}")
    return ACCELERATORS[name]
