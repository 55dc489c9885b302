"""Several prepared datasets drawn in fixed proportions: which source each stream position
reads, and which of that source's samples.

**The blend.** The weights become integers ``W_s`` summing to a period ``P`` (the exact
ratios where their common denominator is at most ``MAX_PERIOD``, else the closest
apportionment of ``MAX_PERIOD``). Within a period, source ``s`` owns the slots whose
*stride* keys ``(2j + 1) / W_s`` (``j < W_s``) come ``k``-th in the sorted order of every
source's keys (ties to the source listed first): each source's draws are spread evenly
through the period, and every period holds exactly ``W_s`` of source ``s``. So after ``p``
positions source ``s`` has had ``(p // P) * W_s + prefix[s, p % P]`` of them, within one
sample of ``p * W_s / P``: the proportions are exact at every period's end and never off
by more than one sample in between. Position ``p`` is read in O(1), without walking the
stream from its start, which is what resuming, rolling back and skipping need.

**Each source** has its own seeded permutation per epoch (:class:`SampleStream`'s), over
its own samples: the ``q``-th draw from source ``s`` is entry ``q`` of that endless
sequence. A source with few samples goes round many epochs while a large one is still in
its first; :meth:`BlendedStream.consumed` counts each source's draws, so the epochs every
source has seen can be reported.

**Positions, skips and state** are those of the blended stream: one integer and the skip
ranges, as for one dataset. A skipped position still uses up the draw of the source it
names (its sample is never read); so skipping never shifts what any other position reads.
One unnamed source is exactly the single-dataset :class:`SampleStream` of before, state
dict included, so its runs and checkpoints are unchanged.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from opt.data.sampler import SampleStream, SkipRanges
from opt.errors import OptError

# The longest period of the blend's pattern: weights whose exact ratios need a longer one
# are rounded to multiples of 1 / MAX_PERIOD (a 0.0015% step).
MAX_PERIOD = 1 << 16


@dataclass(frozen=True)
class BlendSource:
    """One source of a blend: a name (``None`` only for a lone dataset), how many samples
    it holds, and its weight (any positive number: only the ratios count)."""

    name: str | None
    num_samples: int
    weight: float = 1.0


def integer_weights(weights: Sequence[float]) -> list[int]:
    """Positive integers in the ratios of ``weights`` (as written: 0.3 is 3/10), summing to
    at most ``MAX_PERIOD``; the nearest apportionment of ``MAX_PERIOD`` where the exact
    ratios need more (largest remainders; each source keeps at least one slot)."""
    if not weights or any(not (w > 0 and math.isfinite(w)) for w in weights):
        raise OptError(f"blend weights must be positive and finite, not {list(weights)}")
    exact = [Fraction(repr(float(w))) for w in weights]
    total = sum(exact)
    shares = [w / total for w in exact]
    period = math.lcm(*(s.denominator for s in shares))
    if period <= MAX_PERIOD:
        return [int(s * period) for s in shares]
    if len(weights) > MAX_PERIOD:
        raise OptError(f"a blend holds at most {MAX_PERIOD} sources, not {len(weights)}")
    quotas = [s * MAX_PERIOD for s in shares]
    counts = [max(1, math.floor(q)) for q in quotas]
    # Hand the slots still free to the largest remainders (or take back from the smallest).
    order = sorted(range(len(quotas)), key=lambda i: quotas[i] - counts[i], reverse=True)
    missing = MAX_PERIOD - sum(counts)
    for i in order[:missing] if missing > 0 else []:
        counts[i] += 1
    for i in reversed(order) if missing < 0 else []:
        if missing == 0:
            break
        if counts[i] > 1:
            counts[i], missing = counts[i] - 1, missing + 1
    return counts


class Blend:
    """The position -> (source, draw) map of integer weights (see the module docstring)."""

    def __init__(self, weights: Sequence[int]) -> None:
        self.weights = np.asarray(weights, dtype=np.int64)
        self.period = int(self.weights.sum())
        keys = np.concatenate([(2 * np.arange(w) + 1) / w for w in weights])
        owners = np.repeat(np.arange(len(weights)), weights)
        # Equal ratios give bit-equal doubles (division is correctly rounded), and unequal
        # ones with denominators this small differ far above float64's resolution: sorting
        # the doubles sorts the exact keys. Ties go to the source listed first.
        self.pattern = owners[np.lexsort((owners, keys))]
        prefix = np.zeros((len(weights), self.period + 1), dtype=np.int32)
        prefix[self.pattern, np.arange(1, self.period + 1)] = 1
        self.prefix = np.cumsum(prefix, axis=1, dtype=np.int32)  # 256 KiB a source at most

    def draws(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each position, the source it reads and that source's draw number."""
        cycles, slots = np.divmod(positions, self.period)
        sources = self.pattern[slots]
        return sources, cycles * self.weights[sources] + self.prefix[sources, slots]

    def consumed(self, pos: int) -> list[int]:
        """Each source's draws among positions ``[0, pos)``."""
        cycles, slot = divmod(pos, self.period)
        return (cycles * self.weights + self.prefix[:, slot]).tolist()


class BlendedStream(SkipRanges):
    """An endless, seeded sequence of (source, sample index) with a position and skips."""

    def __init__(self, sources: Sequence[BlendSource], seed: int, shuffle: bool = True) -> None:
        super().__init__()
        if not sources:
            raise OptError("a blend needs at least one source")
        names = [s.name for s in sources]
        if len(sources) > 1 and (None in names or len(set(names)) != len(names)):
            raise OptError(f"the sources of a blend need distinct names, not {names}")
        self.sources = list(sources)
        self.seed = seed
        self.shuffle = shuffle
        self.blend = Blend(integer_weights([s.weight for s in sources]))
        # A lone source walks the run's own seed, as the single-dataset stream always has;
        # several draw seeds from their names, so listing them in another order changes
        # only the interleaving, not any source's own order.
        self.streams = [SampleStream(s.num_samples, self._seed_of(s), shuffle) for s in sources]

    def _seed_of(self, source: BlendSource) -> int:
        return self.seed if len(self.sources) == 1 else _source_seed(self.seed, source.name)

    @property
    def names(self) -> list[str]:
        return [s.name or "data" for s in self.sources]

    @property
    def num_samples(self) -> int:
        """Samples over every source."""
        return sum(s.num_samples for s in self.sources)

    @property
    def shares(self) -> list[float]:
        """Each source's share of the positions (the realised weights)."""
        return (self.blend.weights / self.blend.period).tolist()

    def next_samples(self, n: int) -> list[tuple[int, int]]:
        """The next ``n`` (source, sample index) pairs; advances ``pos`` past them (and any
        skips)."""
        out: list[tuple[int, int]] = []
        while len(out) < n:
            self.pos = self._past_skip(self.pos)
            run = int(min(n - len(out), self._next_skip(self.pos) - self.pos))
            positions = np.arange(self.pos, self.pos + run, dtype=np.int64)
            sources, draws = self.blend.draws(positions)
            indices = np.empty(run, dtype=np.int64)
            for s in np.unique(sources).tolist():
                mine = sources == s
                indices[mine] = self.streams[s].at(draws[mine])
            out.extend(zip(sources.tolist(), indices.tolist(), strict=True))
            self.pos += run
        return out

    def consumed(self) -> list[int]:
        """Each source's draws so far, skipped positions included (their samples are used
        up unread)."""
        return self.blend.consumed(self.pos)

    def epochs(self) -> dict[str, float]:
        """Each source's epochs so far: its draws over its samples."""
        return {
            name: drawn / source.num_samples
            for name, drawn, source in zip(self.names, self.consumed(), self.sources, strict=True)
        }

    def copy(self) -> BlendedStream:
        """An independent stream at the same position with the same skips (the per-source
        permutations, never mutated, are shared)."""
        clone = copy.copy(self)
        clone._skips = list(self._skips)
        clone.streams = [s.copy() for s in self.streams]
        return clone

    def state_dict(self) -> dict[str, Any]:
        """Plain ints, strings and lists. A lone unnamed source saves what the
        single-dataset stream saved, so older checkpoints and this one read alike."""
        state = {
            "pos": self.pos,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "shuffle": self.shuffle,
            "skips": self.skip_list(),
        }
        if self.sources[0].name is not None:
            state["sources"] = self._recipe()
        return state

    def _recipe(self) -> list[dict[str, Any]]:
        weights = self.blend.weights.tolist()
        return [{"name": s.name, "num_samples": s.num_samples, "weight": w}
                for s, w in zip(self.sources, weights, strict=True)]  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; refuses a state saved for other sources,
        weights, sizes, seed or order."""
        mine = self.state_dict()
        saved = {key: state.get(key) for key in ("seed", "num_samples", "shuffle", "sources")}
        saved["shuffle"] = state.get("shuffle", True)
        if saved != {key: mine.get(key) for key in saved}:
            raise OptError(
                f"data state was saved for {_describe(saved)}, but this run has "
                f"{_describe(mine)}: the data, sequence length, seed, order or mixture "
                "changed under a resume"
            )
        self.pos = int(state["pos"])
        self.load_skips(state["skips"])


def mixture_plan(stream: BlendedStream, steps_left: int, samples_per_step: int) -> str:
    """The line a run starts with: each source's share, size, and the epochs it will have
    been drawn by the last step (skips to come aside)."""
    end = stream.blend.consumed(stream.pos + steps_left * samples_per_step)
    now = stream.consumed()
    parts = [
        f"{name} {share:.2%} ({source.num_samples:,} samples; epochs {drawn / source.num_samples:.2f}"
        f" now, {last / source.num_samples:.2f} at the last step)"
        for name, share, source, drawn, last in zip(
            stream.names, stream.shares, stream.sources, now, end, strict=True
        )
    ]
    return f"data: {len(parts)} sources by share of the samples: " + "; ".join(parts)


def _source_seed(seed: int, name: str | None) -> int:
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=7).digest()
    return int.from_bytes(digest, "big")  # < 2**56: room for seed + epoch in a uint64


def _describe(state: dict[str, Any]) -> str:
    if state.get("sources"):
        parts = ", ".join(f"{s['name']} ({s['num_samples']} samples, weight {s['weight']})"
                          for s in state["sources"])  # fmt: skip
        return f"sources {parts} with seed {state['seed']} (shuffle {state['shuffle']})"
    return (f"{state['num_samples']} samples with seed {state['seed']} "
            f"(shuffle {state['shuffle']})")  # fmt: skip
