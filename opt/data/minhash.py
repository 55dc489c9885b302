"""MinHash signatures of word n-gram shingles, computed with numpy for a batch of documents
at once, and the LSH index of kept documents that finds a signature's near duplicates.

The signatures equal ``datasketch.MinHash(num_perm, seed, hashfunc=shingle_hash32)`` fed the
same shingles (its default "affine32" scheme: the hash premixed with MurmurHash3's fmix32,
then ``a * h + b`` mod 2^32 with datasketch's own seeded ``a, b``); tests/test_dedup.py checks
it. datasketch's own per-document update hashes every shingle in a Python call and is
several times slower (bench/dedup_speed.py, BENCHMARKS.md). The shingle hash is our own: a
polynomial hash of each word's bytes, mixed, then a polynomial of the n words' hashes, mixed,
high 32 bits; both polynomials are computed with prefix sums over the batch, no Python loop.
:mod:`opt.data.dedup` decides with them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from opt.errors import OptError

# LSH banding weights (false positive, false negative) for datasketch's choice of bands: a
# false positive costs one signature comparison here (every candidate is confirmed), a false
# negative keeps a duplicate, so misses weigh more. At threshold 0.95 with 128 permutations
# this gives 6 bands of 21 rows: a pair with Jaccard 0.95 becomes a candidate with
# probability 0.92 and one of 0.97 with 0.99 (datasketch's default weights, 0.5/0.5, give 3
# bands of 42 rows: 0.31 and 0.62).
LSH_WEIGHTS = (0.05, 0.95)
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


class SignPool:
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

    def __enter__(self) -> SignPool:
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
