"""Trainer behaviour: exact resume, accumulation, schedule, precisions, metrics."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from opt.checkpoint import list_checkpoints
from opt.config import load_config
from opt.errors import OptError
from opt.run.logbook.series import read_series
from opt.train.optim import LinearWarmupDecay
from opt.train.trainer import Trainer


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_resume_reproduces_uninterrupted_run_bitwise(tiny_config, tmp_path):
    """Stop after 4 steps, resume in a new Trainer, and match a run that never stopped."""
    straight = Trainer(tiny_config(train__max_steps=8, checkpoint__every=100, run__name="a"))
    straight_losses = [r.loss for r in straight.fit()]

    first = Trainer(tiny_config(train__max_steps=4, checkpoint__every=4, run__name="b"))
    first_losses = [r.loss for r in first.fit()]
    # A new process would build everything again: so does a new Trainer.
    second = Trainer(tiny_config(train__max_steps=8, checkpoint__every=100, run__name="b"))
    second_losses = [r.loss for r in second.fit()]

    assert first_losses + second_losses == straight_losses  # exact, not approximate
    resumed, reference = _params(second), _params(straight)
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    assert second.loader.state_dict() == straight.loader.state_dict()


def test_dropout_is_active_and_its_rng_is_restored(tiny_config):
    """With dropout on, equal losses after resume prove the RNG state came back too."""
    cfg = dict(model__dropout=0.3, run__name="d")
    straight = [r.loss for r in Trainer(tiny_config(train__max_steps=4, **cfg)).fit()]
    cfg["run__name"] = "e"
    Trainer(tiny_config(train__max_steps=2, checkpoint__every=2, **cfg)).fit()
    resumed = [r.loss for r in Trainer(tiny_config(train__max_steps=4, **cfg)).fit()]
    no_dropout = [r.loss for r in Trainer(tiny_config(train__max_steps=4, run__name="f")).fit()]
    assert resumed == straight[2:]
    assert straight != no_dropout


def test_gradient_accumulation_matches_one_large_batch(tiny_config):
    """2 x 4 sequences accumulated give the gradient of one batch of 8 (to fp32 rounding)."""
    common = dict(model__dropout=0.0, optim__grad_clip=0.0)  # dropout masks differ per pass
    accumulated = Trainer(tiny_config(train__micro_batch_size=4, run__name="acc", **common))
    single = Trainer(tiny_config(train__micro_batch_size=8, run__name="one", **common))
    assert (accumulated.grad_accum, single.grad_accum) == (2, 1)
    results = [trainer.train_step() for trainer in (accumulated, single)]  # same seed, same init
    assert results[0].loss == pytest.approx(results[1].loss, rel=1e-6)
    for (name, a), b in zip(
        accumulated.model.named_parameters(), single.model.parameters(), strict=True
    ):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_checkpoints_hold_every_piece_of_state_and_are_pruned(tiny_config):
    trainer = Trainer(tiny_config(train__max_steps=6, checkpoint__every=2, checkpoint__keep_last=2))
    trainer.fit()
    kept = list_checkpoints(trainer.cfg.checkpoint_dir)
    # The newest 2, and step 0 (saved for the supervisor): at step 6 it is still the only
    # checkpoint old enough (healthy_margin 5) to be a rollback target, so it is protected.
    assert [p.name for p in kept] == ["step_00000000", "step_00000004", "step_00000006"]
    state = torch.load(kept[-1] / "trainer.pt", weights_only=True)
    assert state["progress"] == {"step": 6, "tokens_seen": 6 * 256}
    assert state["data"]["pos"] == 6 * 8  # 8 sequences per step, none repeated or dropped
    assert {"loss_scaler", "factors", "supervisor"} <= state.keys()
    assert state["factors"] == {"lr_scale": 1.0, "grad_clip": 1.0}
    assert (kept[-1] / "rng_rank00000.pt").is_file()
    assert (kept[-1] / "config.toml").is_file() and (kept[-1] / "tokenizer.json").is_file()
    assert (trainer.cfg.run_dir / "config.toml").is_file()


def test_resolved_config_reloads_to_the_same_tree(tiny_config):
    trainer = Trainer(tiny_config(train__max_steps=1))
    trainer.fit()
    reloaded = load_config(trainer.cfg.run_dir / "config.toml")
    assert reloaded == trainer.cfg


def test_schedule_warms_up_then_decays_to_ten_percent():
    from opt.config import ScheduleConfig

    cfg = ScheduleConfig(warmup_tokens=1000, decay_tokens=10_000, min_lr_ratio=0.1)
    lr = LinearWarmupDecay(1.0, cfg, batch_tokens=100)  # 10 warmup steps, decay to step 100
    assert lr(0) == pytest.approx(0.1)
    assert lr(9) == pytest.approx(1.0)
    assert lr(10) == pytest.approx(1.0)
    assert lr(55) == pytest.approx(1.0 - 0.9 * 45 / 90)
    assert lr(100) == pytest.approx(0.1) and lr(1000) == pytest.approx(0.1)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_reports_loss_scale(tiny_config, precision):
    trainer = Trainer(tiny_config(train__precision=precision, train__max_steps=6, optim__lr=3e-3))
    results = trainer.fit()
    assert all(math.isfinite(r.loss) for r in results)
    assert results[-1].loss < results[0].loss
    expected_scale = trainer.cfg.loss_scale.init_scale if precision == "fp16" else 1.0
    assert results[0].loss_scale == expected_scale
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # fp32 master


def test_fp16_overflow_skips_the_step_and_halves_the_scale(tiny_config):
    trainer = Trainer(tiny_config(train__precision="fp16", loss_scale__init_scale=2.0**80))
    before = _params(trainer)
    result = trainer.train_step()
    assert result.skipped and not math.isfinite(result.grad_norm)
    assert trainer.scaler.scale == 2.0**79
    after = _params(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_gradients_are_clipped_to_the_threshold(tiny_config):
    trainer = Trainer(tiny_config(optim__grad_clip=1e-3))
    trainer.model.train()
    result = trainer.train_step()
    assert result.grad_norm > 1e-3  # the reported norm is the one before clipping
    norm = torch.nn.utils.get_total_norm([p.grad for p in trainer.model.parameters()])
    assert float(norm) == pytest.approx(1e-3, rel=1e-3)


def test_tensorboard_event_files_hold_the_logged_scalars(tiny_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = Trainer(tiny_config(metrics__tensorboard=True, train__max_steps=3))
    trainer.fit()
    events = EventAccumulator(str(trainer.cfg.run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/grad_norm", "train/lr", "train/loss_scale"} <= tags
    assert {"train/tokens_per_s", "train/mfu"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]


def test_the_logbook_series_holds_every_logged_step_and_a_resume_appends(tiny_config):
    """Rank 0 writes each logged step into the logbook; a run resumed from an older
    checkpoint (the newest one lost) appends the steps it trains again."""
    cfg = tiny_config(train__max_steps=4, checkpoint__every=2, checkpoint__keep_last=0,
                      metrics__log_every=2, run__name="s")  # fmt: skip
    first = Trainer(cfg).fit()
    shutil.rmtree(cfg.checkpoint_dir / "step_00000004")  # lost: the resume starts at 2
    second = Trainer(cfg.with_overrides({"train.max_steps": 6})).fit()
    points = read_series(cfg.logbook_dir / "series.jsonl")
    logged = [first[1], first[3], second[1], second[3]]
    assert [p.step for p in points] == [2, 4, 4, 6] == [r.step for r in logged]
    assert [p.tokens for p in points] == [s * cfg.train.batch_tokens for s in (2, 4, 4, 6)]
    assert [(p.loss, p.lr, p.loss_scale) for p in points] == [
        (r.loss, r.lr, r.loss_scale) for r in logged
    ]  # exact: the values the trainer logged
    assert {(p.lr_scale, p.grad_clip, p.val_loss) for p in points} == {
        (1.0, cfg.optim.grad_clip, None)
    }
    # The logbook also carries the resolved config, as the run directory has it.
    assert (cfg.logbook_dir / "config.toml").read_text() == (
        cfg.run_dir / "config.toml"
    ).read_text()


def test_resume_refuses_a_checkpoint_of_another_shape(tiny_config):
    Trainer(tiny_config(train__max_steps=1, checkpoint__every=1)).fit()
    with pytest.raises(OptError, match="different model shape"):
        Trainer(tiny_config(train__max_steps=2, model__n_layers=3)).fit()


def test_batch_that_does_not_divide_is_refused(tiny_config):
    with pytest.raises(OptError, match="not a multiple"):
        Trainer(tiny_config(train__batch_tokens=300))
