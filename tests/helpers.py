"""Helpers the tests share (no fixtures: those are in conftest.py): the repository, the tiny
model's config values, and ways to run `opt` and torchrun in new processes."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]

# Whole groups of tests that could not run here, and why: conftest.py ends the session's
# report with a red banner for each, so a green run that tested nothing of them says so.
NOT_TESTED: dict[str, str] = {}


def skip_group(group: str, reason: str, module_level: bool = False) -> None:
    NOT_TESTED[group] = reason
    pytest.skip(f"{group.upper()} NOT TESTED: {reason}", allow_module_level=module_level)


def import_or_skip_group(module: str, group: str) -> ModuleType:
    """``module``, or a skip of the whole test module that the session report shows."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        skip_group(group, f"{module} is not importable ({err}); it is in the [dev] extra", True)


# A model small enough that a training step takes milliseconds on two cores.
TINY_OVERRIDES = {
    "model.name": "opt-tiny",
    "model.n_layers": 2,
    "model.d_model": 64,
    "model.vocab_size": 512,
    "data.seq_len": 32,
    "train.micro_batch_size": 4,
    "train.batch_tokens": 256,  # 2 micro-batches: gradient accumulation is always on
    "schedule.warmup_tokens": 512,
    "schedule.decay_tokens": 256 * 50,
    "optim.lr": 1e-3,
    "metrics.log_every": 1,
    "metrics.peak_tflops": 1.0,  # skip the matmul-peak measurement in tests
    "metrics.tensorboard": False,
    "validation.tokens": 1024,  # 4 global batches of the held-out split, at every checkpoint
}


def toml_value(value) -> str:
    """A value as a `--section.key` override spells it on the command line (TOML syntax)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def train_tiny_checkpoint(tmp_path: Path, dataset: Path, run: str, steps: int = 2) -> Path:
    """A checkpoint of a tiny demo-shaped run, trained through the CLI for ``steps`` steps."""
    values = {
        **TINY_OVERRIDES,
        "data.path": str(dataset),
        "run.dir": str(tmp_path / "runs"),
        "checkpoint.dir": str(tmp_path / "checkpoints"),
        "logbook.dir": str(tmp_path / "logbook"),
        "run.name": run,
        "train.max_steps": steps,
        "checkpoint.every": steps,
    }
    args = ["train", "configs/demo.toml"]
    for key, value in values.items():
        args += [f"--{key}", toml_value(value)]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    return tmp_path / "checkpoints" / run / f"step_{steps:08d}"


# transformers' OPTConfig fields of a small model for the parity tests, and its two variants.
SMALL_HF = {
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "ffn_dim": 256,
    "vocab_size": 500,
    "max_position_embeddings": 64,
}
HF_VARIANTS = {
    "pre_ln": {},
    # OPT-350M's shape: post-LN, no final LayerNorm, narrow word embeddings projected in/out.
    "350m_like": {"do_layer_norm_before": False, "word_embed_proj_dim": 32},
}


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run `python -m opt ...` (never Debian's LLVM `opt`) and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "opt", *args],
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def torchrun(nproc: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            *args,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def tensorboard_losses(run_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars("train/loss")}


def rank_pid(config_file: Path, rank: int, variable: str = "RANK") -> int | None:
    """The PID of training rank ``rank`` of the job started with ``config_file``; under
    Slurm the rank is in SLURM_PROCID (the task sets RANK itself, after it starts)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        is_trainer = b"train" in cmdline and str(config_file).encode() in cmdline
        if is_trainer and f"{variable}={rank}".encode() in environ:
            return int(proc.name)
    return None


def config_for(root: Path, dataset: Path, run: str, **extra) -> Path:
    values = {
        **TINY_OVERRIDES,
        "model.dropout": 0.1,  # the RNG streams must resume too
        "metrics.tensorboard": True,
        "checkpoint.every": 5,
        "train.max_steps": 12,
        "parallel.dp_shard": 2,
        "data.path": str(dataset),
        "run.name": run,
        "run.dir": str(root / "runs"),
        "checkpoint.dir": str(root / "ckpt"),
        "logbook.dir": str(root / "logbook"),
        **extra,
    }
    sections: dict[str, list[str]] = {}
    for key, value in values.items():
        section, name = key.split(".")
        sections.setdefault(section, []).append(f"{name} = {toml_value(value)}")
    path = root / f"{run}.toml"
    path.write_text("".join(f"[{s}]\n" + "\n".join(v) + "\n" for s, v in sections.items()))
    return path


def launch_local(config: Path, env: dict | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "opt", "launch", "local", "--nproc", "2", str(config)],
        cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 150) -> str:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output[-3000:]
    return output


def metrics_losses(run_dir: Path) -> dict[int, float]:
    """Each logged step's loss from ``metrics.jsonl`` (full precision); a step trained twice
    (before a crash and after the resume) keeps its last value. Validation lines are left
    out (``metrics_valid_losses``)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def metrics_valid_losses(run_dir: Path) -> list[tuple[int, float]]:
    """Every validation line of ``metrics.jsonl``: (step, validation loss), in order."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row["val_loss"]) for row in rows if "val_loss" in row]


# ----- a real straggler: one rank throttled by cpulimit -----------------------------------------
# cpulimit stops and resumes the process: at 5% here it runs it for 50-150 ms at a time and
# stops it for 0.6-0.9 s. A stop that falls inside a block forward is what the figure sees,
# and the blocks' forwards are about a third of a rank's CPU time: in 3 steps of this model
# (about 0.6 s of CPU) some 9 stops fall, and the window is slow unless none of them lands
# in a forward (measured over 20 windows: 16 slow at 5%, 13 at 10%, 11 and 12 at 15%, where
# fewer, shorter stops more often all miss). Two ranks make the median their mean, so slow
# means 3x the other rank.
THROTTLE = "5"
STRAGGLER_RUN = {
    "model.d_model": 256,
    "data.seq_len": 128,
    "train.batch_tokens": 2048,  # 4 sequences x 128 x 2 micro-batches x 2 ranks
    "train.max_steps": 60,  # 20 windows
    "checkpoint.every": 1000,  # the stop's own checkpoint is the only one mid-run
    "metrics.tensorboard": False,
    "resilience.straggler_every": 3,
    "resilience.straggler_patience": 2,
    "resilience.straggler_requeue_after": 3,
}


def ensure_cpulimit() -> str:
    """cpulimit's path, installed with apt (Debian's `cpulimit`) when missing; the test
    fails with one line when it cannot be."""
    if shutil.which("cpulimit") is None and shutil.which("apt-get") and os.geteuid() == 0:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        install = ["apt-get", "install", "-y", "-q", "cpulimit"]
        if subprocess.run(install, env=env, capture_output=True, timeout=300).returncode:
            # A fresh machine may have no package lists yet.
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=300)
            subprocess.run(install, env=env, capture_output=True, timeout=300)
    path = shutil.which("cpulimit")
    if path is None:
        pytest.fail(
            "cpulimit is missing and could not be installed (apt-get install cpulimit, as root)"
        )
    return path
