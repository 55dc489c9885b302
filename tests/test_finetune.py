"""Multitask prompted fine-tuning through the trainer (`opt finetune`, [finetune]): the
loss is the mean over every answer token of the global batch, a run resumed in a new
process equals an uninterrupted one bitwise (CPU, fp32), the data-parallel and
tensor-parallel layouts equal one process, and a mixture that leaks a held-out cluster is
refused with one line before anything starts. The mixture is the project's made-up one
(tests/data/finetune); the pretrained weights are a tiny run trained here."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, metrics_losses, run_cli, train_tiny_checkpoint

from opt.config import to_toml
from opt.finetune.stream import IGNORE_INDEX

MIXTURE = REPO / "tests" / "data" / "finetune" / "mixture.toml"
SEQ_LEN = 96
FINETUNE = {
    "finetune__mixture": str(MIXTURE),
    "data__seq_len": SEQ_LEN,
    "train__batch_tokens": SEQ_LEN * 8,  # 8 rows a step
    "train__micro_batch_size": 2,  # 4 micro-batches on one process, 2 per rank on two
    "data__prefetch": False,
    "schedule__warmup_tokens": SEQ_LEN * 8 * 2,
    "metrics__log_every": 1,
}


def _tokenizer(pydoc_dataset: Path) -> str:
    return str(pydoc_dataset.parent / "tokenizer.json")


def test_the_loss_is_the_mean_over_every_answer_token_of_the_step(tiny_config, pydoc_dataset):
    """Packed rows hold unequal numbers of answer tokens, so the mean of the micro-batches'
    means is not the per-token mean; the trainer's weighting gives the per-token mean."""
    from opt.train.trainer import Trainer

    cfg = tiny_config(**FINETUNE, data__tokenizer=_tokenizer(pydoc_dataset),
                      model__dropout=0.0, checkpoint__resume="none")  # fmt: skip
    trainer = Trainer(cfg)
    probe = copy.copy(trainer.loader)
    probe.stream = trainer.loader.stream.copy()
    batches = probe.next_microbatches(trainer.grad_accum)
    sums, counts = [], []
    with torch.no_grad():
        for b in batches:
            logits = trainer.model(b.tokens, positions=b.positions, segments=b.segments)
            losses = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), b.targets.flatten(), reduction="none"
            )
            sums.append(float(losses[b.targets.flatten() != IGNORE_INDEX].double().sum()))
            counts.append(int((b.targets != IGNORE_INDEX).sum()))
    assert counts == [b.loss_tokens for b in batches] and sum(counts) == batches[0].step_loss_tokens
    per_token = sum(sums) / sum(counts)
    mean_of_means = sum(s / c for s, c in zip(sums, counts, strict=True)) / len(sums)
    assert abs(per_token - mean_of_means) > 1e-3  # the check below can tell them apart
    result = trainer.train_step()
    assert result.loss == pytest.approx(per_token, rel=1e-6)


class Runs:
    """`opt finetune` of one config in new processes, as users run it."""

    def __init__(self, tiny_config, tmp_path: Path, init: Path, tokenizer: str):
        self.make, self.tmp, self.init, self.tokenizer = tiny_config, tmp_path, init, tokenizer

    def run(self, name: str, steps: int, *extra: str, dropout: float = 0.1, nproc: int = 1):
        cfg = self.make(**FINETUNE, run__name=name, model__dropout=dropout,
                        checkpoint__init_from=str(self.init), checkpoint__every=3,
                        checkpoint__keep_last=0, parallel__timeout_s=60.0)  # fmt: skip
        path = self.tmp / f"{name}.toml"
        path.write_text(to_toml(cfg))
        command = ["finetune"] if nproc == 1 else ["launch", "local", "--nproc", str(nproc)]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        result = subprocess.run(
            [sys.executable, "-m", "opt", *command, str(path), "--max-steps", str(steps), *extra],
            cwd=REPO, capture_output=True, text=True, timeout=400, env=env,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        return metrics_losses(self.tmp / "runs" / name)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_finetune_resumes_bitwise_and_each_layout_equals_one_process(
    tiny_config, tmp_path, pydoc_dataset
):
    init = train_tiny_checkpoint(tmp_path / "pretrain", pydoc_dataset, "pretrain")
    runs = Runs(tiny_config, tmp_path, init, _tokenizer(pydoc_dataset))
    straight = runs.run("straight", 6)
    assert sorted(straight) == list(range(1, 7))
    assert straight[6] < straight[1]  # it learns the answers

    # A stop at step 3, then the same command again: the resumed steps are the same bits
    # (dropout on: the RNG streams come back too).
    runs.run("resumed", 3)
    assert runs.run("resumed", 6) == straight

    # Layouts, dropout off (each data-parallel rank draws its own masks): two data-parallel
    # ranks, and two tensor-parallel ranks, against one process.
    alone = runs.run("alone", 4, dropout=0.0)
    for name, layout in [("dp2", ["--parallel.dp_shard", "2"]), ("tp2", ["--parallel.tp", "2"])]:
        split = runs.run(name, 4, *layout, dropout=0.0, nproc=2)
        torch.testing.assert_close(list(split.values()), list(alone.values()), rtol=0, atol=1e-5)
    # A pipeline passes hidden states only, so it trains one example per row: two stages
    # against one process, both unpacked (each micro-batch weighted by its answer tokens).
    unpacked = ["--finetune.packing", "false"]
    alone = runs.run("alone-unpacked", 4, *unpacked, dropout=0.0)
    staged = runs.run("pp2", 4, *unpacked, "--parallel.pp", "2", dropout=0.0, nproc=2)
    torch.testing.assert_close(list(staged.values()), list(alone.values()), rtol=0, atol=1e-5)


def test_a_mixture_that_leaks_a_held_out_cluster_is_refused_with_one_line(tmp_path):
    text = MIXTURE.read_text().replace('cluster = "paraphrase"', 'cluster = "nli"')
    leaking = MIXTURE.parent / "leaking-mixture.toml"  # relative paths resolve from there
    leaking.write_text(text)
    try:
        result = run_cli("finetune", "configs/finetune-demo.toml", "--finetune.mixture",
                         str(leaking), "--run.dir", str(tmp_path / "runs"),
                         "--checkpoint.dir", str(tmp_path / "ck"))  # fmt: skip
    finally:
        leaking.unlink()
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "paraphrase" in lines[0] and "nli" in lines[0] and "held out" in lines[0], lines[0]
    assert not (tmp_path / "ck").exists() and not (tmp_path / "runs").exists()


def test_opt_finetune_needs_a_mixture():
    result = run_cli("finetune", "configs/demo.toml", "--max-steps", "1")
    assert result.returncode == 2 and "needs finetune.mixture" in result.stderr


def test_the_supervisor_skips_packed_fine_tuning_data_after_a_spike(tiny_config, tmp_path,
                                                                    pydoc_dataset):  # fmt: skip
    """A packed step reads as many examples as fit, so the data a rollback skips is found by
    reading the stream from the rollback target: the positions steps first..last read."""
    from opt.run.logbook.store import read_events
    from opt.train.trainer import Trainer

    cfg = tiny_config(**FINETUNE, data__tokenizer=_tokenizer(pydoc_dataset),
                      model__dropout=0.0, train__max_steps=30, checkpoint__every=5,
                      supervisor__drill="spike@20", logbook__dir=str(tmp_path / "logbook"),
                      supervisor__ladder=["rollback+skip_data"])  # fmt: skip
    trainer = Trainer(cfg)
    probe = copy.copy(trainer.loader)
    probe.stream = trainer.loader.stream.copy()
    trainer.fit()
    [rollback] = [e for e in read_events(cfg.logbook_dir / "events.jsonl")
                  if e.kind == "intervention"]  # fmt: skip
    first, last = rollback.skipped_steps
    assert rollback.rolled_back_to_step == 15 and first == 16
    assert last == 20 + cfg.supervisor.skip_data_ahead
    # What an undisturbed stream reads in those steps, from the start of the run.
    assert tuple(rollback.skipped_data) == probe.step_positions(
        0, 0, first, last, trainer.grad_accum
    )
    assert trainer.step == 30


def test_a_rollback_to_the_starting_weights_is_not_judged_against_the_steps_it_undid(
    tiny_config, tmp_path, pydoc_dataset
):
    """The only checkpoint is step 0, the pretrained weights, whose loss on the mixture is far
    above that of the steps trained since. After rolling back there the spike history holds
    nothing of the undone steps, so the replayed steps are not spikes (they were, one
    rollback after another, until ``max_interventions`` stopped the run)."""
    from opt.run.logbook.store import read_events
    from opt.train.trainer import Trainer

    cfg = tiny_config(**FINETUNE, data__tokenizer=_tokenizer(pydoc_dataset),
                      model__dropout=0.0, train__max_steps=90, checkpoint__every=1000,
                      supervisor__drill="spike@80", logbook__dir=str(tmp_path / "logbook"),
                      supervisor__ladder=["rollback+lower_lr_clip"], optim__lr=3e-3,
                      schedule__decay_tokens=SEQ_LEN * 8 * 1000)  # fmt: skip
    trainer = Trainer(cfg)
    trainer.fit()
    interventions = [e for e in read_events(cfg.logbook_dir / "events.jsonl")
                     if e.kind == "intervention"]  # fmt: skip
    assert [(e.step, e.rolled_back_to_step) for e in interventions] == [(80, 0)]
    assert trainer.step == 90
