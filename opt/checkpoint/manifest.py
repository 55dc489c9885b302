"""Atomic checkpoint directories and the manifest that proves one is complete.

A checkpoint is written into a hidden temporary directory, every file is fsynced, a manifest
listing every file with its size and SHA-256 is written last, and only then is the directory
renamed into place. A crash at any point leaves either the previous set of checkpoints or a
temporary directory that nothing will load. Completeness is judged by the manifest, never by
"the newest directory".
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from opt.errors import OptError
from opt.fsutil import atomic_write, fsync_dir, fsync_file, sha256_file

# Data files each rank writes (DCP writer threads), and threads that fsync and hash them.
IO_THREADS = 2

MANIFEST = "manifest.json"
FORMAT = "opt-checkpoint-v1"


def temporary_path(final: Path) -> Path:
    return final.parent / f".{final.name}.tmp"


def begin(final: Path) -> Path:
    """Create an empty temporary directory for ``final``, clearing one a crash left behind."""
    tmp = temporary_path(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _sealed_entry(path: Path) -> dict:
    fsync_file(path)
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def seal_files(tmp: Path) -> dict:
    """fsync and hash every file of ``tmp``: the manifest's ``files``. Files are done in
    parallel (hashlib and fsync release the GIL): a rank writes IO_THREADS data files."""
    paths = sorted(p for p in tmp.rglob("*") if p.is_file())
    with ThreadPoolExecutor(IO_THREADS) as pool:
        entries = list(pool.map(_sealed_entry, paths))
    return {str(p.relative_to(tmp)): e for p, e in zip(paths, entries, strict=True)}


def commit(tmp: Path, final: Path, meta: dict, files: dict | None = None) -> Path:
    """fsync every file, write the manifest, and rename ``tmp`` to ``final`` atomically;
    ``files`` are the entries of ``seal_files`` when the caller has them already."""
    files = seal_files(tmp) if files is None else files
    manifest = {"format": FORMAT, **meta, "files": files}
    # The manifest makes the directory a checkpoint: it goes in last, durably.
    atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=1))
    if final.exists():
        # Re-saving the same step (e.g. after a rollback); the old copy goes only after
        # the new one is complete.
        old = final.parent / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)
    return final


def read_manifest(path: Path) -> dict:
    manifest_path = Path(path) / MANIFEST
    if not Path(path).is_dir():
        raise OptError(f"checkpoint not found: {path}")
    if not manifest_path.is_file():
        raise OptError(f"not a complete checkpoint (no {MANIFEST}): {path}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise OptError(f"corrupt checkpoint: unreadable {manifest_path}") from None
    if manifest.get("format") != FORMAT or "files" not in manifest:
        raise OptError(f"corrupt checkpoint: {manifest_path} is not an {FORMAT} manifest")
    return manifest


def verify_checkpoint(
    path: str | Path, checksums: bool = True, hash_only: Collection[str] | None = None
) -> dict:
    """Check every file the manifest lists: present, same size and (optionally) same hash.

    ``hash_only`` limits the (expensive) hashing to those files, so that the ranks of a
    job can split a large checkpoint between them; sizes are always checked for all."""
    path = Path(path)
    manifest = read_manifest(path)
    for name, entry in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise OptError(f"corrupt checkpoint {path}: missing file {name}")
        if file.stat().st_size != entry["bytes"]:
            raise OptError(
                f"corrupt checkpoint {path}: {name} has {file.stat().st_size} bytes, "
                f"the manifest says {entry['bytes']}"
            )
    if not checksums:
        return manifest
    names = [n for n in manifest["files"] if hash_only is None or n in hash_only]
    with ThreadPoolExecutor(IO_THREADS) as pool:
        digests = list(pool.map(lambda n: sha256_file(path / n), names))
    for name, digest in zip(names, digests, strict=True):
        if digest != manifest["files"][name]["sha256"]:
            raise OptError(f"corrupt checkpoint {path}: {name} fails its checksum")
    return manifest
