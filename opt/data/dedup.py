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

Signatures and the LSH index are in :mod:`opt.data.minhash`.
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

from opt.data.corpus import BadRecords, iter_documents, resolve_inputs, total_bytes
from opt.data.minhash import (
    LSH_WEIGHTS,
    PARALLEL_MIN_BYTES,
    NearIndex,
    SignatureMaker,
    SignPool,
)
from opt.errors import OptError
from opt.fsutil import fsync_dir

REPORT_VERSION = 1
REPORT_JSON = "dedup-report.json"
REPORT_MD = "dedup-report.md"
REMOVED = "removed.jsonl.zst"
OUTPUT_SUFFIX = ".jsonl.zst"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_RESERVED = {REMOVED.removesuffix(OUTPUT_SUFFIX)}
_ZSTD_LEVEL = 3


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
    bad_records: dict = field(default_factory=lambda: {"count": 0, "first": []})
    """Malformed input records skipped while reading (``BadRecords.as_meta``)."""
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


def _documents(sources: list[tuple[str, list]], text_key: str, bad: BadRecords) -> Iterator[_Doc]:
    for s, (name, resolved) in enumerate(sources):
        number = 0
        for src in resolved:
            for i, text in enumerate(iter_documents([src], text_key, bad)):
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
    bad: BadRecords | None = None,
) -> DedupReport:
    """Deduplicate the sources ``(name, inputs)`` together into ``out`` (see the module doc).
    Every input is resolved before anything is written; any error publishes nothing.
    ``workers`` processes compute the signatures (default: every usable core, or one for
    inputs under ``PARALLEL_MIN_BYTES``); the outputs do not depend on it. Malformed input
    records are skipped, warned about and counted in ``bad`` (its limit applies)."""
    settings.check()
    bad = bad if bad is not None else BadRecords()
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
    with _Outputs(out) as outputs, SignPool(maker, workers) as pool:
        removed = _ZstdLines(outputs.open(REMOVED))
        writers: list[_ZstdLines] = []
        try:
            jobs = _sign_jobs(
                _batches(_documents(resolved, settings.text_key, bad), batch_docs, batch_bytes)
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
            bad.finish()  # too many bad records: nothing is published
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
            bad_records=bad.as_meta(),
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
