"""The public logbook of a run, which is also what recovery reads back: typed events
(``events``), their lines and schema versions (``codec``), the append-only store
(``store``), the series of logged steps beside them (``series``), redaction (``redact``),
and the renderers for people (``describe``, ``tables``, ``summary``, ``report`` with its
``chart``)."""

from opt.run.logbook.store import EVENTS, MARKDOWN, Logbook, read_events

__all__ = ["EVENTS", "MARKDOWN", "Logbook", "read_events"]
