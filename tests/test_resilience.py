"""A slow or hung rank, not only a dead one (issue 17, deliverable 6, the trainer's half).

Stragglers: the decision from agreed figures (no processes), the figure itself (which
forwards it counts, and that its hooks follow FSDP's), the agreement on a real 2-process
gloo group, and a real run with one rank throttled by `cpulimit` (and the same run without
it, which must name nobody). Hangs: the watchdog's dump and exit status on a real gloo
collective, and a 2-rank `opt launch local` run whose rank 1 is stopped with SIGSTOP.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    REPO,
    STRAGGLER_RUN,
    THROTTLE,
    config_for,
    ensure_cpulimit,
    finish,
    launch_local,
    rank_pid,
    run_cli,
    torchrun,
)

from opt.checkpoint.resume import newest_complete_checkpoint
from opt.config import load_config
from opt.errors import OptError
from opt.run.logbook import read_events
from opt.run.logbook.describe import describe
from opt.run.status import STOPPED_STRAGGLER, read_status
from opt.run.watchdog import COLLECTED, HANG_EXIT, Watchdog, dump_path, hang_dir
from opt.train.straggler import BlockClock, Streaks


# ----- the decision ---------------------------------------------------------------------------
def test_a_rank_is_slow_at_factor_times_the_median_and_named_once_per_streak():
    streaks = Streaks(world_size=4, factor=1.5, patience=2, requeue_after=3)
    fast = [1.0, 1.1, 0.9, 1.0]
    assert streaks.judge(fast).slow == []
    slow = [1.0, 1.0, 1.0, 1.5]  # the median is 1.0: 1.5 is exactly the factor
    first = streaks.judge(slow)
    assert [(s.rank, s.windows) for s in first.slow] == [(3, 1)] and first.median == 1.0
    assert first.named == [] and first.requeue == []
    second = streaks.judge([1.0, 1.0, 1.0, 3.0])
    assert [(s.rank, s.ratio, s.windows) for s in second.named] == [(3, 3.0, 2)]
    third = streaks.judge(slow)
    assert third.named == [], "named once per streak, not every window"
    assert [(s.rank, s.windows) for s in third.requeue] == [(3, 3)]
    assert streaks.judge(fast).slow == [] and streaks.windows == [0, 0, 0, 0]  # streak ended
    assert [s.windows for s in streaks.judge(slow).slow] == [1]  # a new streak starts over
    assert streaks.judge([1.0, 1.0, 1.0, 1.49]).slow == []


def test_two_ranks_compare_to_their_mean_and_a_rank_without_blocks_has_no_figure():
    streaks = Streaks(world_size=2, factor=1.5, patience=1, requeue_after=0)
    assert streaks.judge([1.0, 2.9]).slow == []  # the median of two is their mean: 3x needed
    (slow,) = streaks.judge([1.0, 3.0]).named
    assert (slow.rank, slow.ratio) == (1, 1.5)
    assert streaks.judge([1.0, 3.0]).requeue == [], "requeue_after 0: never stop"
    streaks = Streaks(world_size=3, factor=1.5, patience=1, requeue_after=1)
    verdict = streaks.judge([0.0, 1.0, 2.0])  # rank 0 ran no block forward this window
    assert verdict.median == 1.5 and verdict.slow == []
    assert streaks.judge([0.0, 0.0, 0.0]).slow == []


def test_the_config_section_and_its_rule():
    cfg = load_config(None).resilience
    assert (cfg.straggler_every, cfg.straggler_factor, cfg.straggler_patience) == (50, 1.5, 3)
    assert (cfg.straggler_requeue_after, cfg.hang_timeout_s, cfg.hang_grace_s) == (0, 300, 30)
    with pytest.raises(OptError, match="straggler_requeue_after=2 must be 0 or at least"):
        load_config(None, ["--resilience.straggler_requeue_after", "2"])
    with pytest.raises(OptError, match="straggler_factor must be greater than 1"):
        load_config(None, ["--resilience.straggler_factor", "1"])
    # The default catches a hang inside a collective before the collective's own timeout.
    assert cfg.hang_timeout_s < load_config(None).parallel.timeout_s


# ----- the figure -----------------------------------------------------------------------------
@pytest.mark.parametrize("checkpointing", ["none", "full"])
def test_the_clock_counts_training_forwards_recomputation_included_not_evaluations(
    checkpointing, tiny_config
):
    from opt.train.trainer import Trainer

    trainer = Trainer(tiny_config(parallel__activation_checkpoint=checkpointing))
    clock = BlockClock(trainer.model_parts, trainer.device)
    trainer.validate()
    assert clock.take() == 0.0 and clock.forwards == 0
    trainer.train_step()
    blocks, micro_batches = trainer.model_args.n_layers, trainer.grad_accum
    recomputed = 2 if checkpointing == "full" else 1
    assert clock.forwards == blocks * micro_batches * recomputed
    assert clock.take() > 0 and clock.forwards == 0


def test_the_clock_starts_after_fsdp_waits_and_pauses_across_nested_units():
    """The order of the forward hooks, as FSDP2 leaves them and the clock adds to them:
    FSDP's pre-forward (the all-gather and its wait) before the clock starts, its
    post-forward (a local reshard) before it stops, and a nested unit's wait (bf16's
    LayerNorms) with the clock paused. Built on a fake 2-rank group, on meta."""
    from opt import dist as distributed
    from opt.job import check_job
    from opt.parallel.parallelize import parallelize

    def names(hooks) -> list[str]:
        return [h.__qualname__ for h in hooks.values()]

    for checkpointing in ("none", "full"):
        cfg = load_config(None, ["--parallel.dp_shard", "2", "--train.precision", "bf16",
                                 "--parallel.activation_checkpoint", checkpointing])  # fmt: skip
        job = check_job(cfg, 2)
        try:
            distributed.init_fake(2, 0)
            model = parallelize(job.model_args, job.dims, job.dims.build_meshes("cpu"),
                                cfg.parallel, 64, fsdp_param_dtype=torch.bfloat16)  # fmt: skip
        finally:
            distributed.destroy()
        BlockClock(model.parts, torch.device("cpu"))
        block = model.parts[0].layers["0"]
        timed = getattr(block, "_checkpoint_wrapped_module", block)
        fsdp_pre, fsdp_post = ["FSDPState._pre_forward"], ["FSDPState._post_forward"]
        if checkpointing == "full":  # FSDP wraps the wrapper; the clock is on what it wraps
            assert names(block._forward_pre_hooks) == fsdp_pre
            assert names(timed._forward_pre_hooks) == ["BlockClock._enter"]
            assert names(timed._forward_hooks) == ["BlockClock._leave"]
        else:
            assert names(block._forward_pre_hooks) == [*fsdp_pre, "BlockClock._enter"]
            assert names(block._forward_hooks) == [*fsdp_post, "BlockClock._leave"]
        assert names(timed.attn_norm._forward_pre_hooks) == [
            "BlockClock._pause",
            *fsdp_pre,
            "BlockClock._resume",
        ]


AGREEMENT_WORKER = """
import json, sys
from dataclasses import asdict
import torch
import torch.distributed as dist
from opt.config import load_config
from opt.train.straggler import StragglerWatch

dist.init_process_group("gloo")
rank = dist.get_rank()
cfg = load_config(None, ["--resilience.straggler_every", "1", "--resilience.straggler_patience",
                         "2", "--resilience.straggler_requeue_after", "3"]).resilience
watch = StragglerWatch.build(cfg, [], torch.device("cpu"), rank, 2)
verdicts = []
for window in range(4):
    slow = window < 3 and rank == 1
    watch.clock.seconds, watch.clock.forwards = (4.0 if slow else 1.0) * 0.01 * 6, 6
    verdicts.append(asdict(watch.window()))
json.dump({"hosts": watch.hosts, "verdicts": verdicts}, open(f"{sys.argv[1]}/r{rank}.json", "w"))
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_every_rank_agrees_on_every_figure_and_decides_alike(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(AGREEMENT_WORKER)
    result = torchrun(2, str(worker), str(tmp_path), timeout=100)
    assert result.returncode == 0, result.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"r{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1, "one all-reduce: the same figures, the same decisions on every rank"
    assert r0["hosts"] == [socket.gethostname()] * 2
    verdicts = r0["verdicts"]
    assert verdicts[0]["figures"] == pytest.approx([0.01, 0.04], rel=1e-12)
    assert [[s["rank"] for s in v["slow"]] for v in verdicts] == [[1], [1], [1], []]
    assert [[s["windows"] for s in v["named"]] for v in verdicts] == [[], [2], [], []]
    assert [[s["rank"] for s in v["requeue"]] for v in verdicts] == [[], [], [1], []]


# ----- a real straggler: one rank throttled by cpulimit -----------------------------------------
def window_figures(run_dir: Path) -> list[tuple[int, list[float]]]:
    """Each straggler window's step and figures (ms per block forward, by rank)."""
    lines = (run_dir / "stragglers.jsonl").read_text().splitlines()
    return [
        (w["step"], [round(f * 1e3, 2) for f in w["seconds_per_block"]])
        for w in map(json.loads, lines)
    ]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_throttled_rank_is_named_and_the_run_stops_for_a_requeue_without_its_host(
    tmp_path, pydoc_dataset
):
    cpulimit = ensure_cpulimit()
    config = config_for(tmp_path, pydoc_dataset, "slow", **STRAGGLER_RUN)
    run_dir = tmp_path / "runs" / "slow"
    proc = launch_local(config)
    limiter = None
    try:
        deadline = time.monotonic() + 120
        while read_status(run_dir).get("step", 0) < 1:  # started: throttle training only
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.05)
        pid = rank_pid(config, 1)
        limiter = subprocess.Popen([cpulimit, "-q", "-l", THROTTLE, "-p", str(pid)])
        output = finish(proc, timeout=360)
    finally:
        if limiter is not None:
            limiter.kill()
            limiter.wait()
        if proc.poll() is None:
            proc.kill()
    print("figures (ms per block forward, ranks 0 and 1):", window_figures(run_dir))
    status = read_status(run_dir)
    assert status["state"] == STOPPED_STRAGGLER, output[-3000:]
    step = status["step"]
    assert step % 3 == 0 and step < 60
    assert (status["hosts"], status["ranks"]) == ([socket.gethostname()], [1])
    assert "rank 1 on" in status["reason"] and "x the median" in status["reason"]
    assert newest_complete_checkpoint(tmp_path / "ckpt" / "slow").name == f"step_{step:08d}"
    events = read_events(tmp_path / "logbook" / "slow" / "events.jsonl")
    # Named once per streak: a window whose stops all missed the forwards ends a streak, and
    # the next streak is named again (seen in CI: slow, slow, even, slow, slow, slow).
    named = [e for e in events if e.kind == "straggler"]
    assert named and all(e.step <= step for e in named)
    for e in named:
        assert (e.rank, e.host, e.windows, e.every) == (1, socket.gethostname(), 2, 3)
        assert e.ratio >= 1.5 and e.seconds_per_block >= 1.5 * e.median_seconds_per_block
    assert len({e.step for e in named}) == len(named) and "straggler" in describe(named[0])
    assert "straggler: step" in output and events[-1].kind == "run_stop"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_same_run_unthrottled_names_nobody(tmp_path, pydoc_dataset):
    config = config_for(tmp_path, pydoc_dataset, "even", **STRAGGLER_RUN)
    finish(launch_local(config), timeout=360)
    run_dir = tmp_path / "runs" / "even"
    figures = window_figures(run_dir)
    print("figures (ms per block forward, ranks 0 and 1):", figures)
    assert len(figures) == 20
    assert read_status(run_dir)["state"] == "finished"
    events = read_events(tmp_path / "logbook" / "even" / "events.jsonl")
    assert [e for e in events if e.kind == "straggler"] == []


# ----- hangs ----------------------------------------------------------------------------------
# The torch.distributed collectives a training step can wait in.
COLLECTIVES = (
    "(all_gather_single|all_gather_into_tensor|all_gather|all_reduce|reduce_scatter_tensor"
    "|broadcast|barrier|all_gather_object|broadcast_object_list)"
)


def main_thread_stack(dump: str) -> str:
    """The main thread's frames in a watchdog dump (its id is in the header)."""
    ident = re.search(r"^main thread: (0x[0-9a-f]+)$", dump, re.M).group(1)
    # "Current thread" when the main thread wrote the dump itself (the unit test).
    heading = re.search(
        rf"^(Current thread|Thread) {ident} \(most recent call first\):\n", dump, re.M
    )
    return dump[heading.end() :].split("\n\n", 1)[0]


def test_the_dump_holds_the_header_and_every_thread_and_the_marker_must_be_newer(tmp_path):
    watchdog = Watchdog(tmp_path, rank=3, world_size=4, timeout_s=5, grace_s=1)
    path = watchdog.dump(step=12, idle=6.5)
    assert (
        path == dump_path(tmp_path, 12, 3) == tmp_path / "hangs/after_step_00000012/rank00003.txt"
    )
    text = path.read_text()
    assert "rank: 3 of 4" in text and "last completed step: 12" in text
    assert f"pid: {os.getpid()}" in text and "no progress for 6.5 s" in text
    assert "in test_the_dump_holds_the_header" in main_thread_stack(text)
    from opt.run.watchdog import _newer

    marker = hang_dir(tmp_path, 12) / COLLECTED
    marker.touch()
    os.utime(marker, ns=(0, 0))  # an earlier incident's marker
    assert not _newer(marker, path)
    marker.touch()
    assert _newer(marker, path)


HANG_WORKER = """
import os, sys, time
import torch, torch.distributed as dist
from opt.run.watchdog import Watchdog

rank = int(sys.argv[2])
dist.init_process_group("gloo", rank=rank, world_size=2)
if rank == 1:
    time.sleep(600)  # never joins the all-reduce
Watchdog(sys.argv[1], rank, 2, timeout_s=2, grace_s=600).start(7)
dist.all_reduce(torch.ones(4))
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_rank_blocked_in_a_gloo_collective_is_dumped_by_its_watchdog_and_exits_86(tmp_path):
    """The main thread waits in gloo's all-reduce with the GIL released: the watchdog
    thread runs, writes the stack, waits for the launcher's marker and ends the process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}  # fmt: skip
    procs = [
        subprocess.Popen([sys.executable, "-c", HANG_WORKER, str(tmp_path), str(rank)], env=env)
        for rank in (0, 1)
    ]
    try:
        dump = dump_path(tmp_path, 7, 0)
        deadline = time.monotonic() + 90
        while not dump.is_file():
            assert procs[0].poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        innermost = main_thread_stack(dump.read_text()).splitlines()[0]
        assert re.search(r'distributed_c10d\.py", line \d+ in all_reduce$', innermost), innermost
        (dump.parent / COLLECTED).touch()  # the launcher has what it needs: no grace left
        assert procs[0].wait(timeout=60) == HANG_EXIT
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_stopped_rank_is_a_hang_its_peer_dumps_and_ends_with_86(tmp_path, pydoc_dataset):
    config = config_for(
        tmp_path, pydoc_dataset, "hang", **{
            # No save mid-run: rank 0's main thread then waits in a training collective.
            "train.max_steps": 200, "checkpoint.every": 1000, "metrics.tensorboard": False,
            "resilience.hang_timeout_s": 8.0, "resilience.hang_grace_s": 2.0,
        },
    )  # fmt: skip
    run_dir = tmp_path / "runs" / "hang"
    proc = launch_local(config, {"OPT_STEP_DELAY_S": "0.3"})
    stopped = None
    try:
        deadline = time.monotonic() + 120
        while read_status(run_dir).get("step", 0) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.05)
        rank0, stopped = rank_pid(config, 0), rank_pid(config, 1)
        os.kill(stopped, signal.SIGSTOP)
        while _alive(rank0):  # it hangs in a collective, dumps, waits its grace, exits
            assert time.monotonic() < deadline + 60
            time.sleep(0.1)
        dumps = sorted(run_dir.glob("hangs/after_step_*/rank*.txt"))
        # Killed while still stopped: resumed, its own watchdog would find the silence too.
        os.kill(stopped, signal.SIGKILL)
        output, _ = proc.communicate(timeout=120)
    finally:
        if stopped is not None:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(stopped, sig)
        if proc.poll() is None:
            proc.kill()
    assert [d.name for d in dumps] == ["rank00000.txt"], "the stopped rank cannot dump"
    text = dumps[0].read_text()
    step = int(re.search(r"^last completed step: (\d+)$", text, re.M).group(1))
    assert dumps[0].parent == hang_dir(run_dir, step) and step >= 3
    stack = main_thread_stack(text)
    # Waiting on rank 1 (seen: FSDP's all-gather before a block's forward, in
    # all_gather_single's work.wait(), which has no Python frame of its own).
    innermost = stack.splitlines()[0]
    assert re.search(rf'torch/distributed/distributed_c10d\.py", line \d+ in {COLLECTIVES}$',
                     innermost), stack  # fmt: skip
    assert "opt/train/trainer.py" in stack
    assert re.search(r"rank\s+: 0 \(local_rank: 0\)\n\s+exitcode\s+: 86 ", output), output[-3000:]
    assert proc.returncode != 0


def _alive(pid: int) -> bool:
    """Running or stopped, not exited (a zombie waiting for its parent counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_the_watchdog_stays_quiet_through_steps_saves_and_evaluations(tmp_path, pydoc_dataset):
    """Phases each shorter than the timeout, which the trainer beats between: no dump."""
    config = config_for(tmp_path, pydoc_dataset, "quiet", **{"parallel.dp_shard": 1})
    env = {**os.environ, "OPT_STEP_DELAY_S": "1.0"}
    result = subprocess.run(
        [sys.executable, "-m", "opt", "train", str(config), "--resilience.hang_timeout_s", "5"],
        cwd=REPO, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "runs" / "quiet" / "hangs").exists()
    assert read_status(tmp_path / "runs" / "quiet")["state"] == "finished"


def test_the_exit_status_is_documented():
    assert HANG_EXIT == 86
    described = " ".join(run_cli("train", "--help").stdout.split())
    assert f"{HANG_EXIT} when a rank's hang watchdog ended it" in described
