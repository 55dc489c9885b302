"""The input formats, each read as a stream of documents without holding a file in memory.

A reader yields the text of each good record and hands each malformed one to ``skip(where,
reason)`` (see :class:`opt.data.corpus.BadRecords`), then goes on with the next record; a
compressed stream cut short or corrupt, or a columnar file that cannot be read further, is
one bad record at the point where it broke, and the rest of that file is skipped. Errors
that no later record can escape (a missing column, a file that vanished, an I/O error) raise
:class:`~opt.errors.OptError` instead.

Positions: ``path:LINE`` for line-oriented files (lines counted from 1, as editors and
``sed -n LINEp`` do), ``path: row N`` for Parquet files and a saved dataset's Arrow files
(rows counted from 0, as pyarrow, pandas and ``datasets`` index them; in a saved dataset of
several files, each file's own rows: a cut file leaves no doubt where the next one starts).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import zstandard

from opt.errors import OptError

if TYPE_CHECKING:  # pyarrow is imported where a Parquet file or saved dataset is read: it
    import pyarrow as pa  # costs a sixth of a second, which other inputs need not pay

Skip = Callable[[str, str], None]
"""Told about each malformed record: where it is (``path:line`` or ``path: row N``), why."""

# Kinds of input, by the end of a file's name. A saved dataset is a directory (SAVED).
TEXT, JSONL, GZIP, ZSTD, PARQUET, SAVED = "text", "jsonl", "gzip", "zstd", "parquet", "saved"
SUFFIXES = {
    ".txt": TEXT,
    ".jsonl": JSONL,
    ".json": JSONL,
    ".jsonl.gz": GZIP,
    ".json.gz": GZIP,
    ".jsonl.zst": ZSTD,
    ".json.zst": ZSTD,
    ".parquet": PARQUET,
}
SAVED_DATASET = "a `datasets` directory saved with save_to_disk"

_READ_CHUNK = 1 << 20  # bytes read from a file at a time
_ZSTD_CHUNK = 1 << 16  # compressed bytes per decompress call: bounds the output of one call
_PARQUET_ROWS = 1024  # rows per Parquet batch
_SIZE_SAMPLE = 1 << 20  # compressed bytes decompressed to estimate a file's text size


def kind_of(path: Path) -> str | None:
    """The kind of a file by its name, or None when no reader takes it."""
    name = path.name.lower()
    return next((kind for suffix, kind in SUFFIXES.items() if name.endswith(suffix)), None)


# --- saved `datasets` directories ------------------------------------------------------------


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a directory that ``Dataset.save_to_disk`` wrote."""
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def check_not_dataset_dict(path: Path) -> None:
    """A ``DatasetDict`` holds several splits (train, test, ...): reading them all would
    train on the test split, so the user names the split to read."""
    marker = path / "dataset_dict.json"
    if not marker.is_file():
        return
    try:
        splits = json.loads(marker.read_text(encoding="utf-8"))["splits"]
    except (OSError, ValueError, KeyError, TypeError):
        splits = sorted(p.name for p in path.iterdir() if is_saved_dataset(p))
    raise OptError(
        f"{path} is a DatasetDict with splits {', '.join(splits)}: give the directory of the "
        f"split to read, e.g. {path / (splits[0] if splits else 'train')}"
    )


def saved_dataset_files(path: Path) -> list[Path]:
    """The Arrow files of a saved dataset in row order (state.json's list), all present."""
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        names = [entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise OptError(f"{path}: unreadable state.json of a saved dataset ({e})") from e
    files = [path / name for name in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing or not files:
        raise OptError(f"{path}: saved dataset without its data files ({', '.join(missing)})")
    return files


# --- reading -----------------------------------------------------------------------------------


def read_file(path: Path, kind: str, text_key: str, skip: Skip) -> Iterator[str]:
    """The documents of one input of ``kind`` (see :data:`SUFFIXES`, or SAVED)."""
    try:
        if kind == TEXT:
            yield from _read_text(path, skip)
        elif kind in (JSONL, GZIP, ZSTD):
            yield from _read_json_lines(path, kind, text_key, skip)
        elif kind == PARQUET:
            yield from _read_parquet(path, text_key, skip)
        elif kind == SAVED:
            yield from _read_saved(path, text_key, skip)
        else:
            raise OptError(f"unsupported input {path}")
    except FileNotFoundError as e:
        raise OptError(f"input not found: {e.filename or path}") from e
    except OSError as e:  # a disk error is not a bad record: nothing after it can be trusted
        raise OptError(f"cannot read {path}: {e}") from e


def _read_text(path: Path, skip: Skip) -> Iterator[str]:
    data = path.read_bytes()  # the file is one document: it is in memory as text anyway
    try:
        yield data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        skip(f"{path}:{line}", f"not UTF-8 (byte 0x{data[e.start]:02x}: {e.reason})")


class _Truncated(Exception):
    """A compressed stream ended inside a frame."""


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of every zstd frame in a file, one after the other.

    Not ``stream_reader``: at the end of its input it returns what it has, so a file cut
    short inside a frame reads as a shorter file. This one raises :class:`_Truncated`. The
    Pile's files hold many frames; each starts where the previous one's data ends.
    """

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._frame: zstandard.ZstdDecompressionObj | None = None
        self._out = b""
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._pos == len(self._out):
            chunk = self._f.read(_ZSTD_CHUNK)
            if not chunk:
                if self._frame is not None:
                    raise _Truncated("the file ends inside a zstd frame")
                return 0
            self._out, self._pos = self._decompress(chunk), 0
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = self._out[self._pos : self._pos + n]
        self._pos += n
        return n

    def _decompress(self, chunk: bytes) -> bytes:
        pieces = []
        while chunk:
            if self._frame is None:
                self._frame = zstandard.ZstdDecompressor().decompressobj()
            pieces.append(self._frame.decompress(chunk))
            if not self._frame.eof:
                break
            chunk, self._frame = self._frame.unused_data, None
        return b"".join(pieces)


@contextlib.contextmanager
def _open_lines(path: Path, kind: str) -> Iterator[BinaryIO]:
    # zstd reads its input in chunks of its own: a buffer under it would only copy them.
    with path.open("rb", buffering=0 if kind == ZSTD else _READ_CHUNK) as raw:
        if kind == GZIP:
            with gzip.GzipFile(fileobj=raw, mode="rb") as f:
                yield f
        elif kind == ZSTD:
            yield io.BufferedReader(_ZstdFrames(raw), _READ_CHUNK)
        else:
            yield raw


# What a damaged compressed stream raises: gzip's EOFError and BadGzipFile, zlib's error.
_DAMAGED = (EOFError, gzip.BadGzipFile, zlib.error, zstandard.ZstdError, _Truncated)


def _read_json_lines(path: Path, kind: str, text_key: str, skip: Skip) -> Iterator[str]:
    lineno = 0
    with _open_lines(path, kind) as f:
        try:
            for lineno, line in enumerate(f, start=1):
                if line.isspace():  # a blank line: no record (a line always has its "\n")
                    continue
                text = _text_of(line, text_key, first=lineno == 1)
                if isinstance(text, str):
                    yield text
                else:
                    skip(f"{path}:{lineno}", text.reason)
        except _DAMAGED as e:
            skip(
                f"{path}:{lineno + 1}",
                f"compressed data cut short or corrupt ({e}); the rest of the file is skipped",
            )


class _Bad:
    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _text_of(line: bytes, text_key: str, first: bool) -> str | _Bad:
    """The text of one JSON line, or why there is none."""
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return _Bad(f"not UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})")
    if first and decoded.startswith("\ufeff"):  # a byte-order mark some editors write
        decoded = decoded[1:]
    try:
        record = json.loads(decoded)
    except json.JSONDecodeError as e:
        return _Bad(f"invalid JSON ({e.msg} at column {e.colno})")
    if not isinstance(record, dict):
        return _Bad(f"expected a JSON object, found {_json_type(record)}")
    if text_key not in record:
        fields = ", ".join(repr(k) for k in list(record)[:8]) or "none"
        return _Bad(f"no field {text_key!r} (fields: {fields})")
    text = record[text_key]
    if not isinstance(text, str):
        return _Bad(f"field {text_key!r} is {_json_type(text)}, not a string")
    # JSON can escape half of a surrogate pair ("\ud800"), which is no character at all and
    # which no tokenizer can encode. isascii() is free (CPython keeps the flag); encoding is
    # ~10x cheaper than json.loads, and only for text that is not ASCII.
    if not text.isascii() and not _encodable(text):
        return _Bad(f"field {text_key!r} holds a lone surrogate escape, not valid Unicode")
    return text


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), "a number"
    )


def _read_parquet(path: Path, text_key: str, skip: Skip) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        # Not pre-buffered: a column chunk is read a page at a time, not all at once.
        pf = pq.ParquetFile(path, buffer_size=_READ_CHUNK, pre_buffer=False)
        _check_text_column(pf.schema_arrow, text_key, path)
        for batch in pf.iter_batches(batch_size=_PARQUET_ROWS, columns=[text_key]):
            yield from _column_texts(batch.column(0), text_key, str(path), row, skip)
            row += batch.num_rows
    except (pa.ArrowInvalid, OSError) as e:  # pyarrow raises OSError for a cut file
        if isinstance(e, FileNotFoundError):
            raise
        skip(f"{path}: row {row}", f"unreadable Parquet ({e}); the rest of the file is skipped")


def _read_saved(path: Path, text_key: str, skip: Skip) -> Iterator[str]:
    import pyarrow as pa

    for file in saved_dataset_files(path):
        row = 0
        try:
            with pa.memory_map(str(file)) as mapped:  # pages are read as batches touch them
                reader = pa.ipc.open_stream(mapped)
                _check_text_column(reader.schema, text_key, file)
                for batch in reader:
                    yield from _column_texts(batch.column(text_key), text_key, str(file), row, skip)
                    row += batch.num_rows
        except (pa.ArrowInvalid, OSError) as e:  # pyarrow raises OSError for a cut file
            if isinstance(e, FileNotFoundError):
                raise
            skip(f"{file}: row {row}", f"unreadable Arrow ({e}); the rest of the file is skipped")


def _check_text_column(schema: pa.Schema, text_key: str, path: Path) -> None:
    import pyarrow as pa

    if text_key not in schema.names:
        columns = ", ".join(schema.names[:12])
        raise OptError(f"{path}: no column {text_key!r} (columns: {columns}); see --text-key")
    kind = schema.field(text_key).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise OptError(f"{path}: column {text_key!r} holds {kind}, not strings")


def _column_texts(
    column: pa.Array, text_key: str, where: str, first_row: int, skip: Skip
) -> Iterator[str]:
    try:
        texts = column.to_pylist()
    except UnicodeDecodeError:  # Arrow does not check UTF-8 when it reads; Python does
        texts = [_decoded(column, i) for i in range(len(column))]
    for i, text in enumerate(texts):
        if isinstance(text, str):
            yield text
        else:
            reason = f"null {text_key!r}" if text is None else text.reason
            skip(f"{where}: row {first_row + i}", reason)


def _decoded(column: pa.Array, i: int) -> str | _Bad | None:
    value = column[i]
    if not value.is_valid:
        return None
    raw = value.as_buffer().to_pybytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return _Bad(f"not UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start})")


# --- sizes for the progress bar ----------------------------------------------------------------


def text_size(path: Path, kind: str, text_key: str) -> int:
    """About how many bytes of text ``path`` holds (the bar counts documents' UTF-8 bytes).

    Plain files: their size (JSON framing included). Gzip and zstd: the size the first MiB
    decompresses to, scaled to the whole file (exact for files under a MiB). Parquet: the
    text column's uncompressed size (lengths included). Saved datasets: the text column's
    bytes exactly, from the ends of its offsets. The bar ends at what it counted anyway.
    """
    if kind in (TEXT, JSONL):
        return path.stat().st_size
    if kind == GZIP:
        return _sampled_size(path, lambda: zlib.decompressobj(wbits=31))
    if kind == ZSTD:
        return _sampled_size(path, lambda: zstandard.ZstdDecompressor().decompressobj())
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if kind == PARQUET:
            meta = pq.ParquetFile(path).metadata
            return sum(
                meta.row_group(g).column(c).total_uncompressed_size
                for g in range(meta.num_row_groups)
                for c in range(meta.num_columns)
                if meta.row_group(g).column(c).path_in_schema == text_key
            )
        size = 0
        for file in saved_dataset_files(path):
            with pa.memory_map(str(file)) as mapped:  # reads the offsets' ends, no text
                for batch in pa.ipc.open_stream(mapped):
                    if text_key in batch.schema.names and batch.num_rows:
                        size += _string_bytes(batch.column(text_key))
        return size
    except pa.ArrowInvalid:  # unreadable: the reader will report it; count what is on disk
        return path.stat().st_size if path.is_file() else 0


def _string_bytes(column: pa.Array) -> int:
    """The bytes of text in a string column: the difference of its end offsets."""
    import pyarrow as pa

    width = 8 if pa.types.is_large_string(column.type) else 4
    offsets = np.frombuffer(column.buffers()[1], dtype=f"<i{width}")  # a view, no copy
    return int(offsets[column.offset + len(column)] - offsets[column.offset])


def _sampled_size(path: Path, decompressor: Callable[[], object]) -> int:
    size = path.stat().st_size
    with path.open("rb") as f:
        sample = f.read(_SIZE_SAMPLE)
    out, rest = 0, sample
    while rest:  # one decompressor per gzip member or zstd frame
        d = decompressor()
        try:
            out += len(d.decompress(rest))
        except (zlib.error, zstandard.ZstdError):
            break
        if not d.eof:
            rest = b""
            break
        rest = d.unused_data
    consumed = len(sample) - len(rest)
    if len(sample) == size or consumed == 0:
        return out or size
    return round(out * size / consumed)
