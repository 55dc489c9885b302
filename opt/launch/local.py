"""`opt launch local`: N training processes on this machine through torch.distributed.run.

torchrun sets RANK/WORLD_SIZE/MASTER_ADDR for each process, prefixes every output line with
its rank, and when one process fails it stops the others and reports each failure with
its rank and (via ``@record`` on the entry point) its traceback.
"""

from __future__ import annotations

import sys

from opt.config import load_config
from opt.errors import OptError
from opt.job import check_job
from opt.launch.overrides import expand


def torchrun_args(nproc: int, config: str, overrides: list[str]) -> list[str]:
    if nproc < 1:
        raise OptError(f"--nproc must be at least 1, got {nproc}")
    return [
        "--standalone",  # a private rendezvous on a free local port
        f"--nproc-per-node={nproc}",
        "--max-restarts=0",  # restarts are the Slurm launcher's job, from a checkpoint
        "--tee=3",  # stdout and stderr of every rank, each line prefixed with the rank
        "-m",
        "opt",
        "train",
        config,
        *overrides,
    ]


def check_before_launch(nproc: int, config: str, overrides: list[str]) -> None:
    """Refuse a config or layout that cannot work before starting any process."""
    check_job(load_config(config, expand(overrides)), nproc)


def launch_local(nproc: int, config: str, overrides: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    check_before_launch(nproc, config, overrides)
    args = get_args_parser().parse_args(torchrun_args(nproc, config, overrides))
    try:
        run(args)
    except ChildFailedError as err:
        print(err.format_msg(), file=sys.stderr)  # each failed rank, exit code, traceback
        failed = ", ".join(str(rank) for rank in sorted(err.failures))
        print(f"error: training failed on rank(s) {failed}", file=sys.stderr)
        return 1
    return 0
