"""Stopping on the scheduler's warning signal, and choosing a complete checkpoint to resume.

Without Slurm: `opt launch local` ranks with the handler installed as `opt launch slurm`
installs it. The signal goes to one rank only (Slurm sends it to all), the harder case:
the others must still stop after the same step.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch
from helpers import config_for, finish, launch_local, rank_pid, tensorboard_losses

from opt.checkpoint.resume import newest_complete_checkpoint
from opt.errors import OptError
from opt.run.logbook import read_events
from opt.run.preemption import StopOnSignal
from opt.run.status import read_status


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_signal_to_one_rank_stops_all_at_one_step_and_the_resume_is_exact(
    tmp_path, pydoc_dataset
):
    reference = config_for(tmp_path, pydoc_dataset, "reference")
    finish(launch_local(reference))
    expected = tensorboard_losses(tmp_path / "runs" / "reference")
    assert sorted(expected) == list(range(1, 13))

    cut = config_for(tmp_path, pydoc_dataset, "cut")
    run_dir = tmp_path / "runs" / "cut"
    proc = launch_local(cut, {"OPT_STOP_SIGNALS": "USR2,TERM", "OPT_STEP_DELAY_S": "0.4"})
    deadline = time.monotonic() + 120
    while read_status(run_dir).get("step", 0) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    os.kill(rank_pid(cut, 1), signal.SIGUSR2)  # rank 1 only: rank 0 learns it by all-reduce
    output = finish(proc)
    status = read_status(run_dir)
    stopped_at = status["step"]
    assert status["state"] == "stopped_on_signal" and 2 <= stopped_at < 12, output[-2000:]
    assert "received SIGUSR2" in output
    saved = tmp_path / "ckpt" / "cut" / f"step_{stopped_at:08d}"
    assert (saved / "manifest.json").is_file(), "the stop must save its own step"
    stop = [e for e in read_events(tmp_path / "logbook/cut/events.jsonl") if e.kind == "run_stop"]
    assert "stopped on SIGUSR2" in stop[-1].reason or "peer" in stop[-1].reason

    finish(launch_local(cut))  # the requeued job: resumes and finishes
    assert read_status(run_dir)["state"] == "finished"
    losses = tensorboard_losses(run_dir)
    assert sorted(losses) == list(range(1, 13)), "no step lost or repeated"
    assert losses == pytest.approx(expected, rel=1e-6, abs=0)
    resumed = [e for e in read_events(tmp_path / "logbook/cut/events.jsonl")
               if e.kind == "run_start"][-1]  # fmt: skip
    assert resumed.step == stopped_at and resumed.lost_steps == 0
    assert resumed.previous_state == "stopped_on_signal" and resumed.lost_s >= 0


def test_the_handler_records_the_signal_and_the_step_vector_carries_it():
    from opt.train.agreement import Shares, agree

    stop = StopOnSignal(["USR1"])
    shares = Shares(holds_loss=True, holds_norm=True, squared_norm=False, data_parallel=1)
    try:
        assert stop.received is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.received == "SIGUSR1"
        agreed = agree(shares, torch.tensor(2.5), torch.tensor(0.5), stop.received is not None,
                       stop_file=False, intervention_waiting=False)  # fmt: skip
        assert agreed.stop_signal and (agreed.loss, agreed.grad_norm) == (2.5, 0.5)
    finally:
        stop.restore_defaults()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def _train(tiny_config, steps: int, **overrides):
    from opt.train.trainer import Trainer

    trainer = Trainer(tiny_config(train__max_steps=steps, checkpoint__every=2,
                                  checkpoint__keep_last=0, **overrides))  # fmt: skip
    trainer.fit()
    return trainer


def test_a_truncated_newest_checkpoint_is_set_aside_for_the_previous_complete_one(tiny_config):
    first = _train(tiny_config, 6)
    root = first.cfg.checkpoint_dir
    newest = root / "step_00000006"
    shard = max(newest.glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a partial upload

    resumed = _train(tiny_config, 8)
    assert resumed.step == 8
    events = read_events(resumed.cfg.logbook_dir / "events.jsonl")
    skipped = [e for e in events if e.kind == "checkpoint_skipped"]
    assert len(skipped) == 1 and skipped[0].checkpoint == str(newest)
    assert "bytes, the manifest says" in skipped[0].problem
    start = [e for e in events if e.kind == "run_start"][-1]
    assert start.checkpoint.endswith("step_00000004")
    assert start.previous_step == 6 and start.lost_steps == 2
    assert (root / "step_00000006.corrupt").is_dir(), "kept as evidence"


def test_a_flipped_byte_is_caught_by_the_checksum_and_all_corrupt_is_an_error(tiny_config):
    first = _train(tiny_config, 2, checkpoint__initial=False)  # its only checkpoint: step 2
    path = first.cfg.checkpoint_dir / "step_00000002"
    shard = next(path.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    seen = []
    with pytest.raises(
        OptError, match=r"no complete checkpoint .*fails its checksum.* step_00000002\.corrupt"
    ):
        newest_complete_checkpoint(first.cfg.checkpoint_dir, lambda p, why: seen.append(why))
    assert "fails its checksum" in seen[0]
    # Starting over is a decision for a person, not something a requeue does by itself.
    with pytest.raises(OptError, match="no complete checkpoint"):
        _train(tiny_config, 4, checkpoint__initial=False)


def test_status_file_follows_the_run(tiny_config):
    trainer = _train(tiny_config, 3)
    status = json.loads((trainer.cfg.run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 3
    assert status["last_checkpoint"].endswith("step_00000003")


def test_run_stop_records_compute_and_energy(tiny_config):
    from opt.run.energy import EnergyMeter

    trainer = _train(tiny_config, 2)
    stop = [e for e in read_events(trainer.cfg.logbook_dir / "events.jsonl")
            if e.kind == "run_stop"][-1]  # fmt: skip
    assert stop.gpu_hours == 0.0 and stop.energy_kwh is None
    assert stop.energy_source == "CPU run: not estimated"

    # On a GPU without NVML: the GPU type's TDP times the GPU-hours, then PUE and grid.
    meter = EnergyMeter(torch.device("cpu"), ranks=8, pue=1.1, carbon_kg_per_kwh=0.25)
    meter.gpu, meter.tdp = "NVIDIA A100-SXM4-80GB", 400.0
    meter.started -= 3600  # one hour ago
    usage = meter.usage()
    assert usage["gpu_hours"] == pytest.approx(8, rel=1e-3)
    assert usage["energy_kwh"] == pytest.approx(3.2, rel=1e-3)
    assert usage["co2e_kg"] == pytest.approx(3.2 * 1.1 * 0.25, rel=1e-3)
    assert "TDP" in usage["energy_source"]
