"""Shared fixtures: a small token dataset, a factory for tiny, fast training configs, and the
real Slurm cluster. Plain helpers (no fixtures) live in helpers.py."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
from helpers import NOT_TESTED, REPO, TINY_OVERRIDES

os.environ.setdefault("HF_HUB_OFFLINE", "1")


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


# ----- the real one-node Slurm cluster (tests marked `slurm`) --------------------------------
@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running Slurm of three nodes: one that `.ci/run` started (found through
    $SLURM_CONF), or one started here from Debian's slurm-wlm and munge (installed with apt
    when missing) and stopped by PID at the end of the session. Where it cannot be had (not
    root, no apt, a daemon that will not start), every Slurm test fails with that one reason:
    deselect them with -m "not slurm"."""
    from slurm_cluster import SlurmCluster, ensure_slurm_installed, running_cluster_from_env

    cluster = running_cluster_from_env()
    if cluster is not None:
        yield cluster
        return
    reason = ensure_slurm_installed()
    if reason is not None:
        pytest.fail(f"cannot run the Slurm tests: {reason}", pytrace=False)
    try:
        cluster = SlurmCluster.start(tmp_path_factory.mktemp("slurm"))
    except RuntimeError as err:
        pytest.fail(f"cannot run the Slurm tests: {err}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()


def pytest_collection_modifyitems(items):
    """Every test on the real Slurm is also slow: `-m "not slow"` leaves them out. Every
    `gpu` test is skipped where no CUDA device is present (CI, this machine), however it
    was selected: they run only where a GPU is (`bash bench/gpu_check.sh`)."""
    for item in items:
        if item.get_closest_marker("slurm") is not None:
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("gpu") is not None and no_gpu_reason():
            item.add_marker(pytest.mark.skip(reason=f"{NO_GPU}: {no_gpu_reason()}"))


NO_GPU = "GPU test, no GPU here"


@functools.cache
def no_gpu_reason() -> str:
    """Why the `gpu` tests cannot run here, or "" where a CUDA device is present."""
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"
    return ""


def pytest_terminal_summary(terminalreporter):
    for group, reason in NOT_TESTED.items():
        terminalreporter.write_sep("!", f"{group.upper()} WERE SKIPPED", red=True, bold=True)
        terminalreporter.write_line(f"reason: {reason}", red=True)
    # One line for the GPU tests skipped for want of a GPU, so a green run says so.
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if NO_GPU in str(r.longrepr)]
    if skipped:
        terminalreporter.write_sep(
            "!", f"{len(skipped)} GPU TESTS SKIPPED: no GPU present ({no_gpu_reason()})",
            yellow=True,
        )  # fmt: skip
