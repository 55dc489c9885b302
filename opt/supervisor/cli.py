"""`opt logbook note|show|summary|render` and `opt intervene`."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from opt.errors import OptError
from opt.fsutil import atomic_write

INTERVENE_FILE = "INTERVENE.json"  # in the run directory; applied and renamed by the trainer


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
    summary = add("summary", "interventions by kind, tokens lost, current factors", _summary)
    summary.add_argument("--json", action="store_true", help="print JSON")
    render = add("render", "write a self-contained HTML report", _render)
    render.add_argument("--out", type=Path, help="output file (default: logbook/<run>/report.html)")

    intervene = sub.add_parser(
        "intervene",
        help="change LR scale, clip or skip data of a running job at its next step",
        description="Ask a running job to apply a manual intervention at its next step (every "
        "rank applies it; it is logged as a manual intervention).",
    )
    intervene.add_argument("run", help="run name")
    intervene.add_argument("--runs-dir", default="runs", help="root of run directories")
    intervene.add_argument("--lr-scale", type=float, help="set the LR multiplier")
    intervene.add_argument("--clip", type=float, help="set the gradient-clipping threshold")
    intervene.add_argument("--skip-steps", help="A-B: skip the data of future steps A to B")
    intervene.add_argument("--reason", default="", help="why (goes into the logbook)")
    intervene.set_defaults(func=_intervene)


def _logbook(args):
    from opt.supervisor.logbook import Logbook

    book = Logbook(args.dir, args.run)
    if not book.events_path.is_file():
        raise OptError(f"no logbook for run {args.run!r} at {book.events_path}")
    return book


def _note(args) -> int:
    book = _logbook(args)
    fields = {"text": args.text, "author": os.environ.get("USER", "unknown")}
    if args.step is not None:
        fields["step"] = args.step
    book.append("note", **fields)
    print(f"noted in {book.dir / 'LOGBOOK.md'}")
    return 0


def _show(args) -> int:
    from opt.supervisor.review import timeline

    print(timeline(_logbook(args).events()))
    return 0


def _summary(args) -> int:
    from opt.supervisor.review import format_summary, summary

    s = summary(_logbook(args).events())
    print(json.dumps(s, indent=1) if args.json else format_summary(args.run, s))
    return 0


def _render(args) -> int:
    from opt.supervisor.review import render_html

    book = _logbook(args)
    events = book.events()
    run_dir = next((Path(e["run_dir"]) for e in reversed(events) if e.get("run_dir")), None)
    out = args.out or book.dir / "report.html"
    atomic_write(out, render_html(args.run, events, run_dir))
    print(f"wrote {out}")
    return 0


def parse_step_range(text: str) -> tuple[int, int]:
    try:
        first, last = (int(x) for x in text.split("-"))
    except ValueError:
        raise OptError(f"--skip-steps {text!r}: expected A-B, e.g. 1200-1250") from None
    if not 0 < first <= last:
        raise OptError(f"--skip-steps {text!r}: need 0 < A <= B")
    return first, last


def _intervene(args) -> int:
    request = {"reason": args.reason}
    if args.lr_scale is not None:
        if not 0 < args.lr_scale <= 10:
            raise OptError("--lr-scale must be within (0, 10]")
        request["lr_scale"] = args.lr_scale
    if args.clip is not None:
        if args.clip < 0:
            raise OptError("--clip must not be negative")
        request["grad_clip"] = args.clip
    if args.skip_steps:
        request["skip_steps"] = list(parse_step_range(args.skip_steps))
    if len(request) == 1:
        raise OptError("nothing to do: give --lr-scale, --clip and/or --skip-steps")
    run_dir = Path(args.runs_dir) / args.run
    if not run_dir.is_dir():
        raise OptError(f"no run directory {run_dir}")
    path = run_dir / INTERVENE_FILE
    atomic_write(path, json.dumps(request))  # the trainer never sees half a request
    print(f"requested: {request}; the job applies it at its next step")
    return 0
