"""The accelerators `opt plan` knows: dense bf16 peak, memory, links and power.

Peaks are the vendors' dense (no sparsity) bf16 tensor-core figures for the SXM parts;
links are per GPU and per direction. What fraction of the peak training reaches is not a
property of the card alone: `opt plan`'s time model fits it on published runs
(opt/plan/timing.py), and `opt plan --calibrate` measures it.
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


ACCELERATORS = {
    a.name: a
    for a in (
        Accelerator("a100-40gb", 312.0, 40 * GiB, 300.0, 25.0, 400.0),
        Accelerator("a100-80gb", 312.0, 80 * GiB, 300.0, 25.0, 400.0),
        Accelerator("h100-80gb", 989.0, 80 * GiB, 450.0, 50.0, 700.0),
        Accelerator("h200", 989.0, 141 * 10**9, 450.0, 50.0, 700.0),
    )
}


def get_accelerator(name: str) -> Accelerator:
    if name not in ACCELERATORS:
        raise OptError(f"unknown --gpu {name!r}; known: {', '.join(ACCELERATORS)}")
    return ACCELERATORS[name]
