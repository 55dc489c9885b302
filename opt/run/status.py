"""``<run dir>/status.json``: where a run is, for launchers and `opt status`.

Rank 0 rewrites it after every step (temp file + rename, so a reader never sees half of
it). It is what a launcher reads after the training processes have gone: the last step
reached (what a failure lost) and how the run ended. A run killed with SIGKILL leaves
``state = "running"``, which is how a launcher tells a crash from a clean stop.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from opt.fsutil import atomic_write

STATUS_FILE = "status.json"

# Values of "state".
RUNNING = "running"
FINISHED = "finished"  # reached max_steps
STOPPED_ON_SIGNAL = "stopped_on_signal"  # a checkpoint is saved; requeue and resume
STOPPED_FOR_HUMAN = "stopped_for_human"  # the supervisor or a kill switch stopped it
STOPPED_STRAGGLER = "stopped_straggler"  # a checkpoint is saved; requeue without "hosts"
FAILED = "failed"  # an exception in training


@dataclass(frozen=True)
class Stop:
    """How a run that did not fail ended: the state status.json records, and why."""

    state: str  # FINISHED, STOPPED_ON_SIGNAL, STOPPED_FOR_HUMAN or STOPPED_STRAGGLER
    reason: str
    hosts: list[str] = field(default_factory=list)  # the hosts to leave out of the requeue
    ranks: list[int] = field(default_factory=list)  # ... and the ranks that ran there

    def fields(self) -> dict:
        """What status.json records of the stop beside its state."""
        named = {"hosts": self.hosts, "ranks": self.ranks} if self.hosts or self.ranks else {}
        return {"reason": self.reason, **named}

    @property
    def human_needed(self) -> bool:
        return self.state == STOPPED_FOR_HUMAN


def write_status(run_dir: str | Path, **fields) -> None:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / STATUS_FILE, json.dumps({"updated": time.time(), **fields}))


def read_status(run_dir: str | Path) -> dict:
    """The last status written, or {} when there is none (or it is unreadable)."""
    try:
        return json.loads((Path(run_dir) / STATUS_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
