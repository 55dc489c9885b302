"""Validation in the loop: the loss on a held-out set, evaluated without touching training.

One evaluation reads the first global batches of the held-out set, always the same
sequences in the same order, cut as a training step cuts its batch: each data-parallel rank
its contiguous share, in micro-batches of ``micro_batch_size``. So every layout evaluates
the same tokens in the shapes its step already runs, and a pipeline runs its own schedule.

Nothing of the training state changes: the model runs forward only, in eval mode (no
dropout) and without gradients; the RNG is forked around it, so nothing could draw from the
training streams; the training data stream is another file and is never read; FSDP units
are resharded after it, as they are between steps.

The loss is the mean over every evaluated token. Each rank that holds the loss (the last
pipeline stage's first tensor-parallel rank of each data-parallel replica, as for the
step's loss) sums its micro-batches' mean losses weighted by their token counts, in
float64; one all-reduce of (sum, tokens) gives every rank the same value.

A mixture of sources (``data.sources``) has a held-out set per source: each is evaluated
as above, one all-reduce for all of them, and the run's held-out loss is the mean of the
sources' losses weighted by their shares of the training mixture (the loss the mixture's
own distribution would see), over the sources that have a held-out set.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from opt.data.dataset import TokenDataset
from opt.errors import OptError

MicroBatches = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Evaluation:
    """One evaluation: the mean loss over ``tokens`` held-out tokens at ``step``."""

    step: int
    loss: float
    tokens: int
    seconds: float
    sources: dict[str, float] = field(default_factory=dict)
    """A mixture's loss on each source's held-out set (empty for one dataset)."""

    @property
    def ppl(self) -> float:
        return perplexity(self.loss)


def perplexity(loss: float) -> float:
    """exp(loss), infinite where that overflows (NaN stays NaN)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


class HeldOutBatches:
    """The held-out sequences one evaluation reads, as this rank's micro-batches per global
    batch: sample ``b * G + r * per_rank + i`` of batch ``b`` for data-parallel rank ``r``
    (``G`` sequences per global batch), as ``BatchLoader`` cuts a training step."""

    def __init__(
        self,
        dataset: TokenDataset,
        seq_len: int,
        micro_batch_size: int,
        grad_accum: int,
        n_batches: int,
        dp_rank: int = 0,
        dp_size: int = 1,
    ) -> None:
        self.dataset = dataset
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.per_rank = micro_batch_size * grad_accum
        self.per_batch = self.per_rank * dp_size
        self.n_batches = n_batches
        self.dp_rank = dp_rank

    @classmethod
    def of(
        cls,
        dataset: TokenDataset,
        *,
        seq_len: int,
        batch_tokens: int,
        tokens: int | None,
        micro_batch_size: int,
        grad_accum: int,
        dp_rank: int = 0,
        dp_size: int = 1,
    ) -> HeldOutBatches:
        """The first ``tokens`` of the held-out set in whole global batches (rounded down,
        at least one; all of it when None)."""
        available = cls.available(dataset, seq_len, batch_tokens)
        if available == 0:
            raise OptError(
                f"held-out set {dataset.prefix} has {dataset.n_tokens:,} tokens, less than one "
                f"global batch ({batch_tokens:,} tokens of sequences of {seq_len + 1}) to "
                "evaluate; hold out more (opt data prepare --valid-fraction) or set "
                "validation.enabled = false"
            )
        wanted = available if tokens is None else max(1, tokens // batch_tokens)
        return cls(dataset, seq_len, micro_batch_size, grad_accum, min(wanted, available),
                   dp_rank, dp_size)  # fmt: skip

    @staticmethod
    def available(dataset: TokenDataset, seq_len: int, batch_tokens: int) -> int:
        """Whole global batches of ``batch_tokens`` the held-out set holds."""
        return max(0, (dataset.n_tokens - 1) // seq_len) // (batch_tokens // seq_len)

    @property
    def tokens(self) -> int:
        """Target tokens one evaluation scores, over every rank."""
        return self.n_batches * self.per_batch * self.seq_len

    def __iter__(self) -> Iterator[MicroBatches]:
        for batch in range(self.n_batches):
            first = batch * self.per_batch + self.dp_rank * self.per_rank
            mine = range(first, first + self.per_rank)
            yield [
                self._microbatch(mine[i : i + self.micro_batch_size])
                for i in range(0, self.per_rank, self.micro_batch_size)
            ]

    def _microbatch(self, indices: range) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.from_numpy(np.stack([self.dataset.sample(i, self.seq_len) for i in indices]))
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()  # (B, T) inputs, targets


@dataclass(frozen=True)
class HeldOutSet:
    """A held-out set to evaluate: a mixture source's (its name and share of the training
    mixture) or the one dataset's (no name, share 1)."""

    batches: HeldOutBatches
    name: str | None = None
    share: float = 1.0


class Evaluator:
    """Evaluates the held-out loss with the trainer's forward, and remembers the last one.

    ``forward(microbatches)`` runs the model forward over one global batch's share of this
    rank and returns each micro-batch's mean loss (1-D; any value where the rank does not
    hold the loss). ``report`` hears of every evaluation (console, metrics, status)."""

    def __init__(
        self,
        sets: HeldOutBatches | Sequence[HeldOutSet],
        forward: Callable[[MicroBatches], torch.Tensor],
        parts: list[nn.Module],
        *,
        holds_loss: bool,
        device: torch.device,
        report: Callable[[Evaluation], None] | None = None,
    ) -> None:
        self.sets = [HeldOutSet(sets)] if isinstance(sets, HeldOutBatches) else list(sets)
        self.forward = forward
        self.parts = parts
        self.holds_loss = holds_loss
        self.device = device
        self.report = report
        self.last: Evaluation | None = None

    def evaluate(self, step: int) -> Evaluation:
        """The held-out loss of the model as it is, recorded as of ``step`` (collective:
        every rank calls it at the same point)."""
        start = time.perf_counter()
        # Per held-out set: loss sum, tokens
        totals = torch.zeros(len(self.sets), 2, dtype=torch.float64, device=self.device)
        modes = [part.training for part in self.parts]
        devices = [self.device] if self.device.type != "cpu" else []
        try:
            for part in self.parts:
                part.eval()
            with torch.no_grad(), torch.random.fork_rng(devices, device_type=self.device.type):
                for held_out, total in zip(self.sets, totals, strict=True):
                    self._score(held_out.batches, total)
        finally:
            for part, mode in zip(self.parts, modes, strict=True):
                part.train(mode)
                for module in part.modules():
                    if isinstance(module, FSDPModule):
                        module.reshard()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(totals)
        losses = {}
        for held_out, (loss_sum, tokens) in zip(self.sets, totals.tolist(), strict=True):
            if round(tokens) != held_out.batches.tokens:
                raise RuntimeError(f"evaluated {tokens} tokens, expected {held_out.batches.tokens}")
            losses[held_out.name] = loss_sum / tokens
        weight = sum(held_out.share for held_out in self.sets)
        loss = sum(held_out.share * losses[held_out.name] for held_out in self.sets) / weight
        n_tokens = sum(held_out.batches.tokens for held_out in self.sets)
        named = {name: value for name, value in losses.items() if name is not None}
        evaluation = Evaluation(step, loss, n_tokens, time.perf_counter() - start, named)
        self.last = evaluation
        if self.report is not None:
            self.report(evaluation)
        return evaluation

    def _score(self, batches: HeldOutBatches, total: torch.Tensor) -> None:
        """Add this rank's (loss sum, tokens) over ``batches`` into ``total``."""
        for microbatches in batches:
            losses = self.forward(microbatches)  # (micro-batches,) mean losses
            if self.holds_loss:
                micro_tokens = microbatches[0][1].numel()  # all are the same size
                total[0] += losses.double().sum() * micro_tokens
                total[1] += micro_tokens * len(losses)
