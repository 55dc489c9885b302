"""`opt logbook note|show|summary|render`: read or annotate a run's public logbook."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from opt.errors import OptError
from opt.fsutil import atomic_write
from opt.run.logbook.events import Note
from opt.run.logbook.report import config_of, render_html
from opt.run.logbook.series import SERIES, read_series
from opt.run.logbook.store import MARKDOWN, Logbook
from opt.run.logbook.summary import format_summary, summary
from opt.run.logbook.tables import timeline


def register(sub: argparse._SubParsersAction) -> None:
    logbook = sub.add_parser("logbook", help="read or annotate a run's public logbook")
    commands = logbook.add_subparsers(dest="logbook_command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str, func) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help_text, description=help_text)
        parser.add_argument("run", help="run name (logbook/<run>/)")
        parser.add_argument("--dir", default="logbook", help="logbook root (default: logbook)")
        parser.set_defaults(func=func)
        return parser

    note = add("note", "add a human note to the logbook", _note)
    note.add_argument("text", help="the note")
    note.add_argument("--step", type=int, help="step the note refers to")
    add("show", "print the timeline", _show)
    summary_ = add("summary", "interventions by kind, tokens lost, current factors", _summary)
    summary_.add_argument("--json", action="store_true", help="print JSON")
    render = add("render", "write a self-contained HTML report (chart, marks, timeline, config)",
                 _render)  # fmt: skip
    render.add_argument("--out", type=Path, help="output file (default: logbook/<run>/report.html)")


def _logbook(args) -> Logbook:
    book = Logbook(args.dir, args.run)
    if not book.events_path.is_file():
        raise OptError(f"no logbook for run {args.run!r} at {book.events_path}")
    return book


def _note(args) -> int:
    book = _logbook(args)
    book.append(Note(text=args.text, author=os.environ.get("USER", "unknown"), step=args.step))
    print(f"noted in {book.dir / MARKDOWN}")
    return 0


def _show(args) -> int:
    print(timeline(_logbook(args).events()))
    return 0


def _summary(args) -> int:
    s = summary(_logbook(args).events())
    print(json.dumps(s, indent=1) if args.json else format_summary(args.run, s))
    return 0


def _render(args) -> int:
    book = _logbook(args)
    events = book.events()
    out = args.out or book.dir / "report.html"
    points = read_series(book.dir / SERIES)
    atomic_write(out, render_html(args.run, events, points, config_of(book.dir, events)))
    print(f"wrote {out}")
    return 0
