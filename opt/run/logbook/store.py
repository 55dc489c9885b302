"""INTERIM (replaced at merge by the logbook helper's store): typed events over the old store."""

from __future__ import annotations

from pydantic import TypeAdapter

from opt.run.logbook.events import AnyEvent, Event
from opt.supervisor.logbook import Logbook as _Untyped
from opt.supervisor.logbook import read_events as _read_untyped

_EVENTS = TypeAdapter(AnyEvent)


class Logbook:
    def __init__(self, root, run):
        self._book = _Untyped(root, run)
        self.dir, self.run, self.events_path = self._book.dir, run, self._book.events_path

    def append(self, event: Event) -> Event:
        fields = event.model_dump(
            mode="json", exclude={"kind", "time", "run", "v"}, exclude_none=True
        )
        self._book.append(event.kind, **fields)
        return event

    def events(self) -> list[Event]:
        return read_events(self.events_path)


def read_events(path) -> list[Event]:
    return [_EVENTS.validate_python(e) for e in _read_untyped(path)]
