"""The Slurm launcher's pure parts: host lists, the task environment, the submission it
would make, and the driver's bookkeeping over logbook events. The real cluster is in
test_slurm.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from helpers import REPO, run_cli

from opt.config import load_config
from opt.errors import OptError
from opt.launch.job_history import (
    allocation_vanished,
    excluded_hosts,
    failures_by_host,
    newly_excluded,
    requeue_counts,
    requeue_limit,
    requeues_used,
)
from opt.launch.slurm_driver import SRUN_NODE_FAILURE, SRUN_TASK_ERROR, stop_cause
from opt.launch.slurm_env import adopt_slurm_environment, expand_hostlist, master_port
from opt.launch.slurm_job import sbatch_parameters, srun_command
from opt.run.logbook.events import AllocationStart, NodeExcluded, Requeue, RunStart


@pytest.mark.parametrize(
    ("text", "hosts"),
    [
        ("node7", ["node7"]),
        ("node[001-003,017]", ["node001", "node002", "node003", "node017"]),
        ("a[1-2],b3", ["a1", "a2", "b3"]),
        ("rack[1-2]-n[08-09]", ["rack1-n08", "rack1-n09", "rack2-n08", "rack2-n09"]),
        ("gpu-[9-11]", ["gpu-9", "gpu-10", "gpu-11"]),
    ],
)
def test_host_lists_expand_like_scontrol_show_hostnames(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("bad", ["node[1-2", "node]1[", "node[a-b]"])
def test_a_malformed_host_list_is_an_error(bad):
    with pytest.raises(OptError, match="bad Slurm host list"):
        expand_hostlist(bad)


def test_a_task_takes_rank_and_rendezvous_from_slurm():
    env = {"SLURM_PROCID": "11", "SLURM_NTASKS": "16", "SLURM_LOCALID": "3",
           "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "4242",
           "SLURM_STEP_NODELIST": "gpu[017-018]"}  # fmt: skip
    assert adopt_slurm_environment(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("11", "16", "3")
    assert env["MASTER_ADDR"] == "gpu017" and env["MASTER_PORT"] == str(master_port("4242"))


def test_a_launcher_that_set_the_rank_wins_and_the_batch_shell_is_not_a_task():
    torchrun = {"RANK": "1", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "1"}
    assert not adopt_slurm_environment(torchrun) and torchrun["RANK"] == "1"
    batch = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "1"}
    assert not adopt_slurm_environment(batch) and "RANK" not in batch


def _cfg(*overrides: str):
    return load_config("configs/opt-125m.toml", list(overrides))


def test_the_submission_has_one_task_per_gpu_requeue_and_the_warning_signal():
    cfg = _cfg("--slurm.nodes", "2", "--slurm.gpus_per_node", "4", "--slurm.partition", "p",
               "--slurm.sbatch", '["constraint=a100", "exclusive"]', "--slurm.signal", "USR1",
               "--slurm.signal_delay_s", "200", "--run.name", "r1")  # fmt: skip
    params = sbatch_parameters(cfg)
    assert params["nodes"] == 2 and params["ntasks_per_node"] == 4
    assert params["gpus_per_node"] == 4 and params["partition"] == "p"
    assert params["job_name"] == "r1"
    extra = params["additional_parameters"]
    assert extra["signal"] == "USR1@200" and extra["requeue"] is True
    assert extra["constraint"] == "a100" and extra["exclusive"] is True
    srun = srun_command(cfg, "job.toml", python="py")
    assert "--kill-on-bad-exit=1" in srun and "--ntasks-per-node=4" in srun
    assert srun[-6:] == ["py", "-u", "-m", "opt", "train", "job.toml"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--slurm.gpus_per_node", "8", "--slurm.tasks_per_node", "4"], "one task per GPU"),
        (["--slurm.gpus_per_node", "0"], "needs slurm.tasks_per_node"),
        (["--slurm.signal", "HUP"], "USR1 or USR2"),
        (["--slurm.signal_delay_s", "600", "--slurm.time_minutes", "5"], "shorter than"),
        (["--slurm.sbatch", '["=x"]'], "KEY=VALUE"),
        (["--slurm.nodes", "0"], "slurm.nodes must be at least 1"),
    ],
)
def test_bad_slurm_settings_are_refused(overrides, message):
    with pytest.raises(OptError, match=message):
        _cfg(*overrides)


def _example(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", f"launch/{script}", *args], cwd=REPO, capture_output=True, text=True,
        timeout=120, env={**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO)},
    )  # fmt: skip


@pytest.mark.slow
def test_the_175b_example_dry_run_prints_the_sbatch_script_and_layout_and_submits_nothing(
    tmp_path,
):
    result = _example("opt-175b-124x8-a100.sh", "--run.dir", str(tmp_path / "runs"), "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "124 node(s) x 8 task(s) (8 GPU(s) per node) = 992 ranks" in out
    assert "dp_shard=124 x tp=8" in out and "2,031,616 tokens = 992 sequences" in out
    for line in ("#SBATCH --nodes=124", "#SBATCH --ntasks-per-node=8", "#SBATCH --requeue",
                 "#SBATCH --signal=USR2@600", "#SBATCH --job-name=opt-175b",
                 "#SBATCH --gpus-per-node=8", "#SBATCH --exclusive"):  # fmt: skip
        assert line in out
    assert "srun --kill-on-bad-exit=1" in out and "dry run: nothing submitted" in out
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_the_125m_example_dry_run_is_one_node_of_eight_ranks(tmp_path):
    result = _example("opt-125m-1node.sh", "--run.dir", str(tmp_path / "runs"), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "1 node(s) x 8 task(s) (8 GPU(s) per node) = 8 ranks" in result.stdout
    assert "dp_shard=8 x tp=1" in result.stdout


@pytest.mark.slow
def test_an_inconsistent_layout_is_refused_before_submitting(tmp_path):
    result = run_cli(
        "launch", "slurm", "configs/opt-125m.toml", "--nodes", "1", "--gpus-per-node", "8",
        "--parallel.tp", "3", "--run.dir", str(tmp_path / "runs"),
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert not (tmp_path / "runs").exists()


def test_srun_failure_reports_are_parsed():
    killed = SRUN_TASK_ERROR.search("srun: error: node7: task 1: Killed")
    assert killed.groups() == ("node7", "1", "Killed")
    exited = SRUN_TASK_ERROR.search("srun: error: gpu-3: tasks 0-1: Exited with exit code 1")
    assert exited.groups() == ("gpu-3", "0-1", "Exited with exit code 1")
    assert SRUN_NODE_FAILURE.search("srun: error: Node failure on gpu012").group(1) == "gpu012"


def _requeue(cause, *hosts):
    return Requeue(cause=cause, job_id="7", requeued_by="opt", hosts=list(hosts))


def _allocation():
    return AllocationStart(job_id="7", hosts=["n1", "n2"])


def test_limits_and_exclusion_are_counted_from_the_logbook():
    events = [
        _allocation(), _requeue("preemption"),
        _allocation(), _requeue("process_failure", "n1"),
        _allocation(), _requeue("node_failure", "n2"),
        _allocation(), _requeue("process_failure", "n1"),
        _allocation(), _requeue("timeout"),
    ]  # fmt: skip
    assert requeue_counts(events) == {"preemption": 1, "process_failure": 2, "node_failure": 1,
                                      "timeout": 1}  # fmt: skip
    assert failures_by_host(events) == {"n1": 2, "n2": 1}
    cfg = _cfg("--slurm.exclude", "bad[1-2]")
    assert excluded_hosts(cfg, events) == ["bad1", "bad2", "n1"]
    assert excluded_hosts(_cfg("--slurm.exclude_after_failures", "0"), events) == []
    assert not allocation_vanished(events)
    start = RunStart(reason="fresh", world_size=2, layout={}, model="opt-tiny", run_dir="r")
    assert allocation_vanished([*events, _allocation(), start])


def test_requeue_limits_share_one_count_for_both_kinds_of_failure():
    events = [_requeue("process_failure", "n1"), _requeue("node_failure", "n2"),
              _requeue("timeout"), _requeue("preemption")]  # fmt: skip
    cfg = _cfg("--slurm.max_failure_requeues", "5", "--slurm.max_timeout_requeues", "4")
    assert requeue_limit(cfg, "process_failure") == requeue_limit(cfg, "node_failure") == 5
    assert requeue_limit(cfg, "timeout") == 4 and requeue_limit(cfg, "preemption") is None
    assert requeues_used(events, "node_failure") == requeues_used(events, "process_failure") == 2
    assert requeues_used(events, "timeout") == 1


def test_a_host_is_excluded_once_when_it_reaches_the_threshold():
    cfg = _cfg("--slurm.exclude_after_failures", "2")
    events = [_requeue("process_failure", "n1"), _requeue("node_failure", "n2")]
    assert newly_excluded(cfg, events) == []
    events.append(_requeue("process_failure", "n1"))
    assert newly_excluded(cfg, events) == ["n1"]
    events.append(NodeExcluded(job_id="7", hosts=["n1"], exclude="n1", failures={"n1": 2}))
    assert newly_excluded(cfg, events) == []
    assert excluded_hosts(cfg, events) == ["n1"]  # still excluded from every later allocation


def test_the_cause_of_a_warning_is_what_slurm_reports_of_the_job(monkeypatch):
    """PreemptTime set: a preemption; EndTime within signal_delay_s (+ Slurm's early
    delivery): a timeout; else not the time limit's. The real ones: tests/test_slurm.py."""
    import opt.launch.slurm_driver as driver

    cfg = _cfg("--slurm.time_minutes", "60", "--slurm.signal_delay_s", "300")

    def stamp(seconds: float) -> str:  # as Slurm prints it, local time
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() + seconds))

    cases = [
        ({"EndTime": stamp(300 + 50), "PreemptTime": "None"}, "timeout"),  # came 50 s early
        ({"EndTime": stamp(240), "PreemptTime": "None"}, "timeout"),
        ({"EndTime": stamp(1800), "PreemptTime": "None"}, "preemption"),  # not the limit's
        ({"EndTime": stamp(250), "PreemptTime": stamp(-5)}, "preemption"),  # Slurm dated it
    ]
    for job, cause in cases:
        monkeypatch.setattr(driver, "scontrol_job", lambda job_id, job=job: job)
        assert stop_cause(cfg, "7", elapsed_s=0)[0] == cause, job
    # Without scontrol's answer: the elapsed time against the configured limit.
    monkeypatch.setattr(driver, "scontrol_job", lambda job_id: {})
    assert stop_cause(cfg, "7", 3600 - 300 - 30) == (
        "timeout",
        "no answer from scontrol: 3270 s into the allocation",
    )
    assert stop_cause(cfg, "7", 1200)[0] == "preemption"


def test_a_give_up_replaces_the_requeue_over_the_limit_and_a_failure_says_where(tmp_path):
    from opt.launch.slurm_driver import _give_up_if_over_limit
    from opt.run.logbook import Logbook

    cfg = _cfg("--slurm.max_failure_requeues", "1", "--slurm.max_timeout_requeues", "1",
               "--logbook.dir", str(tmp_path))  # fmt: skip
    book = Logbook(tmp_path, "r")
    failure = Requeue(cause="node_failure", job_id="7", requeued_by="opt", step=9, hosts=["n2"],
                      ranks="3", detail="Killed", checkpoint="ck/step_8")  # fmt: skip
    timeout = Requeue(cause="timeout", job_id="7", requeued_by="opt", step=9, checkpoint="c")
    preemption = Requeue(cause="preemption", job_id="7", requeued_by="slurm")
    assert _give_up_if_over_limit(cfg, book, [], failure) is None
    history = [_requeue("process_failure", "n1"), _requeue("timeout"), preemption] * 3
    assert _give_up_if_over_limit(cfg, book, history, preemption) is None  # never a limit
    assert _give_up_if_over_limit(cfg, book, history, failure) == 1
    assert _give_up_if_over_limit(cfg, book, history, timeout) == 1
    gave_up_failure, gave_up_timeout = book.events()
    assert (gave_up_failure.cause, gave_up_failure.requeues_used, gave_up_failure.limit) == (
        "node_failure", 3, 1)  # fmt: skip
    assert (gave_up_failure.hosts, gave_up_failure.ranks, gave_up_failure.detail) == (
        ["n2"], "3", "Killed")  # fmt: skip
    assert gave_up_failure.checkpoint == "ck/step_8" and gave_up_failure.step == 9
    assert gave_up_timeout.hosts == [] and gave_up_timeout.checkpoint is None
