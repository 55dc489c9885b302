"""The events as a table: Markdown for LOGBOOK.md, and plain columns for a terminal."""

from __future__ import annotations

from opt.run.logbook.describe import describe
from opt.run.logbook.events import Event


def markdown(run: str, events: list[Event], events_file: str) -> str:
    """LOGBOOK.md: the events of ``run``, read from ``events_file`` (named in the text)."""
    lines = [
        f"# Logbook: {run}",
        "",
        "Written by opt's supervisor; every automatic and manual intervention, restart and note "
        f"of the run, newest last. Machine-readable copy: `{events_file}`.",
        "",
        "| time (UTC) | step | tokens | event |",
        "| --- | ---: | ---: | --- |",
    ]
    for e in events:
        text = describe(e).replace("|", "\\|")
        lines.append(f"| {e.time} | {_step(e)} | {_tokens(e)} | {text} |")
    return "\n".join(lines) + "\n"


def timeline(events: list[Event]) -> str:
    lines = [f"{'time (UTC)':<26} {'step':>8} {'tokens':>14}  event"]
    for e in events:
        lines.append(f"{e.time:<26} {_step(e):>8} {_tokens(e):>14}  {describe(e)}")
    return "\n".join(lines)


def _step(e: Event) -> str:
    return "" if e.step is None else str(e.step)


def _tokens(e: Event) -> str:
    return "" if e.tokens is None else f"{e.tokens:,}"
