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
        "--tp",
        type=int,
        default=1,
        help="tensor-parallel degree under torchrun: the model is split over groups of TP "
        "consecutive ranks as in training, the examples over the groups (default 1)",
    )
    ev.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to score (auto: cuda when there is one, each rank on its LOCAL_RANK GPU)",
    )
    ev.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="weights and activations (log-softmax is always fp32); default fp32",
    )
    ev.add_argument(
        "--log-samples",
        action="store_true",
        help="also write samples.jsonl: every scored example's choices, log-likelihoods and "
        "predictions",
    )
    ev.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds any collective may wait under a process group (default 600)",
    )
    ev.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from opt.dist import init_distributed, launched_world_size, rank_and_world
    from opt.eval.report import markdown, write_results
    from opt.eval.runner import EvalSpec, evaluate_checkpoint
    from opt.eval.tasks import parse_tasks

    if args.batch_size < 1:
        raise OptError(f"--batch-size must be at least 1, not {args.batch_size}")
    world = launched_world_size()
    if args.tp < 1 or world % args.tp:
        raise OptError(
            f"--tp {args.tp} must divide the number of processes ({world}); "
            f"start them with torchrun --nproc-per-node N"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        raise OptError("--device cuda: no CUDA device is visible")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
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
        log_samples=args.log_samples,
    )
    distributed = world > 1
    if distributed:  # each group of --tp ranks scores a share of the examples
        device = init_distributed(args.timeout, "cuda" if cuda else "cpu")
    else:
        device = torch.device("cuda" if cuda else "cpu")
    try:
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        results = evaluate_checkpoint(
            args.checkpoint, spec, args.tokenizer, tp=args.tp, device=device, dtype=dtype
        )
        if rank_and_world()[0] == 0:
            paths = write_results(results, args.out)
            print(markdown(results).split("\n## ", 1)[0].rstrip())
            print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    finally:
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0
