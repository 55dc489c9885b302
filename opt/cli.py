"""The `opt` command line: configs, data, train, convert, score."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from opt.errors import OptError
from opt.launch.overrides import expand


def cmd_configs(args: argparse.Namespace) -> int:
    from opt.models.model import count_parameters
    from opt.models.sizes import MODEL_SIZES

    rows = []
    for name, shape in MODEL_SIZES.items():
        rows.append(
            {
                "name": name,
                "layers": shape.n_layers,
                "heads": shape.n_heads,
                "d_model": shape.d_model,
                "ffn_dim": shape.ffn_dim,
                "vocab": shape.vocab_size,
                "layernorm": "pre" if shape.pre_norm else "post",
                "params": count_parameters(shape),
            }
        )
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    header = f"{'name':<10} {'layers':>6} {'heads':>5} {'d_model':>7} {'ffn':>6} {'vocab':>6} {'LN':>4} {'parameters':>16}"
    print(header)
    for r in rows:
        print(
            f"{r['name']:<10} {r['layers']:>6} {r['heads']:>5} {r['d_model']:>7} {r['ffn_dim']:>6} "
            f"{r['vocab']:>6} {r['layernorm']:>4} {r['params']:>16,}"
        )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from opt import dist as distributed
    from opt.config import load_config
    from opt.launch.slurm_env import adopt_slurm_environment

    adopt_slurm_environment()  # a task of `opt launch slurm`: rank and rendezvous from Slurm
    overrides = expand(args.overrides)
    dry_run, world_size, as_json = _pop_dry_run_flags(overrides)
    cfg = load_config(args.config, overrides)
    if dry_run:
        from opt.dry_run import dry_run_report, format_report

        report = dry_run_report(cfg, world_size)
        print(json.dumps(report, indent=1) if as_json else format_report(report))
        return 0
    from opt.train.trainer import Trainer

    try:
        trainer = Trainer(cfg)
        trainer.fit()
    finally:
        distributed.destroy()
    stop = trainer.stop
    human_needed = stop is not None and stop.human_needed
    if trainer.rank != 0:
        return 3 if human_needed else 0
    if human_needed:
        print(f"error: supervisor {stop.reason}", file=sys.stderr)
        print(f"logbook: {cfg.logbook_dir / 'LOGBOOK.md'}", file=sys.stderr)
        return 3
    if stop is not None:
        print(stop.reason)
    latest = trainer.cfg.checkpoint_dir
    print(f"done: step {trainer.step}, {trainer.tokens_seen:,} tokens")
    print(f"checkpoints: {latest}/ (newest: {_newest(latest)})")
    if cfg.metrics.tensorboard:
        print(f"TensorBoard: tensorboard --logdir {cfg.run_dir / 'tensorboard'}")
    print(f"resolved config: {cfg.run_dir / 'config.toml'}")
    print(f"logbook: {cfg.logbook_dir / 'LOGBOOK.md'}")
    return 0


def _pop_dry_run_flags(overrides: list[str]) -> tuple[bool, int, bool]:
    """``--dry-run [--world-size N] [--json]``, taken out of the config overrides."""
    dry_run = "--dry-run" in overrides
    as_json = "--json" in overrides
    for flag in ("--dry-run", "--json"):
        while flag in overrides:
            overrides.remove(flag)
    world_size = 1
    if "--world-size" in overrides:
        at = overrides.index("--world-size")
        if at + 1 >= len(overrides) or not overrides[at + 1].isdigit():
            raise OptError("--world-size needs a positive integer")
        world_size = int(overrides[at + 1])
        del overrides[at : at + 2]
        if not dry_run:
            raise OptError("--world-size is for --dry-run; real runs take it from the launcher")
    elif dry_run:
        from opt.dist import launched_world_size

        world_size = launched_world_size()
    if as_json and not dry_run:
        raise OptError("--json is for --dry-run")
    return dry_run, world_size, as_json


def cmd_launch_slurm(args: argparse.Namespace) -> int:
    from opt.launch.slurm import launch_slurm

    overrides = list(args.overrides)
    dry_run = "--dry-run" in overrides
    overrides = [a for a in overrides if a != "--dry-run"]
    return launch_slurm(args.config, overrides, dry_run)


def cmd_status(args: argparse.Namespace) -> int:
    from opt.launch.status import format_status, run_status_report, status_json

    report = run_status_report(args.run, args.runs_dir)
    print(status_json(report) if args.json else format_status(report))
    return 0


def cmd_launch_local(args: argparse.Namespace) -> int:
    from opt.launch.local import launch_local

    return launch_local(args.nproc, args.config, args.overrides)


def _newest(root: Path) -> str:
    from opt.checkpoint import latest_checkpoint

    newest = latest_checkpoint(root)
    return newest.name if newest else "none"


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


def _config_arguments(parser: argparse.ArgumentParser, func) -> None:
    """CONFIG [overrides] for the commands that start training."""
    parser.add_argument("config", help="TOML config file (see configs/)")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="--section.key value overrides")
    parser.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    from opt.convert import cli as convert_cli
    from opt.data import cli as data_cli
    from opt.plan import cli as plan_cli
    from opt.run import intervene as intervene_cli
    from opt.run.logbook import cli as logbook_cli

    parser = argparse.ArgumentParser(
        prog="opt",
        description="Pretrain OPT-style decoder-only language models (125M to 175B).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    configs = sub.add_parser("configs", help="list the model sizes with exact parameter counts")
    configs.add_argument("--json", action="store_true", help="print JSON instead of a table")
    configs.set_defaults(func=cmd_configs)

    data_cli.register(sub)

    train = sub.add_parser(
        "train",
        help="train from a TOML config",
        description="Train from a TOML config. Any config key can be overridden after the "
        "file, e.g. `opt train configs/demo.toml --optim.lr 3e-4 --train.precision bf16`. "
        "Precedence: defaults < TOML < overrides. The resolved config is saved in the run "
        "directory; with checkpoint.resume=auto (the default) a rerun resumes from the newest "
        "complete checkpoint. Shorthands: --resume (checkpoint.resume: auto, none or a "
        "checkpoint directory), --max-steps (train.max_steps). --dry-run [--world-size N] "
        "[--json] builds the parallel layout on the meta device with a fake process group "
        "and reports per-rank shapes and memory without training.",
    )
    _config_arguments(train, cmd_train)

    convert_cli.register(sub)
    logbook_cli.register(sub)
    intervene_cli.register(sub)
    plan_cli.register(sub)

    launch = sub.add_parser("launch", help="start multi-process training")
    launch_sub = launch.add_subparsers(dest="launcher", required=True, metavar="LAUNCHER")
    local = launch_sub.add_parser(
        "local",
        help="N processes on this machine (torchrun; gloo on CPU, NCCL on GPU)",
        description="Start N ranks of `opt train CONFIG [overrides]` on this machine. The "
        "config's [parallel] section chooses the layout; its degrees must multiply to N.",
    )
    local.add_argument("--nproc", type=int, required=True, help="number of processes (ranks)")
    _config_arguments(local, cmd_launch_local)
    slurm = launch_sub.add_parser(
        "slurm",
        help="submit to Slurm (submitit); requeues itself on timeouts, preemption, failures",
        description="Submit `opt train CONFIG [overrides]` as a Slurm job with one task per "
        "GPU. The [slurm] config section (or --slurm.KEY overrides, or the short flags "
        "--nodes, --gpus-per-node, --tasks-per-node, --partition, --account, --qos, "
        "--time-minutes, --exclude, --nodelist) sets the allocation. Prints the layout and "
        "the sbatch script first; --dry-run stops there and submits nothing.",
    )
    _config_arguments(slurm, cmd_launch_slurm)

    status = sub.add_parser(
        "status",
        help="a run's Slurm job state, step, last checkpoint, restarts and interventions",
        description="Where a run is: its Slurm job (from squeue/scontrol, never sacct), the "
        "current step, the newest complete checkpoint, restarts by cause and the latest "
        "interventions, from the run directory and its logbook.",
    )
    status.add_argument("run", help="run name or run directory")
    status.add_argument("--runs-dir", default="runs", help="root of run directories")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=cmd_status)

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
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
