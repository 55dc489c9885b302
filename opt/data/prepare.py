"""Tokenize documents into the on-disk format that :class:`opt.data.dataset.TokenDataset` reads.

Every file is written to a temporary name beside its target, fsynced, and only then renamed
into place, with the metadata renamed last: a crash or an error leaves either the previous
complete dataset or no metadata at all, never a dataset that looks complete but is not.

A held-out split (``valid_fraction``) takes whole documents out of the training set into a
second dataset beside it, ``PREFIX-valid`` (:func:`opt.data.dataset.valid_prefix`). Which
documents is decided by each document's number alone (:func:`held_out`: a seeded hash), so
the split is the same whatever the batching and the number of tokenizing processes, and
the token files are byte-identical across runs. The two datasets are published together.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import secrets
import sys
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from opt.data.corpus import builtin_documents
from opt.data.dataset import FORMAT, DatasetPaths, token_dtype, valid_prefix
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

# The built-in corpus's held-out split: 5 of its 79 documents (6.6% of the text). With so
# few documents of such different sizes (0.2 to 62 KB) the seed decides the share of text;
# this one holds out a few percent and keeps the largest documents for training.
BUILTIN_VALID_FRACTION = 0.08
BUILTIN_SPLIT_SEED = 1


def held_out(index: int, fraction: float, seed: int = 0) -> bool:
    """Whether document ``index`` (0-based, counting the non-empty documents in input order)
    goes to the held-out set: its seeded hash, read as a number in [0, 1), is below
    ``fraction``. blake2b, not Python's salted ``hash``: the same in every process."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


def prepare_dataset(
    documents: Iterable[str],
    tokenizer: Tokenizer,
    out_prefix: str | Path,
    total_bytes: int | None = None,
    show_progress: bool = True,
    source: Mapping[str, Any] | None = None,
    word_cache: bool = True,
    workers: int = 1,
    valid_fraction: float = 0.0,
    split_seed: int = 0,
    extra: Mapping[str, Any] | None = None,
    allow_empty: bool = False,
) -> dict[str, Any]:
    """Tokenize ``documents`` (EOS after each) into ``<out_prefix>.{bin,idx,json}``.

    ``total_bytes`` sizes the progress bar; ``source`` (e.g. the inputs and tokenizer used) is
    recorded under ``"source"`` in the metadata, as it is once ``documents`` are exhausted
    (the CLI adds the readers' bad-record tally to it then). Empty documents are skipped.
    Returns the metadata that was written. ``word_cache`` encodes through
    :class:`~opt.data.fast_encode.CachedByteLevelEncoder` where the tokenizer allows it (same
    ids, several times faster); off, or for other tokenizers, ``tokenizers`` encodes alone.
    With the word cache, ``workers`` > 1 encodes in that many processes
    (:class:`~opt.data.encode_pool.EncodePool`); ``tokenizers`` alone uses every core itself.

    ``valid_fraction`` > 0 holds out the documents :func:`held_out` picks (about that
    fraction of them, chosen by ``split_seed``) into ``<out_prefix>-valid``; both datasets'
    metadata record the split under ``"split"``. Without a split, a held-out set left there
    by an earlier split of ``out_prefix`` is removed: it may hold documents this one trains on.
    ``extra`` and ``allow_empty`` are :func:`write_dataset`'s.
    """
    if not 0 <= valid_fraction < 1:  # before any worker starts
        raise OptError(f"the held-out fraction must be in [0, 1), not {valid_fraction}")
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype, eos = token_dtype(vocab_size), eos_id(tokenizer)
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(_progress_bar(total_bytes, show_progress))
        blocks = _encoded_blocks(documents, tokenizer, eos, dtype, word_cache, workers, stack)
        return write_dataset(blocks, out_prefix, vocab_size, eos, source=source, bar=bar,
                             valid_fraction=valid_fraction, split_seed=split_seed,
                             extra=extra, allow_empty=allow_empty)  # fmt: skip


def write_dataset(
    blocks: Iterable[tuple[Block, int]],
    out_prefix: str | Path,
    vocab_size: int,
    eos: int,
    source: Mapping[str, Any] | None = None,
    bar: tqdm | None = None,
    valid_fraction: float = 0.0,
    split_seed: int = 0,
    extra: Mapping[str, Any] | None = None,
    allow_empty: bool = False,
) -> dict[str, Any]:
    """Write token ``blocks`` (each with the bytes of text it came from, for ``bar``) as the
    dataset ``out_prefix``, split and published as :func:`prepare_dataset` describes; return
    its metadata. ``extra`` is added to the metadata; ``allow_empty`` accepts no documents
    (a shard of a corpus may have none). :mod:`opt.data.shards` writes and merges shards
    with it, so a merged dataset is this function's output as much as one process's is."""
    if not 0 <= valid_fraction < 1:
        raise OptError(f"the held-out fraction must be in [0, 1), not {valid_fraction}")
    paths = DatasetPaths.of(out_prefix)
    valid_paths = DatasetPaths.of(valid_prefix(out_prefix))
    paths.meta.parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab_size)
    split = valid_fraction > 0
    with _AtomicFiles() as files:
        with contextlib.ExitStack() as stack:
            train = _TokenWriter(stack.enter_context(files.create(paths.bin)))
            valid = (
                _TokenWriter(stack.enter_context(files.create(valid_paths.bin))) if split else None
            )
            if bar is None:
                bar = stack.enter_context(_progress_bar(None, False))
            held = (lambda i: held_out(i, valid_fraction, split_seed)) if split else None
            n_docs = _write_tokens(blocks, train, valid, held, dtype.itemsize, bar)
        if n_docs == 0 and not allow_empty:
            raise OptError("empty corpus: no non-empty documents to prepare")
        if valid is not None and (train.n_docs == 0 or valid.n_docs == 0):
            raise OptError(
                f"a held-out fraction of {valid_fraction} (seed {split_seed}) put "
                f"{valid.n_docs} of the {n_docs} documents in the held-out set and "
                f"{train.n_docs} in the training set: both need at least one"
            )
        common = {"dtype": dtype.name, "vocab_size": vocab_size, "eos_id": eos}
        if source is not None:
            common["source"] = dict(source)
        meta = train.finish(files, paths.idx, common)
        if valid is None:
            meta.update(extra or {})
            _write_meta(files, paths.meta, meta)
            files.publish(paths.meta, retire=valid_paths)
            return meta
        recipe = {"valid_fraction": valid_fraction, "seed": split_seed}
        valid_meta = valid.finish(files, valid_paths.idx, common)
        valid_meta["split"] = {"part": "valid", **recipe, "train_sha256": train.sha256}
        meta["split"] = {"part": "train", **recipe, "valid_docs": valid.n_docs,
                         "valid_tokens": valid.n_tokens, "valid_sha256": valid.sha256}  # fmt: skip
        _write_meta(files, valid_paths.meta, valid_meta)
        _write_meta(files, paths.meta, meta)
        files.publish(valid_paths.meta, paths.meta)
    return meta


class _TokenWriter:
    """One dataset's token file being written, its document offsets and its hash."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.offsets = array("q", [0])  # compact: one int64 per document, however many
        self.digest = hashlib.sha256()

    def write(self, data: memoryview, lengths: np.ndarray) -> None:
        self.offsets.extend((self.offsets[-1] + np.cumsum(lengths)).tolist())
        self.f.write(data)
        self.digest.update(data)

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return self.offsets[-1]

    @property
    def sha256(self) -> str:
        return self.digest.hexdigest()

    def finish(self, files: _AtomicFiles, idx: Path, common: dict) -> dict[str, Any]:
        """Write the document offsets (not yet published); return the dataset's metadata."""
        with files.create(idx) as f:
            np.save(f, np.frombuffer(self.offsets, dtype=np.int64))
        meta = {"format": FORMAT, "dtype": common["dtype"], "n_tokens": self.n_tokens,
                "n_docs": self.n_docs, "vocab_size": common["vocab_size"],
                "eos_id": common["eos_id"], "sha256": self.sha256}  # fmt: skip
        if "source" in common:
            meta["source"] = common["source"]
        return meta


def _write_meta(files: _AtomicFiles, path: Path, meta: dict) -> None:
    with files.create(path) as f:
        f.write(json.dumps(meta, indent=2).encode("utf-8") + b"\n")


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


def _write_tokens(
    blocks: Iterable[tuple[Block, int]],
    train: _TokenWriter,
    valid: _TokenWriter | None,
    held: Callable[[int], bool] | None,
    itemsize: int,
    bar: tqdm,
) -> int:
    """Write the blocks in order, each document to ``valid`` where ``held(number)`` says so
    and to ``train`` otherwise; return the number of documents."""
    n_docs = 0
    for (block, lengths), n_bytes in blocks:
        if held is None:
            train.write(memoryview(block), lengths)
        else:
            goes = np.fromiter((held(n_docs + i) for i in range(len(lengths))), bool, len(lengths))
            ends = np.concatenate([[0], np.cumsum(lengths)]) * itemsize
            # Runs of consecutive documents bound for the same file, each written as one slice.
            cuts = [0, *(np.flatnonzero(goes[1:] != goes[:-1]) + 1).tolist(), len(lengths)]
            data = memoryview(block)
            for a, b in itertools.pairwise(cuts):
                writer = valid if goes[a] else train
                writer.write(data[ends[a] : ends[b]], lengths[a:b])
        n_docs += len(lengths)
        bar.update(n_bytes)
    return n_docs


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

    def publish(self, *markers: Path, retire: DatasetPaths | None = None) -> None:
        """Rename every temp file into place, the ``markers`` last and in their order, so
        that each proves the files renamed before it exist; then delete the dataset
        ``retire`` (its marker first, with the old markers)."""
        # Remove the old markers first: they must never describe a mix of old and new files.
        for marker in [*markers, *([retire.meta] if retire else [])]:
            marker.unlink(missing_ok=True)
        rank = {final: i + 1 for i, final in enumerate(markers)}
        for tmp, final in sorted(self._pending, key=lambda pair: rank.get(pair[1], 0)):
            os.replace(tmp, final)
        self._pending.clear()
        if retire is not None:
            retire.bin.unlink(missing_ok=True)
            retire.idx.unlink(missing_ok=True)
        fsync_dir(markers[-1].parent)

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
        files.publish(path)
    return path


def ensure_builtin_dataset(out_dir: str | Path, vocab_size: int) -> Path:
    """Build (once) a tokenizer and dataset from the built-in pydoc corpus; return the prefix.

    Writes ``out_dir/tokenizer.json``, ``out_dir/train.{bin,idx,json}`` and the held-out
    split ``out_dir/train-valid.{bin,idx,json}`` (``BUILTIN_VALID_FRACTION``) in about a
    second; the tokenizer learns from the training documents only. An existing build is
    reused only if it was made for the same ``vocab_size`` and split. In a distributed job
    call this on one rank, then barrier, as with any other file writer.
    """
    out_dir = Path(out_dir)
    prefix = out_dir / "train"
    paths, tokenizer_path = DatasetPaths.of(prefix), out_dir / "tokenizer.json"
    source = {"inputs": ["builtin:pydoc"], "requested_vocab_size": vocab_size}
    recipe = {"valid_fraction": BUILTIN_VALID_FRACTION, "seed": BUILTIN_SPLIT_SEED}
    meta = _recorded_meta(paths.meta)
    split = meta.get("split", {})
    if (
        tokenizer_path.is_file()
        and meta.get("source") == source
        and {k: split.get(k) for k in recipe} == recipe
        and _recorded_meta(DatasetPaths.of(valid_prefix(prefix)).meta).get("sha256")
        == split.get("valid_sha256")
    ):
        return prefix
    # Unmark the old dataset before replacing its tokenizer, so a crash in between cannot
    # leave metadata that vouches for data made with a different tokenizer.
    paths.meta.unlink(missing_ok=True)
    DatasetPaths.of(valid_prefix(prefix)).meta.unlink(missing_ok=True)
    documents = builtin_documents("pydoc")  # none is empty: their numbers are their indices
    fraction, seed = BUILTIN_VALID_FRACTION, BUILTIN_SPLIT_SEED
    training = [d for i, d in enumerate(documents) if not held_out(i, fraction, seed)]
    tokenizer = train_tokenizer(training, vocab_size)
    save_tokenizer(tokenizer, tokenizer_path)
    prepare_dataset(documents, tokenizer, prefix, show_progress=False, source=source,
                    valid_fraction=fraction, split_seed=seed)  # fmt: skip
    return prefix


def _recorded_meta(meta_path: Path) -> dict:
    """An existing dataset's metadata, or {} if there is none or it is unreadable."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}
