"""`opt data prepare ... --shards N`: preparation spread over processes or a Slurm cluster.

One command line, four modes (:mod:`opt.data.shards` does the work):

- ``--shard-index I``: prepare shard I alone (what each process or array task runs); a shard
  already complete for these inputs and tokenizer is left as it is;
- ``--merge``: check every shard and concatenate them into PREFIX (byte-identical to one
  process), or name the missing ones and the command that prepares them;
- ``--launch local``: prepare the missing shards in that many processes here, then merge;
- ``--launch slurm``: submit the missing shards as one Slurm job array and the merge as a
  job that runs after the array ends, whatever its outcome (``afterany``): the merge then
  names any shard still missing. Run the same command again to redo only those.

Slurm jobs go through submitit, as training's do: ``map_array`` submits one array, and the
merge job's dependency is an ordinary sbatch option. Each array task runs the shard in
the task's own Python process (``opt.cli.main``), so submitit's handler catches Slurm's
warning signal (USR2, sent before a preemption or the time limit): the task is requeued and
redoes its shard from the start (a shard is written atomically or not at all; a killed
one's temp files are cleared). submitit counts what it takes for a time limit against its
3 timeout requeues, preemptions without limit; sbatch's ``--requeue`` lets Slurm requeue
a task whose node fails. Where Slurm itself ends a task for good, the merge names its shard.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opt.data.corpus import BadRecords, Source
from opt.data.dataset import DatasetPaths, valid_prefix
from opt.data.shards import (
    merge_shards,
    missing_shards,
    prepare_shard,
    shard_prefix,
    shard_recipe,
    shard_workers,
    shards_dir,
)
from opt.errors import OptError

LAUNCHERS = ("local", "slurm")


def add_shard_arguments(p: argparse.ArgumentParser) -> None:
    """The sharding options of ``opt data prepare``."""
    g = p.add_argument_group(
        "sharded preparation",
        "Split the inputs into N runs of whole files (balanced by size), tokenize each into "
        "PREFIX.shards/, then merge them into PREFIX: the same bytes as one process.",
    )
    g.add_argument("--shards", type=int, metavar="N", help="number of shards")
    what = g.add_mutually_exclusive_group()
    what.add_argument("--shard-index", type=int, metavar="I", help="prepare shard I (from 0)")
    what.add_argument("--merge", action="store_true", help="merge the N shards into PREFIX")
    what.add_argument(
        "--launch",
        choices=LAUNCHERS,
        help="local: the missing shards in N processes here, then the merge; slurm: a job "
        "array of the missing shards and a merge job after it",
    )
    # The merge job that --launch slurm submits: its message names the slurm command.
    g.add_argument("--launched-by", choices=LAUNCHERS, help=argparse.SUPPRESS)
    g.add_argument("--partition", help="Slurm partition")
    g.add_argument("--time", type=int, metavar="MIN", default=240,
                   help="Slurm time limit per job in minutes (default: 240)")  # fmt: skip
    g.add_argument("--cpus-per-task", type=int, metavar="N", help="Slurm CPUs per shard task")
    g.add_argument("--mem", help="Slurm memory per task, e.g. 32G")
    g.add_argument("--account", help="Slurm account")
    g.add_argument("--qos", help="Slurm QOS")
    g.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, repeatable (e.g. --sbatch exclude=node3)")  # fmt: skip


def sharded(args: argparse.Namespace) -> bool:
    """Whether the command asks for sharded preparation (and its options make sense)."""
    if args.shards is None:
        if args.shard_index is not None or args.merge or args.launch:
            raise OptError("--shard-index, --merge and --launch need --shards N")
        return False
    if args.shard_index is None and not args.merge and not args.launch:
        raise OptError("--shards N needs --shard-index I, --merge or --launch local|slurm")
    return True


def shard_command(args: argparse.Namespace, *mode: str) -> list[str]:
    """The ``opt data prepare`` command line of one mode (``--shard-index I``, ``--merge``)."""
    command = ["opt", "data", "prepare", *args.inputs, "--tokenizer", str(args.tokenizer),
               "--out", str(args.out), "--shards", str(args.shards)]  # fmt: skip
    if args.text_key != "text":
        command += ["--text-key", args.text_key]
    if args.max_bad_records is not None:
        command += ["--max-bad-records", str(args.max_bad_records)]
    if ("--merge" in mode or "--launch" in mode) and args.valid_fraction:
        command += ["--valid-fraction", repr(args.valid_fraction)]
        command += ["--split-seed", str(args.split_seed)]
    if "--merge" not in mode and args.no_word_cache:
        command.append("--no-word-cache")
    if "slurm" in mode:
        command += _slurm_options(args)
    return [*command, *mode]


def _slurm_options(args: argparse.Namespace) -> list[str]:
    options = ["--time", str(args.time)]
    for flag in ("partition", "cpus_per_task", "mem", "account", "qos"):
        if getattr(args, flag) is not None:
            options += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    for option in args.sbatch:
        options += ["--sbatch", option]
    return options


def run_sharded(
    args: argparse.Namespace,
    sources: list[Source],
    tokenizer,
    source: dict[str, Any],
    workers: int,
) -> int:
    """``opt data prepare`` with ``--shards``: see the module's notes."""
    recipe = shard_recipe(sources, tokenizer, args.text_key, args.shards)
    if args.shard_index is not None:
        meta = prepare_shard(sources, tokenizer, args.out, args.shard_index, recipe,
                             show_progress=not args.no_progress,
                             word_cache=not args.no_word_cache, workers=workers,
                             bad_limit=args.max_bad_records)  # fmt: skip
        name = shard_prefix(args.out, args.shard_index, args.shards)
        if meta is None:
            print(f"shard {args.shard_index} of {args.shards} is already prepared: {name}")
        else:
            print(f"prepared shard {args.shard_index} of {args.shards}: {meta['n_tokens']:,} "
                  f"tokens in {meta['n_docs']:,} documents: {name}.{{bin,idx,json}}")  # fmt: skip
            skipped = meta["shard"]["bad_records"]
            if skipped["count"]:
                print(f"skipped {skipped['count']:,} bad record(s) (see the warnings above)")
        return 0
    if args.launch == "local":
        _run_local(args, missing_shards(args.out, recipe))
    elif args.launch == "slurm":
        return _submit_slurm(args, missing_shards(args.out, recipe))
    return _merge(args, recipe, tokenizer, source)


def _merge(args: argparse.Namespace, recipe: dict, tokenizer, source: dict) -> int:
    missing = missing_shards(args.out, recipe)
    rerun = ""
    if missing:
        one = shlex.join(shard_command(args, "--shard-index", "I"))
        launcher = args.launched_by or "local"
        everything = shlex.join(shard_command(args, "--launch", launcher))
        rerun = f"prepare each with `{one}` or all and merge with `{everything}`"
    bad = BadRecords(args.max_bad_records)
    meta = merge_shards(args.out, recipe, tokenizer, source=source,
                        valid_fraction=args.valid_fraction, split_seed=args.split_seed,
                        rerun=rerun, bad=bad)  # fmt: skip
    paths = DatasetPaths.of(args.out)
    print(f"merged {args.shards} shards: {meta['n_tokens']:,} tokens in {meta['n_docs']:,} "
          f"documents: {paths.bin}, {paths.idx}, {paths.meta}")  # fmt: skip
    if "split" in meta:
        split, held = meta["split"], DatasetPaths.of(valid_prefix(args.out))
        print(f"held out {split['valid_tokens']:,} tokens in {split['valid_docs']:,} "
              f"documents: {held.bin}, {held.idx}, {held.meta}")  # fmt: skip
    if bad.count:
        print(bad.summary())
    print(f"the shards in {shards_dir(args.out)} may be deleted")
    return 0


# ----- local processes ---------------------------------------------------------------------
def _run_local(args: argparse.Namespace, missing: list[int]) -> None:
    """Prepare the ``missing`` shards in as many processes at once; each logs to a file."""
    if not missing:
        print(f"all {args.shards} shards are prepared already")
        return
    logs = shards_dir(args.out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    workers = args.workers or shard_workers(len(missing))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    running = []
    for index in missing:
        argv = shard_command(args, "--shard-index", str(index), "--workers", str(workers),
                             "--no-progress")  # fmt: skip
        log = logs / f"{shard_prefix(args.out, index, args.shards).name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", *argv], stdout=out,
                                    stderr=subprocess.STDOUT, env=env)  # fmt: skip
        running.append((index, proc, log))
    print(f"preparing shards {', '.join(map(str, missing))} of {args.shards} in "
          f"{len(missing)} processes (pids {', '.join(str(p.pid) for _, p, _ in running)}); "
          f"logs in {logs}", flush=True)  # fmt: skip
    start = time.monotonic()
    failed = []
    for index, proc, log in running:
        if proc.wait() != 0:
            failed.append(index)
            tail = log.read_text(errors="replace").strip().splitlines()[-1:]
            print(f"shard {index} failed (exit status {proc.returncode}): "
                  f"{tail[0] if tail else 'no output'}; log {log}", file=sys.stderr)  # fmt: skip
    done = len(running) - len(failed)
    print(f"{done} shard(s) prepared in {time.monotonic() - start:.1f} s", flush=True)


# ----- Slurm -------------------------------------------------------------------------------
@dataclass
class ShardTask:
    """What submitit runs in each array task (and in the merge job): one ``opt`` command, in
    a child process (``python -m opt``: this driver does not import the CLI above it).

    The child ignores SIGTERM and SIGUSR2 (an ignored disposition survives exec), so that
    Slurm's signals are handled here, by submitit: a preemption's SIGTERM must not end the
    task as failed before Slurm requeues it (the grace time ends in SIGKILL and the requeue),
    and the USR2 of a time limit or a preemption makes submitit requeue the task. A
    requeued task prepares its shard again from the start."""

    argv: list[str]

    def __call__(self, mode: tuple[str, ...] = ()) -> int:
        ignored = (signal.SIGTERM, signal.SIGUSR2)
        handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in ignored}
        try:
            child = subprocess.Popen([sys.executable, "-m", "opt", *self.argv, *mode])
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        try:
            code = child.wait()
        finally:
            if child.poll() is None:  # submitit's handler is requeueing this task
                child.kill()
        if code:
            sys.exit(code)  # a failed task in Slurm's view
        return code

    def checkpoint(self, *args: Any, **kwargs: Any):
        """On a time limit too: requeue, to redo the shard from its start."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def _executor(args: argparse.Namespace, folder: Path, name: str):
    import submitit

    executor = submitit.SlurmExecutor(folder=folder / "%j")
    optional = {"partition": args.partition, "cpus_per_task": args.cpus_per_task,
                "mem": args.mem}  # fmt: skip
    extra: dict[str, Any] = {"requeue": True, "chdir": os.getcwd()}
    for name_, value in (("account", args.account), ("qos", args.qos)):
        if value:
            extra[name_] = value
    for option in args.sbatch:
        key, _, value = option.removeprefix("--").partition("=")
        extra[key] = value if value else True
    executor.update_parameters(
        job_name=name,
        wckey=None,  # submitit's default "submitit" is refused where WCKeys are tracked
        time=args.time,
        nodes=1,
        ntasks_per_node=1,
        stderr_to_stdout=True,
        additional_parameters=extra,
        **{k: v for k, v in optional.items() if v},
    )
    return executor


def _submit_slurm(args: argparse.Namespace, missing: list[int]) -> int:
    folder = (shards_dir(args.out) / "slurm").absolute()
    folder.mkdir(parents=True, exist_ok=True)
    name = f"prepare-{Path(args.out).name}"
    # The module, not the console script: the job runs `python -m submitit...` anyway.
    base = shard_command(args)[1:]
    dependency = {}
    if missing:
        array = _executor(args, folder, name)
        # submitit submits a single task as a plain job, more as one array.
        jobs = array.map_array(ShardTask([*base, "--no-progress"]),
                               [("--shard-index", str(i)) for i in missing])  # fmt: skip
        array_id = jobs[0].job_id.split("_")[0]
        dependency = {"dependency": f"afterany:{array_id}"}
        ids = ", ".join(f"{j.job_id} (shard {i})" for j, i in zip(jobs, missing, strict=True))
        print(f"submitted job array {array_id} for {len(missing)} of {args.shards} shards: "
              f"{ids}; logs {folder}/<job id>/<job id>_0_log.out")  # fmt: skip
    else:
        print(f"all {args.shards} shards are prepared already")
    merge = _executor(args, folder, f"{name}-merge")
    merge.update_parameters(
        additional_parameters={**merge.parameters["additional_parameters"], **dependency}
    )
    merge_argv = shard_command(args, "--merge", "--launched-by", "slurm")[1:]
    job = merge.submit(ShardTask(merge_argv))
    print(f"submitted merge job {job.job_id} (after the array, whatever its outcome); "
          f"log {folder}/{job.job_id}/{job.job_id}_0_log.out")  # fmt: skip
    print("if a shard fails, run this command again: it submits only the missing shards")
    return 0
