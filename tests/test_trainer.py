"""Trainer behaviour: exact resume, accumulation, schedule, precisions, metrics."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import tomllib
import torch
from helpers import metrics_valid_losses

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
    assert {(p.lr_scale, p.grad_clip) for p in points} == {(1.0, cfg.optim.grad_clip)}
    # Validation runs at every start and save (here every logged step): each point carries
    # the held-out loss that metrics.jsonl recorded for its step, by the run that trained it.
    validated = metrics_valid_losses(cfg.run_dir)
    assert [step for step, _ in validated] == [0, 2, 4, 2, 4, 6]  # each run evaluates at its start
    assert [p.val_loss for p in points] == [loss for _, loss in validated[1:3] + validated[4:]]
    # The logbook also carries the resolved config, as the run directory has it.
    public = tomllib.loads((cfg.logbook_dir / "config.toml").read_text())
    private = tomllib.loads((cfg.run_dir / "config.toml").read_text())
    assert private["parallel"]["dp_shard"] == -1  # reusable under another world size
    private["parallel"]["dp_shard"] = 1  # the public copy says what -1 stood for
    assert public == private


def test_resume_refuses_a_checkpoint_of_another_shape(tiny_config):
    Trainer(tiny_config(train__max_steps=1, checkpoint__every=1)).fit()
    with pytest.raises(OptError, match="different model shape"):
        Trainer(tiny_config(train__max_steps=2, model__n_layers=3)).fit()


def test_batch_that_does_not_divide_is_refused(tiny_config):
    with pytest.raises(OptError, match="not a multiple"):
        Trainer(tiny_config(train__batch_tokens=300))


# ----- validation ----------------------------------------------------------------------------
def _held_out_losses(trainer: Trainer) -> tuple[float, int]:
    """The held-out loss computed here, apart from the trainer's evaluator: every token of
    the first ``n_batches`` global batches, summed in float64, by the plain model."""
    batches = trainer.evaluator.sets[0].batches
    rows = [batches.dataset.sample(i, batches.seq_len) for i in range(batches.n_batches * 8)]
    tokens = torch.from_numpy(np.stack(rows))
    model = trainer.model
    model.eval()
    with torch.no_grad():  # without targets, the chunked head returns the logits too
        logits = model(tokens[:, :-1])
    losses = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).double(), tokens[:, 1:].flatten(), reduction="sum"
    )
    model.train()
    return float(losses) / tokens[:, 1:].numel(), tokens[:, 1:].numel()


@pytest.mark.parametrize("loss_chunk", [4096, 0], ids=["fused-loss", "full-logits"])
def test_validation_loss_is_the_mean_over_every_held_out_token(tiny_config, loss_chunk):
    trainer = Trainer(tiny_config(train__loss_chunk=loss_chunk, validation__tokens=768))
    assert trainer.fused_loss is (loss_chunk > 0)
    batches = trainer.evaluator.sets[0].batches
    assert (batches.n_batches, batches.tokens) == (3, 768)  # 768 tokens: 3 batches of 256
    for _ in range(3):
        trainer.train_step()
    evaluation = trainer.validate()
    expected, tokens = _held_out_losses(trainer)
    assert (evaluation.step, evaluation.tokens) == (3, tokens)
    assert evaluation.loss == pytest.approx(expected, rel=1e-6)
    assert evaluation.ppl == pytest.approx(math.exp(expected), rel=1e-5)
    assert trainer.validate().loss == evaluation.loss  # the same sequences every time


def test_validation_changes_nothing_of_training(tiny_config):
    """Evaluating every step (dropout on: the RNG streams would show a draw) leaves the
    losses, the weights, the data position and the RNG as a run that never evaluates."""
    common = dict(model__dropout=0.3, train__max_steps=6, checkpoint__every=3)
    # Built and run one after the other: building seeds the process's RNG.
    every = Trainer(tiny_config(validation__every=1, run__name="every", **common))
    every_losses = [r.loss for r in every.fit()]
    every_rng = torch.get_rng_state()
    never = Trainer(tiny_config(validation__enabled=False, run__name="never", **common))
    assert never.evaluator is None
    assert every_losses == [r.loss for r in never.fit()]
    assert torch.equal(every_rng, torch.get_rng_state())
    assert every.evaluator.last.step == 6
    ours, theirs = _params(every), _params(never)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert every.loader.state_dict() == never.loader.state_dict()
    assert all(part.training for part in every.model_parts)


def test_validation_goes_to_the_console_metrics_tensorboard_and_status(tiny_config, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(metrics__tensorboard=True, train__max_steps=5, checkpoint__every=3,
                      validation__every=2)  # fmt: skip
    trainer = Trainer(cfg)
    trainer.fit()
    out = capsys.readouterr().out
    assert f"validation: 1,024 tokens (4 batch(es)) of {cfg.data.path}-valid every 2 steps" in out
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    valid = [row for row in rows if "val_loss" in row]
    # At the start, every 2 steps, at the step-3 save and at the last step (saved too).
    assert [row["step"] for row in valid] == [0, 2, 3, 4, 5]
    for row in valid:
        assert row["val_ppl"] == pytest.approx(math.exp(row["val_loss"]))
        assert row["val_tokens"] == 1024 and "loss" not in row
        line = f"step {row['step']:>7d} | val_loss {row['val_loss']:.4f} | "
        assert line in out
    assert valid[-1]["val_loss"] < valid[0]["val_loss"]  # it learns
    events = EventAccumulator(str(cfg.run_dir / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("valid/loss")] == [
        (row["step"], pytest.approx(row["val_loss"])) for row in valid
    ]
    assert [e.step for e in events.Scalars("valid/ppl")] == [0, 2, 3, 4, 5]
    status = json.loads((cfg.run_dir / "status.json").read_text())
    assert (status["valid_step"], status["valid_loss"]) == (5, valid[-1]["val_loss"])
    from opt.launch.status import format_status, run_status_report

    shown = format_status(run_status_report(cfg.run.name, cfg.run.dir))
    assert f"validation: loss {valid[-1]['val_loss']:.4f} (perplexity " in shown
    assert shown.split("validation: ")[1].splitlines()[0].endswith("at step 5")


def test_without_a_held_out_set_there_is_no_validation(tiny_config, tmp_path, pydoc_dataset):
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for suffix in (".bin", ".idx", ".json"):
        shutil.copy(f"{pydoc_dataset}{suffix}", bare / f"train{suffix}")
    shutil.copy(pydoc_dataset.parent / "tokenizer.json", bare)
    trainer = Trainer(tiny_config(data__path=str(bare / "train")))
    assert trainer.evaluator is None and trainer.validate() is None
    assert trainer.validation_plan.startswith("validation: off: no held-out set at")
    with pytest.raises(OptError, match="dataset not found"):  # named, it must be there
        Trainer(tiny_config(data__path=str(bare / "train"), validation__path=str(bare / "v")))
    # Named explicitly, another set serves: here the training set itself.
    named = Trainer(tiny_config(validation__path=str(pydoc_dataset)))
    assert named.evaluator.sets[0].batches.dataset.prefix == pydoc_dataset


def test_a_held_out_set_that_does_not_belong_is_refused(tiny_config, tmp_path, pydoc_dataset):
    import shutil

    from opt.data.prepare import prepare_dataset
    from opt.data.tokenizer import load_tokenizer, train_tokenizer

    other = tmp_path / "other"
    other.mkdir()
    for suffix in (".bin", ".idx", ".json"):
        shutil.copy(f"{pydoc_dataset}{suffix}", other / f"train{suffix}")
    docs = ["some text that was never in the corpus " * 40] * 20
    # A held-out set split from another version of the training set.
    prepare_dataset(docs, load_tokenizer(pydoc_dataset.parent), other / "x", show_progress=False,
                    valid_fraction=0.5)  # fmt: skip
    for suffix in (".bin", ".idx", ".json"):
        shutil.move(other / f"x-valid{suffix}", other / f"train-valid{suffix}")
    with pytest.raises(OptError, match="split from another version of"):
        Trainer(tiny_config(data__path=str(other / "train")))
    # One tokenized with another vocabulary.
    prepare_dataset(docs, train_tokenizer(docs, 300), other / "y", show_progress=False)
    with pytest.raises(OptError, match="tokenized with another vocabulary"):
        Trainer(tiny_config(validation__path=str(other / "y")))
    # Named, a held-out set too small for one global batch is refused; derived, it is unused.
    big_batch = {"train__batch_tokens": 256 * 64, "train__micro_batch_size": 64}
    with pytest.raises(OptError, match="less than one global batch"):
        Trainer(tiny_config(validation__path=str(other / "x"), **big_batch))
    prepare_dataset(docs[:4], load_tokenizer(pydoc_dataset.parent), other / "z",
                    show_progress=False, valid_fraction=0.3)  # fmt: skip
    trainer = Trainer(tiny_config(data__path=str(other / "z"), **big_batch))
    assert trainer.evaluator is None
    assert "holds less than one global batch (16,384 tokens)" in trainer.validation_plan
