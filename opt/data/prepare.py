"""Tokenize documents into the on-disk format that :class:`opt.data.dataset.TokenDataset` reads.

Every file is written to a temporary name beside its target, fsynced, and only then renamed
into place, with the metadata renamed last: a crash or an error leaves either the previous
complete dataset or no metadata at all, never a dataset that looks complete but is not.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import sys
from array import array
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from opt.data.corpus import builtin_documents
from opt.data.dataset import FORMAT, DatasetPaths, token_dtype
from opt.data.encode_pool import Block, EncodePool, encode_block
from opt.data.fast_encode import fast_encoder
from opt.data.tokenizer import eos_id, train_tokenizer
from opt.errors import OptError
from opt.fsutil import fsync_dir

# Documents are encoded in batches: big enough for `encode_batch` to use every core, small
# enough that one batch's text and ids stay well within memory. Batches for worker
# processes are smaller, so that every worker has one early and the last one ends soon.
_BATCH_DOCS = 1024
_BATCH_BYTES = 32 << 20
_WORKER_BATCH_BYTES = 4 << 20


def prepare_dataset(
    documents: Iterable[str],
    tokenizer: Tokenizer,
    out_prefix: str | Path,
    total_bytes: int | None = None,
    show_progress: bool = True,
    source: Mapping[str, Any] | None = None,
    word_cache: bool = True,
    workers: int = 1,
) -> dict[str, Any]:
    """Tokenize ``documents`` (EOS after each) into ``<out_prefix>.{bin,idx,json}``.

    ``total_bytes`` sizes the progress bar; ``source`` (e.g. the inputs and tokenizer used) is
    recorded under ``"source"`` in the metadata. Empty documents are skipped. Returns the
    metadata that was written. ``word_cache`` encodes through
    :class:`~opt.data.fast_encode.CachedByteLevelEncoder` where the tokenizer allows it (same
    ids, several times faster); off, or for other tokenizers, ``tokenizers`` encodes alone.
    With the word cache, ``workers`` > 1 encodes in that many processes
    (:class:`~opt.data.encode_pool.EncodePool`); ``tokenizers`` alone uses every core itself.
    """
    paths = DatasetPaths.of(out_prefix)
    paths.meta.parent.mkdir(parents=True, exist_ok=True)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype, eos = token_dtype(vocab_size), eos_id(tokenizer)
    with _AtomicFiles() as files:
        with contextlib.ExitStack() as stack:
            f = stack.enter_context(files.create(paths.bin))
            bar = stack.enter_context(_progress_bar(total_bytes, show_progress))
            blocks = _encoded_blocks(documents, tokenizer, eos, dtype, word_cache, workers, stack)
            offsets, sha256 = _write_tokens(blocks, f, bar)
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


def _encoded_blocks(
    documents: Iterable[str],
    tokenizer: Tokenizer,
    eos: int,
    dtype: np.dtype,
    word_cache: bool,
    workers: int,
    stack: contextlib.ExitStack,
) -> Iterator[tuple[Block, int]]:
    """Each batch's token block (see ``encode_block``) and its size in bytes of text."""
    # Built here also with workers: it is the check that the word cache applies at all.
    encoder = fast_encoder(tokenizer) if word_cache else None
    if encoder is not None and workers > 1:
        pool = stack.enter_context(EncodePool(tokenizer, workers, eos, dtype))
        return pool.map(_batches(documents, _WORKER_BATCH_BYTES))
    if encoder is not None:
        encode = encoder.encode_batch
    else:
        # The ids are all we keep: `encode_batch_fast` (tokenizers >= 0.20) skips computing
        # the character offsets that `encode_batch` adds to every token.
        fast = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
        encode = lambda batch: [e.ids for e in fast(batch, add_special_tokens=False)]  # noqa: E731
    return (
        (encode_block(encode, batch, eos, dtype), n_bytes)
        for batch, n_bytes in _batches(documents, _BATCH_BYTES)
    )


def _write_tokens(blocks: Iterable[tuple[Block, int]], f: BinaryIO, bar: tqdm) -> tuple[array, str]:
    """Write the blocks in order into ``f``; return doc offsets and the file's sha256."""
    offsets = array("q", [0])  # compact: one int64 per document, however many there are
    digest = hashlib.sha256()
    for (block, lengths), n_bytes in blocks:
        offsets.extend((offsets[-1] + np.cumsum(lengths)).tolist())
        f.write(block)
        digest.update(block)
        bar.update(n_bytes)
    return offsets, digest.hexdigest()


def _batches(documents: Iterable[str], max_bytes: int) -> Iterator[tuple[list[str], int]]:
    """Group non-empty documents into batches; yield each with its size in UTF-8 bytes."""
    batch: list[str] = []
    n_bytes = 0
    for number, doc in enumerate(documents, 1):
        if not doc:
            continue
        batch.append(doc)
        try:
            n_bytes += len(doc.encode("utf-8"))
        except UnicodeEncodeError as err:  # a lone surrogate, from a JSON "\ud800" escape
            raise OptError(
                f"document {number} is not valid Unicode ({err.reason} at character "
                f"{err.start}: {doc[max(0, err.start - 20) : err.start + 1]!r}); no tokenizer "
                "can encode it"
            ) from None
        if len(batch) >= _BATCH_DOCS or n_bytes >= max_bytes:
            yield batch, n_bytes
            batch, n_bytes = [], 0
    if batch:
        yield batch, n_bytes


@contextlib.contextmanager
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

    @contextlib.contextmanager
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
