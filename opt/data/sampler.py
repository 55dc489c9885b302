"""Deterministic, resumable, skippable order of training samples, and batches built from it.

The order is a *stream*: an endless sequence of dataset sample indices, epoch after epoch,
each epoch a fresh permutation seeded by ``seed + epoch``. A stream position ``pos`` names an
entry of that sequence, so the whole data state of a run is one integer (plus skip ranges),
and a resumed run continues exactly where the saved one stopped.

Every data-parallel rank walks the same stream and takes its own slice of each global batch,
so ranks need no communication and the global batch does not depend on ``dp_size``.

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

from opt.data.dataset import TokenDataset
from opt.errors import OptError


class SampleStream:
    """An endless, seeded sequence of sample indices with a position and skip ranges."""

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True) -> None:
        if num_samples < 1:
            raise OptError(f"cannot sample from {num_samples} samples")
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle  # False: every epoch reads the samples in file order
        self.pos = 0
        self._skips: list[tuple[int, int]] = []  # sorted, disjoint, non-adjacent [start, end)
        self._cached: tuple[int, torch.Tensor] | None = None  # (epoch, permutation)

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
            "skips": [[s, e] for s, e in self._skips],
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
        self._skips = []
        for start, end in state["skips"]:
            self.skip(int(start), int(end))


class BatchLoader:
    """Cuts the stream into steps, this rank's share of each step into micro-batches.

    A step takes ``micro_batch_size * grad_accum * dp_size`` stream entries; rank ``r`` gets
    the ``r``-th contiguous slice of them. Because the state is a stream position, a resume
    may even change the batch layout without repeating or dropping a sample.
    """

    def __init__(
        self,
        dataset: TokenDataset,
        stream: SampleStream,
        seq_len: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
    ) -> None:
        if stream.num_samples != dataset.num_samples(seq_len):
            raise OptError(
                f"sample stream covers {stream.num_samples} samples, but the dataset has "
                f"{dataset.num_samples(seq_len)} of length {seq_len + 1}"
            )
        if micro_batch_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad batch layout: mbs={micro_batch_size}, rank {dp_rank}/{dp_size}")
        self.dataset = dataset
        self.stream = stream
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    def samples_per_step(self, grad_accum: int) -> int:
        """Stream entries one optimizer step consumes across all data-parallel ranks."""
        return self.micro_batch_size * grad_accum * self.dp_size

    def step_positions(
        self, pos: int, done_steps: int, first: int, last: int, grad_accum: int
    ) -> tuple[int, int]:
        """Stream positions [start, end) that steps ``first..last`` (1-based, inclusive)
        read, the stream standing at ``pos`` after ``done_steps`` steps with the skips it
        has now: a fixed number per step (what the supervisor skips; the fine-tuning loader
        answers the same question for its packed steps by reading)."""
        from opt.supervisor.rollback import step_samples

        skips = self.stream.state_dict()["skips"]
        return step_samples(pos, done_steps, first, last, self.samples_per_step(grad_accum),
                            skips)  # fmt: skip

    def next_microbatches(self, grad_accum: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's ``grad_accum`` micro-batches of (inputs, targets), each (B, T) int64."""
        per_rank = self.micro_batch_size * grad_accum
        indices = self.stream.next_indices(self.samples_per_step(grad_accum))
        mine = indices[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]
        return [
            self._microbatch(mine[i : i + self.micro_batch_size])
            for i in range(0, per_rank, self.micro_batch_size)
        ]

    def _microbatch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.from_numpy(np.stack([self.dataset.sample(i, self.seq_len) for i in indices]))
        # (B, T + 1) -> inputs and targets (B, T), shifted by one token
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)
