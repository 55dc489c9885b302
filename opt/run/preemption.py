"""Stopping every rank at the same step boundary when the scheduler warns of the end.

Slurm sends its warning signal (USR1/USR2, ``--signal``) some minutes before a time limit
or a preemption, to the tasks of the job step. A handler only records it; the training loop
asks after every step whether *any* rank has seen it (one all-reduce of a flag), so ranks
that got the signal at slightly different moments, or not at all, still stop after the
same step and take part in the same synchronous checkpoint.

The launcher names the signals in ``OPT_STOP_SIGNALS`` (e.g. ``USR2,TERM``); without it no
handler is installed and signals keep their default behaviour.
"""

from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist

ENV = "OPT_STOP_SIGNALS"


class StopOnSignal:
    def __init__(self, names: list[str], device: torch.device):
        self.device = device
        self.received: str | None = None  # the first signal seen by this rank
        self.signals = [getattr(signal, f"SIG{name.strip().upper()}") for name in names]
        for sig in self.signals:
            signal.signal(sig, self._record)

    @classmethod
    def from_environment(cls, device: torch.device) -> StopOnSignal | None:
        names = [n for n in os.environ.get(ENV, "").split(",") if n.strip()]
        return cls(names, device) if names else None

    def _record(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            print(f"received {self.received}: stopping after this step", flush=True)

    def agreed(self) -> str | None:
        """The signal any rank received (collective: every rank must call it each step)."""
        flag = torch.tensor([1 if self.received else 0], device=self.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not int(flag):
            return None
        return self.received or "a peer's signal"

    def restore_defaults(self) -> None:
        for sig in self.signals:
            signal.signal(sig, signal.SIG_DFL)
