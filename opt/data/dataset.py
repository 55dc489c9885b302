"""Read-only access to a prepared token dataset, cut into fixed-length training samples.

On disk a dataset is three files sharing a prefix (written by :mod:`opt.data.prepare`):

- ``<prefix>.bin``: every token of every document, each document followed by EOS, as raw
  ``uint16`` (or ``uint32`` for vocabularies over 65,536), memory-mapped when read;
- ``<prefix>.idx``: ``.npy`` int64 array of document start offsets, ``n_docs + 1`` long;
- ``<prefix>.json``: metadata, written last, so its presence marks a complete dataset.

A held-out split of it (whole documents the training set does not hold) is a dataset of its
own beside it, ``<prefix>-valid`` (:func:`valid_prefix`); both record the split in their
metadata under ``"split"``.

Samples are non-overlapping windows over the token stream, as in OPT/Megatron: sample ``i``
is the ``seq_len + 1`` tokens starting at ``i * seq_len``, so that inputs are ``[:-1]`` and
targets ``[1:]`` and windows may span document boundaries (EOS separates them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from opt.errors import OptError
from opt.fsutil import sha256_file

FORMAT = "opt-tokens-v1"
DTYPES = ("uint16", "uint32")
_META_KEYS = ("format", "dtype", "n_tokens", "n_docs", "vocab_size", "eos_id", "sha256")


@dataclass(frozen=True)
class DatasetPaths:
    """The three files of a dataset; suffixes are appended, so prefixes may contain dots."""

    bin: Path
    idx: Path
    meta: Path

    @classmethod
    def of(cls, prefix: str | Path) -> DatasetPaths:
        return cls(Path(f"{prefix}.bin"), Path(f"{prefix}.idx"), Path(f"{prefix}.json"))


VALID_SUFFIX = "-valid"


def valid_prefix(prefix: str | Path) -> Path:
    """The held-out set of the dataset ``prefix``: ``<prefix>-valid``, what
    ``opt data prepare --valid-fraction`` writes beside the training set."""
    return Path(f"{prefix}{VALID_SUFFIX}")


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every token id."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class TokenDataset:
    """A prepared dataset, memory-mapped read-only; cheap to open, safe to share."""

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = Path(prefix)
        self.paths = DatasetPaths.of(prefix)
        self.meta = _read_meta(self.paths.meta)
        self.dtype = np.dtype(self.meta["dtype"])
        _check_size(self.paths.bin, self.meta["n_tokens"], self.dtype)
        self.tokens = np.memmap(self.paths.bin, dtype=self.dtype, mode="r")

    @property
    def n_tokens(self) -> int:
        return self.meta["n_tokens"]

    @property
    def n_docs(self) -> int:
        return self.meta["n_docs"]

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    @property
    def eos_id(self) -> int:
        return self.meta["eos_id"]

    def doc_offsets(self) -> np.ndarray:
        """Document start offsets into the token stream (``n_docs + 1`` of them)."""
        return np.load(self.paths.idx, mmap_mode="r")

    def num_samples(self, seq_len: int) -> int:
        """How many non-overlapping ``seq_len + 1`` windows fit (the last token only targets)."""
        if seq_len < 1:
            raise OptError(f"sequence length must be positive, got {seq_len}")
        count = (self.n_tokens - 1) // seq_len
        if count == 0:
            raise OptError(
                f"dataset {self.prefix} has {self.n_tokens} tokens, "
                f"too few for one sample of {seq_len + 1}"
            )
        return count

    def sample(self, i: int, seq_len: int) -> np.ndarray:
        """Sample ``i``: ``seq_len + 1`` tokens as int64 (a copy, not a view of the file)."""
        if not 0 <= i < self.num_samples(seq_len):
            raise IndexError(f"sample {i} out of range for seq_len {seq_len}")
        start = i * seq_len
        return self.tokens[start : start + seq_len + 1].astype(np.int64)

    def verify(self) -> None:
        """Re-hash the token file against the metadata; reads the whole file, so not on open."""
        if sha256_file(self.paths.bin) != self.meta["sha256"]:
            raise OptError(f"corrupt dataset {self.paths.bin}: sha256 does not match metadata")


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise OptError(f"dataset not found: {path} (run `opt data prepare`)") from e
    except (OSError, ValueError) as e:
        raise OptError(f"corrupt dataset metadata {path}: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise OptError(f"{path} is not an {FORMAT} dataset")
    missing = [key for key in _META_KEYS if key not in meta]
    if missing or meta["dtype"] not in DTYPES:
        raise OptError(f"corrupt dataset metadata {path}: missing or bad {missing or 'dtype'}")
    return meta


def _check_size(path: Path, n_tokens: int, dtype: np.dtype) -> None:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise OptError(f"corrupt dataset: cannot read {path} ({e.strerror})") from e
    if n_tokens < 1 or size != n_tokens * dtype.itemsize:
        raise OptError(
            f"corrupt dataset {path}: {size} bytes, but metadata says "
            f"{n_tokens} {dtype.name} tokens ({n_tokens * dtype.itemsize} bytes)"
        )
