"""Deterministic, resumable, skippable order of one dataset's training samples.

The order is a *stream*: an endless sequence of dataset sample indices, epoch after epoch,
each epoch a fresh permutation seeded by ``seed + epoch``. A stream position ``pos`` names an
entry of that sequence, so the whole data state of a run is one integer (plus skip ranges),
and a resumed run continues exactly where the saved one stopped.

Several datasets drawn in proportion (:mod:`opt.data.blend`) give each its own stream, and
:class:`opt.data.loader.BatchLoader` cuts steps from the blend.

Skipping bad data (what the divergence supervisor does after a loss spike): after restoring
the checkpoint that precedes the spike, read ``p = loader.state_dict()["pos"]`` and call
``loader.stream.skip(p, p + n_steps * loader.samples_per_step(grad_accum))`` to skip the
samples the next ``n_steps`` steps would have seen. Skip ranges are part of the state dict,
so they survive later checkpoints and restarts.
"""

from __future__ import annotations

import bisect
import copy
from typing import Any

import numpy as np
import torch

from opt.errors import OptError


class SkipRanges:
    """A stream position and the ranges of positions never to yield."""

    def __init__(self) -> None:
        self.pos = 0
        self._skips: list[tuple[int, int]] = []  # sorted, disjoint, non-adjacent [start, end)

    def skip(self, start: int, end: int) -> None:
        """Never yield stream positions in ``[start, end)``; ranges behind ``pos`` are moot."""
        if not 0 <= start <= end:
            raise ValueError(f"bad skip range [{start}, {end})")
        if start == end:
            return
        merged: list[tuple[int, int]] = []
        for s, e in sorted([*self._skips, (start, end)]):
            if merged and s <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], e))
            else:
                merged.append((s, e))
        self._skips = merged

    def skip_list(self) -> list[list[int]]:
        return [[s, e] for s, e in self._skips]

    def load_skips(self, skips: list[list[int]]) -> None:
        self._skips = []
        for start, end in skips:
            self.skip(int(start), int(end))

    def _past_skip(self, pos: int) -> int:
        """``pos``, or the end of the skip range containing it (merged ranges need one jump)."""
        i = bisect.bisect_right(self._skips, (pos, float("inf"))) - 1
        if i >= 0 and self._skips[i][0] <= pos < self._skips[i][1]:
            return self._skips[i][1]
        return pos

    def _next_skip(self, pos: int) -> float:
        """Start of the first skip range after ``pos`` (which is outside every range)."""
        i = bisect.bisect_right(self._skips, (pos, float("inf")))
        return self._skips[i][0] if i < len(self._skips) else float("inf")


class SampleStream(SkipRanges):
    """An endless, seeded sequence of sample indices with a position and skip ranges."""

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True) -> None:
        super().__init__()
        if num_samples < 1:
            raise OptError(f"cannot sample from {num_samples} samples")
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle  # False: every epoch reads the samples in file order
        self._cached: tuple[int, torch.Tensor] | None = None  # (epoch, permutation)

    def next_indices(self, n: int) -> list[int]:
        """The next ``n`` dataset sample indices; advances ``pos`` past them (and any skips)."""
        out: list[int] = []
        while len(out) < n:
            self.pos = self._past_skip(self.pos)
            epoch, offset = divmod(self.pos, self.num_samples)
            # Take a contiguous run: up to the epoch's end, the next skip, or what is still needed.
            run = min(self.num_samples - offset, n - len(out), self._next_skip(self.pos) - self.pos)
            out.extend(self._permutation(epoch)[offset : offset + run].tolist())
            self.pos += run
        return out

    def at(self, positions: np.ndarray) -> np.ndarray:
        """The sample indices at these stream positions, skips aside (a blend's draws)."""
        epochs, offsets = np.divmod(positions, self.num_samples)
        out = np.empty(len(positions), dtype=np.int64)
        for epoch in np.unique(epochs).tolist():
            mine = epochs == epoch
            out[mine] = self._permutation(epoch).numpy()[offsets[mine]]
        return out

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._cached is None or self._cached[0] != epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed + epoch)
                order = torch.randperm(self.num_samples, generator=generator)
            else:
                order = torch.arange(self.num_samples)
            self._cached = (epoch, order)
        return self._cached[1]

    def copy(self) -> SampleStream:
        """An independent stream at the same position with the same skips (it shares the
        cached permutation, which is never mutated)."""
        clone = copy.copy(self)
        clone._skips = list(self._skips)
        return clone

    def state_dict(self) -> dict[str, Any]:
        """Plain ints and lists, so it can go into any checkpoint format."""
        return {
            "pos": self.pos,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "shuffle": self.shuffle,
            "skips": self.skip_list(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; refuses a state saved for another dataset or seed."""
        saved = (state["num_samples"], state["seed"], state.get("shuffle", True))
        if saved != (self.num_samples, self.seed, self.shuffle):
            raise OptError(
                f"data state was saved for {saved[0]} samples with seed {saved[1]} "
                f"(shuffle {saved[2]}), but this run has {self.num_samples} with seed "
                f"{self.seed} (shuffle {self.shuffle}): the dataset, sequence length, seed or "
                "order changed under a resume"
            )
        self.pos = int(state["pos"])
        self.load_skips(state["skips"])
