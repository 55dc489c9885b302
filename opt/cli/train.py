"""`opt train CONFIG [overrides]`: train (or, with --dry-run, check the layout on paper)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from opt.errors import OptError
from opt.launch.overrides import expand
from opt.run.watchdog import HANG_EXIT


def config_arguments(parser: argparse.ArgumentParser, func) -> None:
    """CONFIG [overrides] for the commands that start training."""
    parser.add_argument("config", help="TOML config file (see configs/)")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="--section.key value overrides")
    parser.set_defaults(func=func)


def register(sub: argparse._SubParsersAction) -> None:
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
        "and reports per-rank shapes and memory without training. Exit status: 0 when "
        "training finished or stopped for a requeue (state in <run dir>/status.json), 2 for "
        "bad input, 3 when the supervisor stopped for a human, "
        f"{HANG_EXIT} when a rank's hang watchdog ended it (stacks in <run dir>/hangs/).",
    )
    config_arguments(train, cmd_train)
    finetune = sub.add_parser(
        "finetune",
        help="multitask prompted fine-tuning (T0) from a TOML config with a [finetune] mixture",
        description="`opt train` for a config whose [finetune] section names a prompted "
        "mixture (finetune.mixture) and that starts from pretrained weights "
        "(checkpoint.init_from): the same overrides, layouts, supervisor, logbook and "
        "resume. Refused, with one line, without finetune.mixture.",
    )
    config_arguments(finetune, cmd_finetune)


def cmd_finetune(args: argparse.Namespace) -> int:
    args.require_finetune = True
    return cmd_train(args)


def cmd_train(args: argparse.Namespace) -> int:
    from opt import dist as distributed
    from opt.config import load_config
    from opt.launch.slurm_env import adopt_slurm_environment

    adopt_slurm_environment()  # a task of `opt launch slurm`: rank and rendezvous from Slurm
    overrides = expand(args.overrides)
    dry_run, world_size, as_json = _pop_dry_run_flags(overrides)
    cfg = load_config(args.config, overrides)
    if getattr(args, "require_finetune", False) and cfg.finetune.mixture is None:
        raise OptError(
            "opt finetune needs finetune.mixture (a [finetune] section naming a mixture "
            "file); for pretraining use opt train"
        )
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


def _newest(root: Path) -> str:
    from opt.checkpoint import latest_checkpoint

    newest = latest_checkpoint(root)
    return newest.name if newest else "none"
