"""Durable files: the one atomic write, fsync helpers and checksums.

Every file that another process (or a later start of this one) reads back whole is written
with :func:`atomic_write`: a reader sees the old file or the new one, never half of either,
and a crash (power loss included) cannot leave a renamed-but-empty file behind.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path


def atomic_write(path: str | Path, data: str | bytes, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` atomically and durably: a temp file beside it, fsynced,
    renamed over it, and the directory fsynced so the rename survives a crash too.

    The temp name is unique per call, so concurrent writers (``opt logbook note`` and the
    trainer, say) never write into each other's temp file; the last rename wins.
    """
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # Not mkstemp: its 0600 mode would hide shared files from the other users of a run.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Persist renames in ``path`` (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
