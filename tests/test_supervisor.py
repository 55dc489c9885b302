"""The divergence supervisor on real training: drills, the escalation ladder, in-process
rollback, the logbook, operator controls, and the same decisions on every rank."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import REPO, run_cli

from opt.config import to_toml
from opt.run.logbook import Logbook, read_events
from opt.run.logbook.chart import history
from opt.run.logbook.describe import describe
from opt.run.logbook.events import Note
from opt.run.logbook.redact import redact
from opt.run.logbook.series import read_series
from opt.train.trainer import Trainer

# Checkpoints every 5 steps; a spike drill at step 30 lasting two steps.
DRILL = {
    "train__max_steps": 60,
    "checkpoint__every": 5,
    "checkpoint__keep_last": 1,  # the rollback target survives only by being protected
    "model__dropout": 0.0,
    "metrics__log_every": 100,
}


def drill_config(tiny_config, tmp_path, **overrides):
    return tiny_config(**{**DRILL, "logbook__dir": str(tmp_path / "logbook"), **overrides})


def interventions(events):
    return [e for e in events if e.kind == "intervention"]


def test_an_injected_nan_skips_the_update_and_changes_nothing_else(tiny_config, tmp_path):
    trainer = Trainer(drill_config(tiny_config, tmp_path, supervisor__drill="nan@5"))
    for _ in range(4):
        trainer.train_step()
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    moments = {k: v["exp_avg"].clone() for k, v in trainer.optimizer.state.items()}
    result = trainer.train_step()
    assert result.skipped and result.decision.rung == "skip"
    assert result.decision.anomaly.detector == "nonfinite"
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param, params[name]), name
    for key, state in trainer.optimizer.state.items():
        assert torch.equal(state["exp_avg"], moments[key])
    assert (trainer.factors.lr_scale, trainer.factors.grad_clip, trainer.step) == (1.0, 1.0, 5)
    healthy = trainer.train_step()
    assert not healthy.skipped and torch.isfinite(torch.tensor(healthy.loss))


@pytest.mark.slow
def test_a_spike_rolls_back_lowers_lr_and_clip_and_recovers(tiny_config, tmp_path):
    cfg = drill_config(tiny_config, tmp_path, supervisor__drill="spike@30x2")
    trainer = Trainer(cfg)
    results = trainer.fit()
    events = read_events(cfg.logbook_dir / "events.jsonl")
    skip, rollback = interventions(events)
    assert (skip.step, skip.action, skip.detector) == (30, "skip", "loss_spike")
    assert (rollback.step, rollback.action) == (31, "rollback+lower_lr_clip")
    # Rolled back to a checkpoint from before the spike, with the margin (30 - 5).
    assert rollback.rolled_back_to_step == 25 and rollback.checkpoint.endswith("step_00000025")
    assert rollback.tokens_lost == 6 * cfg.train.batch_tokens
    assert rollback.before.lr_scale == 1.0 and rollback.after.lr_scale == 0.5
    assert rollback.after.grad_clip == pytest.approx(0.6)
    for key in ("time", "step", "tokens", "detector", "numbers", "checkpoint", "before", "after"):
        assert key in rollback.model_fields_set, key  # written in the line, not a default
    assert rollback.numbers["loss"] > rollback.numbers["loss_median"] + 1
    # The held-out loss around them (evaluated at every save): the last one before each,
    # and right after the rollback that of the step-25 weights again, to the bit.
    assert (skip.valid_before.step, skip.valid_after) == (25, None)
    assert rollback.valid_before.step == 30
    assert rollback.valid_after == skip.valid_before
    assert "validation loss" in describe(rollback)
    (outcome,) = [e for e in events if e.kind == "outcome"]
    assert outcome.recovered and outcome.intervention_step == 31
    assert outcome.recovered_at_step <= 31 + cfg.supervisor.recovery_steps
    # The factors persist: the final state and the checkpoint hold them.
    assert (trainer.factors.lr_scale, trainer.factors.grad_clip) == (0.5, pytest.approx(0.6))
    assert trainer.step == 60 and results[-1].loss < outcome.pre_incident_loss
    state = torch.load(cfg.checkpoint_dir / "step_00000060" / "trainer.pt", weights_only=True)
    assert state["factors"]["lr_scale"] == 0.5
    assert "rollback+lower_lr_clip" in (cfg.logbook_dir / "LOGBOOK.md").read_text()


@pytest.mark.slow
def test_persistent_divergence_escalates_then_stops_for_a_human(tiny_config, tmp_path):
    cfg = drill_config(tiny_config, tmp_path, supervisor__drill="spike@30x2!")
    config_file = tmp_path / "persist.toml"
    config_file.write_text(to_toml(cfg))
    result = run_cli("train", str(config_file))
    assert result.returncode == 3
    assert result.stderr.startswith("error: supervisor stopped for a human after loss_spike")
    assert "resumable from" in result.stderr
    events = read_events(cfg.logbook_dir / "events.jsonl")
    # The ladder, its last rung repeated, until more than max_interventions stop the run.
    ladder, limit = cfg.supervisor.ladder, cfg.supervisor.max_interventions
    expected = [*ladder, *[ladder[-1]] * (limit - len(ladder))]
    assert [e.action for e in interventions(events)] == expected
    assert "more than 10 interventions" in events[-2].reason
    assert events[-2].kind == "stop_for_human" and events[-1].kind == "run_stop"
    assert events[-2].valid_before is not None
    skipped = next(e for e in interventions(events) if e.skipped_data)
    # The window, from the rollback target on, to skip_data_ahead steps after the anomaly.
    assert skipped.skipped_steps == (26, 30 + cfg.supervisor.skip_data_ahead)
    # Left resumable: the healthy checkpoint is still there and complete.
    from opt.checkpoint import latest_checkpoint, verify_checkpoint

    verify_checkpoint(latest_checkpoint(cfg.checkpoint_dir))


@pytest.mark.slow
def test_normal_training_raises_no_false_alarm(tiny_config, tmp_path):
    cfg = drill_config(tiny_config, tmp_path, train__max_steps=120, model__dropout=0.1)
    Trainer(cfg).fit()
    kinds = [e.kind for e in read_events(cfg.logbook_dir / "events.jsonl")]
    assert kinds == ["run_start", "run_stop"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "layout", [["--parallel.tp", "2"], ["--parallel.dp_shard", "2"]], ids=["tp2", "dp2"]
)
@pytest.mark.slow
def test_every_rank_takes_the_same_action(layout, tiny_config, tmp_path):
    cfg = drill_config(tiny_config, tmp_path, supervisor__drill="spike@30x2")
    config_file = tmp_path / "drill.toml"
    config_file.write_text(to_toml(cfg))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(REPO / "tests" / "parallel_worker.py"), str(tmp_path), "fit", str(config_file),
         "--parallel.timeout_s", "60", *layout],
        cwd=REPO, capture_output=True, text=True, timeout=280,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"actions_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    acted = [(step, rung) for step, rung, _, _ in ranks[0] if rung]
    assert acted == [(30, "skip"), (31, "rollback+lower_lr_clip")]
    finals = [json.loads((tmp_path / f"final_rank{r}.json").read_text()) for r in (0, 1)]
    assert finals[0] == finals[1] == [60, 0.5, pytest.approx(0.6), False]


def test_the_logbook_survives_kill_9_mid_append(tmp_path):
    writer = (
        "import sys\nfrom opt.run.logbook import Logbook\nfrom opt.run.logbook.events import Note\n"
        "book = Logbook(sys.argv[1], 'crash')\n"
        "for i in range(100000):\n    book.append(Note(step=i, text='x' * 500))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", writer, str(tmp_path)], env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    events_file = tmp_path / "crash" / "events.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (
        not events_file.exists() or events_file.stat().st_size < 20000
    ):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    raw = events_file.read_bytes()
    assert raw.endswith(b"\n")  # no torn line
    events = read_events(events_file)
    assert len(events) == raw.count(b"\n") > 10
    assert [e.step for e in events] == list(range(len(events)))
    book = Logbook(tmp_path, "crash")
    book.append(Note(step=len(events), text="after the crash"))
    assert len(book.events()) == len(events) + 1
    table_rows = (tmp_path / "crash" / "LOGBOOK.md").read_text().count("\n| ") - 2  # header
    assert table_rows == len(events) + 1


def test_secrets_never_reach_the_logbook(tiny_config, tmp_path, monkeypatch):
    token, password = "hf_" + "a1b2c3d4" * 4, "correct-horse-battery"
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("DB_PASSWORD", password)
    cfg = drill_config(tiny_config, tmp_path, train__max_steps=2)
    Trainer(cfg).fit()
    book = Logbook(cfg.logbook.dir, cfg.run.name)
    book.append(Note(text=f"used {token} and {password}; curl https://bob:pa55word@host/x",
                     extra={"api_key": "sk-" + "z" * 30}, tokens=123))  # fmt: skip
    for name in ("events.jsonl", "LOGBOOK.md", "series.jsonl", "config.toml"):
        text = (cfg.logbook_dir / name).read_text()
        for secret in (token, password, "pa55word", "z" * 30):
            assert secret not in text, (name, secret)
    note = book.events()[-1]
    assert note.tokens == 123 and note.extra["api_key"] == "[redacted]"
    assert redact({"tokenizer": "gpt2"}) == {"tokenizer": "gpt2"}


def test_kill_switch_and_manual_intervention(tiny_config, tmp_path):
    cfg = drill_config(tiny_config, tmp_path, train__max_steps=6)
    Trainer(cfg).fit()
    result = run_cli("intervene", cfg.run.name, "--runs-dir", cfg.run.dir, "--lr-scale", "0.5",
                     "--clip", "0.3", "--skip-steps", "8-9", "--reason", "drill")  # fmt: skip
    assert result.returncode == 0, result.stderr
    (cfg.run_dir / "STOP").touch()
    trainer = Trainer(drill_config(tiny_config, tmp_path, train__max_steps=20))
    trainer.fit()
    # The kill switch stopped the run at the first step after the resume, with a checkpoint.
    assert trainer.step == 7 and trainer.stop.reason.startswith("kill switch")
    assert (cfg.checkpoint_dir / "step_00000007").is_dir()
    assert (trainer.factors.lr_scale, trainer.factors.grad_clip) == (0.5, 0.3)
    saved = torch.load(cfg.checkpoint_dir / "step_00000007" / "trainer.pt", weights_only=True)
    assert saved["factors"] == {"lr_scale": 0.5, "grad_clip": 0.3}
    events = read_events(cfg.logbook_dir / "events.jsonl")
    manual = next(e for e in events if e.kind == "manual_intervention")
    assert manual.reason == "drill" and manual.skipped_steps == (8, 9)
    assert manual.after.lr_scale == 0.5
    # Evaluated when the resumed run started (step 6), and again once the request applied.
    assert (manual.valid_before.step, manual.valid_after.step) == (6, 7)
    per_step = trainer.loader.samples_per_step(trainer.grad_accum)
    assert manual.skipped_data == (7 * per_step, 9 * per_step)
    assert [e.kind for e in events][-3:] == ["manual_intervention", "intervention", "run_stop"]
    assert (cfg.run_dir / "STOP.consumed").exists() and not (cfg.run_dir / "STOP").exists()


@pytest.mark.slow
def test_logbook_commands_note_show_summary_render(tiny_config, tmp_path):
    cfg = drill_config(tiny_config, tmp_path, supervisor__drill="spike@30x2",
                       metrics__log_every=1)  # fmt: skip
    Trainer(cfg).fit()
    root, run = cfg.logbook.dir, cfg.run.name
    note = run_cli("logbook", "note", run, "checked the spike", "--step", "40", "--dir", root)
    assert note.returncode == 0, note.stderr
    show = run_cli("logbook", "show", run, "--dir", root)
    assert "rollback+lower_lr_clip" in show.stdout and "note: checked the spike" in show.stdout
    summary = run_cli("logbook", "summary", run, "--dir", root, "--json")
    data = json.loads(summary.stdout)
    assert data["by_action"] == {"skip": 1, "rollback+lower_lr_clip": 1}
    assert data["tokens_lost_to_rollbacks"] == 6 * cfg.train.batch_tokens
    assert data["current"] == {"lr_scale": 0.5, "grad_clip": pytest.approx(0.6)}
    # The series holds what the run did: steps 26-31 twice, the first time abandoned by the
    # rollback at 31 to step 25 (step 31 itself, the anomaly that caused it, with the
    # factors it ran with), with the factors lowered from then on.
    points = read_series(cfg.logbook_dir / "series.jsonl")
    assert [p.step for p in points] == [*range(1, 32), *range(26, 61)]
    h = history(points)
    assert [p.step for p in h.kept] == list(range(1, 61))
    assert [[p.step for p in branch] for branch in h.abandoned] == [list(range(25, 32))]
    assert points[29].loss > 3 * points[28].loss  # the spike, logged before the rollback
    assert points[30].loss > 3 * points[28].loss and points[30].lr_scale == 1.0
    assert all(p.lr_scale == 0.5 and p.grad_clip == pytest.approx(0.6) for p in points[31:])
    # The report is drawn from the logbook alone: the private run directory is gone.
    shutil.rmtree(cfg.run_dir)
    render = run_cli("logbook", "render", run, "--dir", root)
    assert render.returncode == 0, render.stderr
    page = (cfg.logbook_dir / "report.html").read_text()
    import xml.etree.ElementTree as ET

    svg = page[page.index("<svg") : page.index("</svg>") + 6]
    ids = {el.get("id") for el in ET.fromstring(svg).iter()}  # well-formed
    assert {"train-loss", "abandoned-1", "lr-scale", "grad-clip"} <= ids
    assert {i for i in ids if i and re.fullmatch(r"mark-\d+", i)} == {"mark-1", "mark-2",
                                                                      "mark-3"}  # fmt: skip
    assert "[run]" in page and "checked the spike" in page and "**" not in page
    missing = run_cli("logbook", "show", "nope", "--dir", root)
    assert missing.returncode == 2 and missing.stderr.startswith("error: no logbook")


def test_a_loss_scale_collapse_is_detected_in_fp16(tiny_config, tmp_path):
    cfg = drill_config(
        tiny_config, tmp_path, train__precision="fp16", train__max_steps=12,
        supervisor__drill="scale_collapse@10",
    )  # fmt: skip
    results = Trainer(cfg).fit()
    acted = [
        (r.step, r.decision.rung, r.decision.anomaly.detector) for r in results if r.decision.rung
    ]
    assert acted[0] == (10, "skip", "loss_scale_collapse")
    (event, *_) = interventions(read_events(cfg.logbook_dir / "events.jsonl"))
    assert event.numbers["loss_scale"] == cfg.loss_scale.min_scale


def test_config_changes_and_resumes_are_logged(tiny_config, tmp_path):
    Trainer(drill_config(tiny_config, tmp_path, train__max_steps=5)).fit()
    cfg = drill_config(tiny_config, tmp_path, train__max_steps=8, optim__lr=5e-4)
    Trainer(cfg).fit()
    events = read_events(cfg.logbook_dir / "events.jsonl")
    assert [e.kind for e in events] == [
        "run_start", "run_stop", "config_change", "run_start", "run_stop",
    ]  # fmt: skip
    assert events[2].changes["optim.lr"] == (1e-3, 5e-4)
    assert events[2].changes["train.max_steps"] == (5, 8)
    assert events[3].reason == "resumed" and events[3].checkpoint.endswith("step_00000005")


def test_too_many_interventions_stop_the_run(tiny_config, tmp_path):
    cfg = drill_config(
        tiny_config, tmp_path, supervisor__drill="nan@10x4", supervisor__max_interventions=2,
        supervisor__ladder=["skip"],
    )  # fmt: skip
    trainer = Trainer(cfg)
    trainer.fit()
    assert trainer.stop.human_needed and trainer.step == 12
    assert "more than 2 interventions" in trainer.stop.reason


@pytest.mark.slow
def test_a_job_killed_in_the_middle_of_a_rollback_finishes_it_on_restart(tiny_config, tmp_path):
    cfg = drill_config(tiny_config, tmp_path, supervisor__drill="spike@30x2")
    config_file = tmp_path / "killed.toml"
    config_file.write_text(to_toml(cfg))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OPT_INJECT_FAULT": "0:rollback:die"}
    killed = subprocess.run(
        [sys.executable, "-m", "opt", "train", str(config_file)],
        cwd=REPO, capture_output=True, text=True, timeout=240, env=env,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL
    events = read_events(cfg.logbook_dir / "events.jsonl")
    assert events[-1].kind == "intervention" and events[-1].rolled_back_to_step == 25
    assert events[-1].valid_after.step == 25  # evaluated before the line was written
    from opt.checkpoint import list_checkpoints

    # The untrusted step-30 checkpoint is gone from view; the target is complete.
    assert [p.name for p in list_checkpoints(cfg.checkpoint_dir)] == ["step_00000025"]
    resumed = run_cli("train", str(config_file))
    assert resumed.returncode == 0, resumed.stderr
    events = read_events(cfg.logbook_dir / "events.jsonl")
    kinds = [e.kind for e in events]
    assert kinds.count("intervention") == 2  # no second rollback after the restart
    finished = next(e for e in events if e.kind == "intervention_completed_after_restart")
    assert finished.after.lr_scale == 0.5 and finished.step == 25
    state = torch.load(cfg.checkpoint_dir / "step_00000060" / "trainer.pt", weights_only=True)
    assert (state["factors"]["lr_scale"], state["factors"]["grad_clip"]) == (
        0.5,
        pytest.approx(0.6),
    )
    assert not list(cfg.checkpoint_dir.glob(".*"))  # the hidden discarded one, cleaned up
