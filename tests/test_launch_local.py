"""`opt launch local`: failures surface with their rank and traceback, a hung rank makes
the others time out instead of hanging, and a bad layout is refused before any process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import REPO, run_cli

from opt.config import to_toml
from opt.errors import OptError
from opt.faults import parse_fault

pytestmark = pytest.mark.slow  # multi-process runs, seconds each


@pytest.fixture
def config_file(tiny_config, tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(to_toml(tiny_config(train__max_steps=3)))
    return path


def launch(*args: str, fault: str | None = None, timeout: float = 180):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("OPT_INJECT_FAULT", None)
    if fault:
        env["OPT_INJECT_FAULT"] = fault
    return subprocess.run(
        [sys.executable, "-m", "opt", "launch", "local", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.mark.timeout(200)
def test_two_ranks_train_and_only_rank_zero_reports(config_file):
    result = launch("--nproc", "2", str(config_file), "--parallel.dp_shard", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[default0]:done: step 3" in result.stdout
    assert "[default1]:done" not in result.stdout


@pytest.mark.timeout(200)
def test_an_exception_on_one_rank_is_reported_with_rank_and_traceback(config_file):
    result = launch("--nproc", "2", str(config_file), "--parallel.tp", "2", fault="1:2:raise")
    assert result.returncode != 0
    report = result.stderr
    assert "rank      : 1" in report
    assert "InjectedFault: injected fault on rank 1 before step 2" in report
    assert "Traceback" in report
    assert "error: training failed on rank(s)" in report


@pytest.mark.timeout(200)
def test_a_hung_rank_makes_the_others_time_out(config_file):
    result = launch(
        "--nproc", "2", str(config_file), "--parallel.dp_shard", "2",
        "--parallel.timeout_s", "5", fault="1:2:hang",
    )  # fmt: skip
    assert result.returncode != 0
    assert "Timed out" in result.stderr + result.stdout
    assert "rank      : 0" in result.stderr


@pytest.mark.timeout(200)
def test_a_killed_rank_ends_the_job(config_file):
    result = launch(
        "--nproc", "2", str(config_file), "--parallel.dp_shard", "2",
        "--parallel.timeout_s", "20", fault="0:2:die",
    )  # fmt: skip
    assert result.returncode != 0
    assert "SIGKILL" in result.stderr


def test_a_layout_that_does_not_fit_the_process_count_is_refused_before_launch(config_file):
    result = run_cli("launch", "local", "--nproc", "2", str(config_file), "--parallel.tp", "4")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: world size 2 is not divisible by dp_replicate*tp*pp = 4"
    ]
    assert "torchrun" not in result.stderr.lower() and "[default" not in result.stdout


def test_fault_specs_are_validated():
    assert parse_fault("1:5:hang") == (1, 5, "hang")
    with pytest.raises(OptError, match="RANK:STEP:ACTION"):
        parse_fault("1:hang")
    with pytest.raises(OptError, match="one of raise, hang, die"):
        parse_fault("1:2:explode")
