"""Stopping every rank at the same step boundary when the scheduler warns of the end.

Slurm sends its warning signal (USR1/USR2, ``--signal``) some minutes before a time limit
or a preemption, to the tasks of the job step. A handler only records it; every step the
training loop shares whether this rank has seen it in the step's agreed vector
(opt/train/agreement.py), so ranks that got the signal at slightly different moments, or
not at all, still stop after the same step and take part in the same synchronous
checkpoint.

The launcher names the signals in ``OPT_STOP_SIGNALS`` (e.g. ``USR2,TERM``); without it no
handler is installed and signals keep their default behaviour.
"""

from __future__ import annotations

import os
import signal

ENV = "OPT_STOP_SIGNALS"


class StopOnSignal:
    def __init__(self, names: list[str]):
        self.received: str | None = None  # the first signal seen by this rank
        self.signals = [getattr(signal, f"SIG{name.strip().upper()}") for name in names]
        for sig in self.signals:
            signal.signal(sig, self._record)

    @classmethod
    def from_environment(cls) -> StopOnSignal | None:
        names = [n for n in os.environ.get(ENV, "").split(",") if n.strip()]
        return cls(names) if names else None

    def _record(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            print(f"received {self.received}: stopping after this step", flush=True)

    def restore_defaults(self) -> None:
        for sig in self.signals:
            signal.signal(sig, signal.SIG_DFL)
