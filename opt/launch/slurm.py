"""`opt launch slurm CONFIG [overrides]`: submit a run to Slurm through submitit.

What is submitted is one batch job per run. Each allocation of it runs the allocation
driver (``opt.launch.slurm_driver``) in the batch step; the driver starts one training task
per GPU with srun and, when the tasks end, decides: done, requeue (time limit, preemption,
a failed process or node) or give up. The job keeps its id and run directory across
requeues, and every decision goes into the run's public logbook.

The job reads a snapshot of the resolved config written at submission
(``<run dir>/slurm/config.toml``), so editing the TOML afterwards cannot change a job that
is already queued.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from opt.config import JobConfig, load_config, to_toml
from opt.errors import OptError
from opt.fsutil import atomic_write

# `opt launch slurm --nodes 2` is `--slurm.nodes 2`, and so on.
SHORT_FLAGS = {
    "--nodes": "--slurm.nodes",
    "--gpus-per-node": "--slurm.gpus_per_node",
    "--tasks-per-node": "--slurm.tasks_per_node",
    "--partition": "--slurm.partition",
    "--account": "--slurm.account",
    "--qos": "--slurm.qos",
    "--time-minutes": "--slurm.time_minutes",
    "--exclude": "--slurm.exclude",
    "--nodelist": "--slurm.nodelist",
}
JOB_CONFIG = "config.toml"  # in <run dir>/slurm/


def slurm_folder(cfg: JobConfig) -> Path:
    """submitit's job folder: the submission script, pickles and per-job logs."""
    return (cfg.run_dir / "slurm").absolute()


def tasks_per_node(cfg: JobConfig) -> int:
    if cfg.slurm.tasks_per_node is not None:
        return cfg.slurm.tasks_per_node
    return cfg.slurm.gpus_per_node


def world_size(cfg: JobConfig) -> int:
    return cfg.slurm.nodes * tasks_per_node(cfg)


def sbatch_parameters(cfg: JobConfig) -> dict:
    """submitit's SlurmExecutor parameters for this run."""
    slurm = cfg.slurm
    optional = {
        "partition": slurm.partition,
        "account": slurm.account,
        "qos": slurm.qos,
        "exclude": slurm.exclude,
        "nodelist": slurm.nodelist,
        "mem": slurm.mem,
        "cpus_per_task": slurm.cpus_per_task,
        "gpus_per_node": slurm.gpus_per_node,
    }
    extra = {
        "requeue": True,  # let `scontrol requeue` (and Slurm after a node failure) requeue it
        # Without "B:" the warning reaches every task of the job step (every rank), not the
        # batch shell: the ranks save, the driver then requeues.
        "signal": f"{slurm.signal}@{slurm.signal_delay_s}",
        "chdir": os.getcwd(),  # relative paths in the config mean the same on every node
    }
    for option in slurm.sbatch:
        key, _, value = option.removeprefix("--").partition("=")
        extra[key] = value if value else True
    return {
        "job_name": cfg.run.name,
        "wckey": None,  # submitit sets "submitit"; clusters that track WCKeys may refuse it
        "nodes": slurm.nodes,
        "ntasks_per_node": tasks_per_node(cfg),
        "time": slurm.time_minutes,
        "signal_delay_s": slurm.signal_delay_s,
        "setup": list(slurm.setup),
        "use_srun": False,  # the driver runs in the batch step and starts srun itself
        "stderr_to_stdout": True,
        **{k: v for k, v in optional.items() if v},
        "additional_parameters": extra,
    }


def srun_command(
    cfg: JobConfig, config_file: Path, python: str = sys.executable, nodes: int | None = None
) -> list[str]:
    """The job step each allocation runs: one training task per GPU on each of ``nodes``
    (the allocation's own count, which an administrator may have changed; the layout's
    dp_shard=-1 follows it, and the checkpoint reshards)."""
    command = [
        "srun",
        "--kill-on-bad-exit=1",  # one dead rank ends the step instead of hanging the rest
        "--label",  # every output line prefixed with its rank
        "--unbuffered",
        f"--nodes={nodes or cfg.slurm.nodes}",
        f"--ntasks-per-node={tasks_per_node(cfg)}",
    ]
    if cfg.slurm.cpus_per_task is not None:
        command.append(f"--cpus-per-task={cfg.slurm.cpus_per_task}")
    return [*command, python, "-u", "-m", "opt", "train", str(config_file)]


def _executor(cfg: JobConfig):
    import submitit

    executor = submitit.SlurmExecutor(folder=slurm_folder(cfg) / "%j")
    executor.update_parameters(**sbatch_parameters(cfg))
    return executor


def submission_script(cfg: JobConfig) -> str:
    """The sbatch script submitit will write, verbatim (for the dry run)."""
    executor = _executor(cfg)
    # Private to submitit, but it is exactly the text `submit` would write.
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


def check_submission(config: str, overrides: list[str]) -> JobConfig:
    from opt.cli import SHORTHANDS
    from opt.job import check_job

    overrides = [SHORT_FLAGS.get(a, SHORTHANDS.get(a, a)) for a in overrides]
    cfg = load_config(config, overrides)
    if cfg.checkpoint.resume != "auto":
        raise OptError(
            "opt launch slurm resumes with checkpoint.resume=auto after every requeue; start "
            "from other weights with checkpoint.init_from instead"
        )
    check_job(cfg, world_size(cfg))
    return cfg


def describe(cfg: JobConfig) -> str:
    from opt.dry_run import dry_run_report, format_report

    slurm = cfg.slurm
    gpus = f"{slurm.gpus_per_node} GPU(s)" if slurm.gpus_per_node else "no GPU"
    lines = [
        f"run {cfg.run.name!r}: {slurm.nodes} node(s) x {tasks_per_node(cfg)} task(s) "
        f"({gpus} per node) = {world_size(cfg)} ranks",
        f"requeue: on {slurm.signal} ({slurm.signal_delay_s} s before the limit) every rank "
        f"saves; timeouts up to {slurm.max_timeout_requeues}, failures up to "
        f"{slurm.max_failure_requeues}, preemptions unlimited; a node is excluded after "
        f"{slurm.exclude_after_failures or 'no'} failure(s)",
        f"run directory {cfg.run_dir}, checkpoints {cfg.checkpoint_dir}, logbook {cfg.logbook_dir}",
        "",
        format_report(dry_run_report(cfg, world_size(cfg)), shapes=False),
        "",
        f"sbatch script ({slurm_folder(cfg)}/<job id>/<job id>_submission.sh):",
        submission_script(cfg).rstrip(),
        "",
        "each allocation then runs (from the driver in the batch step):",
        "  " + shlex.join(srun_command(cfg, slurm_folder(cfg) / JOB_CONFIG)),
    ]
    return "\n".join(lines)


def launch_slurm(config: str, overrides: list[str], dry_run: bool) -> int:
    from opt.launch.slurm_driver import AllocationDriver
    from opt.supervisor.logbook import Logbook

    cfg = check_submission(config, overrides)
    print(describe(cfg), flush=True)
    if dry_run:
        print("\ndry run: nothing submitted")
        return 0
    folder = slurm_folder(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    config_file = folder / JOB_CONFIG
    atomic_write(config_file, to_toml(cfg))
    job = _executor(cfg).submit(AllocationDriver(str(config_file)))
    Logbook(cfg.logbook.dir, cfg.run.name).append(
        "job_submitted",
        job_id=job.job_id,
        nodes=cfg.slurm.nodes,
        ranks=world_size(cfg),
        partition=cfg.slurm.partition,
        time_minutes=cfg.slurm.time_minutes,
    )
    print(f"\nsubmitted job {job.job_id}; follow it with `opt status {cfg.run_dir}`")
    return 0
