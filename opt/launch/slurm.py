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

import shlex

from opt.config import JobConfig, load_config, to_toml
from opt.dry_run import dry_run_report, format_report
from opt.errors import OptError
from opt.fsutil import atomic_write
from opt.job import check_job
from opt.launch.overrides import SHORTHANDS, SLURM_SHORT_FLAGS, expand
from opt.launch.slurm_driver import AllocationDriver
from opt.launch.slurm_job import (
    JOB_CONFIG,
    sbatch_parameters,
    slurm_folder,
    srun_command,
    tasks_per_node,
    world_size,
)
from opt.run.logbook import Logbook
from opt.run.logbook.events import JobSubmitted


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
    cfg = load_config(config, expand(overrides, SLURM_SHORT_FLAGS, SHORTHANDS))
    if cfg.checkpoint.resume != "auto":
        raise OptError(
            "opt launch slurm resumes with checkpoint.resume=auto after every requeue; start "
            "from other weights with checkpoint.init_from instead"
        )
    check_job(cfg, world_size(cfg))
    return cfg


def describe(cfg: JobConfig) -> str:
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
    submitted = JobSubmitted(
        job_id=job.job_id,
        nodes=cfg.slurm.nodes,
        ranks=world_size(cfg),
        partition=cfg.slurm.partition,
        time_minutes=cfg.slurm.time_minutes,
    )
    Logbook(cfg.logbook.dir, cfg.run.name).append(submitted)
    print(f"\nsubmitted job {job.job_id}; follow it with `opt status {cfg.run_dir}`")
    return 0
