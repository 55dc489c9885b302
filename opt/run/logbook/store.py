"""The public logbook of a run: ``logbook/<run>/events.jsonl`` (append-only, one typed event
per line, see ``codec``) and ``LOGBOOK.md`` (the same events for people, regenerated after
every append).

Durability: each event is one ``write`` to a file opened with O_APPEND, followed by fsync,
so a crash (kill -9 included) leaves every earlier line intact. Only a machine that dies
mid-write can leave a torn last line (no newline at its end): the reader skips it, and the
next append, holding an exclusive lock on the file, cuts it off first, so the file stays a
sequence of whole lines (``append_line`` and ``whole_lines``, which the series beside the
events uses too). LOGBOOK.md is replaced atomically, so it is always a complete rendering.

Reading validates: every line must be an event of a known kind with known fields, of
schema version 0 (upgraded) or the current one; anything else is an error naming the file
and the line. The logbook is meant to be published, so every event passes through
``redact`` before it is written.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

from opt.errors import OptError
from opt.fsutil import atomic_write, fsync_dir
from opt.run.logbook.codec import EventError, parse_event, to_json
from opt.run.logbook.events import Event
from opt.run.logbook.redact import redact
from opt.run.logbook.tables import markdown

EVENTS = "events.jsonl"
MARKDOWN = "LOGBOOK.md"


class Logbook:
    """Append events of one run; only rank 0 of a training job writes (callers guarantee
    that), but other processes (`opt logbook note`, the Slurm driver) may append at the
    same time."""

    def __init__(self, root: str | Path, run: str):
        self.dir = Path(root) / run
        self.run = run
        self.events_path = self.dir / EVENTS

    def append(self, event: Event) -> Event:
        """Write ``event`` (its ``run`` filled in, secrets redacted) and return it as written."""
        fields = redact(to_json(event.model_copy(update={"run": self.run})))
        try:
            written = parse_event(fields)
        except EventError as err:
            raise OptError(
                f"logbook {self.events_path}: refused to write an event: {err}"
            ) from None
        append_line(self.events_path, (json.dumps(fields, allow_nan=False) + "\n").encode())
        self.render_markdown()
        return written

    def events(self) -> list[Event]:
        return read_events(self.events_path)

    def render_markdown(self) -> None:
        atomic_write(self.dir / MARKDOWN, markdown(self.run, self.events(), EVENTS))


def read_events(path: str | Path) -> list[Event]:
    """Every event of a logbook file, typed; a torn final line (a crash mid-write) is skipped."""
    path = Path(path)
    if not path.is_file():
        raise OptError(f"no logbook at {path}")
    return [_parse_line(path, number, raw) for number, raw in whole_lines(path)]


def _parse_line(path: Path, number: int, raw: bytes) -> Event:
    try:
        return parse_event(json.loads(raw.decode(errors="replace")))
    except json.JSONDecodeError as err:
        raise OptError(f"{path}:{number}: not a JSON line ({err.msg})") from None
    except EventError as err:
        raise OptError(f"{path}:{number}: {err}") from None


def _is_json(raw: bytes) -> bool:
    try:
        json.loads(raw.decode(errors="replace"))
    except json.JSONDecodeError:
        return False
    return True


# ----- append-only JSON lines (the events, and the series beside them) ---------------------
def append_line(path: Path, line: bytes) -> None:
    """Append one whole line (ending in a newline) to ``path`` durably: one ``write`` to
    the file opened with O_APPEND under an exclusive lock, a torn last line cut off first,
    then fsync (and the directory's fsync when the file is new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        with contextlib.suppress(OSError):  # a filesystem without locks: append anyway
            fcntl.flock(fd, fcntl.LOCK_EX)
        line = _after_torn_tail(fd) + line
        count = os.write(fd, line)
        if count != len(line):  # a short write to a regular file means a full disk
            raise OptError(f"logbook {path}: short write ({count}/{len(line)})")
        os.fsync(fd)
    finally:
        os.close(fd)  # releases the lock
    if new:
        fsync_dir(path.parent)


def whole_lines(path: Path) -> list[tuple[int, bytes]]:
    """The non-empty lines of an append-only JSON-lines file with their line numbers; a
    torn final line (a crash mid-write: no newline, not JSON) is left out."""
    lines = path.read_bytes().split(b"\n")
    # The piece after the last newline: empty, or a line whose write did not finish.
    unterminated = lines.pop()
    numbered = [(number, raw) for number, raw in enumerate(lines, start=1) if raw.strip()]
    if unterminated.strip() and _is_json(unterminated):
        numbered.append((len(lines) + 1, unterminated))
    return numbered


def _after_torn_tail(fd: int) -> bytes:
    """Make the file end in a newline before the next line is appended: a torn last line
    (not JSON) is cut off; a whole one that lost only its newline keeps it. Returns what
    to write before the line."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return b""
    start = size
    while start > 0:  # back to the newline before the tail
        chunk = os.pread(fd, min(start, 65536), max(0, start - 65536))
        start -= len(chunk)
        if (at := chunk.rfind(b"\n")) >= 0:
            start += at + 1
            break
    if _is_json(os.pread(fd, size - start, start)):
        return b"\n"
    os.ftruncate(fd, start)
    return b""
