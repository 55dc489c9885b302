"""The hang watchdog: a rank that makes no progress for ``resilience.hang_timeout_s``
writes its Python stacks to the run directory and exits with ``HANG_EXIT``.

A daemon thread per rank. The trainer calls ``beat(step)`` at every point of progress
(a step, a checkpoint save, an evaluation, a restore): two attribute stores, no I/O. The
thread looks every second or so; a main thread blocked in a collective (gloo or NCCL's
host-side wait) has released the GIL, so the thread runs and sees the silence.

When it fires it writes, atomically (temp file + rename),
``<run dir>/hangs/after_step_<step:08d>/rank<rank:05d>.txt``: a header (rank, host, pid,
world size, last completed step, seconds without progress, the Slurm job, the time, the
main thread's id as faulthandler prints it) and then every thread's stack
(``faulthandler.dump_traceback``). A rank that is stopped or stuck in native code writes
nothing, and its peers, waiting on it in a collective, write theirs: the launcher can
tell which ranks could not dump and take their stacks from outside (py-spy), then write
the file ``collected`` in the same directory. The watchdog waits for that file (one
newer than its own dump: a directory may hold an earlier incident at the same step) for
at most ``hang_grace_s``, then ends the process with ``os._exit(HANG_EXIT)``: no
finalizer, no collective, nothing left to hang on.
"""

from __future__ import annotations

import datetime as dt
import faulthandler
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from opt.fsutil import atomic_write

HANG_EXIT = 86  # `opt train`'s exit status when the watchdog ended a rank that hung
HANGS_DIR = "hangs"
COLLECTED = "collected"  # written by the launcher once it has every rank's stack
POLL_S = 0.5  # how often a rank that has dumped looks for COLLECTED


def hang_dir(run_dir: str | Path, step: int) -> Path:
    """Where the ranks that hung after ``step`` (their last completed one) write."""
    return Path(run_dir) / HANGS_DIR / f"after_step_{step:08d}"


def dump_path(run_dir: str | Path, step: int, rank: int) -> Path:
    return hang_dir(run_dir, step) / f"rank{rank:05d}.txt"


class Watchdog:
    def __init__(
        self, run_dir: str | Path, rank: int, world_size: int, timeout_s: float,
        grace_s: float,
    ):  # fmt: skip
        self.run_dir, self.rank, self.world_size = Path(run_dir), rank, world_size
        self.timeout_s, self.grace_s = timeout_s, grace_s
        self.step = 0  # the last step completed
        self.last = time.monotonic()  # when progress was last made
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="opt-hang-watchdog", daemon=True)

    def start(self, step: int) -> Watchdog:
        self.beat(step)
        self._thread.start()
        return self

    def beat(self, step: int) -> None:
        """Progress: ``step`` is the last step completed. Cheap enough to call anywhere."""
        self.step = step
        self.last = time.monotonic()

    def close(self) -> None:
        self._closed.set()
        if self._thread.is_alive():
            self._thread.join()

    def _watch(self) -> None:
        interval = min(1.0, self.timeout_s / 4)
        while not self._closed.wait(interval):
            idle = time.monotonic() - self.last
            if idle >= self.timeout_s:
                self._fire(self.step, idle)

    def _fire(self, step: int, idle: float) -> None:
        where = f"rank {self.rank} made no progress for {idle:.0f} s after step {step}"
        try:
            path = self.dump(step, idle)
        except OSError as err:  # the exit matters more than the dump: a hung job holds nodes
            print(f"hang: {where}; its stacks could not be written: {err}", file=sys.stderr,
                  flush=True)  # fmt: skip
            os._exit(HANG_EXIT)
        print(f"hang: {where}; stacks in {path}", file=sys.stderr, flush=True)
        collected = path.parent / COLLECTED
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline and not _newer(collected, path):
            time.sleep(POLL_S)
        os._exit(HANG_EXIT)

    def dump(self, step: int, idle: float) -> Path:
        """Write this rank's header and every thread's stack; returns the file."""
        header = [
            f"hang: no progress for {idle:.1f} s (resilience.hang_timeout_s = {self.timeout_s:g})",
            f"rank: {self.rank} of {self.world_size}",
            f"host: {socket.gethostname()}",
            f"pid: {os.getpid()}",
            f"last completed step: {step}",
            f"slurm job: {os.environ.get('SLURM_JOB_ID', '-')}",
            f"time: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}",
            # As faulthandler names threads below ("Thread 0x..."), to find the main one.
            f"main thread: {threading.main_thread().ident:#018x}",
            "",
        ]
        # faulthandler writes to a file descriptor; a scratch file, then one atomic write.
        with tempfile.TemporaryFile() as scratch:
            faulthandler.dump_traceback(scratch, all_threads=True)
            scratch.seek(0)
            stacks = scratch.read()
        path = dump_path(self.run_dir, step, self.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write(path, "\n".join(header).encode() + b"\n" + stacks)


def _newer(marker: Path, than: Path) -> bool:
    try:
        return marker.stat().st_mtime_ns >= than.stat().st_mtime_ns
    except OSError:
        return False
