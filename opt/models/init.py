"""Layout-independent weight initialisation.

Every value is drawn from a generator seeded by (run seed, parameter name, tile), where a
tile is a fixed block of the parameter's *global* shape. A rank that holds only a shard
(tensor-parallel slice, FSDP row block, one pipeline stage) draws just the tiles its shard
overlaps, and gets exactly the values the single-process model holds at those positions.
That is what lets every parallel layout start from the same weights without a seed
checkpoint, while only the local shard is ever allocated.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Callable, Sequence

import torch

TILE = 256  # rows and columns per 2-D tile; 1-D tensors use TILE * TILE elements

# (name, local tensor, global shape, global offset of the local tensor)
LocalView = tuple[torch.Tensor, Sequence[int], Sequence[int]]


def _tile_generator(seed: int, name: str, index: tuple[int, ...]) -> torch.Generator:
    key = zlib.crc32(f"{name}|{index}".encode())
    return torch.Generator().manual_seed((seed << 32) ^ key)


def _tile_extents(global_shape: Sequence[int]) -> list[int]:
    return [TILE * TILE] if len(global_shape) == 1 else [TILE] * len(global_shape)


@torch.no_grad()
def fill_normal_(
    local: torch.Tensor,
    std: float,
    seed: int,
    name: str,
    global_shape: Sequence[int],
    offset: Sequence[int],
) -> None:
    """Fill ``local`` (the block of a ``global_shape`` tensor at ``offset``) with N(0, std)."""
    if local.numel() == 0:
        return
    extents = _tile_extents(global_shape)
    ranges = []
    for start, size, extent, full in zip(offset, local.shape, extents, global_shape, strict=True):
        first, last = start // extent, (start + size - 1) // extent
        ranges.append(range(first, min(last, (full - 1) // extent) + 1))
    for index in itertools.product(*ranges):
        tile_lo = [i * e for i, e in zip(index, extents, strict=True)]
        tile_shape = [
            min(e, full - lo) for e, full, lo in zip(extents, global_shape, tile_lo, strict=True)
        ]
        tile = torch.empty(tile_shape, dtype=torch.float32)
        tile.normal_(0.0, std, generator=_tile_generator(seed, name, index))
        # Overlap of the tile with the local block, in global coordinates.
        lo = [max(t, o) for t, o in zip(tile_lo, offset, strict=True)]
        hi = [
            min(t + s, o + n)
            for t, s, o, n in zip(tile_lo, tile_shape, offset, local.shape, strict=True)
        ]
        src = tuple(slice(a - t, b - t) for a, b, t in zip(lo, hi, tile_lo, strict=True))
        dst = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offset, strict=True))
        local[dst].copy_(tile[src])


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
