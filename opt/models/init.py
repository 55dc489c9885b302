"""Layout-independent weight initialisation.

Every value is drawn from a generator seeded by (run seed, parameter name, tile), where a
tile is a fixed block of the parameter's *global* shape. A rank that holds only a shard
(tensor-parallel slice, FSDP row block, one pipeline stage) draws just the tiles its shard
overlaps, and gets exactly the values the single-process model holds at those positions.
That is what lets every parallel layout start from the same weights without a seed
checkpoint, while only the local shard is ever allocated.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

# Tiles are short and wide because FSDP cuts tensors into row blocks that can be only a few
# rows high (OPT-175B: 12 rows of a TP8 x FSDP128 shard): a rank then draws at most about
# twice what it keeps. Tensors of more than two dimensions tile their last two.
TILE_ROWS, TILE_COLS = 16, 1024
TILE_1D = TILE_ROWS * TILE_COLS
PARALLEL_MIN_TILES = 16  # fewer tiles than this are drawn in the calling thread

# (name, local tensor, global shape, global offset of the local tensor)
LocalView = tuple[torch.Tensor, Sequence[int], Sequence[int]]


def _name_key(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=16).digest(), "little")


def _tile_values(seed: int, name_key: int, index: tuple[int, ...], shape: list[int]) -> np.ndarray:
    """Standard normals for one tile. The stream is keyed by the full (seed, name, tile)
    through numpy's SeedSequence into PCG64 (128-bit state): torch's CPU generator keeps
    only 32 bits of a seed, which would collide across the millions of tiles of 175B."""
    entropy = [seed, name_key, *index]
    generator = np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))
    return generator.standard_normal(shape, dtype=np.float32)


def _tile_extents(global_shape: Sequence[int]) -> list[int]:
    if len(global_shape) == 1:
        return [TILE_1D]
    return [1] * (len(global_shape) - 2) + [TILE_ROWS, TILE_COLS]


@torch.no_grad()
def fill_normal_(
    local: torch.Tensor,
    std: float,
    seed: int,
    name: str,
    global_shape: Sequence[int],
    offset: Sequence[int],
) -> None:
    """Fill ``local`` (the block of a ``global_shape`` tensor at ``offset``) with N(0, std).

    Tiles are independent streams, so they are drawn in parallel threads (numpy releases the
    GIL while it generates) with the same values in any order: a 6.7B model's ~400k tiles
    would take minutes on one core. A block on an accelerator is filled in host memory and
    copied once, rather than as one small transfer per tile."""
    if local.numel() == 0:
        return
    extents = _tile_extents(global_shape)
    ranges = []
    for start, size, extent, full in zip(offset, local.shape, extents, global_shape, strict=True):
        first, last = start // extent, (start + size - 1) // extent
        ranges.append(range(first, min(last, (full - 1) // extent) + 1))
    target = local if local.device.type == "cpu" else torch.empty(local.shape, dtype=local.dtype)
    # fp32 tiles are scaled and placed by numpy, which (unlike torch's small-op dispatch)
    # runs without the GIL, so the threads overlap; a float32 array times a Python float
    # rounds exactly as torch's float32 mul_ does.
    array = target.detach().numpy() if target.dtype == torch.float32 else None
    name_key = _name_key(name)

    def fill_tile(index: tuple[int, ...]) -> None:
        tile_lo = [i * e for i, e in zip(index, extents, strict=True)]
        tile_shape = [
            min(e, full - lo) for e, full, lo in zip(extents, global_shape, tile_lo, strict=True)
        ]
        tile = _tile_values(seed, name_key, index, tile_shape)
        # Overlap of the tile with the local block, in global coordinates.
        lo = [max(t, o) for t, o in zip(tile_lo, offset, strict=True)]
        hi = [
            min(t + s, o + n)
            for t, s, o, n in zip(tile_lo, tile_shape, offset, local.shape, strict=True)
        ]
        src = tuple(slice(a - t, b - t) for a, b, t in zip(lo, hi, tile_lo, strict=True))
        dst = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offset, strict=True))
        if array is not None:
            np.multiply(tile[src], std, out=array[dst])
        else:
            target[dst].copy_(torch.from_numpy(tile[src]).mul_(std))

    indices = list(itertools.product(*ranges))
    if len(indices) < PARALLEL_MIN_TILES:
        for index in indices:
            fill_tile(index)
    else:
        # list() re-raises a worker's exception here.
        list(_tile_pool().map(fill_tile, indices))
    if target is not local:
        local.copy_(target)


@functools.cache
def _tile_pool() -> ThreadPoolExecutor:
    """One pool per process, made on first use."""
    workers = min(32, len(os.sched_getaffinity(0)))
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="opt-init")


def plain_view(param: torch.Tensor) -> LocalView:
    """An unsharded tensor is its own whole global tensor."""
    return param.data, param.shape, (0,) * param.dim()


@torch.no_grad()
def init_parameters(
    named_parameters: Sequence[tuple[str, torch.Tensor]],
    rule: Callable[[str], tuple[str, float]],
    seed: int,
    local_view: Callable[[torch.Tensor], LocalView] = plain_view,
) -> None:
    """Apply ``rule(name) -> (kind, std)`` (kind: normal, zeros or ones) to each parameter."""
    for name, param in named_parameters:
        local, global_shape, offset = local_view(param)
        kind, std = rule(name)
        if kind == "zeros":
            local.zero_()
        elif kind == "ones":
            local.fill_(1.0)
        else:
            fill_normal_(local, std, seed, name, global_shape, offset)
