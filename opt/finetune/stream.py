"""The fine-tuning data: prompted examples as a deterministic function of a stream position,
tokenized with the loss on the target only, and packed into fixed-size rows.

**The stream.** One epoch is every kept (dataset, example) pair of the mixture, in a
permutation seeded by ``seed + epoch`` (the pretraining :class:`SampleStream` over the
pairs: examples-proportional mixing with the mixture's cap). Position ``p`` of the stream is
an entry of that sequence, so the whole state is one integer plus skip ranges, with
``SampleStream``'s semantics for both.

**The template** of the example at a position is drawn from ``Random(f"{seed}:{epoch}:
{dataset}:{row}")``: a shuffled order of the dataset's selected templates, of which the first
that applies to the example is used. That is a uniform draw among the templates that apply
(drawing without replacement until one applies), a function of the position alone, and it
changes from epoch to epoch. The mixture has already dropped the examples no template
applies to.

**Tokens.** As ``opt eval`` scores (opt/eval/scoring.py): OPT's ``</s>`` prefix, the input,
then the target after ``TARGET_SEPARATOR`` (a space), the two encoded apart; then a closing
``</s>``. The model reads ``[</s>] + input + target`` and is trained to predict ``target +
[</s>]``; the input's own next tokens get ``IGNORE_INDEX``. An example longer than the row
loses input tokens from the left (after the ``</s>`` prefix, which marks its start); one
whose target and closing ``</s>`` alone exceed the row is refused.

**Rows.** Packed: examples in stream order, each whole in the current row if it fits, else
the row is closed (padded) and a new one started (next-fit: the order of the stream is kept,
and a row is a contiguous run of it). Unpacked: one example per row. Per row ``tokens``,
``targets`` (``IGNORE_INDEX`` except on target tokens; never across two examples),
``positions`` (0, 1, ... from each example's start) and ``segments`` (1, 2, ... per
example, 0 on padding) so a model can keep attention and positions inside an example.

**Batches.** Like the pretraining :class:`BatchLoader`, every data-parallel rank walks the
same stream, builds the whole step's rows and keeps its contiguous slice: ranks need no
communication, and the global batch does not depend on the layout. A packed step reads as
many examples as its rows hold, so the stream positions a step covers are found by reading
(:meth:`FinetuneLoader.step_positions`), not by multiplying.
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import random
from dataclasses import dataclass, fields
from typing import Any

import torch

from opt.data.sampler import SampleStream
from opt.data.tokenizer import eos_id
from opt.errors import OptError
from opt.eval.runner import TARGET_SEPARATOR
from opt.finetune.mixture import Mixture, render

IGNORE_INDEX = -100  # torch's cross_entropy default: no loss at this position
PAD_ID = 1  # OPT's <pad>


@dataclass(frozen=True)
class Example:
    """One prompted, tokenized example at a stream position."""

    position: int  # in the stream
    dataset: str
    row: int  # in the dataset's data, 0-based
    template: str
    ids: tuple[int, ...]  # </s> + input + target + </s>, after any truncation
    context: int  # how many leading ids are prefix and input (no loss on predicting them)
    truncated: int  # input tokens cut from the left to fit the row

    @property
    def length(self) -> int:
        """Row slots it takes: the model reads every id but the closing ``</s>``."""
        return len(self.ids) - 1

    @property
    def loss_tokens(self) -> int:
        """Predicted tokens: the target's and the closing ``</s>``."""
        return len(self.ids) - self.context


class PromptedStream:
    """The mixture's examples, endlessly, by stream position; skippable and resumable."""

    def __init__(self, mixture: Mixture, tokenizer, seq_len: int, seed: int | None = None):
        if seq_len < 2:
            raise OptError(f"seq_len must be at least 2, not {seq_len}")
        self.mixture = mixture
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.seed = mixture.seed if seed is None else seed
        self.eos = eos_id(tokenizer)
        self.order = SampleStream(mixture.num_examples, self.seed)
        self._lookup = SampleStream(mixture.num_examples, self.seed)  # positions, no skips
        self._fingerprint = mixture.fingerprint()
        self._starts = []  # first entry of each dataset in the epoch's index space
        start = 0
        for d in mixture.datasets:
            self._starts.append(start)
            start += len(d.examples)

    # --- the SampleStream contract --------------------------------------------------------
    @property
    def pos(self) -> int:
        return self.order.pos

    def skip(self, start: int, end: int) -> None:
        """Never yield positions in ``[start, end)`` (``SampleStream.skip``)."""
        self.order.skip(start, end)

    def copy(self) -> PromptedStream:
        """An independent stream at the same position with the same skips."""
        clone = copy.copy(self)
        clone.order = self.order.copy()
        clone._lookup = self._lookup.copy()
        return clone

    def state_dict(self) -> dict[str, Any]:
        return {**self.order.state_dict(), "mixture": self._fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mixture") != self._fingerprint:
            raise OptError(
                f"data state was saved for mixture {state.get('mixture')}, but "
                f"{self.mixture.path} is now {self._fingerprint}: its datasets, templates, "
                "cap or seed changed under a resume"
            )
        self.order.load_state_dict(state)

    # --- examples -------------------------------------------------------------------------
    def next_example(self) -> Example:
        """The example at the next position (past skips); advances past it."""
        entry = self.order.next_indices(1)[0]
        return self._example(self.order.pos - 1, entry)

    def rewind(self, example: Example) -> None:
        """Put back the example :meth:`next_example` just returned: it comes next again."""
        self.order.pos = example.position

    def example_at(self, position: int) -> Example:
        """The example at ``position``, whether skipped or not (reads nothing)."""
        self._lookup.pos = position
        return self._example(position, self._lookup.next_indices(1)[0])

    def _example(self, position: int, entry: int) -> Example:
        epoch = position // self.mixture.num_examples
        d = bisect.bisect_right(self._starts, entry) - 1
        dataset = self.mixture.datasets[d]
        local = entry - self._starts[d]
        example, row = dataset.examples[local], dataset.rows[local]
        draws = random.Random(f"{self.seed}:{epoch}:{dataset.name}:{row}")
        for t in draws.sample(range(len(dataset.templates)), len(dataset.templates)):
            template = dataset.templates[t]
            rendered = render(template, example, f"dataset {dataset.name!r}", row)
            if rendered is not None:
                break
        else:  # the mixture keeps only examples some template applies to
            raise AssertionError(f"{dataset.name} row {row}: no template applies")
        where = f"dataset {dataset.name!r} row {row + 1}, template {template.name!r}"
        ids, context, cut = encode(self.tokenizer, self.eos, self.seq_len, *rendered, where)
        return Example(position, dataset.name, row, template.name, ids, context, cut)


def encode(
    tokenizer, eos: int, seq_len: int, text: str, target: str, where: str = "an example"
) -> tuple[tuple[int, ...], int, int]:
    """(ids, context, cut): ``</s> + input + " " + target + </s>`` as token ids, with the
    input cut by ``cut`` tokens from the left so that all but the closing ``</s>`` fit
    ``seq_len``; ``context`` leading ids (prefix and input) get no loss."""
    context = tokenizer.encode(text).ids
    answer = [*tokenizer.encode(TARGET_SEPARATOR + target).ids, eos]
    # Slots: </s> + context + answer, less the closing </s> (read by no one).
    over = len(context) + len(answer) - seq_len
    if over > len(context):
        raise OptError(
            f"{where}: the target and closing </s> take {len(answer)} tokens, more than "
            f"seq_len={seq_len}"
        )
    cut = max(over, 0)
    return (eos, *context[cut:], *answer), 1 + len(context) - cut, cut


def survey(mixture: Mixture, tokenizer, seq_len: int) -> dict[str, dict[str, int]]:
    """Every kept example under every selected template that applies to it, tokenized as
    training would: refuses up front what a stream would refuse when it got there (a target
    longer than the row), and counts per dataset the renderings and those whose input would
    be cut, and the most row slots a rendering takes uncut (``longest``). It reads every
    (example, template) pair, so it costs several epochs of rendering; a run can afford it
    on small mixtures."""
    eos, out = eos_id(tokenizer), {}
    for d in mixture.datasets:
        counts = {"renderings": 0, "truncated": 0, "longest": 0}
        for example, row in zip(d.examples, d.rows, strict=True):
            for template in d.templates:
                rendered = render(template, example, f"dataset {d.name!r}", row)
                if rendered is None:
                    continue
                where = f"dataset {d.name!r} row {row + 1}, template {template.name!r}"
                ids, _, cut = encode(tokenizer, eos, seq_len, *rendered, where)
                counts["renderings"] += 1
                counts["truncated"] += cut > 0
                counts["longest"] = max(counts["longest"], len(ids) - 1 + cut)
        out[d.name] = counts
    return out


@dataclass(frozen=True, eq=False)  # tensors: compare with torch.equal
class FinetuneBatch:
    """Rows of prompted examples: each tensor (B, T) int64."""

    tokens: torch.Tensor  # model input; PAD_ID after the last example of a row
    targets: torch.Tensor  # next token where it is a target token, else IGNORE_INDEX
    positions: torch.Tensor  # position ids from 0 at each example's start; 0 on padding
    segments: torch.Tensor  # 1, 2, ... per example within its row; 0 on padding
    loss_tokens: int  # targets that are not IGNORE_INDEX, in these rows
    step_loss_tokens: int  # the same over the whole step, every rank's rows included
    step_examples: int  # examples the whole step holds
    step_truncated: int  # of which lost input tokens to fit

    def rows(self, start: int, end: int) -> FinetuneBatch:
        """Rows ``start:end``, their own ``loss_tokens``; the step's counts kept."""
        parts = {f.name: getattr(self, f.name)[start:end].contiguous() for f in _TENSORS}
        loss = int((parts["targets"] != IGNORE_INDEX).sum())
        return FinetuneBatch(**parts, loss_tokens=loss, step_loss_tokens=self.step_loss_tokens,
                             step_examples=self.step_examples, step_truncated=self.step_truncated)  # fmt: skip

    def to(self, device, non_blocking: bool = False) -> FinetuneBatch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> FinetuneBatch:
        return self._map(torch.Tensor.pin_memory)

    def _map(self, fn) -> FinetuneBatch:
        return dataclasses.replace(self, **{f.name: fn(getattr(self, f.name)) for f in _TENSORS})


_TENSORS = [
    f for f in fields(FinetuneBatch) if f.name in ("tokens", "targets", "positions", "segments")
]


def read_rows(stream: PromptedStream, rows: int, packing: bool = True) -> list[list[Example]]:
    """The next ``rows`` rows of examples from ``stream`` (advanced past exactly the
    examples they hold). Packed: next-fit in stream order; unpacked: one per row."""
    if rows < 1:
        raise ValueError(f"rows must be at least 1, not {rows}")
    out: list[list[Example]] = [[]]
    used = 0
    while True:
        example = stream.next_example()
        if out[-1] and (not packing or used + example.length > stream.seq_len):
            if len(out) == rows:
                stream.rewind(example)
                return out
            out.append([])
            used = 0
        out[-1].append(example)
        used += example.length
        if not packing and len(out) == rows:
            return out


def build_batch(examples: list[list[Example]], seq_len: int, pad_id: int = PAD_ID) -> FinetuneBatch:
    """Tensors for rows of examples (see :class:`FinetuneBatch`)."""
    shape = (len(examples), seq_len)
    tokens = torch.full(shape, pad_id, dtype=torch.int64)
    targets = torch.full(shape, IGNORE_INDEX, dtype=torch.int64)
    positions = torch.zeros(shape, dtype=torch.int64)
    segments = torch.zeros(shape, dtype=torch.int64)
    for r, row in enumerate(examples):
        at = 0
        for k, ex in enumerate(row, 1):
            ids = torch.tensor(ex.ids, dtype=torch.int64)
            n = ex.length
            if at + n > seq_len:
                raise ValueError(f"row {r} holds {at + n} tokens, more than {seq_len}")
            tokens[r, at : at + n] = ids[:-1]
            targets[r, at + ex.context - 1 : at + n] = ids[ex.context :]
            positions[r, at : at + n] = torch.arange(n)
            segments[r, at : at + n] = k
            at += n
    flat = [ex for row in examples for ex in row]
    loss = sum(ex.loss_tokens for ex in flat)
    return FinetuneBatch(tokens, targets, positions, segments, loss_tokens=loss,
                         step_loss_tokens=loss, step_examples=len(flat),
                         step_truncated=sum(ex.truncated > 0 for ex in flat))  # fmt: skip


def next_batch(
    stream: PromptedStream, global_rows: int, rank: int = 0, world: int = 1, packing: bool = True,
    pad_id: int = PAD_ID,
) -> FinetuneBatch:  # fmt: skip
    """This rank's contiguous share of the next ``global_rows`` rows (every rank reads the
    whole step from its own copy of the stream, as the pretraining loader does)."""
    if global_rows % world or not 0 <= rank < world:
        raise ValueError(f"{global_rows} rows do not split over rank {rank} of {world}")
    whole = build_batch(read_rows(stream, global_rows, packing), stream.seq_len, pad_id)
    per_rank = global_rows // world
    return whole.rows(rank * per_rank, (rank + 1) * per_rank)


class FinetuneLoader:
    """The fine-tuning counterpart of :class:`opt.data.sampler.BatchLoader`: cuts the
    stream into steps of ``micro_batch_size * grad_accum * dp_size`` rows, this rank's share
    into micro-batches. Its ``stream``, ``state_dict`` and ``load_state_dict`` behave as
    BatchLoader's; a packed step reads a varying number of positions (see
    :meth:`step_positions`)."""

    def __init__(
        self,
        stream: PromptedStream,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        packing: bool = True,
        pad_id: int = PAD_ID,
    ) -> None:
        if micro_batch_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad batch layout: mbs={micro_batch_size}, rank {dp_rank}/{dp_size}")
        self.stream = stream
        self.seq_len = stream.seq_len
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.packing = packing
        self.pad_id = pad_id

    def rows_per_step(self, grad_accum: int) -> int:
        """Rows one optimizer step takes across all data-parallel ranks."""
        return self.micro_batch_size * grad_accum * self.dp_size

    def samples_per_step(self, grad_accum: int) -> int:
        """Stream positions one step reads: fixed without packing only."""
        if self.packing:
            raise OptError(
                "a packed fine-tuning step reads as many examples as fit its rows; use "
                "step_positions() for the positions steps cover"
            )
        return self.rows_per_step(grad_accum)

    def next_microbatches(self, grad_accum: int) -> list[FinetuneBatch]:
        """This rank's ``grad_accum`` micro-batches, each ``micro_batch_size`` rows."""
        per_rank = self.micro_batch_size * grad_accum
        mine = next_batch(self.stream, self.rows_per_step(grad_accum), self.dp_rank,
                          self.dp_size, self.packing, self.pad_id)  # fmt: skip
        return [
            mine.rows(i, i + self.micro_batch_size)
            for i in range(0, per_rank, self.micro_batch_size)
        ]

    def source_epochs(self) -> dict[str, float]:
        """Epochs of the prompted mixture so far: every epoch is one permutation of all its
        (example, template) entries, so all its datasets share the count."""
        return {"mixture": self.stream.pos / self.stream.mixture.num_examples}

    def step_positions(
        self, pos: int, done_steps: int, first: int, last: int, grad_accum: int
    ) -> tuple[int, int]:
        """Stream positions [start, end) that steps ``first..last`` (1-based, inclusive)
        read, given the stream stands at ``pos`` after ``done_steps`` steps and the skips
        it has now: what ``opt.supervisor.rollback.step_samples`` computes for a fixed
        number of positions per step, here found by reading a copy of the stream."""
        if not done_steps < first <= last:
            raise ValueError(f"steps {first}..{last} do not follow step {done_steps}")
        probe = self.stream.copy()
        probe.order.pos = pos
        rows = self.rows_per_step(grad_accum)
        for _ in range(first - done_steps - 1):
            read_rows(probe, rows, self.packing)
        head = probe.next_example()
        probe.rewind(head)
        for _ in range(last - first + 1):
            read_rows(probe, rows, self.packing)
        return head.position, probe.pos

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)
