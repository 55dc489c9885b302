"""Shared fixtures: a small token dataset and a factory for tiny, fast training configs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]

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
}


@pytest.fixture(scope="session", autouse=True)
def repository_logbooks_untouched():
    """Tests write their logbooks under tmp: the committed public ones must not change."""

    def snapshot():
        return sorted(
            (str(p.relative_to(REPO)), p.stat().st_size)
            for p in (REPO / "logbook").rglob("*")
            if p.is_file()
        )

    before = snapshot()
    yield
    assert snapshot() == before, "a test wrote into the repository's logbook/"


@pytest.fixture(scope="session")
def pydoc_dataset(tmp_path_factory) -> Path:
    """The embedded corpus tokenized with a 512-token BPE; returns the token-file prefix."""
    from opt.data.prepare import ensure_builtin_dataset

    return ensure_builtin_dataset(tmp_path_factory.mktemp("pydoc"), vocab_size=512)


@pytest.fixture
def tiny_config(tmp_path, pydoc_dataset):
    """Build a JobConfig for a tiny run under tmp_path; keyword overrides win."""
    from opt.config import load_config

    def make(**overrides):
        values = {
            **TINY_OVERRIDES,
            "data.path": str(pydoc_dataset),
            "run.dir": str(tmp_path / "runs"),
            "checkpoint.dir": str(tmp_path / "checkpoints"),
            "logbook.dir": str(tmp_path / "logbook"),
            **{k.replace("__", "."): v for k, v in overrides.items()},
        }
        return load_config(None, values=values)

    return make


def _toml(value) -> str:
    """A value as a `--section.key` override spells it on the command line (TOML syntax)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


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


# ----- the real one-node Slurm cluster (tests marked `slurm`) --------------------------------
_SLURM_SKIPPED: list[str] = []


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running Slurm: one that `.ci/run` started (found through $SLURM_CONF), or one
    started here from Debian's slurm-wlm and munge (installed with apt when missing) and
    stopped by PID at the end of the session."""
    from slurm_cluster import SlurmCluster, ensure_slurm_installed, running_cluster_from_env

    cluster = running_cluster_from_env()
    if cluster is not None:
        yield cluster
        return
    if shutil.which("sbatch") is None and shutil.which("apt-get") is None:
        reason = "Slurm is not installed and there is no apt-get to install it"
        _SLURM_SKIPPED.append(reason)
        pytest.skip(f"SLURM TESTS SKIPPED, NOTHING ABOUT SLURM WAS TESTED: {reason}")
    reason = ensure_slurm_installed()
    if reason is not None:  # apt is there but failed: that is a failure, not a skip
        pytest.fail(f"could not install Slurm for the tests: {reason}")
    cluster = SlurmCluster.start(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster
    finally:
        cluster.stop()


def pytest_terminal_summary(terminalreporter):
    if _SLURM_SKIPPED:
        terminalreporter.write_sep("!", "THE SLURM TESTS WERE SKIPPED", red=True, bold=True)
        terminalreporter.write_line(f"reason: {_SLURM_SKIPPED[0]}", red=True)
