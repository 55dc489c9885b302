"""`opt eval CHECKPOINT --tasks ... --data DIR --out DIR`: zero- and few-shot accuracy over
every PromptSource prompt of each task, and its spread over the prompts (the T0 view)."""

from __future__ import annotations

import argparse
from pathlib import Path

from opt.errors import OptError


def register(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser(
        "eval",
        help="zero-/few-shot accuracy over many prompts per task (JSON, Markdown, chart)",
        description=(
            "Rank classification over each prompt's answer choices by log-likelihood, for "
            "every original-task PromptSource template of each task; per prompt accuracy "
            "with a bootstrap 95% CI, per task the median, IQR, min and max over prompts. "
            "Writes results.json, results.md and results.png into --out."
        ),
    )
    ev.add_argument("checkpoint", help="checkpoint directory (step_NNNNNNNN)")
    ev.add_argument("--tasks", required=True, help="comma-separated: rte,cb,copa,wic,wsc")
    ev.add_argument(
        "--data",
        required=True,
        help="directory with one folder per task (<task>/<split>.jsonl or a saved dataset)",
    )
    ev.add_argument("--out", required=True, help="directory for results.json/.md/.png")
    ev.add_argument("--split", default="validation", help="split to score (default: validation)")
    ev.add_argument(
        "--prompts",
        default="all",
        help="'all' (every original-task template) or template names, comma-separated",
    )
    ev.add_argument("--shots", type=int, default=0, help="few-shot demonstrations (default 0)")
    ev.add_argument("--fewshot-split", default="train", help="split the demonstrations come from")
    ev.add_argument("--seed", type=int, default=0, help="few-shot and bootstrap seed")
    ev.add_argument("--limit", type=int, help="score only the first N examples of each task")
    ev.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    ev.add_argument(
        "--tokenizer", help="tokenizer file or directory (default: the checkpoint's own)"
    )
    ev.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds any collective may wait under a process group (default 600)",
    )
    ev.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from opt.dist import init_distributed, launched_world_size, rank_and_world
    from opt.eval.report import markdown, write_results
    from opt.eval.runner import EvalSpec, evaluate_checkpoint
    from opt.eval.tasks import parse_tasks

    if args.batch_size < 1:
        raise OptError(f"--batch-size must be at least 1, not {args.batch_size}")
    spec = EvalSpec(
        tasks=tuple(parse_tasks(args.tasks)),
        data_dir=Path(args.data),
        split=args.split,
        prompts=args.prompts,
        shots=args.shots,
        fewshot_split=args.fewshot_split,
        seed=args.seed,
        limit=args.limit,
        batch_size=args.batch_size,
    )
    distributed = launched_world_size() > 1
    if distributed:  # data parallel: each rank scores a share of the examples
        init_distributed(args.timeout, "cpu")
    try:
        results = evaluate_checkpoint(args.checkpoint, spec, args.tokenizer)
        if rank_and_world()[0] == 0:
            paths = write_results(results, args.out)
            print(markdown(results).split("\n## ", 1)[0].rstrip())
            print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    finally:
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0
