"""The supervisor against real divergences of the tiny model, nothing injected into the loss
or the gradients: a learning rate far too high, a block of garbage documents in the data,
and a learning rate that warms up into a slow divergence. (The fp16 loss-scale collapse, the
fourth kind, is in test_rungs.py.)

Each scenario trains three runs on the same number of steps: a healthy reference (the tiny
model's own settings), the fault without the supervisor, and the fault with its defaults.
The unsupervised run must really diverge (its final validation loss at least 20% above the
reference's), and the supervised one must end within 5% of the reference, with the
interventions that repair it in the logbook. The full-size version of this suite, on the
demo shape, is bench/divergence.py (BENCHMARKS.md).

CPU, fp32, fixed seeds: every number here is deterministic, so the verdicts cannot flicker."""

from __future__ import annotations

import random

import pytest
from helpers import metrics_valid_losses

from opt.data.corpus import builtin_documents
from opt.data.prepare import BUILTIN_SPLIT_SEED, BUILTIN_VALID_FRACTION, held_out, prepare_dataset
from opt.data.tokenizer import load_tokenizer
from opt.run.logbook import read_events
from opt.train.trainer import Trainer

pytestmark = pytest.mark.slow  # three runs of 60 to 200 steps each

DIVERGED, TARGET = 1.20, 1.05  # as in bench/divergence.py


def final_validation(cfg) -> float:
    return metrics_valid_losses(cfg.run_dir)[-1][1]


def three_runs(tiny_config, fault: dict, **common) -> tuple[float, float, float, list]:
    """Final validation losses of the reference, the unsupervised and the supervised run,
    and the supervised run's interventions."""
    common = {"checkpoint__every": 10, "checkpoint__keep_last": 3, **common}
    finals = []
    for name, overrides in (
        ("reference", {"supervisor__enabled": False}),
        ("nosup", {**fault, "supervisor__enabled": False}),
        ("supervised", fault),
    ):
        cfg = tiny_config(run__name=name, **common, **overrides)
        Trainer(cfg).fit()
        finals.append(final_validation(cfg))
    events = read_events(cfg.logbook_dir / "events.jsonl")
    interventions = [e for e in events if e.kind == "intervention"]
    assert not [e for e in events if e.kind == "stop_for_human"]
    return (*finals, interventions)


def test_a_learning_rate_far_too_high_blows_up_in_warmup_and_is_repaired(tiny_config):
    """LR 3.0 (3000x the tiny model's): the loss is far above ln V by step 2. The supervisor
    sees it at once (no history needed), rolls back to the step-0 checkpoint and halves the
    LR until the run trains."""
    ref, nosup, sup, interventions = three_runs(
        tiny_config, {"optim__lr": 3.0}, train__max_steps=60
    )
    assert nosup >= DIVERGED * ref, (ref, nosup)
    assert sup <= TARGET * ref, (ref, sup)
    first = interventions[0]
    assert first.step <= 3 and first.detector == "loss_blowup"
    rollbacks = [e for e in interventions if e.rolled_back_to_step is not None]
    assert rollbacks[0].rolled_back_to_step == 0  # the fresh run's step-0 checkpoint
    assert interventions[-1].after.lr_scale <= 0.5**3


@pytest.fixture
def poisoned(tmp_path, pydoc_dataset) -> tuple[str, int, int]:
    """The training documents in order with a block of 8 garbage documents (random tokens
    and one token repeated, as bad crawl shards hold) after about 60 steps of text; returns
    the prefix and the block's first and last token positions."""
    tokenizer = load_tokenizer(pydoc_dataset.parent / "tokenizer.json")
    documents = [
        d for i, d in enumerate(builtin_documents("pydoc"))
        if not held_out(i, BUILTIN_VALID_FRACTION, BUILTIN_SPLIT_SEED)
    ]  # fmt: skip
    rng = random.Random(0)
    vocab = [tokenizer.id_to_token(i) for i in range(100, 512)]
    garbage = [
        " ".join([vocab[7]] * 300 if i % 2 == 0 else (rng.choice(vocab) for _ in range(300)))
        for i in range(8)
    ]
    tokens, at = 0, 0
    while tokens < 60 * 256:  # 256 tokens a step
        tokens += len(tokenizer.encode(documents[at]).ids) + 1  # +1: the separator
        at += 1
    length = sum(len(tokenizer.encode(g).ids) + 1 for g in garbage)
    prefix = tmp_path / "poisoned" / "train"
    prefix.parent.mkdir()
    (prefix.parent / "tokenizer.json").write_bytes(
        (pydoc_dataset.parent / "tokenizer.json").read_bytes()
    )
    prepare_dataset(documents[:at] + garbage + documents[at:], tokenizer, prefix,
                    show_progress=False)  # fmt: skip
    return str(prefix), tokens, tokens + length


def test_a_block_of_garbage_documents_is_skipped(tiny_config, pydoc_dataset, poisoned):
    """At LR 0.1, read in order, a 30-step block of garbage at step 61 ruins the run. The
    supervisor sees the loss jump at the block, and its skip_data rungs skip every step
    that reads it; the run ends near the one that never saw it."""
    prefix, first_token, last_token = poisoned
    common = {"train__max_steps": 100, "optim__lr": 0.1, "data__shuffle": False,
              "validation__path": f"{pydoc_dataset}-valid"}  # fmt: skip
    ref, nosup, sup, interventions = three_runs(tiny_config, {"data__path": prefix}, **common)
    # At this size the block costs the unsupervised run about 13% (its validation loss
    # swings far higher on the way); the suite's 20% bar is held by bench/divergence.py.
    assert nosup >= 1.10 * ref, (ref, nosup)
    assert sup <= TARGET * ref, (ref, sup)
    # The first step that reads the block (61) spikes (LR 0.1 is steep for this shape:
    # a validation regression may come earlier too, and be rolled back).
    at_block = [e for e in interventions if e.step == 61]
    assert at_block and at_block[0].detector in ("loss_spike", "loss_blowup"), interventions
    # Every sample of the block was skipped: read in order, stream position i is sample i,
    # tokens [32 i, 32 i + 33); the ranges named in the logbook cover every sample that
    # starts in the block.
    block = (first_token // 32, (last_token - 1) // 32 + 1)
    skipped = sorted(tuple(e.skipped_data) for e in interventions if e.skipped_data)
    reach = block[0]
    for start, end in skipped:
        if start <= reach:
            reach = max(reach, end)
    assert reach >= block[1], (block, skipped)


def test_a_learning_rate_that_warms_up_too_far_diverges_slowly_and_is_rolled_back(tiny_config):
    """The LR warms up over 150 steps to 1.0 and never decays: the validation loss falls
    to its best around step 30, then creeps up over a hundred steps and more. The
    validation-regression detector rolls back to the best step's checkpoint (which
    retention kept) with a lower LR, as many times as it creeps."""
    fault = {"optim__lr": 1.0, "schedule__warmup_tokens": 150 * 256,
             "schedule__min_lr_ratio": 1.0}  # fmt: skip
    ref, nosup, sup, interventions = three_runs(tiny_config, fault, train__max_steps=200)
    assert nosup >= DIVERGED * ref, (ref, nosup)
    assert sup <= TARGET * ref, (ref, sup)
    gradual = [e for e in interventions if e.detector == "validation_regression"]
    assert gradual
    for event in gradual:  # back to where the curve was best, not just a few steps back
        assert event.rolled_back_to_step <= event.numbers["val_best_step"]
        assert event.step - event.rolled_back_to_step > 20
