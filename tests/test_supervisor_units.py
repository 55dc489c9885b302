"""The supervisor's decisions without training: detectors, the ladder, incidents and their
outcomes, drills and rollback planning. Pure functions of numbers, so each runs in
microseconds; the end-to-end tests (test_supervisor.py) show the trainer carrying them out."""

from __future__ import annotations

import math

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


def warmed(cfg: SupervisorConfig = CFG, steps: int = 30) -> Supervisor:
    """A supervisor that has seen ``steps`` healthy steps of a slowly falling, noisy loss."""
    sup = Supervisor(cfg)
    for step in range(1, steps + 1):
        loss = 6.0 - 0.01 * step + 0.02 * (-1) ** step
        assert sup.inspect(step, loss, 1.0 + 0.05 * (-1) ** step, False, 1.0, False).healthy
    return sup


def flags(detectors: Detectors, step, loss, norm, overflow=False, at_floor=False) -> list[str]:
    return [
        NAMES[i] for i, f in enumerate(detectors.flags(step, loss, norm, overflow, at_floor)) if f
    ]


# ----- detectors -------------------------------------------------------------------------------
def test_detectors_wait_for_min_steps_before_judging_spikes_and_norms():
    detectors = Detectors(CFG)
    for _step in range(1, CFG.min_steps):
        detectors.observe(5.0, 1.0)
    assert flags(detectors, 20, 50.0, 1e6) == []  # not armed: 19 healthy steps seen
    detectors.observe(5.0, 1.0)
    assert flags(detectors, 21, 50.0, 1e6) == ["loss_spike", "grad_norm_explosion"]


def test_a_spike_must_clear_both_the_robust_z_and_the_minimum_rise():
    detectors = Detectors(CFG)
    for i in range(30):
        detectors.observe(5.0 + 0.001 * (i % 3), 1.0)  # robust std ~0.0015
    assert flags(detectors, 31, 5.04, 1.0) == []  # 27 robust stds, but below min rise 0.05
    assert flags(detectors, 32, 5.06, 1.0) == ["loss_spike"]
    noisy = Detectors(CFG)
    for i in range(30):
        noisy.observe(5.0 + 0.2 * (i % 3), 1.0)  # robust std ~0.3
    assert flags(noisy, 31, 6.0, 1.0) == []  # +0.8: under 6 robust stds
    assert flags(noisy, 32, 7.5, 1.0) == ["loss_spike"]


def test_grad_norm_explosion_is_a_multiple_of_the_running_median():
    detectors = Detectors(CFG)
    for _ in range(25):
        detectors.observe(5.0, 2.0)
    assert flags(detectors, 26, 5.0, 19.9) == []
    assert flags(detectors, 27, 5.0, 20.1) == ["grad_norm_explosion"]
    off = Detectors(SupervisorConfig(grad_norm_factor=0))
    for _ in range(25):
        off.observe(5.0, 2.0)
    assert flags(off, 26, 5.0, 1e9) == []


def test_non_finite_values_fire_at_once_but_an_fp16_overflow_alone_does_not():
    detectors = Detectors(CFG)
    assert flags(detectors, 1, math.nan, 1.0) == ["nonfinite"]
    assert flags(detectors, 2, 5.0, math.inf) == ["nonfinite"]
    assert flags(detectors, 3, 5.0, math.inf, overflow=True) == []  # the scaler's business


def test_loss_scale_collapse_is_n_overflows_within_the_window_or_the_floor():
    cfg = SupervisorConfig(window=10, scale_collapses=3)
    detectors = Detectors(cfg)
    assert flags(detectors, 1, 5.0, math.inf, overflow=True) == []
    assert flags(detectors, 5, 5.0, math.inf, overflow=True) == []
    assert flags(detectors, 9, 5.0, math.inf, overflow=True) == ["loss_scale_collapse"]
    # Overflows age out of the window: steps 1 and 5 are gone by step 15.
    assert flags(detectors, 15, 5.0, math.inf, overflow=True) == []
    assert flags(detectors, 16, 5.0, 1.0, at_floor=True) == ["loss_scale_collapse"]


def test_anomalous_steps_never_enter_the_history():
    sup = warmed()
    before = list(sup.detectors.losses)
    decision = sup.inspect(31, 50.0, 1.0, False, 1.0, False)
    assert decision.anomaly.detector == "loss_spike"
    assert list(sup.detectors.losses) == before


# ----- the ladder and incidents ----------------------------------------------------------------
def test_the_ladder_escalates_within_an_incident_then_resets_after_recovery():
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
    sup.inspect(31, 50.0, 1.0, False, 1.0, False)
    for step in (32, 33, 34):
        sup.inspect(step, level + 0.04, 1.0, False, 1.0, False)  # high, but not a spike
    outcome = sup.pop_outcome()
    assert not outcome.recovered and outcome.recovered_at_step is None
    assert outcome.result.startswith("not recovered")


def test_the_last_rung_repeats_and_too_many_interventions_stop_the_run():
    cfg = SupervisorConfig(ladder=["skip"], max_interventions=2, intervention_window=100)
    sup = warmed(cfg)
    assert sup.inspect(31, 50.0, 1.0, False, 1.0, False).rung == "skip"
    assert sup.inspect(32, 50.0, 1.0, False, 1.0, False).rung == "skip"
    stop = sup.inspect(33, 50.0, 1.0, False, 1.0, False)
    assert stop.moves == ("stop",) and "more than 2 interventions within 100 steps" in stop.reason


def test_the_kill_switch_stops_without_dropping_the_update_and_requests_wait():
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


def test_step_samples_are_the_stream_positions_a_step_range_reads():
    # The stream stands at 80 after 10 steps of 8 samples each.
    assert step_samples(80, 10, 11, 11, 8) == (80, 88)
    assert step_samples(80, 10, 13, 15, 8) == (96, 120)


def test_a_rollback_plan_lowers_the_factors_and_skips_the_window_before_the_anomaly():
    cfg = SupervisorConfig(lr_factor=0.5, clip_factor=0.6, skip_data_steps=3)
    factors = Factors(lr_scale=0.8, grad_clip=1.0)
    plan = plan_rollback(cfg, ("rollback", "lower_lr_clip", "skip_data"), anomaly_step=31,
                         target_step=25, target_pos=200, factors=factors, batch_tokens=256,
                         samples_per_step=8)  # fmt: skip
    assert (plan.target_step, plan.tokens_lost) == (25, 6 * 256)
    assert (plan.lr_scale, plan.grad_clip) == (0.4, 0.6)
    assert plan.skipped_steps == (29, 31)  # the 3 steps up to the anomaly
    assert plan.skipped_data == (200 + 3 * 8, 200 + 6 * 8)
    assert not plan.reset_optimizer
    plain = plan_rollback(cfg, ("rollback", "reset_optimizer"), 31, 25, 200, factors, 256, 8)
    assert (plain.lr_scale, plain.grad_clip, plain.skipped_data) == (0.8, 1.0, None)
    assert plain.reset_optimizer
    near = plan_rollback(cfg, ("rollback", "skip_data"), 27, 25, 200, factors, 256, 8)
    assert near.skipped_steps == (26, 27)  # never before the target
