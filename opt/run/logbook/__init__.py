"""The public logbook of a run, which is also what recovery reads back: typed events
(``events``), their lines and schema versions (``codec``), the append-only store
(``store``), redaction (``redact``), and the renderers for people (``describe``,
``tables``, ``summary``, ``report``)."""

from opt.run.logbook.store import EVENTS, MARKDOWN, Logbook, read_events

__all__ = ["EVENTS", "MARKDOWN", "Logbook", "read_events"]
