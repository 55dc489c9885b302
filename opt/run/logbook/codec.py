"""An event to and from its line in ``events.jsonl``, across schema versions.

A line is one JSON object: ``v``, ``time``, ``run`` and ``kind`` first, then the event's
fields; fields that are ``None`` are left out, and a non-finite float (a diverged loss)
is written as a string, because strict JSON has no NaN.

Version 0 is every line written before events were typed (no ``v``): the same kinds and
fields as version 1, except that a missing field the readers of the time gave a default is
filled with that default, and a note may carry keys of its own (kept in ``Note.extra``).
"""

from __future__ import annotations

import math
import typing

from pydantic import TypeAdapter, ValidationError

from opt.run.logbook.events import SCHEMA_VERSION, AnyEvent, Event, Note

_ADAPTER: TypeAdapter[Event] = TypeAdapter(AnyEvent)

EVENT_TYPES: dict[str, type[Event]] = {
    cls.model_fields["kind"].default: cls for cls in typing.get_args(typing.get_args(AnyEvent)[0])
}
"""Every event class by its ``kind``."""

_FIRST = ("v", "time", "run", "kind")

# What the readers of version 0 assumed for a field a line did not have.
_V0_DEFAULTS: dict[str, dict[str, typing.Any]] = {
    "run_start": {"reason": "fresh", "world_size": 1},
    "requeue": {"job_id": "?", "requeued_by": "opt"},
    "allocation_start": {"job_id": "?"},
    "allocation_end": {"job_id": "?"},
    "node_excluded": {"job_id": "?"},
    "gave_up": {"job_id": "?", "cause": "?"},
}


class EventError(ValueError):
    """A line that is not a valid event; the message is one line."""


def to_json(event: Event) -> dict:
    """The JSON object of ``event``'s line (ready for ``json.dumps(..., allow_nan=False)``)."""
    fields = _finite(event.model_dump(exclude_none=True))
    return {**{k: fields[k] for k in _FIRST if k in fields}, **fields}


def parse_event(obj: object) -> Event:
    """The typed event of one line's JSON object, of any schema version."""
    if not isinstance(obj, dict):
        raise EventError(f"not a JSON object but {type(obj).__name__}")
    version = obj.get("v", 0)
    if version == 0:
        obj = upgrade_v0(obj)
    elif version != SCHEMA_VERSION:
        raise EventError(
            f"schema version {version!r}: this opt reads versions 0 to {SCHEMA_VERSION}"
        )
    try:
        return _ADAPTER.validate_python(obj)
    except ValidationError as err:
        raise EventError(_one_line(obj, err)) from None


def upgrade_v0(obj: dict) -> dict:
    """A version-0 line's object in version 1's shape (not yet validated)."""
    kind = obj.get("kind")
    upgraded = {**_V0_DEFAULTS.get(kind, {}), **obj, "v": SCHEMA_VERSION}
    if kind == "note":
        own = set(Note.model_fields)
        extra = {k: v for k, v in upgraded.items() if k not in own}
        upgraded = {k: v for k, v in upgraded.items() if k in own}
        if extra:
            upgraded["extra"] = extra
    return upgraded


def _one_line(obj: dict, err: ValidationError) -> str:
    first = err.errors()[0]
    kind = obj.get("kind")
    loc = first["loc"][1:] if first["loc"] and first["loc"][0] == kind else first["loc"]
    name = ".".join(str(part) for part in loc)
    kind_text = f"{kind} event" if isinstance(kind, str) else "event"
    if first["type"] == "union_tag_invalid":
        text = f"unknown event kind {kind!r}"
    elif first["type"] == "union_tag_not_found":
        text = "no event kind"
    elif first["type"] == "extra_forbidden":
        text = f"{kind_text}: unknown field {name!r}"
    elif first["type"] == "missing":
        text = f"{kind_text}: missing field {name!r}"
    else:
        text = f"{kind_text}: field {name!r}: {first['msg']}"
    more = err.error_count() - 1
    return text + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")


def _finite(value):
    """Tuples as lists, and NaN and infinities as strings ("nan", "inf")."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
