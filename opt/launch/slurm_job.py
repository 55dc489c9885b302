"""One `opt launch slurm` job's shape, from its config: the submitit folder, the sbatch
parameters, and the srun step that each allocation runs. Pure functions of the config,
shared by the submission (``slurm``) and the allocation driver (``slurm_driver``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from opt.config import JobConfig

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
