"""Choosing the checkpoint to resume from: the newest one that proves complete.

"Complete" means every file its manifest lists is present with the recorded size and
SHA-256, never "the newest directory". Hashing a 175B checkpoint (2+ TB) on one rank would
take an hour, so the ranks of the job split the files between them and agree on the
verdict. A checkpoint that fails is renamed ``step_N.corrupt`` (kept as evidence, never
pruned or picked again) and the previous one is tried.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from opt.checkpoint import manifest
from opt.checkpoint.checkpointer import list_checkpoints
from opt.dist import barrier, rank_and_world
from opt.errors import OptError

CORRUPT_SUFFIX = ".corrupt"


def verify_together(path: Path) -> str | None:
    """Verify ``path`` with the hashing split across ranks (collective); returns the first
    problem any rank found, or None when the checkpoint is complete."""
    rank, world = rank_and_world()
    try:
        names = sorted(manifest.read_manifest(path)["files"])
        manifest.verify_checkpoint(path, hash_only=set(names[rank::world]))
        problem = None
    except OptError as err:
        problem = str(err)
    if world == 1:
        return problem
    problems: list[str | None] = [None] * world
    dist.all_gather_object(problems, problem)
    return next((p for p in problems if p is not None), None)


def newest_complete_checkpoint(
    root: str | Path, on_skip: Callable[[Path, str], None] | None = None
) -> Path | None:
    """The newest checkpoint under ``root`` that verifies (collective). Each one that does
    not is reported to ``on_skip(path, problem)`` on rank 0 and set aside. None when there
    are no checkpoints; an error when there were some but none is complete, because
    silently starting over would throw the run away."""
    root = Path(root)
    problems = []
    for path in reversed(list_checkpoints(root)):
        problem = verify_together(path)
        if problem is None:
            return path
        problems.append(problem)
        barrier()  # every rank is done reading it before it moves
        if rank_and_world()[0] == 0:
            os.replace(path, path.with_name(path.name + CORRUPT_SUFFIX))
            if on_skip is not None:
                on_skip(path, problem)
        barrier()
    corrupt = sorted(p.name for p in root.glob(f"step_*{CORRUPT_SUFFIX}")) if root.is_dir() else []
    if corrupt:
        newest = f"{problems[0]}; " if problems else ""
        raise OptError(
            f"no complete checkpoint in {root}: {newest}set aside as corrupt: "
            f"{', '.join(corrupt)}; to start over, move them away or set checkpoint.resume=none"
        )
    return None
