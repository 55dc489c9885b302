"""Build the next step's batches in a background thread while the current step computes.

The prefetched step is only used if the loader's state is still the one it was built from:
the supervisor may skip data or roll back between steps, and a resume loads a new state.
The background thread works on a copy of the sample stream, so the loader's own state only
ever moves in the training thread, and the batches a run sees are the same with or without
prefetching.

On a GPU the batches are copied into page-locked memory in the background thread, so the
host-to-device copy in the step can be asynchronous (``non_blocking=True``).
"""

from __future__ import annotations

import copy
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from opt.data.loader import BatchLoader

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def _state_key(loader: BatchLoader, grad_accum: int) -> tuple:
    state = loader.state_dict()
    return state["pos"], tuple(map(tuple, state["skips"])), grad_accum


class PrefetchingLoader:
    """``BatchLoader`` with one step of read-ahead; same interface, same batches."""

    def __init__(self, loader: BatchLoader, pin_memory: bool = False):
        self.loader = loader
        self.pin_memory = pin_memory
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opt-data")
        self._ahead: tuple[tuple, Future] | None = None
        self.wait_s = 0.0  # time the training thread spent waiting for batches, in total

    # The loader's other attributes (stream, samples_per_step, ...) pass through.
    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["loader"], name)

    def next_microbatches(self, grad_accum: int) -> Batches:
        start = time.perf_counter()
        key = _state_key(self.loader, grad_accum)
        batches = None
        if self._ahead is not None:
            built_from, future = self._ahead
            result = future.result()  # a stale read-ahead is waited for too, then dropped
            if built_from == key:
                batches, self.loader.stream = result
        if batches is None:
            batches = self._pinned(self.loader.next_microbatches(grad_accum))
        # The copy is taken here, in the training thread: the thread never sees the
        # loader's own state, which the supervisor may change before the next step.
        ahead = copy.copy(self.loader)
        ahead.stream = self.loader.stream.copy()
        future = self._pool.submit(self._read_ahead, ahead, grad_accum)
        self._ahead = (_state_key(self.loader, grad_accum), future)
        self.wait_s += time.perf_counter() - start
        return batches

    def _read_ahead(self, ahead: BatchLoader, grad_accum: int):
        return self._pinned(ahead.next_microbatches(grad_accum)), ahead.stream

    def _pinned(self, batches: Batches) -> Batches:
        if not self.pin_memory:
            return batches
        # (inputs, targets) tuples, or fine-tuning's batches that pin themselves
        return [tuple(t.pin_memory() for t in b) if isinstance(b, tuple) else b.pin_memory()
                for b in batches]  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)  # any read-ahead no longer matches the key

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
