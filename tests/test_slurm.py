"""`opt launch slurm` on a real one-node Slurm (slurmctld + slurmd + munged, see
slurm_cluster.py): a warning signal sent with scancel, a real time limit whose warning Slurm
sends itself, a real preemption by a job of a higher-tier partition, a killed rank, a truncated checkpoint, a node that keeps failing and a requeue
limit, each read back from the logbook.

The tiny model trains with 2 tasks of 1 CPU; OPT_STEP_DELAY_S slows each step so that the
test can act in the middle of training. Losses are compared with the same layout run once
without Slurm (`opt launch local`), exactly.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    REPO,
    config_for,
    finish,
    launch_local,
    metrics_losses,
    rank_pid,
    tensorboard_losses,
)

from opt.run.logbook import read_events
from opt.run.logbook.events import Event
from opt.run.status import read_status

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(420)]

SLURM_FLAGS = [
    "--slurm.gpus_per_node", "0", "--slurm.tasks_per_node", "2", "--slurm.cpus_per_task", "1",
    "--slurm.time_minutes", "20", "--slurm.signal_delay_s", "60",
]  # fmt: skip


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory, pydoc_dataset) -> dict[int, float]:
    root = tmp_path_factory.mktemp("slurm-reference")
    finish(launch_local(config_for(root, pydoc_dataset, "reference", **{"train.max_steps": 14})))
    return metrics_losses(root / "runs" / "reference")


class Job:
    """One `opt launch slurm` submission and the files it writes."""

    def __init__(self, cluster, root: Path, dataset: Path, run: str, *flags: str, **env):
        self.cluster, self.root, self.run = cluster, root, run
        self.config = config_for(root, dataset, run, **{"train.max_steps": 14})
        self.env = {**cluster.env, "PYTHONPATH": str(REPO), "OPT_STEP_DELAY_S": "0.5", **env}
        result = self.cli("launch", "slurm", str(self.config), *SLURM_FLAGS, *flags)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        self.id = re.search(r"submitted job (\d+)", result.stdout).group(1)

    @property
    def run_dir(self) -> Path:
        return self.root / "runs" / self.run

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "opt", *args], cwd=REPO, env=self.env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    def events(self) -> list[Event]:
        path = self.root / "logbook" / self.run / "events.jsonl"
        return read_events(path) if path.is_file() else []

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events()]

    def slurm(self, *command: str) -> str:
        return subprocess.run(command, env=self.cluster.env, capture_output=True, text=True,
                              timeout=30).stdout.strip()  # fmt: skip

    def state(self) -> str:
        return self.slurm("squeue", "-h", "-t", "all", "-j", self.id, "-o", "%T %R")

    def wait(self, what: str, condition, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                self.slurm("scancel", self.id)
                raise AssertionError(f"timed out waiting for {what}; job {self.id}: "
                                     f"{self.state()}; events {self.kinds()}\n{self.log()}")  # fmt: skip
            time.sleep(0.2)

    def wait_for_step(self, step: int) -> None:
        self.wait(f"step {step}", lambda: (read_status(self.run_dir).get("step") or 0) >= step)

    def wait_until_finished(self) -> None:
        self.wait("the run to finish", lambda: "allocation_end" in self.kinds()
                  or "gave_up" in self.kinds())  # fmt: skip

    def log(self) -> str:
        logs = sorted((self.run_dir / "slurm").glob("*/*_log.out"))
        return "".join(p.read_text()[-3000:] for p in logs)


@pytest.mark.timeout(420)
def test_a_preemption_signal_requeues_and_the_resumed_run_matches_an_uninterrupted_one(
    slurm_cluster, tmp_path, pydoc_dataset, reference_losses
):
    job = Job(slurm_cluster, tmp_path, pydoc_dataset, "preempted")
    job.wait_for_step(3)
    status = job.cli("status", str(job.run_dir))
    assert f"slurm job {job.id}: RUNNING" in status.stdout, status.stdout + status.stderr
    assert "training: running at step" in status.stdout
    # What Slurm's --signal does before a time limit or preemption, to every task.
    job.slurm("scancel", "--signal=USR2", job.id)
    job.wait_until_finished()

    events = job.events()
    kinds = [e.kind for e in events]
    assert kinds.count("allocation_start") == 2, (kinds, job.log())
    stop = next(e for e in events if e.kind == "run_stop")
    assert "stopped on SIGUSR2" in stop.reason
    requeue = next(e for e in events if e.kind == "requeue")
    assert requeue.cause == "preemption" and requeue.job_id == job.id
    assert requeue.checkpoint.endswith(f"step_{stop.step:08d}")
    resumed = [e for e in events if e.kind == "run_start"][-1]
    assert resumed.step == stop.step and resumed.lost_steps == 0
    restart = [e for e in events if e.kind == "allocation_start"][-1]
    assert restart.restart == 1 and restart.job_id == job.id  # requeued, same job
    assert events[-1].kind == "allocation_end" and events[-1].result == "finished"

    assert sorted(tensorboard_losses(job.run_dir)) == list(range(1, 15)), "none lost or repeated"
    # Bitwise (CPU, fp32, the same layout): metrics.jsonl holds each loss at full precision.
    assert metrics_losses(job.run_dir) == reference_losses

    summary = job.cli("logbook", "summary", job.run, "--dir", str(tmp_path / "logbook"))
    assert "restarts: 1 (preemption 1)" in summary.stdout, summary.stdout
    assert "lost to restarts: 0 steps, 0 tokens" in summary.stdout
    status = job.cli("status", str(job.run_dir))
    assert "training: finished at step 14 of 14" in status.stdout, status.stdout
    assert "restarts: 1 (preemption 1)" in status.stdout


@pytest.mark.timeout(420)
def test_a_real_time_limit_warns_the_ranks_which_save_and_the_job_resumes_as_a_timeout(
    slurm_cluster, tmp_path, pydoc_dataset, reference_losses
):
    """A 3-minute time limit with --signal=USR2@90: Slurm itself sends the warning (up to a
    minute early, by its timer's resolution), every rank stops at one agreed step and saves,
    and the driver reads Slurm's end time for the job to call it a timeout, then requeues."""
    job = Job(slurm_cluster, tmp_path, pydoc_dataset, "timed", "--slurm.time_minutes", "3",
              "--slurm.signal_delay_s", "90", "--train.max_steps", "2000")  # fmt: skip
    job.wait("Slurm's warning and the requeue", lambda: "requeue" in job.kinds(), timeout=200)
    job.wait("the resume", lambda: [e.kind for e in job.events()].count("run_start") == 2)
    job.slurm("scancel", job.id)
    events = job.events()
    stop = next(e for e in events if e.kind == "run_stop")
    assert "stopped on SIGUSR2" in stop.reason, stop
    requeue = next(e for e in events if e.kind == "requeue")
    assert requeue.cause == "timeout", requeue
    assert requeue.detail.startswith("Slurm's EndTime="), requeue.detail
    away = int(re.search(r": (-?\d+) s away", requeue.detail).group(1))
    assert away <= 90 + 90  # the limit's warning, however early Slurm sent it
    assert requeue.checkpoint.endswith(f"step_{stop.step:08d}")
    resumed = [e for e in events if e.kind == "run_start"][-1]
    assert resumed.step == stop.step and resumed.lost_steps == 0
    # The steps before the stop are the uninterrupted run's, bit for bit.
    losses = metrics_losses(job.run_dir)
    common = [s for s in reference_losses if s <= stop.step]
    assert common and {s: losses[s] for s in common} == {s: reference_losses[s] for s in common}


@pytest.mark.timeout(420)
def test_a_higher_priority_job_preempts_ours_which_saves_and_resumes_bitwise(
    slurm_cluster, tmp_path, pydoc_dataset, reference_losses
):
    """Real preemption (PreemptType=preempt/partition_prio, PreemptMode=REQUEUE): a job in
    the higher-tier partition needs a CPU ours holds; Slurm sends ours its --signal, the
    ranks save at one step, the job is requeued and resumes once the node is free, with no
    step lost or repeated and the uninterrupted run's losses, bit for bit."""
    job = Job(slurm_cluster, tmp_path, pydoc_dataset, "preemptee")
    job.wait_for_step(3)
    urgent = job.slurm("sbatch", "--parsable", "-p", "urgent", "-n", "1", "-t", "2",
                       "-o", "/dev/null", "--wrap", "sleep 10")  # fmt: skip
    assert urgent.isdigit(), urgent
    job.wait_until_finished()
    events = job.events()
    requeue = next(e for e in events if e.kind == "requeue")
    assert requeue.cause == "preemption", requeue
    # Judged on what Slurm reports (unless Slurm requeued the job before the driver could).
    assert requeue.requeued_by == "slurm" or requeue.detail.startswith("Slurm set PreemptTime=")
    stop = next(e for e in events if e.kind == "run_stop")
    assert stop.reason.startswith("stopped on SIG"), stop
    resumed = [e for e in events if e.kind == "run_start"][-1]
    assert resumed.step == stop.step and resumed.lost_steps == 0
    assert events[-1].kind == "allocation_end" and events[-1].result == "finished"
    assert metrics_losses(job.run_dir) == reference_losses


@pytest.mark.timeout(420)
def test_a_killed_rank_requeues_and_resumes_from_the_last_complete_checkpoint(
    slurm_cluster, tmp_path, pydoc_dataset, reference_losses
):
    job = Job(slurm_cluster, tmp_path, pydoc_dataset, "killed",
              "--checkpoint.every", "3", "--checkpoint.keep_last", "0",
              "--slurm.exclude_after_failures", "0")  # fmt: skip
    job.wait_for_step(8)  # checkpoints at 3 and 6
    os.kill(rank_pid(job.run_dir / "slurm/config.toml", 1, "SLURM_PROCID"), signal.SIGKILL)
    job.wait("the requeue", lambda: "requeue" in job.kinds())
    # While the job waits to run again, the newest checkpoint loses its tail, as an
    # interrupted copy would leave it: the resume must notice and take the one before.
    ckpts = sorted((tmp_path / "ckpt" / "killed").glob("step_*"))
    newest, previous = ckpts[-1], ckpts[-2]
    shard = max(newest.glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:100])
    job.wait_until_finished()

    events = job.events()
    requeue = next(e for e in events if e.kind == "requeue")
    assert requeue.cause == "process_failure", requeue
    assert requeue.hosts == [slurm_cluster.node_name] and requeue.ranks == "1"
    assert requeue.detail == "Killed"
    skipped = next(e for e in events if e.kind == "checkpoint_skipped")
    assert skipped.checkpoint == str(newest)
    resumed = [e for e in events if e.kind == "run_start"][-1]
    assert resumed.checkpoint == str(previous)
    lost = resumed.previous_step - int(previous.name.split("_")[1])
    assert resumed.lost_steps == lost >= 2 and resumed.lost_s > 0
    assert events[-1].kind == "allocation_end" and events[-1].result == "finished"

    # The steps after the resume repeat the reference bit for bit: metrics.jsonl keeps, for
    # a step trained twice, the value of its second time (full precision, unlike TensorBoard).
    losses = metrics_losses(job.run_dir)
    assert sorted(losses) == list(range(1, 15))
    assert losses == reference_losses
    summary = job.cli("logbook", "summary", job.run, "--dir", str(tmp_path / "logbook"))
    assert "restarts: 1 (process failure 1)" in summary.stdout, summary.stdout
    assert f"lost to restarts: {lost} steps, {lost * 256:,} tokens" in summary.stdout


@pytest.mark.timeout(300)
def test_a_node_that_fails_again_is_excluded_from_the_next_allocation(
    slurm_cluster, tmp_path, pydoc_dataset
):
    job = Job(slurm_cluster, tmp_path, pydoc_dataset, "flaky", "--slurm.exclude_after_failures",
              "1", OPT_INJECT_FAULT="0:3:die")  # fmt: skip
    job.wait("the exclusion", lambda: "node_excluded" in job.kinds())
    # The only node is excluded, so the requeued job can never start: Slurm says why.
    job.wait("Slurm to hold the job", lambda: "BadConstraints" in job.state(), timeout=60)
    shown = job.slurm("scontrol", "-o", "show", "job", job.id)
    assert f"ExcNodeList={slurm_cluster.node_name}" in shown
    excluded = next(e for e in job.events() if e.kind == "node_excluded")
    assert excluded.hosts == [slurm_cluster.node_name]
    assert excluded.failures == {slurm_cluster.node_name: 1}
    job.slurm("scancel", job.id)


@pytest.mark.timeout(300)
def test_failures_past_the_limit_end_the_job_and_say_so(slurm_cluster, tmp_path, pydoc_dataset):
    job = Job(slurm_cluster, tmp_path, pydoc_dataset, "doomed", "--slurm.max_failure_requeues",
              "0", OPT_INJECT_FAULT="1:2:die")  # fmt: skip
    job.wait_until_finished()
    events = job.events()
    gave_up = events[-1]
    assert gave_up.kind == "gave_up" and gave_up.cause == "process_failure", events
    assert gave_up.limit == 0 and gave_up.hosts == [slurm_cluster.node_name]
    assert "requeue" not in [e.kind for e in events]
    job.wait("Slurm to end the job", lambda: job.state().startswith("FAILED"), timeout=60)


@pytest.mark.timeout(300)
def test_a_start_that_can_never_work_ends_the_job_instead_of_requeueing(
    slurm_cluster, tmp_path, pydoc_dataset
):
    missing = tmp_path / "purged-from-scratch" / "step_00001000"
    job = Job(slurm_cluster, tmp_path, pydoc_dataset, "refused",
              "--checkpoint.init_from", str(missing))  # fmt: skip
    job.wait_until_finished()
    events = job.events()
    gave_up = events[-1]
    assert gave_up.kind == "gave_up" and gave_up.cause == "refused", events
    assert f"checkpoint not found: {missing}" in gave_up.detail
    assert "requeue" not in [e.kind for e in events]
    job.wait("Slurm to end the job", lambda: job.state().startswith("FAILED"), timeout=60)
