"""What a process inside a Slurm allocation learns from its environment.

Pure functions over Slurm's variables, so they are tested without a cluster: host lists
(``node[001-003,017],gpu7``), the rendezvous address (the allocation's first node) and the
torch.distributed variables of one srun task (one task per GPU).
"""

from __future__ import annotations

import os
import re

from opt.errors import OptError

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, current = [], 0, []
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth < 0 or depth > 1:
            raise OptError(f"bad Slurm host list {text!r}")
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth:
        raise OptError(f"bad Slurm host list {text!r}")
    parts.append("".join(current))
    return [p for p in parts if p]


def _expand_one(pattern: str, whole: str) -> list[str]:
    """``rack[1-2]-n[01-02]`` → rack1-n01, rack1-n02, rack2-n01, rack2-n02."""
    match = re.search(r"\[([^\]]*)\]", pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    names = []
    for item in match.group(1).split(","):
        bounds = _RANGE.match(item)
        if bounds is None:
            raise OptError(f"bad Slurm host list {whole!r}")
        low, high = bounds.group(1), bounds.group(2) or bounds.group(1)
        width = len(low)  # zero padding, e.g. 001
        for number in range(int(low), int(high) + 1):
            names += _expand_one(f"{head}{number:0{width}d}{tail}", whole)
    return names


def expand_hostlist(text: str) -> list[str]:
    """Slurm's compressed host list as a list of host names, in order."""
    return [name for part in _split_top_level(text.strip()) for name in _expand_one(part, text)]


def master_port(job_id: str) -> int:
    """A rendezvous port per job, so two jobs sharing a node do not collide."""
    return 20000 + int(re.sub(r"\D", "", job_id) or 0) % 20000


def adopt_slurm_environment(env: dict | None = None) -> bool:
    """Inside an srun task, set torch.distributed's RANK, WORLD_SIZE, LOCAL_RANK and the
    rendezvous (first node of the allocation, a per-job port) from Slurm's variables.
    Variables a launcher already set win. Returns whether this is such a task."""
    env = os.environ if env is None else env
    in_task = "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and "SLURM_NTASKS" in env
    if "RANK" in env or not in_task:
        return False
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
    if "MASTER_ADDR" not in env:
        env["MASTER_ADDR"] = expand_hostlist(nodes)[0] if nodes else "127.0.0.1"
    env.setdefault("MASTER_PORT", str(master_port(env.get("SLURM_JOB_ID", "0"))))
    return True
