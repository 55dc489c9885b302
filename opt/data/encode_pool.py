"""Tokenizing on every core: worker processes, each with its own word cache.

The word cache (:mod:`opt.data.fast_encode`) is Python and numpy, so one process uses one
core. ``opt data prepare`` hands batches of documents to worker processes and writes their
token blocks in input order. Workers are spawned, not forked (the parent may hold threads),
and import only this module, numpy and ``tokenizers``; each starts in a fraction of a
second and keeps its cache for the whole run.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor

import numpy as np
from tokenizers import Tokenizer

from opt.data.fast_encode import CachedByteLevelEncoder, unicode_class_table
from opt.host_memory import retain_freed_memory

Encode = Callable[[list[str]], list[Sequence[int]]]
Block = tuple[bytes, np.ndarray]  # token ids with EOS after each document; their counts


def encode_block(encode: Encode, batch: list[str], eos: int, dtype: np.dtype) -> Block:
    """The batch's ids as one block of ``dtype``, EOS after each document, and the number
    of ids (EOS included) each document has in it."""
    per_doc = [np.asarray(ids, dtype) for ids in encode(batch)]
    lengths = np.fromiter(map(len, per_doc), np.int64, len(per_doc)) + 1
    pieces = [np.array([eos], dtype)] * (2 * len(per_doc))
    pieces[::2] = per_doc
    return np.concatenate(pieces).tobytes(), lengths


_worker: dict = {}  # in a worker process: its encoder and the output format


def _start_worker(tokenizer_json: str, classes: np.ndarray, eos: int, dtype: str) -> None:
    # Every batch allocates and frees arrays of the same tens of MB: keep them mapped, or
    # each batch faults them in again page by page (a third of a worker's time was kernel).
    retain_freed_memory()
    # One core per worker: `tokenizers`' own thread pool (for the new words) would only
    # spin on the cores the other workers use.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    encoder = CachedByteLevelEncoder(Tokenizer.from_str(tokenizer_json), classes)
    _worker.update(encode=encoder.encode_batch, eos=eos, dtype=np.dtype(dtype))


def _encode_in_worker(batch: list[str]) -> Block:
    return encode_block(_worker["encode"], batch, _worker["eos"], _worker["dtype"])


class EncodePool:
    """``workers`` processes encoding batches with the word cache; use as a context."""

    def __init__(self, tokenizer: Tokenizer, workers: int, eos: int, dtype: np.dtype) -> None:
        self.workers = workers
        self._executor = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            # The class table is built once here (0.3 s) and sent, not rebuilt per worker.
            initargs=(tokenizer.to_str(), unicode_class_table(), eos, dtype.str),
        )

    def map(self, batches: Iterable[tuple[list[str], int]]) -> Iterator[tuple[Block, int]]:
        """Each batch's block and its size in bytes, in input order. At most two batches
        per worker are in flight, so a huge corpus is never read ahead into memory."""
        pending: deque[tuple[Future, int]] = deque()
        for batch, n_bytes in batches:
            pending.append((self._executor.submit(_encode_in_worker, batch), n_bytes))
            if len(pending) >= 2 * self.workers:
                future, size = pending.popleft()
                yield future.result(), size
        while pending:
            future, size = pending.popleft()
            yield future.result(), size

    def __enter__(self) -> EncodePool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._executor.shutdown(cancel_futures=True)
