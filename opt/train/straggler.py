"""Stragglers: a rank persistently slower than the others is named, and past a limit the
run stops so that the launcher can requeue it without that node.

The figure is not the step time. In synchronous data parallelism every rank's step takes
the same wall-clock time: the fast ranks wait for the slow one in the collectives. It is
each rank's own compute: the time inside its transformer blocks' forwards, per block
forward, so that pipeline stages holding different numbers of blocks compare. Every
training forward counts (activation checkpointing's recomputation too: the same work),
evaluations do not (``training_forward``, shared with the activation watch).

Where the waiting happens, read in torch 2.13's FSDP2
(``torch/distributed/fsdp/_fully_shard/_fsdp_state.py``, ``FSDPState.init``):
``fully_shard`` registers its forward pre-hook with ``prepend=True`` and its forward hook
with ``prepend=False``. The pre-hook (``FSDPParamGroup.pre_forward``: ``unshard``, then
``wait_for_unshard``, whose ``foreach_all_gather_copy_out`` waits on the all-gather; on a
GPU, the compute stream waits on the all-gather stream) therefore runs before any hook
registered after it, and our start mark comes after the wait for the slowest peer. Its
post-hook only reshards (local, no communication) and runs before our end mark. FSDP
units nested inside a block (the LayerNorms of bf16 runs, data_parallel.py) wait for
their own all-gather mid-block: the clock is paused across their pre-hook (a pre-hook of
ours prepended before FSDP's, another appended after it). Under activation checkpointing
the clock sits on the wrapped block, which the recomputation calls (the wrapper, where
FSDP's hooks are, is not called again; FSDP's pre-backward has gathered the parameters).

What the figure still holds: tensor (and sequence) parallelism's collectives inside the
block, so every rank of a slow rank's tensor-parallel group looks slow too; that group
lives on one node, so the host named is still the right one.

Every ``straggler_every`` steps all ranks agree on every rank's figure with one all-reduce
(each rank writes its own slot of a zero vector) and decide alike from the same numbers.
"""

from __future__ import annotations

import socket
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from opt.config import ResilienceConfig
from opt.train.activation_watch import training_forward


class BlockClock:
    """Seconds this rank spends computing inside its blocks' training forwards."""

    def __init__(self, parts: list[torch.nn.Module], device: torch.device):
        self.cuda = device.type == "cuda"  # kernels run asynchronously: time them by events
        self.seconds = 0.0
        self.forwards = 0
        self._inside = False
        self._start: float | torch.cuda.Event | None = None
        self._spans: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.handles = []
        for part in parts:
            for block in getattr(part, "layers", {}).values():
                timed = getattr(block, "_checkpoint_wrapped_module", block)
                self.handles += [
                    timed.register_forward_pre_hook(self._enter),
                    # Also when the forward raises: activation checkpointing's recomputation
                    # ends by an exception once it has what backward needs (early stop).
                    timed.register_forward_hook(self._leave, always_call=True),
                ]
                for unit in timed.modules():
                    if unit is not timed and isinstance(unit, FSDPModule):
                        self.handles += [
                            unit.register_forward_pre_hook(self._pause, prepend=True),
                            unit.register_forward_pre_hook(self._resume),
                        ]

    def _mark(self) -> float | torch.cuda.Event:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _stop(self) -> None:
        if self._start is None:
            return
        if self.cuda:
            self._spans.append((self._start, self._mark()))
        else:
            self.seconds += time.perf_counter() - self._start
        self._start = None

    # Hooks run eagerly under torch.compile (a compiled block graph-breaks around them).
    @torch.compiler.disable
    def _enter(self, module: torch.nn.Module, args) -> None:
        if training_forward(module):
            self._inside = True
            self._start = self._mark()

    @torch.compiler.disable
    def _leave(self, module: torch.nn.Module, args, output) -> None:
        if self._inside:
            self._stop()
            self._inside = False
            self.forwards += 1

    @torch.compiler.disable
    def _pause(self, module: torch.nn.Module, args) -> None:
        self._stop()

    @torch.compiler.disable
    def _resume(self, module: torch.nn.Module, args) -> None:
        if self._inside:
            self._start = self._mark()

    def take(self) -> float:
        """Mean seconds per block forward since the last call (0.0 when there was none).
        On a GPU it waits for the last forward's kernels (done by then: the step's agreed
        vector was copied to the host after backward)."""
        if self._spans:
            self._spans[-1][1].synchronize()
            self.seconds += sum(start.elapsed_time(end) for start, end in self._spans) / 1e3
            self._spans.clear()
        mean = self.seconds / self.forwards if self.forwards else 0.0
        self.seconds, self.forwards = 0.0, 0
        return mean


@dataclass(frozen=True)
class Slow:
    """A rank slow in a window."""

    rank: int
    seconds_per_block: float
    ratio: float  # to the median of all ranks' figures
    windows: int  # consecutive slow windows, this one included


@dataclass(frozen=True)
class Verdict:
    figures: list[float]  # every rank's seconds per block forward (0.0: none measured)
    median: float
    slow: list[Slow]  # every rank slow in this window
    named: list[Slow]  # slow for `patience` windows in a row as of this one: name them
    requeue: list[Slow]  # slow for `requeue_after` windows in a row: stop without them


class Streaks:
    """The decision from one window's agreed figures: no I/O, no collectives, so that
    every rank, holding the same figures, decides the same."""

    def __init__(self, world_size: int, factor: float, patience: int, requeue_after: int):
        self.factor, self.patience, self.requeue_after = factor, patience, requeue_after
        self.windows = [0] * world_size  # each rank's current streak of slow windows

    def judge(self, figures: list[float]) -> Verdict:
        measured = [f for f in figures if f > 0]  # a rank without blocks has no figure
        median = statistics.median(measured) if measured else 0.0
        slow = []
        for rank, figure in enumerate(figures):
            if median > 0 and figure >= self.factor * median:
                self.windows[rank] += 1
                slow.append(Slow(rank, figure, figure / median, self.windows[rank]))
            else:
                self.windows[rank] = 0
        named = [s for s in slow if s.windows == self.patience]  # once per streak
        requeue = [s for s in slow if self.requeue_after and s.windows >= self.requeue_after]
        return Verdict(list(figures), median, slow, named, requeue)


class StragglerWatch:
    """This rank's clock, the window's agreement and the streaks (collective: every rank
    builds one and calls ``window`` at the same steps)."""

    def __init__(
        self, cfg: ResilienceConfig, parts: list[torch.nn.Module], device: torch.device,
        rank: int, world_size: int,
    ):  # fmt: skip
        self.every, self.rank, self.device = cfg.straggler_every, rank, device
        self.clock = BlockClock(parts, device)
        self.streaks = Streaks(world_size, cfg.straggler_factor, cfg.straggler_patience,
                               cfg.straggler_requeue_after)  # fmt: skip
        self.hosts: list[str] = [""] * world_size  # each rank's host, gathered once
        dist.all_gather_object(self.hosts, socket.gethostname())

    @classmethod
    def build(
        cls, cfg: ResilienceConfig, parts: list[torch.nn.Module], device: torch.device,
        rank: int, world_size: int,
    ) -> StragglerWatch | None:  # fmt: skip
        """The watch, or None when detection is off (``straggler_every`` 0, or one rank)."""
        if cfg.straggler_every == 0 or world_size == 1:
            return None
        return cls(cfg, parts, device, rank, world_size)

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def window(self) -> Verdict:
        """Every rank's figure since the last window, agreed, and judged (collective)."""
        figures = torch.zeros(len(self.hosts), dtype=torch.float64, device=self.device)
        figures[self.rank] = self.clock.take()
        dist.all_reduce(figures)  # SUM: each slot has one writer
        return self.streaks.judge(figures.tolist())
