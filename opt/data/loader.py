"""Training batches cut from a blended sample stream.

Every data-parallel rank walks the same stream and takes its own slice of each global batch,
so ranks need no communication and the global batch does not depend on ``dp_size``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from opt.data.blend import BlendedStream, BlendSource
from opt.data.dataset import TokenDataset
from opt.data.sampler import SampleStream
from opt.errors import OptError


def lone_stream(stream: SampleStream) -> BlendedStream:
    """One dataset's stream as a blend of one unnamed source: the same samples in the same
    order, and the same state dict."""
    blended = BlendedStream([BlendSource(None, stream.num_samples)], stream.seed, stream.shuffle)
    blended.load_state_dict(stream.state_dict())
    return blended


class BatchLoader:
    """Cuts the stream into steps, this rank's share of each step into micro-batches.

    A step takes ``micro_batch_size * grad_accum * dp_size`` stream entries; rank ``r`` gets
    the ``r``-th contiguous slice of them. Because the state is a stream position, a resume
    may even change the batch layout without repeating or dropping a sample.

    ``datasets`` are the blend's sources in its order (one dataset, or a list); ``stream``
    is a :class:`BlendedStream` over them, or one dataset's :class:`SampleStream`.
    """

    def __init__(
        self,
        datasets: TokenDataset | Sequence[TokenDataset],
        stream: BlendedStream | SampleStream,
        seq_len: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
    ) -> None:
        datasets = [datasets] if isinstance(datasets, TokenDataset) else list(datasets)
        if isinstance(stream, SampleStream):
            stream = lone_stream(stream)
        if len(datasets) != len(stream.sources):
            raise ValueError(f"{len(datasets)} datasets for {len(stream.sources)} sources")
        for dataset, source in zip(datasets, stream.sources, strict=True):
            if source.num_samples != dataset.num_samples(seq_len):
                raise OptError(
                    f"sample stream covers {source.num_samples} samples, but the dataset "
                    f"{dataset.prefix} has {dataset.num_samples(seq_len)} of length {seq_len + 1}"
                )
        if micro_batch_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad batch layout: mbs={micro_batch_size}, rank {dp_rank}/{dp_size}")
        self.datasets = datasets
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

        skips = self.stream.skip_list()
        return step_samples(pos, done_steps, first, last, self.samples_per_step(grad_accum),
                            skips)  # fmt: skip

    def source_epochs(self) -> dict[str, float]:
        """Each source's epochs so far (draws over samples; skipped draws count)."""
        return self.stream.epochs()

    def next_microbatches(self, grad_accum: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's ``grad_accum`` micro-batches of (inputs, targets), each (B, T) int64."""
        per_rank = self.micro_batch_size * grad_accum
        samples = self.stream.next_samples(self.samples_per_step(grad_accum))
        mine = samples[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]
        return [
            self._microbatch(mine[i : i + self.micro_batch_size])
            for i in range(0, per_rank, self.micro_batch_size)
        ]

    def _microbatch(self, samples: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([self.datasets[s].sample(i, self.seq_len) for s, i in samples])
        rows = torch.from_numpy(rows)
        # (B, T + 1) -> inputs and targets (B, T), shifted by one token
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)
