"""The `opt` command line: one module per command group, all registered here.

Building the parser imports no torch: each command imports what it needs when it runs, so
that `opt --help` and `opt data prepare` (and its worker processes) start in a fraction of
a second. Bad input raises OptError anywhere below, which ``main`` turns into one line on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from opt.cli import (
    configs,
    convert,
    data,
    eval,
    generate,
    intervene,
    launch,
    logbook,
    plan,
    score,
    train,
)
from opt.errors import REFUSED_EXIT, OptError

# In the order `opt --help` lists them.
COMMAND_GROUPS = (
    configs,
    data,
    train,
    convert,
    logbook,
    intervene,
    plan,
    launch,
    score,
    eval,
    generate,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opt",
        description="Pretrain OPT-style decoder-only language models (125M to 175B).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except OptError as err:
        rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
        where = f"[rank {rank}] " if rank is not None else ""
        print(f"error: {where}{err}", file=sys.stderr)
        return REFUSED_EXIT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
