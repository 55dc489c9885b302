"""GPU-hours, energy and CO2e of a training process, for the logbook's run_stop events.

Energy is read from NVML's cumulative counter (nvidia-ml-py) on rank 0's GPU and scaled by
the number of ranks; without NVML it is the GPU type's TDP times the GPU-hours (an upper
bound). A CPU run records its hours but no energy: there is no meaningful TDP to use.
CO2e is energy x PUE x carbon intensity (``[logbook]`` settings).
"""

from __future__ import annotations

import time

import torch

from opt.device import accelerator_of
from opt.hardware import ACCELERATORS


def _nvml_energy_mj(device: torch.device) -> float | None:
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        return float(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))
    except pynvml.NVMLError:
        return None


class EnergyMeter:
    def __init__(self, device: torch.device, ranks: int, pue: float, carbon_kg_per_kwh: float):
        self.device, self.ranks = device, ranks
        self.pue, self.carbon = pue, carbon_kg_per_kwh
        name, accelerator = accelerator_of(device)
        self.gpu = name if device.type == "cuda" else None
        self.tdp = ACCELERATORS[accelerator].tdp_watts if accelerator else None
        self.started = time.monotonic()
        self.nvml_start = _nvml_energy_mj(device) if device.type == "cuda" else None

    def usage(self) -> dict:
        """What this process has used so far, as logbook fields."""
        hours = (time.monotonic() - self.started) / 3600
        if self.gpu is None:
            return {"gpu_hours": 0.0, "energy_kwh": None, "energy_source": "CPU run: not estimated"}
        gpu_hours = hours * self.ranks
        now = _nvml_energy_mj(self.device) if self.nvml_start is not None else None
        if now is not None:
            kwh = (now - self.nvml_start) / 3.6e9 * self.ranks
            source = "NVML on rank 0's GPU, times the ranks"
        elif self.tdp is not None:
            kwh, source = gpu_hours * self.tdp / 1000, f"TDP of {self.gpu} ({self.tdp:.0f} W)"
        else:
            return {"gpu_hours": round(gpu_hours, 4), "energy_kwh": None,
                    "energy_source": f"unknown GPU {self.gpu}, no NVML"}  # fmt: skip
        return {
            "gpu_hours": round(gpu_hours, 4),
            "energy_kwh": round(kwh, 4),
            "energy_source": source,
            "co2e_kg": round(kwh * self.pue * self.carbon, 4),
        }
