"""The stacks of training ranks that cannot write their own, taken from outside with py-spy.

A hung rank's own watchdog (opt/run/watchdog.py) writes its Python stack only while the
process can still run Python: a process stopped by a signal, or stuck in C code holding the
GIL, writes nothing. Its peers' watchdogs do write theirs (they wait in a collective, which
releases the GIL), and the allocation driver, seeing their dumps, runs this module on the
node of each rank that wrote none, as a step that overlaps the training step::

    srun --overlap --jobid JOB -N 1 -n 1 -w NODE python -m opt.launch.stack_dump DIR JOB RANKS

It finds the job's training processes on this node by their Slurm variables and writes
``DIR/rank<R>.py-spy.txt`` for each rank in RANKS (beside, never over, a dump the rank may
write itself later: Slurm sends SIGCONT before it ends a step, which wakes a stopped rank): the process's state (``T (stopped)``, say) and
py-spy's dump, read without stopping or attaching to the process (``--nonblocking``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from opt.fsutil import atomic_write


def rank_processes(job_id: str, node: str) -> dict[int, int]:
    """{rank: pid} of job ``job_id``'s `opt train` processes on ``node``."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = dict(
                item.split(b"=", 1) for item in (proc / "environ").read_bytes().split(b"\0")
                if b"=" in item
            )  # fmt: skip
        except OSError:
            continue
        if b"opt" not in cmdline or b"train" not in cmdline:
            continue
        if environ.get(b"SLURM_JOB_ID") != job_id.encode():
            continue
        if environ.get(b"SLURMD_NODENAME", b"").decode() != node or b"SLURM_PROCID" not in environ:
            continue
        found[int(environ[b"SLURM_PROCID"])] = int(proc.name)
    return found


def _py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"  # the venv's, when it is not on PATH
    return str(beside) if beside.is_file() else shutil.which("py-spy")


def _state(pid: int) -> str:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("State:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "gone"


def dump(directory: Path, job_id: str, ranks: list[int]) -> list[int]:
    """Write the stacks of ``ranks`` found on this node; returns the ranks written."""
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    processes = rank_processes(job_id, node)
    py_spy = _py_spy()
    written = []
    for rank in ranks:
        pid = processes.get(rank)
        if pid is None:
            continue
        header = (f"rank {rank} on {node}, pid {pid}, process state {_state(pid)}\n"
                  "its own watchdog wrote nothing: stack taken from outside by py-spy\n\n")  # fmt: skip
        if py_spy is None:
            body = "py-spy is not installed (pip install py-spy): no stack\n"
        else:
            result = subprocess.run([py_spy, "dump", "--nonblocking", "--pid", str(pid)],
                                    capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
            body = result.stdout or f"py-spy failed: {result.stderr.strip()}\n"
        atomic_write(directory / f"rank{rank:05d}.py-spy.txt", header + body)
        written.append(rank)
    return written


def main(argv: list[str]) -> int:
    directory, job_id, ranks = Path(argv[0]), argv[1], [int(r) for r in argv[2].split(",")]
    written = dump(directory, job_id, ranks)
    print(f"stack_dump: wrote rank(s) {written or 'none'} on {socket.gethostname()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
