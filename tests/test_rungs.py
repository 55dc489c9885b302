"""Every rung of the supervisor's ladder proven by what it does to the run, not by its log
line: after a rollback the run is the target checkpoint's, bitwise; lower_lr_clip changes
the LR and the clip the optimizer uses; skip_data removes exactly the logged samples from
the stream; reset_optimizer zeroes AdamW's moments and re-warms the LR. And the detectors
that no drill can reach: the overflow count of loss_scale_collapse in a real fp16 run, and
grad_norm_explosion after a real jump of the learning rate.

A nan drill at step 11 triggers each rung (the rung under test is the ladder's only one):
with a checkpoint every 5 steps and the default margin of 5, every rollback goes back to
step 5, and the run trains on to step 12. The runs are the tiny model's, with dropout, so
the RNG streams matter; each rung's run is trained once and shared by its tests."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from helpers import TINY_OVERRIDES

from opt.config import load_config
from opt.data.sampler import SampleStream
from opt.run.logbook import read_events
from opt.train.optim import build_optimizer
from opt.train.trainer import StepResult, Trainer

ANOMALY, TARGET, MAX_STEPS = 11, 5, 12
RUN = {
    "train__max_steps": MAX_STEPS,
    "checkpoint__every": 5,
    "checkpoint__keep_last": 0,  # the target stays for a fresh trainer to load
    "model__dropout": 0.1,
    "metrics__log_every": 100,
}
# What the rung tests look at: a clip the gradients exceed before and after it is lowered,
# three steps of data to skip up to the anomaly and one after it, four steps of re-warmup.
RUNGS = {
    **RUN,
    "optim__grad_clip": 0.5,
    "supervisor__skip_data_steps": 3,
    "supervisor__skip_data_ahead": 1,
    "supervisor__rewarmup_steps": 4,
}
ROLLBACK_RUNGS = (
    "rollback",
    "rollback+lower_lr_clip",
    "rollback+lower_lr_clip+skip_data",
    "rollback+reset_optimizer",
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, pydoc_dataset):
    """``runs(rung)``: the run with ``rung`` as the ladder's only rung and a nan drill at
    ANOMALY, trained on first use; ``runs(None, **overrides)``: a new, untrained trainer
    of the same run without the drill (its own run directory)."""
    root = tmp_path_factory.mktemp("rungs")
    trained: dict[str, Watched] = {}
    fresh = itertools.count()

    def config(name: str, **overrides):
        values = {
            **TINY_OVERRIDES,
            "data.path": str(pydoc_dataset),
            "run.name": name,
            "run.dir": str(root / "runs"),
            "checkpoint.dir": str(root / "checkpoints"),
            "logbook.dir": str(root / "logbook"),
            **{k.replace("__", "."): v for k, v in {**RUNGS, **overrides}.items()},
        }
        return load_config(None, values=values)

    def run(rung: str | None, **overrides) -> Watched:
        if rung is None:
            return Watched(config(f"fresh-{next(fresh)}", **overrides))
        if rung not in trained:
            ladder = {"supervisor__ladder": [rung], "supervisor__drill": f"nan@{ANOMALY}"}
            trained[rung] = Watched(config(rung.replace("+", "-"), **ladder))
            trained[rung].fit()
        return trained[rung]

    return run


class Reading:
    """The trainer's loader, recording the rows (input and last target token: the whole
    sample) of every step it hands out; everything else passes through."""

    def __init__(self, loader):
        self.loader = loader
        self.read: list[torch.Tensor] = []

    def next_microbatches(self, grad_accum: int):
        batches = self.loader.next_microbatches(grad_accum)
        self.read.append(torch.cat([torch.cat([i, t[:, -1:]], dim=1) for i, t in batches]))
        return batches

    def __getattr__(self, name: str):
        return getattr(self.__dict__["loader"], name)


class Seen:
    """One step as the optimizer saw it: its result, the LR of every param group, the
    gradients it used (after clipping), and the state it left."""

    def __init__(self, trainer: Trainer, result: StepResult):
        self.result = result
        self.lrs = [g["lr"] for opt in trainer.optimizers for g in opt.param_groups]
        grads = [p.grad for p in trainer.model.parameters()]
        self.grads = [g.clone() for g in grads]
        self.used_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()
        self.after = state_of(trainer)


class Watched(Trainer):
    """A trainer that records each step it takes and its state after each rollback."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.loader = Reading(self.loader)
        self.seen: list[Seen] = []
        self.rolled_back: list[dict] = []

    def train_step(self) -> StepResult:
        result = super().train_step()
        self.seen.append(Seen(self, result))
        return result

    def _act_on(self, result: StepResult) -> None:
        super()._act_on(result)
        if self.step < result.step:
            self.rolled_back.append(state_of(self))

    def fit(self) -> list[StepResult]:
        try:
            return super().fit()
        finally:
            if hasattr(self.loader.loader, "close"):
                self.loader.loader.close()  # the prefetching thread

    def after_rollback(self) -> list[Seen]:
        """The steps taken after the (one) rollback."""
        starts = [i for i, s in enumerate(self.seen) if s.result.step == TARGET + 1]
        assert len(starts) == 2, [s.result.step for s in self.seen]
        return self.seen[starts[-1] :]


def state_of(trainer: Trainer) -> dict:
    """Everything a rollback restores, and the factors it may lower, as copies."""
    return {
        "model": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
        "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
        "data": trainer.loader.state_dict(),
        "rng": torch.get_rng_state(),
        "progress": trainer.progress.state_dict(),
        "loss_scaler": trainer.scaler.state_dict(),
        "factors": trainer.factors.state_dict(),
    }


def assert_same(a, b, where: str = "") -> None:
    """Equal, bitwise for tensors, naming the first difference."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, a.keys(), b.keys())
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def fresh_from_target(runs, rolled: Watched) -> Watched:
    """A new trainer (its own run) that resumes from the rollback's target checkpoint,
    restored."""
    target = rolled.cfg.checkpoint_dir / f"step_{TARGET:08d}"
    fresh = runs(None, checkpoint__resume=str(target))
    assert fresh.restore() == target
    return fresh


def rollback_event(cfg):
    (event,) = [
        e for e in read_events(cfg.logbook_dir / "events.jsonl") if e.kind == "intervention"
    ]
    assert event.step == ANOMALY and event.rolled_back_to_step == TARGET
    return event


# ----- rollback: the run is the target checkpoint's -----------------------------------------
# The fast loop checks the default ladder's fullest rollback rung (its run is shared with the
# skip_data test); the others are slow.
@pytest.mark.parametrize(
    "rung",
    [r if "skip_data" in r else pytest.param(r, marks=pytest.mark.slow) for r in ROLLBACK_RUNGS],
)
def test_after_a_rollback_the_state_is_the_target_checkpoints_bitwise(runs, rung):
    """Weights, optimizer (moments, step counts, groups), data position and skips, loss
    scaler, progress and the RNG streams equal those of a fresh trainer that loads the
    target; the documented exceptions are what the rung changes on purpose (the factors it
    lowers, the samples it skips, the moments it zeroes) and the supervisor's memory."""
    rolled = runs(rung)
    cfg = rolled.cfg
    (after,) = rolled.rolled_back
    fresh = state_of(fresh_from_target(runs, rolled))
    event = rollback_event(cfg)
    expected = copy.deepcopy(fresh)
    moves = rung.split("+")
    if "lower_lr_clip" in moves:
        expected["factors"] = {
            "lr_scale": cfg.supervisor.lr_factor,
            "grad_clip": cfg.optim.grad_clip * cfg.supervisor.clip_factor,
        }
    assert (event.after.lr_scale, event.after.grad_clip) == tuple(expected["factors"].values())
    if "skip_data" in moves:
        assert event.skipped_data is not None
        expected["data"]["skips"] = [list(event.skipped_data)]
    if "reset_optimizer" in moves:
        expected["optimizer"]["state"] = {}
        assert fresh["optimizer"]["state"]  # there were moments to zero
    assert_same(after, expected, "after the rollback")


@pytest.mark.slow
def test_a_run_rolled_back_goes_on_exactly_as_one_resumed_from_the_target(runs):
    """The plain rollback changes nothing else: every later step's loss, gradient norm and
    weights are those of a run resumed from the target checkpoint, bit for bit."""
    rolled = runs("rollback")
    fresh = fresh_from_target(runs, rolled)
    fresh.fit()
    again = rolled.after_rollback()
    assert [s.result.step for s in again] == list(range(TARGET + 1, MAX_STEPS + 1))
    assert len(fresh.seen) == len(again)
    for mine, theirs in zip(again, fresh.seen, strict=True):
        step = mine.result.step
        assert (mine.result.loss, mine.result.grad_norm) == (
            theirs.result.loss,
            theirs.result.grad_norm,
        ), step
        assert_same(mine.after["model"], theirs.after["model"], f"step {step}")


# ----- lower_lr_clip ---------------------------------------------------------------------
@pytest.mark.slow
def test_lower_lr_clip_changes_the_lr_and_the_clip_the_optimizer_uses(runs):
    """The same steps before and after the rollback: the param groups' LR is the schedule's
    times the lowered scale, and the gradients the optimizer steps with are clipped to the
    lowered threshold (the clip is on: the norms are above both thresholds)."""
    trainer = runs("rollback+lower_lr_clip")
    cfg, sup = trainer.cfg, trainer.cfg.supervisor
    lr_scale, clip = sup.lr_factor, cfg.optim.grad_clip * sup.clip_factor
    first = {s.result.step: s for s in trainer.seen[:ANOMALY]}
    again = {s.result.step: s for s in trainer.after_rollback()}
    for step in range(TARGET + 1, ANOMALY):
        before, after = first[step], again[step]
        schedule = trainer.schedule(step - 1)
        assert before.lrs == [schedule * 1.0] * len(before.lrs)
        assert after.lrs == [schedule * lr_scale] * len(after.lrs)
        for seen, threshold in ((before, cfg.optim.grad_clip), (after, clip)):
            norm = seen.result.grad_norm
            assert norm > threshold, step
            assert seen.used_norm == pytest.approx(threshold * norm / (norm + 1e-6), rel=1e-5)
    # The first step after the rollback starts from the target's weights, data and RNG: the
    # same gradients, stepped with a smaller LR and clip.
    assert first[TARGET + 1].result.grad_norm == again[TARGET + 1].result.grad_norm
    assert (trainer.factors.lr_scale, trainer.factors.grad_clip) == (lr_scale, clip)


# ----- skip_data ---------------------------------------------------------------------------
def test_skip_data_removes_exactly_the_logged_samples_from_the_stream(runs):
    """The logged range is the samples the skipped steps read the first time through; after
    the rollback those, and only those, never come again: the steps read the stream from the
    target's position on, minus the range, none repeated and none lost.

    Samples are compared by their tokens (inputs and last target): the corpus holds a few
    identical samples, so tokens cannot be mapped back to one id, but a sample's id gives
    its tokens."""
    trainer = runs("rollback+lower_lr_clip+skip_data")
    cfg = trainer.cfg
    dataset, seq_len = trainer.loader.datasets[0], trainer.loader.seq_len

    def tokens(sample_id: int) -> bytes:
        return dataset.sample(sample_id, seq_len).astype("int64").tobytes()

    read = [[row.numpy().tobytes() for row in rows] for rows in trainer.loader.read]
    per_step = trainer.loader.samples_per_step(trainer.grad_accum)
    assert all(len(step) == per_step for step in read)
    stream = SampleStream(trainer.loader.stream.num_samples, seed=cfg.run.seed)
    at = stream.next_indices(per_step * (MAX_STEPS + 4))  # the id at each stream position
    assert len(set(at)) == len(at)  # one epoch: a position is its sample id
    # The first time through, step s reads positions [(s - 1) * per_step, s * per_step).
    for s in range(1, ANOMALY + 1):
        assert read[s - 1] == [tokens(i) for i in at[(s - 1) * per_step : s * per_step]], s
    event = rollback_event(cfg)
    first_skipped = ANOMALY - cfg.supervisor.skip_data_steps + 1
    last_skipped = ANOMALY + cfg.supervisor.skip_data_ahead  # a step not yet taken
    assert event.skipped_steps == (first_skipped, last_skipped)
    start, end = event.skipped_data
    assert (start, end) == ((first_skipped - 1) * per_step, last_skipped * per_step)
    after = [row for step in read[ANOMALY:] for row in step]
    assert len(read) - ANOMALY == MAX_STEPS - TARGET
    # After the rollback: every position from the target's on, in order, except the named
    # ones (those the skipped steps read, and those the step after the anomaly would have
    # read); none repeated, none lost.
    kept = [p for p in range(TARGET * per_step, len(at)) if not start <= p < end]
    assert after == [tokens(at[p]) for p in kept[: len(after)]]
    assert len(after) == (MAX_STEPS - TARGET) * per_step


# ----- reset_optimizer ---------------------------------------------------------------------
@pytest.mark.slow
def test_reset_optimizer_zeroes_the_moments_and_rewarms_the_lr(runs):
    """Right after the rollback AdamW has no state; after the next step its state and the
    weights are those of a fresh AdamW after one step from the same weights with the same
    gradients and LR; and the LR of each following step climbs back linearly over
    ``supervisor.rewarmup_steps``."""
    trainer = runs("rollback+reset_optimizer")
    cfg = trainer.cfg
    (rolled,) = trainer.rolled_back
    assert rolled["optimizer"]["state"] == {}
    first = trainer.after_rollback()[0]
    assert first.result.step == TARGET + 1 and not first.result.skipped
    model = copy.deepcopy(trainer.model)
    model.load_state_dict(rolled["model"])
    fresh = build_optimizer(model, cfg.optim)
    for param, grad in zip(model.parameters(), first.grads, strict=True):
        param.grad = grad.clone()
    for group, lr in zip(fresh.param_groups, first.lrs, strict=True):
        group["lr"] = lr
    fresh.step()
    assert_same(first.after["optimizer"]["state"], fresh.state_dict()["state"], "moments")
    assert all(s["step"].item() == 1 for s in fresh.state_dict()["state"].values())
    assert_same(first.after["model"], model.state_dict(), "weights")
    # The re-warmup: 1/4, 2/4, 3/4 of the scheduled LR, then all of it.
    warmup = cfg.supervisor.rewarmup_steps
    for seen in trainer.after_rollback():
        step = seen.result.step
        into = step - TARGET
        lr = trainer.schedule(step - 1) * 1.0 * (into / warmup if into < warmup else 1.0)
        assert seen.lrs == [lr] * len(seen.lrs), step


# ----- detectors on real trouble ----------------------------------------------------------
def test_an_fp16_loss_scale_that_keeps_overflowing_is_a_collapse(tiny_config):
    """No drill: a loss scale of 2**24 overflows the fp16 gradients step after step, the
    scaler halving it each time. The fifth overflow within the window fires
    loss_scale_collapse far above the floor; once the scale has come down, the clean steps
    that follow are healthy again and train."""
    cfg = tiny_config(**{
        **RUN, "train__precision": "fp16", "train__max_steps": 14, "checkpoint__every": 100,
        "loss_scale__init_scale": 2.0**24, "supervisor__ladder": ["skip"],
    })  # fmt: skip
    results = Watched(cfg).fit()
    overflowed = [r.step for r in results if not math.isfinite(r.grad_norm)]
    n = cfg.supervisor.scale_collapses
    assert overflowed == list(range(1, len(overflowed) + 1)) and len(overflowed) >= n
    for r in results[: n - 1]:
        assert r.skipped and r.decision.healthy  # the scaler's business, not yet a collapse
    fired = results[n - 1]
    assert fired.decision.rung == "skip"
    assert fired.decision.anomaly.detector == "loss_scale_collapse"
    numbers = fired.decision.anomaly.numbers
    assert numbers["overflows_in_window"] == n
    assert numbers["loss_scale"] == 2.0**24 / 2 ** (n - 1) > cfg.loss_scale.min_scale
    for r in results[n : len(overflowed)]:
        assert r.decision.anomaly.detector == "loss_scale_collapse"  # still overflowing
    clean = results[len(overflowed) :]
    assert clean and all(r.decision.healthy and not r.skipped for r in clean)
    assert clean[-1].loss < results[0].loss
    events = [e for e in read_events(cfg.logbook_dir / "events.jsonl") if e.kind == "intervention"]
    assert [e.step for e in events] == overflowed[n - 1 :]


@pytest.mark.slow
def test_a_learning_rate_jump_fires_grad_norm_explosion(tiny_config):
    """No drill: 21 healthy steps (the detectors armed), then the run resumed with a
    learning rate 1000 times its own. The update that follows makes the gradient norm jump
    past 10 times its median."""
    Watched(tiny_config(**{**RUN, "train__max_steps": 21, "checkpoint__every": 21})).fit()
    cfg = tiny_config(**{**RUN, "train__max_steps": 24, "checkpoint__every": 21, "optim__lr": 1.0})
    trainer = Watched(cfg)
    results = trainer.fit()
    assert results[0].step == 22 and results[0].decision.healthy  # the big update is taken
    jumped = next(r for r in results if not r.decision.healthy)
    numbers = jumped.decision.anomaly.numbers
    assert "grad_norm_explosion" in numbers["fired"]
    median = numbers["grad_norm_median"]
    assert jumped.grad_norm > cfg.supervisor.grad_norm_factor * median
    assert results[0].grad_norm < 2 * median  # the step before the jump was sane
    event = next(
        e for e in read_events(cfg.logbook_dir / "events.jsonl") if e.kind == "intervention"
    )
    assert event.step == jumped.step and "grad_norm_explosion" in event.numbers["fired"]
