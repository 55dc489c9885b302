"""Tokenize documents into the on-disk format that :class:`opt.data.dataset.TokenDataset` reads.

Every file is written to a temporary name beside its target, fsynced, and only then renamed
into place, with the metadata renamed last: a crash or an error leaves either the previous
complete dataset or no metadata at all, never a dataset that looks complete but is not.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sys
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from opt.data.corpus import builtin_documents
from opt.data.dataset import FORMAT, DatasetPaths, token_dtype
from opt.data.fast_encode import fast_encoder
from opt.data.tokenizer import eos_id, train_tokenizer
from opt.errors import OptError
from opt.fsutil import fsync_dir

# Documents are encoded in batches: big enough for `encode_batch` to use every core, small
# enough that one batch's text and ids stay well within memory.
_BATCH_DOCS = 1024
_BATCH_BYTES = 32 << 20


def prepare_dataset(
    documents: Iterable[str],
    tokenizer: Tokenizer,
    out_prefix: str | Path,
    total_bytes: int | None = None,
    show_progress: bool = True,
    source: Mapping[str, Any] | None = None,
    word_cache: bool = True,
) -> dict[str, Any]:
    """Tokenize ``documents`` (EOS after each) into ``<out_prefix>.{bin,idx,json}``.

    ``total_bytes`` sizes the progress bar; ``source`` (e.g. the inputs and tokenizer used) is
    recorded under ``"source"`` in the metadata. Empty documents are skipped. Returns the
    metadata that was written. ``word_cache`` encodes through
    :class:`~opt.data.fast_encode.CachedByteLevelEncoder` where the tokenizer allows it (same
    ids, several times faster); off, or for other tokenizers, ``tokenizers`` encodes alone.
    """
    paths = DatasetPaths.of(out_prefix)
    paths.meta.parent.mkdir(parents=True, exist_ok=True)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype, eos = token_dtype(vocab_size), eos_id(tokenizer)
    with _AtomicFiles() as files:
        with files.create(paths.bin) as f, _progress_bar(total_bytes, show_progress) as bar:
            encode = _batch_encoder(tokenizer, word_cache)
            offsets, sha256 = _write_tokens(documents, encode, eos, dtype, f, bar)
        if len(offsets) == 1:
            raise OptError("empty corpus: no non-empty documents to prepare")
        with files.create(paths.idx) as f:
            np.save(f, np.frombuffer(offsets, dtype=np.int64))
        meta = {
            "format": FORMAT,
            "dtype": dtype.name,
            "n_tokens": offsets[-1],
            "n_docs": len(offsets) - 1,
            "vocab_size": vocab_size,
            "eos_id": eos,
            "sha256": sha256,
        }
        if source is not None:
            meta["source"] = dict(source)
        with files.create(paths.meta) as f:
            f.write(json.dumps(meta, indent=2).encode("utf-8") + b"\n")
        files.publish(marker=paths.meta)
    return meta


def _batch_encoder(
    tokenizer: Tokenizer, word_cache: bool
) -> Callable[[list[str]], list[Sequence[int]]]:
    """A function from a batch of documents to their ids (lists or arrays)."""
    encoder = fast_encoder(tokenizer) if word_cache else None
    if encoder is not None:
        return encoder.encode_batch
    # The ids are all we keep: `encode_batch_fast` (tokenizers >= 0.20) skips computing the
    # character offsets that `encode_batch` adds to every token.
    encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    return lambda batch: [e.ids for e in encode_batch(batch, add_special_tokens=False)]


def _write_tokens(
    documents: Iterable[str],
    encode: Callable[[list[str]], list[Sequence[int]]],
    eos: int,
    dtype: np.dtype,
    f: BinaryIO,
    bar: tqdm,
) -> tuple[array, str]:
    """Stream every document's ids + EOS into ``f``; return doc offsets and the file's sha256."""
    offsets = array("q", [0])  # compact: one int64 per document, however many there are
    digest = hashlib.sha256()
    eos_block = np.array([eos], dtype)
    for batch, n_bytes in _batches(documents):
        per_doc = [np.asarray(ids, dtype) for ids in encode(batch)]
        lengths = np.fromiter(map(len, per_doc), np.int64, len(per_doc)) + 1  # with EOS
        offsets.extend((offsets[-1] + np.cumsum(lengths)).tolist())
        pieces = [eos_block] * (2 * len(per_doc))
        pieces[::2] = per_doc
        block = np.concatenate(pieces).tobytes()
        f.write(block)
        digest.update(block)
        bar.update(n_bytes)
    return offsets, digest.hexdigest()


def _batches(documents: Iterable[str]) -> Iterator[tuple[list[str], int]]:
    """Group non-empty documents into batches; yield each with its size in UTF-8 bytes."""
    batch: list[str] = []
    n_bytes = 0
    for doc in documents:
        if not doc:
            continue
        batch.append(doc)
        n_bytes += len(doc.encode("utf-8"))
        if len(batch) >= _BATCH_DOCS or n_bytes >= _BATCH_BYTES:
            yield batch, n_bytes
            batch, n_bytes = [], 0
    if batch:
        yield batch, n_bytes


@contextmanager
def _progress_bar(total: int | None, enabled: bool) -> Iterator[tqdm]:
    """A tqdm bar in bytes of text on stderr; it ends full even if ``total`` was a guess."""
    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="tokenizing",
        file=sys.stderr,
        disable=not enabled,
    )
    try:
        yield bar
        bar.total = bar.n  # `total` may count JSON framing that the bar never sees
    finally:
        bar.close()


class _AtomicFiles:
    """Temp files beside their targets, renamed into place together or all deleted."""

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []  # (temp, final)

    @contextmanager
    def create(self, final: Path) -> Iterator[BinaryIO]:
        """Open a temp file for ``final``; it is fsynced on leaving the block."""
        tmp = final.with_name(f".{final.name}.{secrets.token_hex(6)}.tmp")
        # Not mkstemp: its 0600 mode would make shared datasets unreadable to other users.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        self._pending.append((tmp, final))
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # data on disk before the rename can expose it

    def publish(self, marker: Path) -> None:
        """Rename every temp file into place, ``marker`` last, so it proves the rest exist."""
        # Remove the old marker first: it must never describe a mix of old and new files.
        marker.unlink(missing_ok=True)
        ordered = sorted(self._pending, key=lambda pair: pair[1] == marker)
        for tmp, final in ordered:
            os.replace(tmp, final)
        self._pending.clear()
        fsync_dir(marker.parent)

    def __enter__(self) -> _AtomicFiles:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for tmp, _ in self._pending:  # anything still pending was not published
            tmp.unlink(missing_ok=True)


def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> Path:
    """Write ``tokenizer.json`` atomically (same temp-and-rename discipline as datasets)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _AtomicFiles() as files:
        with files.create(path) as f:
            f.write(tokenizer.to_str(pretty=True).encode("utf-8"))
        files.publish(marker=path)
    return path


def ensure_builtin_dataset(out_dir: str | Path, vocab_size: int) -> Path:
    """Build (once) a tokenizer and dataset from the built-in pydoc corpus; return the prefix.

    Writes ``out_dir/tokenizer.json`` and ``out_dir/train.{bin,idx,json}`` in about a second.
    An existing build is reused only if it was made for the same ``vocab_size``. In a
    distributed job call this on one rank, then barrier, as with any other file writer.
    """
    out_dir = Path(out_dir)
    prefix = out_dir / "train"
    paths, tokenizer_path = DatasetPaths.of(prefix), out_dir / "tokenizer.json"
    source = {"inputs": ["builtin:pydoc"], "requested_vocab_size": vocab_size}
    if tokenizer_path.is_file() and _recorded_source(paths.meta) == source:
        return prefix
    # Unmark the old dataset before replacing its tokenizer, so a crash in between cannot
    # leave metadata that vouches for data made with a different tokenizer.
    paths.meta.unlink(missing_ok=True)
    documents = builtin_documents("pydoc")
    tokenizer = train_tokenizer(documents, vocab_size)
    save_tokenizer(tokenizer, tokenizer_path)
    prepare_dataset(documents, tokenizer, prefix, show_progress=False, source=source)
    return prefix


def _recorded_source(meta_path: Path) -> Any:
    """The ``source`` of an existing dataset, or None if there is none or it is unreadable."""
    try:
        return json.loads(meta_path.read_text(encoding="utf-8")).get("source")
    except (OSError, ValueError, AttributeError):
        return None
