"""`opt score CHECKPOINT --text|--file`: per-token losses of a text under a checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from opt.errors import OptError


def register(sub: argparse._SubParsersAction) -> None:
    score = sub.add_parser(
        "score",
        help="per-token losses of a text under a checkpoint (JSON)",
        description="Print JSON with the loss of every token of a text, its mean and perplexity.",
    )
    score.add_argument("checkpoint", help="checkpoint directory (step_NNNNNNNN)")
    source = score.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="text to score")
    source.add_argument("--file", help="file whose text to score")
    score.add_argument(
        "--tokenizer", help="tokenizer file or directory (default: the checkpoint's own)"
    )
    score.set_defaults(func=cmd_score)


def cmd_score(args: argparse.Namespace) -> int:
    from opt.score import score_text

    if args.file is not None:
        path = Path(args.file)
        if not path.is_file():
            raise OptError(f"file not found: {path}")
        text = path.read_text()
    else:
        text = args.text
    print(json.dumps(score_text(args.checkpoint, text, args.tokenizer)))
    return 0
