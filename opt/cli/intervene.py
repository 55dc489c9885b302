"""`opt intervene`: an operator's request to a running job, through a file in its run
directory. The trainer reads ``INTERVENE.json`` at its next step, applies it on every rank,
logs it as a manual intervention and renames the file ``INTERVENE.applied.json``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from opt.errors import OptError
from opt.fsutil import atomic_write
from opt.run.control import INTERVENE_FILE


def register(sub: argparse._SubParsersAction) -> None:
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
