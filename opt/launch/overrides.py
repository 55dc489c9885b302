"""Short flags that stand for config overrides, shared by `opt train` and the launchers
that start it (which check the config before any process starts)."""

from __future__ import annotations

# Flags that `opt train` (and so every launcher) accepts as shorthands for full config keys.
SHORTHANDS = {"--resume": "--checkpoint.resume", "--max-steps": "--train.max_steps"}

# `opt launch slurm --nodes 2` is `--slurm.nodes 2`, and so on.
SLURM_SHORT_FLAGS = {
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


def expand(arguments: list[str], *tables: dict[str, str]) -> list[str]:
    """``arguments`` with each short flag replaced by its config key (``SHORTHANDS`` unless
    other tables are given; the first table that knows a flag wins)."""
    tables = tables or (SHORTHANDS,)
    return [next((t[a] for t in tables if a in t), a) for a in arguments]
