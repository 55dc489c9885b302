"""Process-group setup: from torchrun's environment, or a fake group for a dry run."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from opt.errors import OptError

T = TypeVar("T")


def launched_world_size() -> int:
    """World size set by the launcher (torchrun, Slurm); 1 when started directly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(timeout_s: float, device_type: str) -> torch.device:
    """Join the job's process group (NCCL on GPU, gloo on CPU); returns this rank's device.

    The timeout bounds every collective: a rank that dies or hangs makes the others fail
    after ``timeout_s`` instead of waiting forever.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "RANK") if k not in os.environ]
        if missing:
            raise OptError(
                f"WORLD_SIZE={launched_world_size()} but {', '.join(missing)} not set; "
                "start multi-process runs with `opt launch local` or `opt launch slurm`"
            )
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return device


def init_fake(world_size: int, rank: int) -> None:
    """A process group that pretends to be ``rank`` of ``world_size``; collectives are
    no-ops. Enough to build meshes, shard parameters on meta and read their shapes."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def first_rank_then_all(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0, then on the others (for work that creates shared files, such
    as building the demo corpus). An error on rank 0 is raised on every rank, so nobody is
    left waiting at a barrier for a rank that has already failed."""
    rank, world = rank_and_world()
    if world == 1:
        return fn()
    error = [None]
    if rank == 0:
        try:
            result = fn()
        except OptError as err:
            error[0] = str(err)
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise OptError(error[0])
    return result if rank == 0 else fn()


def broadcast_object(value: T) -> T:
    """Rank 0's ``value`` on every rank (collective; the value itself without a group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
