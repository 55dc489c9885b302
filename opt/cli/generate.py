"""`opt generate CHECKPOINT --prompt TEXT [--file F]`: continue prompts under a checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from opt.errors import OptError


def register(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser(
        "generate",
        help="continue prompts under a checkpoint (greedy or sampled)",
        description="Continue each prompt with greedy decoding (temperature 0, the default) "
        "or sampling; prints each prompt with its continuation, or JSON lines.",
    )
    gen.add_argument("checkpoint", help="checkpoint directory (step_NNNNNNNN)")
    gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    gen.add_argument("--file", help="a file of prompts, one per line (blank lines skipped)")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="default: 64")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus size; 1 (default): all")
    gen.add_argument("--top-k", type=int, default=0, help="most likely tokens kept; 0: all")
    gen.add_argument("--seed", type=int, help="seed of the sampling (default: random)")
    gen.add_argument(
        "--stop", action="append", default=[], help="end a continuation at this string"
    )
    gen.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    gen.add_argument(
        "--tokenizer", help="tokenizer file or directory (default: the checkpoint's own)"
    )
    gen.add_argument(
        "--jsonl", action="store_true", help="one JSON object per prompt instead of text"
    )
    gen.set_defaults(func=cmd_generate)


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.file is not None:
        path = Path(args.file)
        if not path.is_file():
            raise OptError(f"file not found: {path}")
        prompts += [line for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise OptError("nothing to continue: give --prompt TEXT or --file F")
    return prompts


def cmd_generate(args: argparse.Namespace) -> int:
    from opt import checkpoint as ckpt
    from opt.data.tokenizer import load_tokenizer
    from opt.eval.generate import Sampling, generate

    prompts = _prompts(args)
    Sampling(args.temperature, args.top_p, args.top_k)  # refuse bad settings before loading
    checkpoint = Path(args.checkpoint)
    model = ckpt.load_model(checkpoint).eval()  # first: a wrong path is named as a checkpoint
    tokenizer = load_tokenizer(args.tokenizer or checkpoint)
    outputs = generate(
        model,
        tokenizer,
        prompts,
        args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
        batch_size=args.batch_size,
    )
    for i, (prompt, out) in enumerate(zip(prompts, outputs, strict=True)):
        if args.jsonl:
            record = {"prompt": prompt, "text": out.text, "token_ids": out.token_ids}
            print(json.dumps({**record, "finish": out.finish}))
        else:
            print(("\n" if i else "") + prompt + out.text)
    return 0
