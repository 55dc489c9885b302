"""Preparation in shards: each process tokenizes a run of the input files, then one merge
concatenates the shards into the dataset that a single :func:`~opt.data.prepare.prepare_dataset`
of the same inputs would have written, byte for byte.

Shard ``I`` of ``N`` of the dataset ``PREFIX`` is a dataset of its own,
``PREFIX.shards/0000I-of-0000N.{bin,idx,json}``, written atomically as every dataset is
(metadata last). It holds every non-empty document of a contiguous run of the resolved input
files (:func:`plan_shards`: balanced by size), with no held-out split: which documents are
held out depends on their number in the whole corpus, so the split is made at the merge.

A shard's metadata records its recipe (:func:`shard_recipe`: every resolved input with its
size and modification time, the tokenizer's hash, the text key, the number of shards) and
where it sits in the plan. A shard whose metadata carries the same recipe is complete and is
not redone; anything else (missing, half-written, made from other inputs or with another
tokenizer) is redone. The recipe covers all the inputs, since the plan depends on all their
sizes: changing any input or the tokenizer redoes every shard, never mixing old and new.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from opt.data.corpus import BUILTIN_SCHEME, BadRecords, Source, iter_documents, total_bytes
from opt.data.dataset import DatasetPaths, token_dtype
from opt.data.encode_pool import Block
from opt.data.prepare import prepare_dataset, write_dataset
from opt.data.tokenizer import eos_id
from opt.errors import OptError

SHARDS_SUFFIX = ".shards"
RECIPE_VERSION = 1
# The merge reads a shard in pieces of at most this many documents and bytes of tokens.
_MERGE_DOCS = 1 << 16
_MERGE_BYTES = 64 << 20


def shards_dir(prefix: str | Path) -> Path:
    """Where the shards of the dataset ``prefix`` live: ``<prefix>.shards/``."""
    return Path(f"{prefix}{SHARDS_SUFFIX}")


def shard_prefix(prefix: str | Path, index: int, count: int) -> Path:
    """Shard ``index`` (from 0) of ``count``: ``<prefix>.shards/00003-of-00008``."""
    return shards_dir(prefix) / f"{index:05d}-of-{count:05d}"


def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    """A hash of the tokenizer itself (its serialized form), whichever files it came from."""
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


def describe_input(source: Source) -> dict[str, Any]:
    """One resolved input as a recipe records it: its absolute path, size and mtime (a
    directory, such as a saved dataset: the sum of its files' sizes, their latest mtime)."""
    if isinstance(source, str) and source.startswith(BUILTIN_SCHEME):
        return {"path": source, "bytes": total_bytes([source])}
    path = Path(source).absolute()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stats = [p.stat() for p in files]
    return {
        "path": str(path),
        "bytes": sum(s.st_size for s in stats),
        "mtime_ns": max((s.st_mtime_ns for s in stats), default=0),
    }


def shard_recipe(
    sources: Sequence[Source], tokenizer: Tokenizer, text_key: str, count: int
) -> dict[str, Any]:
    """What every shard of one sharded preparation is made from (see the module's notes)."""
    inputs = [describe_input(s) for s in sources]
    plan_shards([i["bytes"] for i in inputs], count)  # too many shards fails before any work
    return {
        "version": RECIPE_VERSION,
        "inputs": inputs,
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "text_key": text_key,
        "shards": count,
    }


def recipe_sha256(recipe: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode("utf-8")).hexdigest()


def plan_shards(sizes: Sequence[int], count: int) -> list[tuple[int, int]]:
    """Cut the files (their ``sizes`` in order) into ``count`` contiguous, non-empty runs
    ``[start, stop)`` of about equal size: each cut is put where the running total is
    nearest to its share of the whole, leaving at least one file to every later shard."""
    n = len(sizes)
    if count < 1:
        raise OptError(f"--shards must be at least 1, not {count}")
    if count > n:
        raise OptError(
            f"{count} shards of {n} input file(s): a shard is a run of whole files, so use "
            f"--shards {n} or fewer, or split the input into more files"
        )
    cumulative = np.cumsum([0, *sizes], dtype=np.float64)  # cumulative[i]: size before file i
    total = cumulative[-1]
    cuts = [0]
    for k in range(1, count):
        low, high = cuts[-1] + 1, n - (count - k)  # each shard keeps at least one file
        target = total * k / count
        best = min(range(low, high + 1), key=lambda i: (abs(cumulative[i] - target), i))
        cuts.append(best)
    cuts.append(n)
    return list(itertools.pairwise(cuts))


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def shard_is_complete(prefix: str | Path, index: int, recipe: dict[str, Any]) -> bool:
    """Whether shard ``index`` is published, of this recipe, with files of the sizes its
    metadata states (a cheap check: the merge verifies the tokens' hash as it reads)."""
    paths = DatasetPaths.of(shard_prefix(prefix, index, recipe["shards"]))
    meta = _read_meta(paths.meta)
    shard = meta.get("shard")
    if not isinstance(shard, dict) or shard.get("recipe_sha256") != recipe_sha256(recipe):
        return False
    try:
        itemsize = np.dtype(meta["dtype"]).itemsize
        return paths.bin.stat().st_size == meta["n_tokens"] * itemsize and paths.idx.is_file()
    except (OSError, KeyError, TypeError):
        return False


def missing_shards(prefix: str | Path, recipe: dict[str, Any]) -> list[int]:
    """The shards not yet complete for ``recipe``, in order."""
    return [i for i in range(recipe["shards"]) if not shard_is_complete(prefix, i, recipe)]


def prepare_shard(
    sources: Sequence[Source],
    tokenizer: Tokenizer,
    prefix: str | Path,
    index: int,
    recipe: dict[str, Any],
    show_progress: bool = True,
    word_cache: bool = True,
    workers: int = 1,
    bad_limit: int | float | None = None,
) -> dict[str, Any] | None:
    """Tokenize shard ``index`` of ``recipe`` into its place beside ``prefix``; return its
    metadata, or None when it was already complete (then nothing is touched). Its malformed
    records are counted into its metadata; a count ``bad_limit`` stops it early (the whole
    corpus has more then), a fraction is the whole corpus's: :func:`merge_shards` checks it."""
    count = recipe["shards"]
    if not 0 <= index < count:
        raise OptError(f"--shard-index must be in [0, {count}), not {index}")
    if shard_is_complete(prefix, index, recipe):
        return None
    # A shard killed while it wrote (SIGKILL, a lost node) left its temp files: clear them,
    # as only one process prepares a shard at a time (two at once would still publish whole
    # files: the one whose temp files went fails, the other publishes).
    for stale in shards_dir(prefix).glob(f".{shard_prefix(prefix, index, count).name}.*.tmp"):
        stale.unlink(missing_ok=True)
    plan = plan_shards([i["bytes"] for i in recipe["inputs"]], count)
    start, stop = plan[index]
    mine = list(sources[start:stop])
    shard = {
        "index": index,
        "count": count,
        "inputs": [start, stop],
        "recipe_sha256": recipe_sha256(recipe),
        "recipe": recipe,
    }
    bad = BadRecords(bad_limit if isinstance(bad_limit, int) else None)

    def documents() -> Iterator[str]:
        yield from iter_documents(mine, recipe["text_key"], bad)
        # Read into the metadata once the documents are exhausted, as prepare_dataset does.
        shard["bad_records"] = {**bad.as_meta(), "records": bad.records}

    return prepare_dataset(
        documents(),
        tokenizer,
        shard_prefix(prefix, index, count),
        total_bytes=sum(i["bytes"] for i in recipe["inputs"][start:stop]),
        show_progress=show_progress,
        word_cache=word_cache,
        workers=workers,
        extra={"shard": shard},
        allow_empty=True,  # a run of files may hold only empty documents
    )


def merge_shards(
    prefix: str | Path,
    recipe: dict[str, Any],
    tokenizer: Tokenizer,
    source: dict[str, Any] | None = None,
    valid_fraction: float = 0.0,
    split_seed: int = 0,
    rerun: str = "",
    bad: BadRecords | None = None,
) -> dict[str, Any]:
    """Concatenate every shard of ``recipe`` in order into the dataset ``prefix`` (and its
    held-out split), published atomically; return its metadata. With ``source`` and the
    split of the single-process command, every file is byte-identical to what that command
    writes. A missing or stale shard stops it before anything is written: one line naming
    them, then ``rerun`` (the command that prepares them). The shards' malformed records are
    added up into ``bad`` (its limit applies to the whole corpus) and, with ``source``,
    recorded as one process records them."""
    missing = missing_shards(prefix, recipe)
    if missing:
        count = recipe["shards"]
        names = ", ".join(str(i) for i in missing)
        raise OptError(
            f"cannot merge {prefix}: {len(missing)} of {count} shards are missing or were made "
            f"from other inputs or another tokenizer (shard {names} in {shards_dir(prefix)}); "
            f"{rerun}".rstrip("; ")
        )
    _add_bad_records(prefix, recipe["shards"], bad if bad is not None else BadRecords())
    if source is not None and bad is not None:
        source = {**source, "bad_records": bad.as_meta()}
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    blocks = _shard_blocks(prefix, recipe["shards"], token_dtype(vocab_size))
    return write_dataset(blocks, prefix, vocab_size, eos_id(tokenizer), source=source,
                         valid_fraction=valid_fraction, split_seed=split_seed)  # fmt: skip


def _add_bad_records(prefix: str | Path, count: int, bad: BadRecords) -> None:
    """Count every shard's malformed records into ``bad``, in order (so its first few are
    the corpus's first few), and apply its limit to the whole corpus."""
    for index in range(count):
        meta = _read_meta(DatasetPaths.of(shard_prefix(prefix, index, count)).meta)
        shard = meta["shard"].get("bad_records", {"count": 0, "first": [], "records": 0})
        bad.count += shard["count"]
        bad.records += shard["records"]
        bad.first.extend(shard["first"][: bad.KEEP - len(bad.first)])
    if isinstance(bad.limit, int) and bad.count > bad.limit:
        raise OptError(
            f"{bad.count} bad records in the shards, more than {bad.limit} (the limit set by "
            f"max-bad-records); the first: {bad.first[0]}"
        )
    bad.finish()


def _shard_blocks(prefix: str | Path, count: int, dtype: np.dtype) -> Iterator[tuple[Block, int]]:
    """The shards' documents in order, as token blocks with their lengths (and their size
    in bytes, for a progress bar); each shard's tokens are checked against its hash."""
    max_tokens = _MERGE_BYTES // dtype.itemsize
    for index in range(count):
        paths = DatasetPaths.of(shard_prefix(prefix, index, count))
        meta = _read_meta(paths.meta)
        if meta.get("dtype") != dtype.name:
            raise OptError(f"{paths.meta}: tokens of {meta.get('dtype')}, expected {dtype.name}")
        offsets = np.load(paths.idx)
        digest = hashlib.sha256()
        with paths.bin.open("rb") as f:
            a = 0
            while a < len(offsets) - 1:
                b = min(len(offsets) - 1, a + _MERGE_DOCS)
                b = max(
                    a + 1,
                    min(b, int(np.searchsorted(offsets, offsets[a] + max_tokens, "right")) - 1),
                )
                n_bytes = int(offsets[b] - offsets[a]) * dtype.itemsize
                data = f.read(n_bytes)
                if len(data) != n_bytes:
                    raise OptError(f"{paths.bin} is shorter than its index says")
                digest.update(data)
                yield (data, np.diff(offsets[a : b + 1])), n_bytes
                a = b
        if digest.hexdigest() != meta.get("sha256"):
            raise OptError(
                f"{paths.bin} does not match the hash in its metadata: delete "
                f"{paths.meta} and prepare shard {index} again"
            )


def shard_workers(count: int, cores: int | None = None) -> int:
    """Encoding processes for each of ``count`` shards run at once on this machine."""
    cores = cores or len(os.sched_getaffinity(0))
    return max(1, cores // count)
