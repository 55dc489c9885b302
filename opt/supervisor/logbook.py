"""Compatibility shim for the trainer's call sites (``opt/train/``), which still write
``append(kind, **fields)`` and read events back as dicts. The logbook is
``opt.run.logbook``; delete this file once those call sites write typed events.

Even through this shim every event is typed: ``append`` builds the event class of ``kind``
from ``fields`` (a misspelled field is refused), and ``events`` are the typed events of the
file as the dicts of their lines.
"""

from __future__ import annotations

from pathlib import Path

from opt.run.logbook.codec import EVENT_TYPES, to_json
from opt.run.logbook.store import Logbook as _Logbook


class Logbook:
    def __init__(self, root: str | Path, run: str):
        self._book = _Logbook(root, run)
        self.dir, self.run, self.events_path = self._book.dir, run, self._book.events_path

    def append(self, kind: str, **fields) -> dict:
        return to_json(self._book.append(EVENT_TYPES[kind](**fields)))

    def events(self) -> list[dict]:
        return [to_json(e) for e in self._book.events()]
