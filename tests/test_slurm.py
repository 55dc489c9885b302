"""`opt launch slurm` on a real Slurm of three nodes on this machine (slurmctld, a slurmd per
node in its own network and UTS namespace, munged; see slurm_cluster.py), against the events
a long run meets: a real time limit whose warning Slurm sends itself, a real preemption by a
job of a higher-tier partition, a node that really goes away (link down, every process on it
killed), a killed rank, a truncated checkpoint, a node that keeps failing and a requeue limit,
each read back from the logbook. One test sends the warning signal with scancel itself (the
mechanism, without the scheduler's timing).

The tiny model trains as one process, two ranks on one node, or one rank on each of two
nodes (torch.distributed's rendezvous at the first node's address, gloo between the nodes'
own addresses); OPT_STEP_DELAY_S slows each step so that the test can act in the middle of
training. Losses are compared with the same layout run once without Slurm (`opt launch
local`, or one `opt train` process), exactly: CPU fp32 is deterministic for a fixed layout.
"""

from __future__ import annotations

import contextlib
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
    STRAGGLER_RUN,
    THROTTLE,
    config_for,
    ensure_cpulimit,
    finish,
    launch_local,
    metrics_losses,
    rank_pid,
    tensorboard_losses,
)

from opt.checkpoint.manifest import temporary_path
from opt.run.logbook import read_events
from opt.run.logbook.events import Event
from opt.run.status import read_status

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(420)]

SLURM_FLAGS = [
    "--slurm.gpus_per_node", "0", "--slurm.cpus_per_task", "1",
    "--slurm.time_minutes", "20", "--slurm.signal_delay_s", "60",
]  # fmt: skip
ONE_NODE = ["--slurm.nodes", "1", "--slurm.tasks_per_node", "2"]  # 2 ranks on one node
TWO_NODES = ["--slurm.nodes", "2", "--slurm.tasks_per_node", "1"]  # a rank on each of two


ONE_PROCESS = ["--slurm.nodes", "1", "--slurm.tasks_per_node", "1", "--parallel.dp_shard", "1"]
LONG_RUN = 300  # steps of the one-process run that a real time limit interrupts


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory, pydoc_dataset) -> dict[int, float]:
    """Two ranks (data parallel), uninterrupted: what every two-rank job must reproduce."""
    root = tmp_path_factory.mktemp("slurm-reference")
    finish(launch_local(config_for(root, pydoc_dataset, "reference", **{"train.max_steps": 14})))
    return metrics_losses(root / "runs" / "reference")


@pytest.fixture(scope="module")
def one_process_reference(tmp_path_factory, pydoc_dataset) -> dict[int, float]:
    """One process, LONG_RUN steps, uninterrupted."""
    root = tmp_path_factory.mktemp("slurm-reference-1")
    config = config_for(root, pydoc_dataset, "reference", **{"train.max_steps": LONG_RUN,
                                                              "parallel.dp_shard": 1})  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "opt", "train", str(config)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return metrics_losses(root / "runs" / "reference")


class Job:
    """One `opt launch slurm` submission and the files it writes."""

    def __init__(self, cluster, root: Path, dataset: Path, run: str, *flags: str,
                 layout: list[str] = ONE_NODE, steps: int = 14, settings: dict | None = None,
                 **env):  # fmt: skip
        self.cluster, self.root, self.run = cluster, root, run
        self.config = config_for(
            root, dataset, run, **{"train.max_steps": steps, **(settings or {})}
        )
        self.env = {**cluster.env, "PYTHONPATH": str(REPO), "OPT_STEP_DELAY_S": "0.5", **env}
        result = self.cli("launch", "slurm", str(self.config), *SLURM_FLAGS, *layout, *flags)
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

    def wait_until_finished(self, timeout: float = 240) -> None:
        self.wait("the run to finish", lambda: "allocation_end" in self.kinds()
                  or "gave_up" in self.kinds(), timeout)  # fmt: skip

    def allocations(self) -> list[list[str]]:
        """The hosts of each allocation so far, in order."""
        return [e.hosts for e in self.events() if e.kind == "allocation_start"]

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


@pytest.mark.timeout(600)
def test_a_real_time_limit_warns_the_rank_which_saves_and_the_job_resumes_bitwise_as_a_timeout(
    slurm_cluster, tmp_path, pydoc_dataset, one_process_reference
):
    """One process under a 3-minute time limit with --signal=USR2@90: Slurm itself sends the
    warning (up to a minute early, by its timer's resolution), the rank saves, and the driver
    reads Slurm's end time for the job to call it a timeout and requeue. The run needs more
    than one allocation; in the end every loss equals the uninterrupted process's, bit for bit."""
    job = Job(slurm_cluster, tmp_path, pydoc_dataset, "timed", "--slurm.time_minutes", "3",
              "--slurm.signal_delay_s", "90", layout=ONE_PROCESS, steps=LONG_RUN)  # fmt: skip
    job.wait_until_finished(timeout=540)
    events = job.events()
    stop = next(e for e in events if e.kind == "run_stop")
    assert "stopped on SIGUSR2" in stop.reason, stop
    requeue = next(e for e in events if e.kind == "requeue")
    assert requeue.cause == "timeout", requeue
    assert requeue.detail.startswith("Slurm's EndTime="), requeue.detail
    away = int(re.search(r": (-?\d+) s away", requeue.detail).group(1))
    assert away <= 90 + 90  # the limit's warning, however early Slurm sent it
    assert requeue.checkpoint.endswith(f"step_{stop.step:08d}")
    resumed = [e for e in events if e.kind == "run_start"][1]
    assert resumed.step == stop.step and resumed.lost_steps == 0
    assert events[-1].kind == "allocation_end" and events[-1].result == "finished", job.kinds()
    assert metrics_losses(job.run_dir) == one_process_reference


@pytest.mark.timeout(420)
def test_a_higher_priority_job_preempts_ours_which_saves_and_resumes_bitwise(
    slurm_cluster, tmp_path, pydoc_dataset, reference_losses
):
    """Real preemption (PreemptType=preempt/partition_prio, PreemptMode=REQUEUE) of a job with
    a rank on each of two nodes: a job in the higher-tier partition needs every CPU of one of
    them; Slurm sends ours its --signal, both ranks save at one agreed step, the job is
    requeued and resumes when nodes are free, with no step lost or repeated and the
    uninterrupted run's losses, bit for bit."""
    job = Job(slurm_cluster, tmp_path, pydoc_dataset, "preemptee", layout=TWO_NODES)
    job.wait_for_step(3)
    first = job.allocations()[0]
    assert len(set(first)) == 2, first  # two nodes, one rank each
    urgent = job.slurm("sbatch", "--parsable", "-p", "urgent", "-N", "1", "-w", first[1], "-n", "2",
                       "-t", "2", "-o", "/dev/null", "--wrap", "sleep 10")  # fmt: skip
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
              "--slurm.exclude_after_failures", "0", layout=TWO_NODES)  # fmt: skip
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
    assert requeue.hosts == [job.allocations()[0][1]] and requeue.ranks == "1"  # its node
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


@pytest.mark.timeout(420)
def test_a_node_that_dies_mid_checkpoint_fails_the_job_which_resumes_bitwise_without_it(
    slurm_cluster, tmp_path, pydoc_dataset, reference_losses
):
    """A node of a two-node job really goes away: its link goes down and every process on it
    (slurmd, the job step, the rank) is SIGKILLed, as at a power loss. Slurm hears nothing
    from it for SlurmdTimeout, marks it DOWN, fails the job (NODE_FAIL) and requeues it. The
    next allocation runs on two healthy nodes from the last complete checkpoint, never the one
    half-written when the node died; the logbook names the node, Slurm's reason and the time
    lost, and excludes it; the run ends with the uninterrupted run's losses, bit for bit.
    The node that dies is the first, where the batch step (the driver) runs too. To be sure
    the death falls inside a save, the test's fault hook holds that save open (rank 0 stops
    after the shards are written, before it commits the checkpoint's manifest; once)."""
    job = Job(slurm_cluster, tmp_path, pydoc_dataset, "orphaned", "--checkpoint.every", "3",
              "--checkpoint.keep_last", "0", "--slurm.exclude_after_failures", "1",
              layout=TWO_NODES, OPT_INJECT_FAULT="0:save@9:hang",
              OPT_INJECT_FAULT_ONCE=str(tmp_path / "fault-fired"))  # fmt: skip
    job.wait("the save of step 9 to be held open", (tmp_path / "fault-fired").exists)
    dead = job.allocations()[0][0]  # rank 0's node, the driver's too
    step_9 = tmp_path / "ckpt" / "orphaned" / "step_00000009"
    try:
        slurm_cluster.kill_node(dead)
        # What the death left: step 9's shards in its temporary directory, never committed.
        assert list(temporary_path(step_9).glob("*.distcp")) and not step_9.exists()
        job.wait_until_finished()
        states = slurm_cluster.node_states()
    finally:
        slurm_cluster.revive_node(dead)
    assert "down" in states[dead], states
    events = job.events()
    requeue = next(e for e in events if e.kind == "requeue")
    assert requeue.cause == "node_failure" and requeue.requeued_by == "slurm", requeue
    assert requeue.hosts == [dead] and requeue.allocation_hosts == job.allocations()[0]
    assert requeue.detail.startswith(f"{dead}: DOWN") and "Not responding" in requeue.detail
    excluded = next(e for e in events if e.kind == "node_excluded")
    assert excluded.hosts == [dead] and not excluded.applied  # the job was already running
    second = job.allocations()[1]
    assert len(set(second)) == 2 and dead not in second, second
    resumed = [e for e in events if e.kind == "run_start"][-1]
    assert resumed.checkpoint.endswith("step_00000006"), resumed
    assert resumed.lost_steps == resumed.previous_step - 6 >= 2 and resumed.lost_s > 0
    assert events[-1].kind == "allocation_end" and events[-1].result == "finished", job.kinds()
    assert metrics_losses(job.run_dir) == reference_losses
    summary = job.cli("logbook", "summary", job.run, "--dir", str(tmp_path / "logbook"))
    assert "restarts: 1 (node failure 1)" in summary.stdout, summary.stdout
    book = (tmp_path / "logbook" / job.run / "LOGBOOK.md").read_text()
    assert f"**node failure** on {dead} ({dead}: DOWN" in book, book


@pytest.mark.timeout(300)
def test_a_node_that_fails_is_excluded_and_the_next_allocation_avoids_it(
    slurm_cluster, tmp_path, pydoc_dataset
):
    """Rank 0 dies before step 3 in every allocation: with exclude_after_failures=1 its node
    is excluded after the first failure and the requeued job runs elsewhere (and fails
    again, which uses up max_failure_requeues=1)."""
    job = Job(slurm_cluster, tmp_path, pydoc_dataset, "flaky", "--slurm.exclude_after_failures",
              "1", "--slurm.max_failure_requeues", "1", OPT_INJECT_FAULT="0:3:die")  # fmt: skip
    job.wait_until_finished()
    events = job.events()
    (first,), (second,) = (set(hosts) for hosts in job.allocations())
    excluded = next(e for e in events if e.kind == "node_excluded")
    assert excluded.hosts == [first] and excluded.failures == {first: 1} and excluded.applied
    assert second != first  # Slurm kept the job off the excluded node
    assert f"ExcNodeList={first}" in job.slurm("scontrol", "-o", "show", "job", job.id)
    assert events[-1].kind == "gave_up" and events[-1].hosts == [second], events[-1]


@pytest.mark.timeout(300)
def test_failures_past_the_limit_end_the_job_and_say_so(slurm_cluster, tmp_path, pydoc_dataset):
    job = Job(slurm_cluster, tmp_path, pydoc_dataset, "doomed", "--slurm.max_failure_requeues",
              "0", OPT_INJECT_FAULT="1:2:die")  # fmt: skip
    job.wait_until_finished()
    events = job.events()
    gave_up = events[-1]
    assert gave_up.kind == "gave_up" and gave_up.cause == "process_failure", events
    assert gave_up.limit == 0 and gave_up.hosts == job.allocations()[0]
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


@pytest.mark.timeout(420)
def test_a_hung_rank_is_caught_its_stack_taken_and_the_job_resumes_bitwise_without_its_node(
    slurm_cluster, tmp_path, pydoc_dataset, reference_losses
):
    """Rank 1 (alone on its node) is stopped with SIGSTOP mid-run: it makes no progress, and
    rank 0 waits in a collective. After hang_timeout_s, rank 0's watchdog writes its own
    stack; the driver sees it, finds that rank 1 wrote none, takes rank 1's stack from
    outside on its node (py-spy, an overlapping srun step), and requeues a hang of rank 1's
    node, which exclude_after_failures=1 keeps out of the next allocation. The run resumes
    and ends with the uninterrupted run's losses, bit for bit."""
    job = Job(slurm_cluster, tmp_path, pydoc_dataset, "hung", "--checkpoint.every", "3",
              "--slurm.exclude_after_failures", "1", "--resilience.hang_timeout_s", "10",
              "--resilience.hang_grace_s", "60", layout=TWO_NODES)  # fmt: skip
    job.wait_for_step(4)
    pid = rank_pid(job.run_dir / "slurm/config.toml", 1, "SLURM_PROCID")
    slow = job.allocations()[0][1]
    os.kill(pid, signal.SIGSTOP)
    try:
        job.wait("the hang's requeue", lambda: "requeue" in job.kinds(), timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # normally srun has: nothing is left stopped
    job.wait_until_finished()
    events = job.events()
    requeue = next(e for e in events if e.kind == "requeue")
    assert requeue.cause == "hang" and requeue.requeued_by == "opt", requeue
    assert requeue.hosts == [slow] and requeue.ranks == "1", requeue
    dump = Path(re.search(r"stacks in (\S+)", requeue.detail).group(1))
    waiting = (dump / "rank00000.txt").read_text()
    assert "all_reduce" in waiting or "wait" in waiting, waiting  # rank 0, in a collective
    stopped = (dump / "rank00001.py-spy.txt").read_text()
    assert "process state T (stopped)" in stopped and "py-spy" in stopped, stopped
    assert "train_step" in stopped or "fit" in stopped, stopped  # a real Python stack
    assert next(e for e in events if e.kind == "node_excluded").hosts == [slow]
    assert slow not in job.allocations()[1]
    assert events[-1].kind == "allocation_end" and events[-1].result == "finished", job.kinds()
    assert metrics_losses(job.run_dir) == reference_losses


@pytest.mark.timeout(420)
def test_a_throttled_node_is_named_and_the_job_requeues_without_it(
    slurm_cluster, tmp_path, pydoc_dataset
):
    """Real slowness: rank 1's process (alone on its node) is throttled by cpulimit (5%:
    it is stopped and resumed, as a node with failing cooling or a noisy neighbour makes
    it crawl). Its seconds per block forward, agreed every 3 steps, are 1.5x the median
    window after window: the logbook names it with its figures after 2 windows, and after 3
    every rank stops at one step and saves; the driver requeues the job without that node,
    and the run finishes on two others."""
    cpulimit = ensure_cpulimit()
    job = Job(slurm_cluster, tmp_path, pydoc_dataset, "throttled", layout=TWO_NODES,
              steps=STRAGGLER_RUN["train.max_steps"], settings=STRAGGLER_RUN,
              OPT_STEP_DELAY_S="0")  # fmt: skip
    job.wait_for_step(1)
    slow = job.allocations()[0][1]
    pid = rank_pid(job.run_dir / "slurm/config.toml", 1, "SLURM_PROCID")
    limiter = subprocess.Popen([cpulimit, "-q", "-l", THROTTLE, "-p", str(pid)])
    try:
        job.wait("the straggler's requeue", lambda: "requeue" in job.kinds(), timeout=240)
    finally:
        limiter.kill()
        limiter.wait()
    job.wait_until_finished()
    events = job.events()
    named = next(e for e in events if e.kind == "straggler")
    assert (named.rank, named.host, named.windows) == (1, slow, 2), named
    assert named.seconds_per_block >= 1.5 * named.median_seconds_per_block
    requeue = next(e for e in events if e.kind == "requeue")
    assert requeue.cause == "straggler" and requeue.hosts == [slow], requeue
    assert requeue.step % 3 == 0 and requeue.checkpoint.endswith(f"step_{requeue.step:08d}")
    excluded = next(e for e in events if e.kind == "node_excluded")
    assert excluded.hosts == [slow] and excluded.applied
    assert slow not in job.allocations()[1]
    resumed = [e for e in events if e.kind == "run_start"][-1]
    assert resumed.step == requeue.step and resumed.lost_steps == 0
    assert events[-1].kind == "allocation_end" and events[-1].result == "finished", job.kinds()
