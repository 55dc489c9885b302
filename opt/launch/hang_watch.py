"""The allocation driver's side of a hang: complete the stacks, then name the hung ranks.

When a rank makes no progress for ``resilience.hang_timeout_s``, every rank whose Python
can still run writes its own stack under ``<run dir>/hangs/after_step_<N>/`` and waits
(opt/run/watchdog.py). The driver watches that directory while the training step runs. On
the first dump it gives the other ranks a moment to write theirs; the ranks that wrote
none are the hung ones (stopped, or stuck without the GIL), and their stacks are taken from
outside on their nodes (opt/launch/stack_dump.py, an overlapping srun step). The driver then
writes ``collected``, on which the waiting ranks exit with the watchdog's status, srun's
--kill-on-bad-exit ends the step, and the driver requeues the job as a hang of those ranks'
hosts.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from opt.run.watchdog import COLLECTED, HANGS_DIR  # the ranks' side of the protocol

PEERS_GRACE_S = 5.0  # for the other waiting ranks' own dumps, which fire about together
POLL_S = 1.0


@dataclass
class Hang:
    directory: Path
    after_step: int
    dumped: list[int]  # ranks that wrote their own stack (they were waiting)
    hung: list[int]  # ranks that wrote none: the ones that stopped making progress
    hosts: list[str]  # the hung ranks' hosts


def rank_hosts(hosts: list[str], tasks_per_node: int, world: int) -> list[str]:
    """Each rank's host under srun's default block distribution."""
    return [hosts[rank // tasks_per_node] for rank in range(world)]


class HangWatch:
    """A thread that watches one training step's run directory for hang dumps."""

    def __init__(self, run_dir: Path, job_id: str, hosts: list[str], tasks_per_node: int,
                 world: int):  # fmt: skip
        self.root = run_dir / HANGS_DIR
        self.job_id, self.world = job_id, world
        self.host_of = rank_hosts(hosts, tasks_per_node, world)
        self.before = set(self._dirs())  # hangs of earlier allocations are not this one's
        self.hang: Hang | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hang-watch", daemon=True)

    def __enter__(self) -> HangWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join(timeout=120)

    def _dirs(self) -> list[Path]:
        return sorted(self.root.glob("after_step_*")) if self.root.is_dir() else []

    def _watch(self) -> None:
        while not self._done.wait(POLL_S):
            if any(d not in self.before for d in self._dirs()):
                self.hang = self._collect()
                return

    def _collect(self) -> Hang:
        """After the peers' grace: the ranks that dumped (a rank stuck after finishing step
        N names its directory N, its peers may already be at N+1), the stacks of the others
        taken from outside into the first directory, and ``collected`` in every one."""
        time.sleep(PEERS_GRACE_S)
        directories = [d for d in self._dirs() if d not in self.before]
        directory = directories[0]
        dumped = sorted(int(m.group(1)) for d in directories for p in d.iterdir()
                        if (m := re.fullmatch(r"rank(\d+)\.txt", p.name)))  # fmt: skip
        hung = [rank for rank in range(self.world) if rank not in dumped]
        print(f"driver: hang after {directory.name}: rank(s) {hung or 'none'} wrote no stack; "
              "taking them from outside", flush=True)  # fmt: skip
        for host in sorted({self.host_of[r] for r in hung}):
            ranks = ",".join(str(r) for r in hung if self.host_of[r] == host)
            command = ["srun", "--overlap", f"--jobid={self.job_id}", "--nodes=1", "--ntasks=1",
                       f"--nodelist={host}", sys.executable, "-m", "opt.launch.stack_dump",
                       str(directory), self.job_id, ranks]  # fmt: skip
            try:
                subprocess.run(command, timeout=90, check=False)
            except (OSError, subprocess.TimeoutExpired) as err:
                print(f"driver: could not take stacks on {host}: {err}", flush=True)
        for each in directories:
            (each / COLLECTED).touch()
        return Hang(directory, int(directory.name.rsplit("_", 1)[1]), dumped, hung,
                    sorted({self.host_of[r] for r in hung}))  # fmt: skip
