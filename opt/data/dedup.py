"""Deduplication across sources: exact duplicates by a hash of the text, near duplicates by
MinHash LSH over word n-gram shingles (OPT-175B: Jaccard >= 0.95 across all its sources).

Documents are seen in one order: the sources in the order given, each source's inputs in the
order given, each input's documents in order. A document is decided when it is seen, against
the documents kept before it, so the first copy is the one kept:

1. Exact: the BLAKE2b-128 digest of the text's UTF-8 bytes, unchanged (no normalization: a
   copy that differs in case or spacing is left to the near pass, where it scores 1.0).
2. Near: the document's shingles are its word n-grams, words being the runs of bytes between
   ASCII whitespace after ASCII letters are lowercased (a document of fewer than n words is
   one shingle of all its words; a document without words is not compared). Its MinHash
   signature is looked up in a ``datasketch.MinHashLSH`` index of the kept documents; each
   candidate is confirmed by the signatures' estimated Jaccard (the share of equal slots)
   against the threshold, so an LSH false positive removes nothing. A confirmed document is
   removed as a duplicate of the candidate with the highest estimate (the earliest on a tie)
   and is not indexed: a document is removed only for resembling one that is kept, so the
   far end of a chain of small edits stays.

A later copy of a text already decided gets the same verdict without being compared again:
an exact duplicate of the kept copy, or, if the first copy was removed as a near duplicate,
a near duplicate of the same kept document with the same estimate.

Signatures are computed here with numpy, for a whole batch of documents at once, and equal
``datasketch.MinHash(num_perm, seed, hashfunc=shingle_hash32)`` fed the same shingles
(its default "affine32" scheme: the hash premixed with MurmurHash3's fmix32, then
``a * h + b`` mod 2^32 with datasketch's own seeded ``a, b``); tests/test_dedup.py checks it.
datasketch's own per-document update hashes every shingle in a Python call and is several
times slower (bench/dedup_speed.py, BENCHMARKS.md). The shingle hash is our own: a
polynomial hash of each word's bytes, mixed, then a polynomial of the n words' hashes, mixed,
high 32 bits; both polynomials are computed with prefix sums over the batch, no Python loop.
With ``workers`` > 1, spawned processes sign the next batches while this one reads, decides
and writes; the decisions stay in this process and in order, so the output is the same.

Memory: the digest and verdict of every distinct text, the signature (4 bytes a permutation)
and the LSH entries (a key in each band's table) of every kept document: 3.7 KB a document
at 128 permutations (measured with tracemalloc on 100,000), so about 4 GB a million: this is a
one-machine dedup for up to some millions of documents, not OPT's whole 180B-token union.

Output (under ``out``, all renamed into place together at the end, the report last; nothing is
published if anything fails): ``NAME.jsonl.zst`` per source, its kept documents as
``{"text": ...}`` lines in input order; ``removed.jsonl.zst``, one line per removed document;
``dedup-report.json`` and ``dedup-report.md``, the counts per source.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import secrets
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from opt.data.corpus import iter_documents, resolve_inputs, total_bytes
from opt.errors import OptError
from opt.fsutil import fsync_dir

REPORT_VERSION = 1
REPORT_JSON = "dedup-report.json"
REPORT_MD = "dedup-report.md"
REMOVED = "removed.jsonl.zst"
OUTPUT_SUFFIX = ".jsonl.zst"
# LSH banding weights (false positive, false negative) for datasketch's choice of bands: a
# false positive costs one signature comparison here (every candidate is confirmed), a false
# negative keeps a duplicate, so misses weigh more. At threshold 0.95 with 128 permutations
# this gives 6 bands of 21 rows: a pair with Jaccard 0.95 becomes a candidate with
# probability 0.92 and one of 0.97 with 0.99 (datasketch's default weights, 0.5/0.5, give 3
# bands of 42 rows: 0.31 and 0.62).
LSH_WEIGHTS = (0.05, 0.95)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_RESERVED = {REMOVED.removesuffix(OUTPUT_SUFFIX)}
_ZSTD_LEVEL = 3
# Below this much input one process signs about as soon as two: a worker takes about half a
# second to start (spawned, importing numpy), and the parent reads and writes meanwhile.
PARALLEL_MIN_BYTES = 32 << 20

# ----- the shingle hash -------------------------------------------------------------------
_M64 = (1 << 64) - 1
_P = 0x100000001B3  # FNV-64's prime: odd, so it has an inverse mod 2^64
_Q = 0x9E3779B97F4A7C15  # the golden-ratio constant, odd
_P_INV = pow(_P, -1, 1 << 64)
_Q_INV = pow(_Q, -1, 1 << 64)
_ASCII_SPACE = b" \t\n\r\x0b\x0c"  # what bytes.split() splits on
_IS_SPACE = np.zeros(256, dtype=bool)
_IS_SPACE[list(_ASCII_SPACE)] = True
_LOWER = np.arange(256, dtype=np.uint8)
_LOWER[65:91] += 32  # A-Z -> a-z, as bytes.lower()


def _mix64_int(x: int) -> int:
    """MurmurHash3's fmix64 on a Python int (the reference for ``_mix64``)."""
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & _M64
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & _M64
    return x ^ (x >> 33)


def _mix64(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(33))
    x *= np.uint64(0xFF51AFD7ED558CCD)  # uint64 arrays wrap: the mod 2^64 meant here
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xC4CEB9FE1A85EC53)
    return x ^ (x >> np.uint64(33))


def _fmix32(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's fmix32, as datasketch premixes each hash in its affine32 scheme."""
    x = x ^ (x >> np.uint32(16))
    x *= np.uint32(0x85EBCA6B)
    x ^= x >> np.uint32(13)
    x *= np.uint32(0xC2B2AE35)
    return x ^ (x >> np.uint32(16))


def words_of(text: str) -> list[bytes]:
    """The words shingles are made of: UTF-8, ASCII letters lowercased, split on ASCII
    whitespace (``bytes.lower`` and ``bytes.split`` do exactly that)."""
    return text.encode("utf-8").lower().split()


def shingles_of(text: str, ngram: int) -> list[tuple[bytes, ...]]:
    """Every run of ``ngram`` consecutive words, in order (repeats included); a document of
    fewer words is one shingle of all of them, one without words has none."""
    words = words_of(text)
    if not words:
        return []
    if len(words) < ngram:
        return [tuple(words)]
    return [tuple(words[i : i + ngram]) for i in range(len(words) - ngram + 1)]


def shingle_hash32(shingle: tuple[bytes, ...]) -> int:
    """The 32-bit hash of one shingle, in plain Python: what ``minhash_signatures`` computes
    for every shingle at once, and a ``hashfunc`` for ``datasketch.MinHash``."""
    h = 0
    for word in shingle:
        w = 0
        for byte in word:
            w = (w * _P + byte + 1) & _M64
        h = (h * _Q + _mix64_int(w)) & _M64
    return _mix64_int(h) >> 32


def _powers(base: int, n: int) -> np.ndarray:
    """base^0 .. base^(n-1) mod 2^64."""
    out = np.full(n, base, dtype=np.uint64)
    out[0] = 1
    return np.cumprod(out, out=out)  # wraps mod 2^64


class _PowerTable:
    """Powers of a base and of its inverse, grown on demand and reused across batches."""

    def __init__(self, base: int, inverse: int) -> None:
        self.base, self.inverse = base, inverse
        self.up = self.down = np.ones(0, dtype=np.uint64)

    def get(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self.up) < n:
            size = max(n, 2 * len(self.up))
            self.up, self.down = _powers(self.base, size), _powers(self.inverse, size)
        return self.up[:n], self.down[:n]


def _span_hashes(values: np.ndarray, starts: np.ndarray, ends: np.ndarray, table: _PowerTable):
    """Horner's ``h = h * base + v`` over ``values[s:e]`` for every span at once:
    sum_j v_j base^(e-1-j) = base^(e-1) * (G[e] - G[s]), with G the prefix sums of
    v_j base^-j (every odd number is invertible mod 2^64)."""
    up, down = table.get(len(values) + 1)
    prefix = np.zeros(len(values) + 1, dtype=np.uint64)
    np.cumsum(values * down[: len(values)], out=prefix[1:])
    return (prefix[ends] - prefix[starts]) * up[ends - 1]


class SignatureMaker:
    """MinHash signatures of batches of documents: ``num_perm`` uint32 per document, equal to
    ``datasketch.MinHash(num_perm, seed, hashfunc=shingle_hash32)`` fed ``shingles_of``."""

    def __init__(
        self,
        num_perm: int = 128,
        ngram: int = 5,
        seed: int = 1,
        chunk: int = 16384,
        permutations: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        if num_perm < 2:
            raise OptError(f"--num-perm must be at least 2, not {num_perm}")
        if ngram < 1:
            raise OptError(f"--ngram must be at least 1, not {ngram}")
        self.num_perm, self.ngram, self.seed = num_perm, ngram, seed
        if permutations is None:  # datasketch's own, so that the signatures are its own
            from datasketch import MinHash

            permutations = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
        a, b = permutations
        self.a, self.b = np.asarray(a, np.uint32), np.asarray(b, np.uint32)
        self.chunk = chunk  # shingles per (num_perm, chunk) block: 8 MB at 128 permutations
        self._bytes = _PowerTable(_P, _P_INV)
        self._words = _PowerTable(_Q, _Q_INV)

    def shingle_hashes(self, encoded: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """The 32-bit hash of every shingle of every document, and where each document's
        shingles start (``len(encoded) + 1`` offsets)."""
        n_docs = len(encoded)
        data = np.frombuffer(b"\n".join(encoded), dtype=np.uint8)  # "\n" ends every word
        doc_bytes = np.zeros(n_docs + 1, dtype=np.int64)
        np.cumsum([len(e) + 1 for e in encoded], out=doc_bytes[1:])
        space = _IS_SPACE[data]
        letter = ~space
        before = np.concatenate(([True], space[:-1]))
        after = np.concatenate((space[1:], [True]))
        starts = np.flatnonzero(letter & before)
        ends = np.flatnonzero(letter & after) + 1
        if len(starts) == 0:
            return np.zeros(0, dtype=np.uint32), np.zeros(n_docs + 1, dtype=np.int64)
        byte_values = _LOWER[data].astype(np.uint64) + np.uint64(1)
        word_hashes = _mix64(_span_hashes(byte_values, starts, ends, self._bytes))
        # Words per document, and each word's place in its document.
        doc_words = np.zeros(n_docs + 1, dtype=np.int64)
        doc_words[1:] = np.searchsorted(starts, doc_bytes[1:])
        counts = np.diff(doc_words)
        doc_of = np.repeat(np.arange(n_docs), counts)
        place = np.arange(len(starts)) - doc_words[doc_of]
        count = counts[doc_of]
        n = self.ngram
        is_first = (place <= count - n) | ((place == 0) & (count < n))
        first = np.flatnonzero(is_first)
        last = first + np.minimum(n, count[first])
        shingles = _mix64(_span_hashes(word_hashes, first, last, self._words))
        doc_shingles = np.zeros(n_docs + 1, dtype=np.int64)
        doc_shingles[1:] = np.cumsum(np.maximum(counts - n + 1, (counts > 0).astype(np.int64)))
        return (shingles >> np.uint64(32)).astype(np.uint32), doc_shingles

    def signatures(self, encoded: Sequence[bytes]) -> np.ndarray:
        """``(len(encoded), num_perm)`` uint32; a document without words gets datasketch's
        empty signature (every slot 2^32 - 1)."""
        return self.sign(encoded)[0]

    def sign(self, encoded: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """The signatures, and which documents have words (shingles) at all."""
        hashes, offsets = self.shingle_hashes(encoded)
        out = np.full((len(encoded), self.num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
        hv = _fmix32(hashes)
        nonempty = np.flatnonzero(np.diff(offsets) > 0)
        doc_start, doc_end = offsets[nonempty], offsets[nonempty + 1]
        # One permutation per row, shingles along it: numpy broadcasts a scalar down each
        # contiguous row and reduces along it, 4x faster than shingles as rows (measured).
        block = np.empty((self.num_perm, self.chunk), dtype=np.uint32)
        a, b = self.a[:, None], self.b[:, None]
        for s0 in range(0, len(hv), self.chunk):
            s1 = min(s0 + self.chunk, len(hv))
            rows = block[:, : s1 - s0]
            np.multiply(a, hv[None, s0:s1], out=rows)  # wraps mod 2^32, as datasketch's
            rows += b
            lo = np.searchsorted(doc_end, s0, side="right")
            hi = np.searchsorted(doc_start, s1, side="left")
            docs = nonempty[lo:hi]
            local = np.maximum(doc_start[lo:hi], s0) - s0
            mins = np.minimum.reduceat(rows, local, axis=1).T  # (docs, num_perm)
            out[docs] = np.minimum(out[docs], mins)
        return out, np.diff(offsets) > 0


# ----- signatures on every core ------------------------------------------------------------
_worker: dict = {}  # in a worker process: its SignatureMaker


def _start_worker(num_perm: int, ngram: int, seed: int, permutations: tuple) -> None:
    _worker["maker"] = SignatureMaker(num_perm, ngram, seed, permutations=permutations)


def _sign_in_worker(encoded: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    return _worker["maker"].sign(encoded)


class _SignPool:
    """Batches signed in order, in this process (``workers=1``) or in ``workers`` spawned
    processes (they import numpy and this module, not datasketch) with at most two batches
    per worker in flight, so a large corpus is never read far ahead."""

    def __init__(self, maker: SignatureMaker, workers: int) -> None:
        self.maker, self.workers = maker, workers
        self._executor = None
        if workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self._executor = ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=(maker.num_perm, maker.ngram, maker.seed, (maker.a, maker.b)),
            )

    def map(self, jobs: Iterable[tuple[object, list[bytes]]]) -> Iterator[tuple[object, tuple]]:
        """``(tag, encoded)`` in, ``(tag, (signatures, has_words))`` out, in order."""
        if self._executor is None:
            for tag, encoded in jobs:
                yield tag, self.maker.sign(encoded)
            return
        from collections import deque

        pending: deque = deque()
        for tag, encoded in jobs:
            pending.append((tag, self._executor.submit(_sign_in_worker, encoded)))
            if len(pending) >= 2 * self.workers:
                tag, future = pending.popleft()
                yield tag, future.result()
        while pending:
            tag, future = pending.popleft()
            yield tag, future.result()

    def __enter__(self) -> _SignPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._executor is not None:
            self._executor.shutdown(cancel_futures=True)


# ----- the LSH index -----------------------------------------------------------------------
class _Sketch:
    """What ``MinHashLSH`` reads of a MinHash (its hash values, length and scheme), without
    building a ``MinHash`` per document."""

    __slots__ = ("hashvalues",)
    scheme = "affine32"

    def __init__(self, hashvalues: np.ndarray) -> None:
        self.hashvalues = hashvalues

    def __len__(self) -> int:
        return len(self.hashvalues)


class NearIndex:
    """The kept documents' signatures in a ``datasketch.MinHashLSH``, each candidate it
    returns confirmed by the estimated Jaccard against the threshold."""

    def __init__(self, threshold: float, num_perm: int) -> None:
        from datasketch import MinHashLSH

        self.threshold = threshold
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=LSH_WEIGHTS)
        self.bands, self.rows = self.lsh.b, self.lsh.r
        self._signatures = np.empty((1024, num_perm), dtype=np.uint32)
        self.size = 0
        self.candidates = 0  # candidates the LSH returned
        self.rejected = 0  # of those, the ones whose estimate fell below the threshold

    def match(self, signature: np.ndarray) -> tuple[int, float] | None:
        """The kept document this one duplicates (its key) and the estimated Jaccard, or None."""
        keys = self.lsh.query(_Sketch(signature))
        if not keys:
            return None
        keys = np.array(sorted(keys))
        estimates = (self._signatures[keys] == signature).mean(axis=1)
        self.candidates += len(keys)
        confirmed = estimates >= self.threshold
        self.rejected += int(len(keys) - confirmed.sum())
        if not confirmed.any():
            return None
        best = int(np.argmax(np.where(confirmed, estimates, -1.0)))  # first of the highest
        return int(keys[best]), float(estimates[best])

    def add(self, signature: np.ndarray) -> int:
        key = self.size
        if key == len(self._signatures):
            self._signatures = np.concatenate([self._signatures, np.empty_like(self._signatures)])
        self._signatures[key] = signature
        self.lsh.insert(key, _Sketch(signature), check_duplication=False)
        self.size += 1
        return key


# ----- the run -----------------------------------------------------------------------------
@dataclass(frozen=True)
class DedupSettings:
    threshold: float = 0.95
    """Near duplicates: estimated Jaccard of the shingle sets at or above this is removed."""
    num_perm: int = 128
    """MinHash permutations (signature length)."""
    ngram: int = 5
    """Words per shingle."""
    seed: int = 1
    """Seed of datasketch's permutations (its default)."""
    text_key: str = "text"
    """JSON field holding the text."""

    def check(self) -> None:
        if not 0 < self.threshold <= 1:
            raise OptError(f"--threshold must be in (0, 1], not {self.threshold}")
        if self.num_perm < 2:
            raise OptError(f"--num-perm must be at least 2, not {self.num_perm}")
        if self.ngram < 1:
            raise OptError(f"--ngram must be at least 1, not {self.ngram}")


@dataclass
class SourceCounts:
    name: str
    inputs: list[str]
    documents: int = 0
    exact_within: int = 0
    exact_across: int = 0
    near_within: int = 0
    near_across: int = 0
    kept: int = 0
    bytes_in: int = 0
    bytes_kept: int = 0
    output: str = ""


@dataclass
class DedupReport:
    settings: dict
    sources: list[SourceCounts]
    lsh: dict = field(default_factory=dict)
    version: int = REPORT_VERSION

    def total(self) -> SourceCounts:
        total = SourceCounts("total", [])
        for s in self.sources:
            for key in ("documents", "exact_within", "exact_across", "near_within",
                        "near_across", "kept", "bytes_in", "bytes_kept"):  # fmt: skip
                setattr(total, key, getattr(total, key) + getattr(s, key))
        return total

    def to_json(self) -> str:
        body = asdict(self)
        body["total"] = {
            k: v for k, v in asdict(self.total()).items() if k not in ("name", "inputs", "output")
        }
        body["removed"] = REMOVED
        return json.dumps(body, indent=1) + "\n"

    def markdown(self) -> str:
        header = ("source", "documents", "exact dup. (within)", "exact dup. (across)",
                  "near dup. (within)", "near dup. (across)", "kept", "MB in", "MB kept")  # fmt: skip
        rows = [header]
        for s in [*self.sources, self.total()]:
            rows.append((s.name, *(f"{getattr(s, k):,}" for k in ("documents", "exact_within",
                         "exact_across", "near_within", "near_across", "kept")),
                         f"{s.bytes_in / 1e6:,.2f}", f"{s.bytes_kept / 1e6:,.2f}"))  # fmt: skip
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
                 for r in rows]  # fmt: skip
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        st = self.settings
        return (
            "\n".join(lines)
            + f"\n\nExact: identical UTF-8 text. Near: estimated Jaccard >= {st['threshold']} of "
            f"word {st['ngram']}-gram shingles (MinHash, {st['num_perm']} permutations, seed "
            f"{st['seed']}; LSH {st['bands']} bands x {st['rows']} rows). Within: the kept copy "
            "is in the same source; across: in an earlier source. The first copy is kept "
            f"(sources in the order given, then input order). LSH candidate pairs: "
            f"{self.lsh['candidates']:,}, of which {self.lsh['rejected']:,} were below the "
            f"threshold on their signatures (not duplicates). Every removed document is listed "
            f"in {REMOVED}.\n"
        )


def parse_sources(specs: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``NAME=INPUT`` arguments to (name, inputs) in order of first appearance; a repeated
    name adds its input to that source."""
    if not specs:
        raise OptError("no sources given: expected NAME=INPUT arguments")
    sources: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            raise OptError(
                f"expected NAME=INPUT (a source name, '=', a file or directory), not {spec!r}"
            )
        if not _NAME.fullmatch(name) or name in _RESERVED:
            raise OptError(
                f"bad source name {name!r}: use letters, digits, '.', '_', '-' (not starting "
                f"with '.', '_' or '-'), and not {', '.join(sorted(_RESERVED))}"
            )
        sources.setdefault(name, []).append(path)
    return list(sources.items())


class _Outputs:
    """Temp files beside their targets in ``out``, renamed into place together or deleted."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self._created_dir = not out.exists()
        self._pending: list[tuple[Path, Path]] = []
        self._published = False

    def open(self, name: str) -> BinaryIO:
        final = self.out / name
        tmp = final.with_name(f".{final.name}.{secrets.token_hex(6)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        self._pending.append((tmp, final))
        return os.fdopen(fd, "wb")

    def write(self, name: str, data: bytes) -> None:
        with self.open(name) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def publish(self) -> None:
        """Rename in order of creation: the report, written last, proves the rest is there."""
        (self.out / REPORT_JSON).unlink(missing_ok=True)
        for tmp, final in self._pending:
            os.replace(tmp, final)
        self._pending.clear()
        self._published = True
        fsync_dir(self.out)

    def __enter__(self) -> _Outputs:
        self.out.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for tmp, _ in self._pending:
            tmp.unlink(missing_ok=True)
        if not self._published and self._created_dir:
            with contextlib.suppress(OSError):
                self.out.rmdir()  # only if empty: a failed run leaves no trace


class _ZstdLines:
    """JSON lines into a zstandard stream over a temp file; ``close`` fsyncs it."""

    def __init__(self, f: BinaryIO) -> None:
        import zstandard

        self._file = f
        self._stream = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).stream_writer(f, closefd=False)
        self._buffer = io.StringIO()
        self._buffered = 0

    def write(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        self._buffer.write(line)
        self._buffered += len(line)
        if self._buffered >= 1 << 20:
            self._flush()

    def _flush(self) -> None:
        self._stream.write(self._buffer.getvalue().encode("utf-8"))
        self._buffer = io.StringIO()
        self._buffered = 0

    def close(self) -> None:
        self._flush()
        self._stream.close()  # ends the zstd frame
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        self._file.close()


@dataclass
class _Doc:
    source: int
    number: int  # in its source
    input: str
    input_number: int  # in its input file
    text: str
    encoded: bytes


def _documents(sources: list[tuple[str, list]], text_key: str) -> Iterator[_Doc]:
    for s, (name, resolved) in enumerate(sources):
        number = 0
        for src in resolved:
            for i, text in enumerate(iter_documents([src], text_key)):
                yield _Doc(s, number, str(src), i, text, text.encode("utf-8"))
                number += 1
        if number == 0:  # a mixture component without documents is a mistake, not a source
            raise OptError(
                f"source {name!r} has no documents (inputs: {', '.join(map(str, resolved))})"
            )


def _batches(docs: Iterable[_Doc], max_docs: int, max_bytes: int) -> Iterator[list[_Doc]]:
    batch: list[_Doc] = []
    size = 0
    for doc in docs:
        batch.append(doc)
        size += len(doc.encoded)
        if len(batch) >= max_docs or size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def dedup_sources(
    specs: Sequence[tuple[str, Sequence[str]]],
    out: str | Path,
    settings: DedupSettings = DedupSettings(),
    *,
    batch_docs: int = 2048,
    batch_bytes: int = 8 << 20,
    workers: int | None = None,
) -> DedupReport:
    """Deduplicate the sources ``(name, inputs)`` together into ``out`` (see the module doc).
    Every input is resolved before anything is written; any error publishes nothing.
    ``workers`` processes compute the signatures (default: every usable core, or one for
    inputs under ``PARALLEL_MIN_BYTES``); the outputs do not depend on it."""
    settings.check()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OptError(f"--out {out} exists and is not a directory")
    names = [name for name, _ in specs]
    if len(set(names)) != len(names):
        raise OptError(f"a source is named twice: {names}")
    resolved = [(name, resolve_inputs(list(inputs))) for name, inputs in specs]
    targets = [REMOVED, REPORT_JSON, REPORT_MD, *(name + OUTPUT_SUFFIX for name in names)]
    if clash := [t for t in targets if (out / t).is_dir()]:
        raise OptError(f"cannot write {out / clash[0]}: a directory is in the way")
    maker = SignatureMaker(settings.num_perm, settings.ngram, settings.seed)
    index = NearIndex(settings.threshold, settings.num_perm)
    counts = [SourceCounts(name, [str(i) for i in inputs], output=name + OUTPUT_SUFFIX)
              for name, inputs in specs]  # fmt: skip
    # digest of a text seen -> how its copies are removed: ("exact", the kept copy, 1.0), or,
    # where the first copy was itself a near duplicate, ("near", the one it repeats, estimate)
    verdicts: dict[bytes, tuple[str, tuple[int, int], float]] = {}
    near_owner: list[tuple[int, int]] = []  # index key -> (source, number)

    if workers is None:
        workers = _default_workers(resolved)
    elif workers < 1:
        raise OptError(f"--workers must be at least 1, not {workers}")
    with _Outputs(out) as outputs, _SignPool(maker, workers) as pool:
        removed = _ZstdLines(outputs.open(REMOVED))
        writers: list[_ZstdLines] = []
        try:
            jobs = _sign_jobs(
                _batches(_documents(resolved, settings.text_key), batch_docs, batch_bytes)
            )
            for (batch, digests, row), (signed, worded) in pool.map(jobs):
                # Each document decided in order, against everything decided before it.
                for doc, digest in zip(batch, digests, strict=True):
                    c = counts[doc.source]
                    c.documents += 1
                    c.bytes_in += len(doc.encoded)
                    if (verdict := verdicts.get(digest)) is not None:  # a copy of an earlier text
                        kind, kept, jaccard = verdict
                        _remove(removed, c, counts, doc, kind, kept, jaccard)
                        continue
                    signature, has_words = signed[row[digest]], worded[row[digest]]
                    hit = index.match(signature) if has_words else None
                    if hit is not None:
                        key, jaccard = hit
                        # Its later copies repeat this verdict: they duplicate the same kept one.
                        verdicts[digest] = ("near", near_owner[key], jaccard)
                        _remove(removed, c, counts, doc, "near", near_owner[key], jaccard)
                        continue
                    verdicts[digest] = ("exact", (doc.source, doc.number), 1.0)
                    if has_words:
                        index.add(signature)
                        near_owner.append((doc.source, doc.number))
                    while len(writers) <= doc.source:  # sources begin in order
                        if writers:
                            writers[-1].close()
                        writers.append(_ZstdLines(outputs.open(counts[len(writers)].output)))
                    writers[doc.source].write({"text": doc.text})
                    c.kept += 1
                    c.bytes_kept += len(doc.encoded)
            while len(writers) < len(counts):  # sources with no documents, or none kept
                if writers:
                    writers[-1].close()
                writers.append(_ZstdLines(outputs.open(counts[len(writers)].output)))
            writers[-1].close()
            removed.close()
        except BaseException:
            for w in [*writers, removed]:
                w.abort()
            raise
        report = DedupReport(
            settings={
                **asdict(settings),
                "bands": index.bands,
                "rows": index.rows,
                "lsh_weights": list(LSH_WEIGHTS),
            },
            sources=counts,
            lsh={"indexed": index.size, "candidates": index.candidates, "rejected": index.rejected},
        )
        outputs.write(REPORT_MD, report.markdown().encode())
        outputs.write(REPORT_JSON, report.to_json().encode())
        outputs.publish()
    return report


def _default_workers(resolved: list[tuple[str, list]]) -> int:
    size = sum(total_bytes(sources) for _, sources in resolved)
    return len(os.sched_getaffinity(0)) if size >= PARALLEL_MIN_BYTES else 1


def _sign_jobs(batches: Iterable[list[_Doc]]) -> Iterator[tuple[tuple, list[bytes]]]:
    """For each batch: the texts to sign, those not seen before (in this batch or an earlier
    one): a text's first copy is signed in its own batch, its later copies copy its verdict."""
    submitted: set[bytes] = set()
    for batch in batches:
        digests = [hashlib.blake2b(d.encoded, digest_size=16).digest() for d in batch]
        row: dict[bytes, int] = {}
        encoded = []
        for doc, digest in zip(batch, digests, strict=True):
            if digest not in submitted:
                submitted.add(digest)
                row[digest] = len(encoded)
                encoded.append(doc.encoded)
        yield (batch, digests, row), encoded


def _remove(removed: _ZstdLines, c: SourceCounts, counts: list[SourceCounts], doc: _Doc,
            kind: str, kept: tuple[int, int], jaccard: float) -> None:  # fmt: skip
    within = kept[0] == doc.source
    counter = f"{kind}_{'within' if within else 'across'}"
    setattr(c, counter, getattr(c, counter) + 1)
    removed.write({
        "source": c.name,
        "number": doc.number,
        "input": doc.input,
        "input_number": doc.input_number,
        "kind": kind,
        "within": within,
        "duplicate_of": {"source": counts[kept[0]].name, "number": kept[1]},
        "jaccard": jaccard,
        "text": doc.text,
    })  # fmt: skip


def read_jsonl_zst(path: str | Path) -> Iterator[dict]:
    """The records of a ``.jsonl.zst`` file this module wrote (for reviewing and tests)."""
    import zstandard

    with open(path, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as reader:
        yield from (json.loads(line) for line in io.TextIOWrapper(reader, encoding="utf-8"))
