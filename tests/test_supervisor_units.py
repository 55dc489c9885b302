"""The supervisor's decisions without training: detectors, the ladder, incidents and their
outcomes, drills and rollback planning. Pure functions of numbers, so each runs in
microseconds; the end-to-end tests (test_supervisor.py, test_rungs.py) show the trainer
carrying them out.

Most of it is tables: a detector case is a history of healthy steps and the flags each
following step raises; a ladder case is the decision for each step of a warmed-up
supervisor; a planning case is what a rung's rollback does. A new case is one row."""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest

from opt.config import SupervisorConfig
from opt.supervisor.detectors import NAMES, Detectors
from opt.supervisor.drills import Drill
from opt.supervisor.rollback import (
    Factors,
    plan_rollback,
    protected_step,
    rollback_limit,
    step_samples,
)
from opt.supervisor.supervisor import KILL_SWITCH_REASON, Supervisor

CFG = SupervisorConfig(window=50, min_steps=20, spike_z=6.0, spike_min_rise=0.05)
INF, NAN = math.inf, math.nan
LN_V = math.log(8192)  # the loss of predicting an 8192-token vocabulary uniformly


def warmed(cfg: SupervisorConfig = CFG, steps: int = 30) -> Supervisor:
    """A supervisor that has seen ``steps`` healthy steps of a slowly falling, noisy loss."""
    sup = Supervisor(cfg)
    for step in range(1, steps + 1):
        loss = 6.0 - 0.01 * step + 0.02 * (-1) ** step
        assert sup.inspect(step, loss, 1.0 + 0.05 * (-1) ** step, False, 1.0, False).healthy
    return sup


# ----- detectors -------------------------------------------------------------------------------
class Step(NamedTuple):
    """One step shown to the detectors, and the detectors it must fire (space-separated)."""

    step: int
    loss: float
    grad_norm: float
    fires: str = ""
    overflow: bool = False
    at_floor: bool = False
    activation_rms: float = math.nan


def flat(n: int, loss: float = 5.0, grad_norm: float = 1.0) -> list[tuple[float, float]]:
    return [(loss, grad_norm)] * n


OVERFLOWS = SupervisorConfig(window=10, scale_collapses=3)

# name: (config, healthy (loss, grad norm) history, the steps that follow, in order)
DETECTOR_CASES = {
    "the spike waits for min_steps healthy steps, the norm for norm_min_steps": (
        CFG, flat(19), [Step(20, 9.5, 1.0), Step(21, 5.0, 1e6, "grad_norm_explosion")],
    ),
    "the norm detector waits for norm_min_steps healthy steps": (
        CFG, flat(4), [Step(5, 5.0, 1e6)],
    ),
    "a blow-up above blowup_factor x ln(V) fires from the first step": (
        CFG, [], [Step(1, 9.0, 1.0), Step(2, 1.2 * LN_V + 0.01, 1.0, "loss_blowup")],
    ),
    "blowup_factor 0 turns the blow-up detector off": (
        SupervisorConfig(blowup_factor=0), [], [Step(1, 1e6, 1.0)],
    ),
    # Best median of 10: 4.855 (steps 11-20); then the last 10 climb to a median of 5.225.
    "a slow rise of the median over trend_window above its best by trend_rise": (
        SupervisorConfig(trend_window=10, trend_rise=0.05, spike_min_rise=10.0),
        [(5.0 - 0.01 * i, 1.0) for i in range(20)] + [(5.0 + 0.05 * i, 1.0) for i in range(10)],
        [Step(31, 5.0, 1.0, "slow_divergence")],
    ),
    "a rise under trend_rise, or a noisy flat curve, is no slow divergence": (
        SupervisorConfig(trend_window=10, trend_rise=0.05, spike_min_rise=10.0),
        [(5.0 - 0.01 * i, 1.0) for i in range(20)] + [(5.0 + 0.02 * (i % 3), 1.0) for i in range(30)],
        [Step(51, 5.0, 1.0)],
    ),
    "spike and norm armed at min_steps": (
        CFG, flat(20), [Step(21, 9.5, 1e6, "loss_spike grad_norm_explosion")],
    ),
    "a rise of many robust stds but under spike_min_rise is no spike": (
        CFG, [(5.0 + 0.001 * (i % 3), 1.0) for i in range(30)],  # robust std ~0.0015
        [Step(31, 5.04, 1.0), Step(32, 5.06, 1.0, "loss_spike")],
    ),
    "a rise over spike_min_rise but under spike_z robust stds is no spike": (
        CFG, [(5.0 + 0.2 * (i % 3), 1.0) for i in range(30)],  # robust std ~0.3
        [Step(31, 6.0, 1.0), Step(32, 7.5, 1.0, "loss_spike")],
    ),
    "grad_norm_explosion above grad_norm_factor times the median": (
        CFG, flat(25, grad_norm=2.0),
        [Step(26, 5.0, 19.9), Step(27, 5.0, 20.1, "grad_norm_explosion")],
    ),
    "grad_norm_factor 0 turns grad_norm_explosion off": (
        SupervisorConfig(grad_norm_factor=0), flat(25, grad_norm=2.0), [Step(26, 5.0, 1e9)],
    ),
    "non-finite values fire at once, an fp16 overflow alone does not": (
        CFG, [],
        [Step(1, NAN, 1.0, "nonfinite"), Step(2, 5.0, INF, "nonfinite"),
         Step(3, 5.0, INF, overflow=True)],  # the scaler's business
    ),
    "a non-finite value is only that, armed or not": (
        CFG, flat(20), [Step(21, NAN, 1.0, "nonfinite"), Step(22, 5.0, INF, "nonfinite")],
    ),
    "scale_collapse_count overflows within the window, or the floor": (
        OVERFLOWS, [],
        [Step(1, 5.0, INF, overflow=True), Step(5, 5.0, INF, overflow=True),
         Step(9, 5.0, INF, "loss_scale_collapse", overflow=True),
         Step(15, 5.0, INF, overflow=True),  # steps 1 and 5 have left the window
         Step(16, 5.0, 1.0, "loss_scale_collapse", at_floor=True)],
    ),
    "the clean steps after the collapse count are healthy, the next overflow is not": (
        OVERFLOWS, [],
        [Step(1, 5.0, INF, overflow=True), Step(2, 5.0, INF, overflow=True),
         Step(3, 5.0, INF, "loss_scale_collapse", overflow=True),
         Step(4, 5.0, 1.0), Step(5, 5.0, 1.0),
         Step(6, 5.0, INF, "loss_scale_collapse", overflow=True)],
    ),
    "the loss-scale floor fires without an overflow": (
        OVERFLOWS, [], [Step(1, 5.0, 1.0, "loss_scale_collapse", at_floor=True)],
    ),
    # (loss, grad norm, the last block's activation RMS): growing from 1.0 to 1.24; the
    # median of the last activation_window (10): 1.195.
    "the activations above activation_factor x their recent median, armed after min_steps": (
        CFG, [(5.0, 1.0, 1.0 + 0.01 * i) for i in range(25)],
        [Step(26, 5.0, 1.0, activation_rms=4.77), Step(27, 5.0, 1.0, "", activation_rms=NAN),
         Step(28, 5.0, 1.0, "activation_growth", activation_rms=4.79)],
    ),
    "healthy growth, 1.6x every 10 steps (ten-fold in 50), is no warning": (
        CFG, [(5.0, 1.0, 1.6 ** (i / 10)) for i in range(60)],
        [Step(61, 5.0, 1.0, activation_rms=1.6 ** 6.1)],
    ),
    "the activation detector waits for min_steps measured steps": (
        CFG, [(5.0, 1.0, 1.0)] * 19 + [(5.0, 1.0, NAN)] * 10,
        [Step(30, 5.0, 1.0, activation_rms=100.0)],
    ),
    "activation_factor 0 turns the activation detector off": (
        SupervisorConfig(activation_factor=0), [(5.0, 1.0, 1.0)] * 25,
        [Step(26, 5.0, 1.0, activation_rms=1e6)],
    ),
}  # fmt: skip


@pytest.mark.parametrize(("cfg", "history", "steps"), DETECTOR_CASES.values(), ids=DETECTOR_CASES)
def test_detectors(cfg, history, steps):
    detectors = Detectors(cfg, reference_loss=LN_V)
    for step, (loss, grad_norm, *activation_rms) in enumerate(history, 1):
        detectors.observe(step, loss, grad_norm, *activation_rms)
    for s in steps:
        flags = detectors.flags(s.step, s.loss, s.grad_norm, s.overflow, s.at_floor,
                                s.activation_rms)  # fmt: skip
        assert [NAMES[i] for i, f in enumerate(flags) if f] == s.fires.split(), s


def test_anomalous_steps_never_enter_the_history():
    sup = warmed()
    before = list(sup.detectors.losses)
    decision = sup.inspect(31, 50.0, 1.0, False, 1.0, False)
    assert decision.anomaly.detector == "loss_spike"
    assert list(sup.detectors.losses) == before


# ----- the ladder ------------------------------------------------------------------------------
class At(NamedTuple):
    """One step shown to a warmed-up supervisor (30 healthy steps) and its decision's moves
    ('' when healthy), with ``reason`` a part of the decision's reason."""

    step: int
    loss: float
    moves: str
    reason: str = ""
    stop_file: bool = False
    manual_file: bool = False


SPIKE = 50.0
DEFAULT_LADDER = SupervisorConfig().ladder

# name: (config, the steps after the warm-up, in order)
LADDER_CASES = {
    "one rung per anomaly of an incident, a fresh ladder after it is judged": (
        SupervisorConfig(recovery_steps=5),
        [At(31, SPIKE, DEFAULT_LADDER[0]), At(32, SPIKE, DEFAULT_LADDER[1]),
         At(33, SPIKE, DEFAULT_LADDER[2]),
         *[At(step, 5.5, "") for step in range(34, 39)],
         At(39, SPIKE, DEFAULT_LADDER[0])],
    ),
    "the default ladder's last rung repeats until too many interventions stop the run": (
        SupervisorConfig(),
        [*[At(31 + i, SPIKE, rung) for i, rung in enumerate(DEFAULT_LADDER)],
         *[At(step, SPIKE, DEFAULT_LADDER[-1]) for step in range(31 + len(DEFAULT_LADDER), 41)],
         At(41, SPIKE, "stop", "more than 10 interventions within 1000 steps")],
    ),
    "a ladder that ends in stop stops there, and stop repeats": (
        SupervisorConfig(ladder=["skip", "stop"]),
        [At(31, SPIKE, "skip"), At(32, SPIKE, "stop", "the escalation ladder is exhausted"),
         At(33, SPIKE, "stop", "the escalation ladder is exhausted")],
    ),
    "the last rung repeats, then too many interventions stop the run": (
        SupervisorConfig(ladder=["skip"], max_interventions=2, intervention_window=100),
        [At(31, SPIKE, "skip"), At(32, SPIKE, "skip"),
         At(33, SPIKE, "stop", "more than 2 interventions within 100 steps")],
    ),
    "interventions older than the window no longer count": (
        SupervisorConfig(ladder=["skip"], max_interventions=2, intervention_window=3),
        [At(31, SPIKE, "skip"), At(32, SPIKE, "skip"), At(35, SPIKE, "skip")],
    ),
    "the kill switch stops at once, an anomaly or not, requests wait": (
        CFG,
        [At(31, 5.0, "stop", KILL_SWITCH_REASON, stop_file=True, manual_file=True),
         At(32, SPIKE, "skip")],
    ),
    "an operator's request alone is healthy": (
        CFG, [At(31, 5.0, "", manual_file=True)],
    ),
}  # fmt: skip


@pytest.mark.parametrize(("cfg", "steps"), LADDER_CASES.values(), ids=LADDER_CASES)
def test_the_ladder(cfg, steps):
    sup = warmed(cfg)
    for at in steps:
        decision = sup.inspect(at.step, at.loss, 1.0, False, 1.0, False, at.stop_file,
                               at.manual_file)  # fmt: skip
        assert "+".join(decision.moves) == at.moves, at
        assert at.reason in decision.reason, at
        assert decision.manual == at.manual_file, at


def test_an_incident_is_judged_recovered_and_the_ladder_resets():
    cfg = SupervisorConfig(recovery_steps=5)
    sup = warmed(cfg)
    rungs = [sup.inspect(31 + i, 50.0, 1.0, False, 1.0, False).rung for i in range(3)]
    assert rungs == list(cfg.ladder[:3])
    assert sup.incident.start == 31
    assert sup.rollback_limit() == 31 - cfg.healthy_margin
    for step in range(34, 39):
        assert sup.inspect(step, 5.5, 1.0, False, 1.0, False).healthy
    outcome = sup.pop_outcome()
    assert outcome.recovered and outcome.intervention_step == 33 and outcome.judged_at_step == 38
    assert outcome.rungs == list(cfg.ladder[:3]) and outcome.incident_start == 31
    assert sup.incident is None and sup.pop_outcome() is None
    assert sup.inspect(39, 50.0, 1.0, False, 1.0, False).rung == cfg.ladder[0]  # fresh ladder


def test_an_incident_whose_loss_stays_high_is_judged_not_recovered():
    sup = warmed(SupervisorConfig(recovery_steps=3))
    level = sup.detectors.pre_incident_level()
    sup.inspect(31, 50.0, 1.0, False, 1.0, False)  # skip
    sup.inspect(32, 50.0, 1.0, False, 1.0, False)  # rollback: the weights change
    for step in (33, 34, 35):
        sup.inspect(step, level + 0.04, 1.0, False, 1.0, False)  # high, but not a spike
    outcome = sup.pop_outcome()
    assert not outcome.recovered and outcome.recovered_at_step is None
    assert outcome.verdict == "not_recovered" and outcome.result.startswith("not recovered")


def test_skipped_updates_alone_are_no_harm_done_not_a_recovery():
    """A skip never touched the weights: there was nothing to recover from."""
    sup = warmed(SupervisorConfig(recovery_steps=3))
    sup.inspect(31, 50.0, 1.0, False, 1.0, False)
    for step in (32, 33, 34):
        sup.inspect(step, 5.0, 1.0, False, 1.0, False)
    outcome = sup.pop_outcome()
    assert outcome.verdict == "no_harm_done" and not outcome.recovered
    assert outcome.result.startswith("no harm done")


def test_recovery_is_judged_on_the_validation_loss_after_the_intervention():
    sup = warmed(SupervisorConfig(recovery_steps=4))
    assert sup.validated(30, 5.5).healthy  # the pre-incident held-out level
    sup.inspect(31, 50.0, 1.0, False, 1.0, False)
    sup.inspect(32, 50.0, 1.0, False, 1.0, False)  # rollback
    sup.inspect(33, 5.0, 1.0, False, 1.0, False)  # a low training loss is not enough
    assert sup.validated(33, 5.6).healthy  # (under valid_rise: no regression either)
    sup.inspect(34, 5.0, 1.0, False, 1.0, False)
    assert sup.validated(34, 5.4).healthy
    for step in (35, 36):
        sup.inspect(step, 5.0, 1.0, False, 1.0, False)
    outcome = sup.pop_outcome()
    assert outcome.verdict == "recovered" and outcome.recovered_at_step == 34
    assert outcome.judged_by == "validation loss" and outcome.pre_incident_loss == 5.5


def test_a_validation_regression_rolls_back_to_before_the_best_evaluation():
    sup = warmed(SupervisorConfig(valid_rise=0.05))
    for step, val in ((10, 6.0), (20, 5.5), (30, 5.7)):  # best 5.5 at step 20
        assert sup.validated(step, val).healthy
    decision = sup.validated(40, 5.9)  # 7% above the best
    assert decision.anomaly.detector == "validation_regression"
    assert "rollback" in decision.moves  # skipping one step cannot help a gradual rise
    assert sup.rollback_limit() == 20


def test_the_kill_switch_keeps_the_update_every_other_intervention_drops_it():
    sup = warmed()
    stop = sup.inspect(31, 5.0, 1.0, False, 1.0, False, stop_file=True, manual_file=True)
    assert stop.moves == ("stop",) and stop.reason == KILL_SWITCH_REASON
    assert not stop.drops_update and stop.manual
    spike = sup.inspect(32, 50.0, 1.0, False, 1.0, False)
    assert spike.drops_update


def test_the_supervisor_state_round_trips():
    sup = warmed()
    sup.inspect(31, 50.0, 1.0, False, 1.0, False)
    copy = Supervisor(CFG)
    copy.load_state_dict(sup.state_dict())
    assert copy.state_dict() == sup.state_dict()
    assert copy.inspect(32, 50.0, 1.0, False, 1.0, False).rung == CFG.ladder[1]


def test_lr_rewarms_linearly_after_an_optimizer_reset():
    sup = Supervisor(SupervisorConfig(rewarmup_steps=4))
    assert sup.lr_multiplier(10) == 1.0
    sup.rewarmup_start = 10
    assert [sup.lr_multiplier(s) for s in (10, 11, 13, 14, 15)] == [0.0, 0.25, 0.75, 1.0, 1.0]


# ----- drills ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "drill"),
    [
        ("spike@30", Drill("spike", 30, 1, False)),
        ("nan@5x4", Drill("nan", 5, 4, False)),
        ("scale_collapse@10x2!", Drill("scale_collapse", 10, 2, True)),
        (None, None),
    ],
)
def test_drills_parse(text, drill):
    assert Drill.parse(text) == drill


def test_a_drill_fires_once_unless_it_repeats():
    once = Supervisor(SupervisorConfig(drill="spike@5x2"))
    assert [once.drill_at(s) for s in (4, 5, 6, 7)] == [None, "spike", "spike", None]
    assert once.drill_at(5) is None  # passed again after a rollback: it does not come back
    again = Supervisor(SupervisorConfig(drill="spike@5!"))
    assert again.drill_at(5) == "spike" and again.drill_at(5) == "spike"


# ----- rollback planning -----------------------------------------------------------------------
def test_rollback_targets_are_before_the_incident_with_a_margin():
    cfg = SupervisorConfig(healthy_margin=5)
    assert rollback_limit(30, cfg) == 25
    assert protected_step([5, 10, 15, 20], step=24, cfg=cfg) == 15
    assert protected_step([5, 10, 15, 20], step=25, cfg=cfg) == 20
    assert protected_step([20], step=24, cfg=cfg) is None


@pytest.mark.parametrize(
    ("first", "last", "skips", "samples"),
    [
        (11, 11, [], (80, 88)),
        (13, 15, [], (96, 120)),
        # Ranges skipped already are passed over: behind the stream, they change nothing;
        # ahead of it, steps read past them; one the result would start in is passed too.
        (11, 11, [(0, 40)], (80, 88)),
        (12, 13, [(84, 90)], (94, 110)),
        (11, 12, [(80, 82), (90, 91)], (82, 99)),
        (12, 12, [(88, 96)], (96, 104)),
    ],
)
def test_step_samples_are_the_stream_positions_a_step_range_reads(first, last, skips, samples):
    # The stream stands at 80 after 10 steps of 8 samples each.
    assert step_samples(80, 10, first, last, 8, skips) == samples


class Planned(NamedTuple):
    lr_scale: float
    grad_clip: float
    skipped_steps: tuple[int, int] | None
    skipped_data: tuple[int, int] | None
    reset_optimizer: bool


# lr_factor 0.5, clip_factor 0.6, skip_data_steps 3 and skip_data_ahead 2, from factors
# (0.8, 1.0), to the checkpoint of step 25, where the stream stands at 200 (8 samples a step).
PLAN_CASES = {
    "lower and skip the window around the anomaly": (
        "rollback+lower_lr_clip+skip_data", 31, Planned(0.4, 0.6, (29, 33), (224, 264), False),
    ),
    "reset keeps the factors": (
        "rollback+reset_optimizer", 31, Planned(0.8, 1.0, None, None, True),
    ),
    "the skipped window never reaches before the target": (
        "rollback+skip_data", 27, Planned(0.8, 1.0, (26, 29), (200, 232), False),
    ),
    "a plain rollback changes nothing": ("rollback", 31, Planned(0.8, 1.0, None, None, False)),
}  # fmt: skip


@pytest.mark.parametrize(("rung", "anomaly_step", "planned"), PLAN_CASES.values(), ids=PLAN_CASES)
def test_rollback_plans(rung, anomaly_step, planned):
    cfg = SupervisorConfig(lr_factor=0.5, clip_factor=0.6, skip_data_steps=3, skip_data_ahead=2)
    plan = plan_rollback(cfg, tuple(rung.split("+")), anomaly_step, target_step=25,
                         factors=Factors(lr_scale=0.8, grad_clip=1.0), batch_tokens=256,
                         step_range=lambda first, last: step_samples(200, 25, first, last, 8))  # fmt: skip
    assert (plan.target_step, plan.tokens_lost) == (25, (anomaly_step - 25) * 256)
    assert Planned(plan.lr_scale, plan.grad_clip, plan.skipped_steps, plan.skipped_data,
                   plan.reset_optimizer) == planned  # fmt: skip


def test_a_rollback_measures_the_activations_afresh_and_keeps_the_trend_best():
    sup = Supervisor(SupervisorConfig(trend_window=10))
    for step in range(1, 31):
        assert sup.inspect(
            step, 6.0 - 0.01 * step, 1.0, False, 1.0, False, activation_rms=1.0
        ).healthy
    best = sup.detectors.trend_best
    assert (len(sup.detectors.activations), sup.detectors.activation_steps) == (10, 30)
    assert sup.inspect(31, NAN, 1.0, False, 1.0, False).rung == "skip"
    assert sup.inspect(32, NAN, 1.0, False, 1.0, False).rung == "rollback+lower_lr_clip"
    # The activations of the undone steps are gone; the trend's best is kept.
    assert not sup.detectors.activations and not sup.detectors.trend
    assert sup.detectors.activation_steps == 0  # disarmed until min_steps more
    assert sup.detectors.trend_best == best


def test_a_rollback_forgets_the_undone_steps_losses_so_the_restored_level_is_no_spike():
    """Fine-tuning rolled back to the weights it started from: their loss on the new data
    (10.5) is far above the undone steps' (0.14). Judged against those, every step after the
    rollback would be a spike; after ``forget_after`` the history is the restored one's."""
    cfg = SupervisorConfig()
    detectors = Detectors(cfg, reference_loss=LN_V)
    for step in range(1, 31):
        detectors.observe(step, 0.14 + 0.001 * (step % 3), 1.0)
    assert detectors.flags(31, 10.5, 1.0, False, False)[NAMES.index("loss_spike")]
    detectors.forget_after(20)  # a rollback to step 20: steps 21-30 are undone
    assert list(detectors.steps) == list(range(1, 21)) and len(detectors.losses) == 20
    detectors.forget_after(0)  # to the starting weights: nothing of this run is left
    assert not detectors.losses and not detectors.norms
    assert not any(detectors.flags(1, 10.5, 1.0, False, False))  # no history: nothing fires
    state = detectors.state_dict()
    again = Detectors(cfg, reference_loss=LN_V)
    again.load_state_dict(state)
    assert again.state_dict() == state


def test_the_best_steps_are_where_validation_and_the_trend_were_best():
    """Retention keeps a checkpoint at or before each: a gradual divergence rolls back there."""
    sup = Supervisor(SupervisorConfig(trend_window=5))
    assert sup.best_steps() == set()
    for step, val in ((10, 5.0), (20, 4.5), (30, 4.7)):
        sup.validated(step, val)
    assert sup.best_steps() == {20}
    for step in range(1, 13):
        sup.inspect(step, 6.0 - 0.1 * min(step, 8), 1.0, False, 1.0, False)
    assert sup.best_steps() == {20, sup.detectors.trend_best_step}
    assert sup.detectors.trend_best_step == 10  # the first window whose median is lowest


def test_a_validation_regression_rolls_back_to_the_best_and_is_judged_against_it():
    sup = Supervisor(SupervisorConfig(valid_rise=0.05))
    for step, val in ((10, 5.0), (20, 4.5), (30, 4.6)):
        assert sup.validated(step, val).healthy
    decision = sup.validated(40, 4.8)  # 6.7% above the best
    assert decision.rung == "rollback+lower_lr_clip"  # gradual: no skip
    assert decision.anomaly.detector == "validation_regression"
    assert sup.rollback_limit() == 20 and sup.incident.pre_valid == 4.5


def test_a_verdict_by_validation_waits_for_the_first_evaluation_after_the_incident():
    """recovery_steps healthy steps end the incident (the ladder starts afresh), but the
    repair is judged on the next evaluation, not on what was known before it."""
    sup = warmed(SupervisorConfig(recovery_steps=4))
    assert sup.validated(30, 5.5).healthy
    sup.inspect(31, 50.0, 1.0, False, 1.0, False)
    sup.inspect(32, 50.0, 1.0, False, 1.0, False)  # rollback
    for step in range(33, 37):
        assert sup.inspect(step, 5.0, 1.0, False, 1.0, False).healthy
    assert sup.incident is None and sup.pending is not None and sup.pop_outcome() is None
    assert sup.inspect(37, 50.0, 1.0, False, 1.0, False).rung == "skip"  # a new incident...
    outcome = sup.pop_outcome()  # ... and the old one's verdict, with what was known
    assert outcome.verdict == "not_recovered" and outcome.judged_at_step == 37

    sup = warmed(SupervisorConfig(recovery_steps=4))
    assert sup.validated(30, 5.5).healthy
    sup.inspect(31, 50.0, 1.0, False, 1.0, False)
    sup.inspect(32, 50.0, 1.0, False, 1.0, False)
    for step in range(33, 37):
        sup.inspect(step, 5.0, 1.0, False, 1.0, False)
    assert sup.validated(36, 5.45).healthy  # the evaluation of the step that ended it
    outcome = sup.pop_outcome()
    assert outcome.verdict == "recovered" and outcome.recovered_at_step == 36
    assert sup.pending is None


def test_an_incident_a_drill_started_says_so_in_its_verdict():
    sup = Supervisor(SupervisorConfig(drill="spike@31", recovery_steps=2))
    for step in range(1, 31):
        sup.drill_at(step)
        sup.inspect(step, 6.0 - 0.01 * step + 0.02 * (-1) ** step, 1.0, False, 1.0, False)
    assert sup.drill_at(31) == "spike"
    assert sup.inspect(31, 50.0, 1.0, False, 1.0, False).rung == "skip"
    for step in (32, 33):
        sup.drill_at(step)
        sup.inspect(step, 5.7, 1.0, False, 1.0, False)
    outcome = sup.pop_outcome()
    assert outcome.drill and outcome.verdict == "no_harm_done"
