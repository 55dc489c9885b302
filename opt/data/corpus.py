"""Where raw documents come from: files of text, JSON lines, Parquet, saved `datasets`, or a
corpus built into Python.

The built-in ``pydoc`` corpus is the reference documentation that CPython ships in
``pydoc_data.topics`` (about 0.5 MB of English and code). It needs no download, so tests and
smoke runs can train a real tokenizer and model on it anywhere.

An input is named by a string: ``builtin:<name>``; a ``.txt`` file (one document per file); a
JSON-lines file, ``.jsonl``/``.json`` (one JSON object per line, the text under ``text_key``),
compressed as ``.jsonl.gz``/``.json.gz`` or ``.jsonl.zst``/``.json.zst`` (as the Pile ships);
a ``.parquet`` file (the text in column ``text_key``); a directory that
``datasets.Dataset.save_to_disk`` wrote (one input: its rows in order); or any other directory,
which stands for the supported files and saved datasets under it in sorted order. Every reader
streams (:mod:`opt.data.formats`): a file is never read into memory whole.

A malformed record (invalid JSON, not UTF-8, no string under ``text_key``, a null in a
column, a compressed file cut short) is skipped with one warning line naming the file and
line or row; :class:`BadRecords` counts them, and can stop the job past a limit.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from opt.data import formats
from opt.errors import OptError

BUILTIN_SCHEME = "builtin:"
TEXT_SUFFIXES = tuple(s for s, kind in formats.SUFFIXES.items() if kind == formats.TEXT)
JSONL_SUFFIXES = tuple(s for s, kind in formats.SUFFIXES.items() if kind == formats.JSONL)
_BUILTINS = ("pydoc",)

Source = str | Path
"""A resolved input: ``"builtin:<name>"``, the path of one readable file, or the directory of
one saved dataset."""


def builtin_documents(name: str = "pydoc") -> list[str]:
    """The documents of a built-in corpus, in a fixed order (sorted by topic)."""
    if name != "pydoc":
        raise OptError(f"unknown built-in corpus {name!r} (available: {', '.join(_BUILTINS)})")
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distributions strip pydoc_data from the stdlib
        raise OptError("built-in corpus 'pydoc' needs pydoc_data, missing from this Python") from e
    return [topics[key] for key in sorted(topics)]


# --- bad records ------------------------------------------------------------------------------


class BadRecords:
    """The malformed records met while reading: each is warned about on ``warn`` (one line,
    as it is met) and counted, and the first few are kept for the summary.

    ``limit`` stops the job with an :class:`OptError`: an int N as soon as N + 1 records were
    bad; a float F in [0, 1) at the end of the input, when more than that fraction of the
    records read were bad. None (the default) skips any number of them.
    """

    KEEP = 10  # positions kept for the summary and the dataset's metadata

    def __init__(self, limit: int | float | None = None, warn: TextIO | None = None) -> None:
        if limit is not None and not (
            (isinstance(limit, int) and limit >= 0) or (isinstance(limit, float) and 0 <= limit < 1)
        ):
            raise OptError(
                f"a bad-record limit is a count >= 0 or a fraction in [0, 1), not {limit}"
            )
        self.limit = limit
        self.warn = warn
        self.count = 0
        self.records = 0  # good and bad: the fraction's denominator
        self.first: list[str] = []

    def skip(self, where: str, reason: str) -> None:
        """Count, warn about and remember one bad record; stop when it is one too many."""
        self.count += 1
        self.records += 1
        line = f"{where}: {reason}"
        if len(self.first) < self.KEEP:
            self.first.append(line)
        # tqdm.write: the line goes above a progress bar on stderr, not into it.
        tqdm.write(f"warning: skipped {line}", file=self.warn or sys.stderr)
        if isinstance(self.limit, int) and self.count > self.limit:
            raise OptError(
                f"more than {self.limit} bad records (the limit set by max-bad-records); "
                f"the last: {line}"
            )

    def finish(self) -> None:
        """At the end of the input: stop if more than the limit's fraction were bad."""
        if isinstance(self.limit, float) and self.count > self.limit * self.records:
            raise OptError(
                f"{self.count} of {self.records} records were bad ({self.count / self.records:.2%}),"
                f" more than the fraction {self.limit:g} that max-bad-records allows; "
                f"the first: {self.first[0]}"
            )

    def summary(self, shown: int = 3) -> str:
        """One line: how many were skipped and where the first ones were."""
        if self.count == 0:
            return "no bad records"
        noun = "record" if self.count == 1 else "records"
        more = ", ..." if self.count > shown else ""
        return f"skipped {self.count:,} bad {noun}: {'; '.join(self.first[:shown])}{more}"

    def as_meta(self) -> dict:
        """What a dataset's metadata records of them."""
        return {"count": self.count, "first": list(self.first)}


def parse_limit(text: str) -> int | float:
    """A ``--max-bad-records`` value: a count (``10``), a fraction (``0.001``) or a percentage
    (``0.1%``) of the records read."""
    try:
        if text.endswith("%"):
            limit: int | float = float(text[:-1]) / 100
        elif text.isdigit():
            limit = int(text)
        else:
            limit = float(text)
    except ValueError:
        limit = -1
    if (isinstance(limit, int) and limit >= 0) or (isinstance(limit, float) and 0 <= limit < 1):
        return limit
    raise OptError(
        f"a bad-record limit is a count (10), a fraction below 1 (0.001) or a percentage "
        f"(0.1%), not {text!r}"
    )


# --- inputs -----------------------------------------------------------------------------------


def read_documents(
    path: str | Path, text_key: str = "text", bad: BadRecords | None = None
) -> Iterator[str]:
    """Yield the documents of one input file or saved-dataset directory, lazily; malformed
    records go to ``bad`` (a fresh :class:`BadRecords` when None: warned about, skipped)."""
    path = Path(path)
    kind = _kind(path)
    if kind is None:
        raise OptError(f"unsupported input {path}: expected {_suffix_list()}")
    bad = bad if bad is not None else BadRecords()
    for text in formats.read_file(path, kind, text_key, bad.skip):
        bad.records += 1
        yield text


def resolve_inputs(inputs: Sequence[str]) -> list[Source]:
    """Check every input up front and expand directories, so a bad name fails before work."""
    if not inputs:
        raise OptError("no inputs given")
    sources: list[Source] = []
    for spec in inputs:
        if spec.startswith(BUILTIN_SCHEME):
            builtin_documents(spec.removeprefix(BUILTIN_SCHEME))  # validates the name
            sources.append(spec)
        else:
            sources.extend(_resolve_path(Path(spec)))
    return sources


def _resolve_path(path: Path) -> list[Path]:
    if path.is_dir():
        formats.check_not_dataset_dict(path)
        if formats.is_saved_dataset(path):
            formats.saved_dataset_files(path)  # its state and data files are all there
            return [path]
        found = sorted(_walk(path))
        if not found:
            raise OptError(f"no {_suffix_list()} files under {path}")
        return found
    if not path.is_file():
        raise OptError(f"input not found: {path}")
    if _kind(path) is None:
        raise OptError(f"unsupported input {path}: expected {_suffix_list()}")
    return [path]


def _walk(directory: Path) -> Iterator[Path]:
    """The supported files and saved datasets under ``directory``; a saved dataset is not
    looked into (its state.json is no input of its own)."""
    for entry in directory.iterdir():
        if entry.is_dir():
            formats.check_not_dataset_dict(entry)
            if formats.is_saved_dataset(entry):
                formats.saved_dataset_files(entry)
                yield entry
            else:
                yield from _walk(entry)
        elif entry.is_file() and _kind(entry) is not None:
            yield entry


def _kind(path: Path) -> str | None:
    if path.is_dir():
        return formats.SAVED if formats.is_saved_dataset(path) else None
    return formats.kind_of(path)


def _suffix_list() -> str:
    return f"{', '.join(formats.SUFFIXES)} or {formats.SAVED_DATASET}"


def iter_documents(
    sources: Sequence[Source], text_key: str = "text", bad: BadRecords | None = None
) -> Iterator[str]:
    """All documents of the resolved sources, in order (empty ones too). Malformed records
    go to ``bad`` (a fresh :class:`BadRecords` when None: warned about, skipped); its
    fractional limit is checked after the last document."""
    bad = bad if bad is not None else BadRecords()
    for source in sources:
        if isinstance(source, str) and source.startswith(BUILTIN_SCHEME):
            for text in builtin_documents(source.removeprefix(BUILTIN_SCHEME)):
                bad.records += 1
                yield text
        else:
            yield from read_documents(source, text_key, bad)
    bad.finish()


def total_bytes(sources: Sequence[Source], text_key: str = "text") -> int:
    """About how many bytes of text the sources hold, for a progress bar that counts the
    documents' UTF-8 bytes: a plain file's size (JSON framing included), a compressed file's
    size decompressed (estimated from its first MiB), a column's uncompressed size
    (:func:`opt.data.formats.text_size`). An estimate: the bar ends at what it counted."""
    size = 0
    for source in sources:
        if isinstance(source, str) and source.startswith(BUILTIN_SCHEME):
            docs = builtin_documents(source.removeprefix(BUILTIN_SCHEME))
            size += sum(len(d.encode("utf-8")) for d in docs)
        else:
            path = Path(source)
            size += formats.text_size(path, _kind(path) or formats.TEXT, text_key)
    return size
