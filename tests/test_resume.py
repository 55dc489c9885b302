"""Resume the way users resume: a new process through `opt train` (or `opt launch local`),
after a clean stop or a kill -9 at any moment, a checkpoint save included. On CPU in fp32
the resumed run's losses equal an uninterrupted run's bit for bit (``==``).

Every run here has dropout on (so the RNG streams must come back), measures its matmul peak
at start (what the demo does; it once drew from the training RNG after a resume), saves
asynchronously every 3 steps, and logs every step's values at full precision to
``runs/<run>/metrics.jsonl``, which is what is compared. The held-out loss, evaluated at
every save and at every start, is compared too: a step evaluated before a stop and again
after the resume from it gives the same bits, and the same as the run that never stopped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, metrics_losses, metrics_valid_losses

from opt.config import to_toml

pytestmark = pytest.mark.slow

STEPS = 10
LAYOUTS = {
    "1proc": [],
    "dp2": ["--parallel.dp_shard", "2"],
    "tp2": ["--parallel.tp", "2"],
}


def all_lines(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row["loss"]) for row in rows if "loss" in row]


class Runs:
    """`opt train` of one config under one layout, in new processes."""

    def __init__(self, tiny_config, tmp_path: Path, layout: str):
        self.tmp, self.layout, self.make = tmp_path, layout, tiny_config

    def config(self, name: str) -> Path:
        cfg = self.make(
            run__name=name,
            model__dropout=0.1,
            metrics__peak_tflops=None,  # measured at every start, as in the demo
            checkpoint__every=3,
            checkpoint__keep_last=0,
            parallel__timeout_s=60.0,
        )
        path = self.tmp / f"{name}.toml"
        path.write_text(to_toml(cfg))
        return path

    def run(self, name: str, max_steps: int, fault: str | None = None):
        ranks = 1 if self.layout == "1proc" else 2
        launch = ["train"] if ranks == 1 else ["launch", "local", "--nproc", str(ranks)]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        if fault:
            env["OPT_INJECT_FAULT"] = fault
        command = [sys.executable, "-m", "opt", *launch, str(self.config(name)),
                   "--max-steps", str(max_steps), *LAYOUTS[self.layout]]  # fmt: skip
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=400,
                              env=env)  # fmt: skip

    def run_dir(self, name: str) -> Path:
        return self.tmp / "runs" / name


def assert_same_validation(run_dir: Path, expected: dict[int, float]) -> None:
    seen: dict[int, float] = {}
    for step, loss in metrics_valid_losses(run_dir):
        assert seen.setdefault(step, loss) == loss, step  # before a stop and after the resume
        assert expected.get(step, loss) == loss, step
    assert seen.keys() >= {0, STEPS}


def _resumed_from(result: subprocess.CompletedProcess) -> str:
    line = next(ln for ln in result.stdout.splitlines() if "resumed from" in ln)
    return line.split("resumed from ")[1].split()[0]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_stopped_or_killed_run_resumes_bitwise_in_a_new_process(tiny_config, tmp_path, layout):
    runs = Runs(tiny_config, tmp_path, layout)
    straight = runs.run("straight", STEPS)
    assert straight.returncode == 0, straight.stderr[-3000:]
    expected = metrics_losses(runs.run_dir("straight"))
    assert sorted(expected) == list(range(1, STEPS + 1))
    expected_valid = dict(metrics_valid_losses(runs.run_dir("straight")))
    assert sorted(expected_valid) == [0, 3, 6, 9, 10]  # the start, every save, the end

    # A clean stop at step 5, then `opt train` again with the full length.
    assert runs.run("clean", 5).returncode == 0
    resumed = runs.run("clean", STEPS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _resumed_from(resumed).endswith("step_00000005")
    assert metrics_losses(runs.run_dir("clean")) == expected
    assert_same_validation(runs.run_dir("clean"), expected_valid)
    assert 5 in dict(metrics_valid_losses(runs.run_dir("clean")))

    # kill -9 in the middle of the step-6 save: its shards are written, its manifest is not.
    killed = runs.run("mid-save", STEPS, fault="0:save@6:die")
    assert killed.returncode != 0
    checkpoints = tmp_path / "checkpoints" / "mid-save"
    assert (checkpoints / ".step_00000006.tmp").is_dir()  # the half-written one
    assert not (checkpoints / "step_00000006").exists()
    resumed = runs.run("mid-save", STEPS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _resumed_from(resumed).endswith("step_00000003")  # the half-written one unused
    assert metrics_losses(runs.run_dir("mid-save")) == expected
    assert_same_validation(runs.run_dir("mid-save"), expected_valid)
    # The steps the killed run trained before it died were the same ones, too.
    assert all(expected[step] == loss for step, loss in all_lines(runs.run_dir("mid-save")))

    if layout != "1proc":
        return
    # kill -9 between two steps, with a save of its own in flight or just committed.
    killed = runs.run("mid-run", STEPS, fault="0:8:die")
    assert killed.returncode == -signal.SIGKILL
    resumed = runs.run("mid-run", STEPS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert metrics_losses(runs.run_dir("mid-run")) == expected
    assert_same_validation(runs.run_dir("mid-run"), expected_valid)
