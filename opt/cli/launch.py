"""`opt launch local|slurm` and `opt status`."""

from __future__ import annotations

import argparse

from opt.cli.train import config_arguments


def register(sub: argparse._SubParsersAction) -> None:
    launch = sub.add_parser("launch", help="start multi-process training")
    launch_sub = launch.add_subparsers(dest="launcher", required=True, metavar="LAUNCHER")
    local = launch_sub.add_parser(
        "local",
        help="N processes on this machine (torchrun; gloo on CPU, NCCL on GPU)",
        description="Start N ranks of `opt train CONFIG [overrides]` on this machine. The "
        "config's [parallel] section chooses the layout; its degrees must multiply to N.",
    )
    local.add_argument("--nproc", type=int, required=True, help="number of processes (ranks)")
    config_arguments(local, cmd_launch_local)
    slurm = launch_sub.add_parser(
        "slurm",
        help="submit to Slurm (submitit); requeues itself on timeouts, preemption, failures",
        description="Submit `opt train CONFIG [overrides]` as a Slurm job with one task per "
        "GPU. The [slurm] config section (or --slurm.KEY overrides, or the short flags "
        "--nodes, --gpus-per-node, --tasks-per-node, --partition, --account, --qos, "
        "--time-minutes, --exclude, --nodelist) sets the allocation. Prints the layout and "
        "the sbatch script first; --dry-run stops there and submits nothing.",
    )
    config_arguments(slurm, cmd_launch_slurm)

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
