"""A run's logbook in numbers: interventions, losses to rollbacks and restarts, compute."""

from __future__ import annotations

from collections import Counter

from opt.run.logbook.events import (
    Event,
    Intervention,
    InterventionCompletedAfterRestart,
    ManualIntervention,
    Note,
    Outcome,
    Requeue,
    RunStart,
    RunStop,
    StopForHuman,
    StragglerDetected,
)

INTERVENTIONS = (Intervention, StopForHuman, ManualIntervention)
"""The events that are the supervisor's (or an operator's) interventions."""
CHANGES_FACTORS = (Intervention, ManualIntervention, InterventionCompletedAfterRestart)
"""The events that set the LR and clipping factors (``after``)."""


def summary(events: list[Event]) -> dict:
    """The numbers of `opt logbook summary` (a JSON-ready dict)."""
    actions = Counter(e.action for e in events if isinstance(e, INTERVENTIONS))
    detectors = Counter(e.detector for e in events if isinstance(e, Intervention))
    factors = {"lr_scale": 1.0, "grad_clip": None}
    for e in events:
        if isinstance(e, CHANGES_FACTORS) and e.after is not None:
            factors = {"lr_scale": e.after.lr_scale, "grad_clip": e.after.grad_clip}
    rollbacks = [e for e in events if isinstance(e, Intervention)]
    outcomes = [e for e in events if isinstance(e, Outcome)]
    starts = [e for e in events if isinstance(e, RunStart)]
    stops = [e for e in events if isinstance(e, RunStop)]
    return {
        "interventions": sum(actions.values()),
        "by_action": dict(actions),
        "by_detector": dict(detectors),
        "tokens_lost_to_rollbacks": sum(e.tokens_lost or 0 for e in rollbacks),
        "steps_lost_to_rollbacks": sum(
            e.step - e.rolled_back_to_step
            for e in rollbacks
            if e.rolled_back_to_step is not None and e.step is not None
        ),
        "recovered": sum(1 for e in outcomes if e.recovered),
        "not_recovered": sum(1 for e in outcomes if not e.recovered),
        "starts": len(starts),
        "restarts_by_cause": dict(Counter(e.cause for e in events if isinstance(e, Requeue))),
        "steps_lost_to_restarts": sum(e.lost_steps or 0 for e in starts),
        "tokens_lost_to_restarts": sum(e.lost_tokens or 0 for e in starts),
        "time_lost_to_restarts_s": round(sum(e.lost_s or 0.0 for e in starts), 1),
        "gpu_hours": round(sum(e.gpu_hours or 0.0 for e in stops), 4),
        "energy_kwh": round(sum(e.energy_kwh or 0.0 for e in stops), 4),
        "co2e_kg": round(sum(e.co2e_kg or 0.0 for e in stops), 4),
        "stragglers": [
            f"rank {e.rank} on {e.host} at step {e.step} ({e.ratio:.2f}x)"
            for e in events
            if isinstance(e, StragglerDetected)
        ],
        "notes": sum(1 for e in events if isinstance(e, Note)),
        "current": factors,
    }


def format_summary(run: str, s: dict) -> str:
    lines = [
        f"logbook summary: {run}",
        f"interventions: {s['interventions']}"
        + (
            f" ({', '.join(f'{k} {v}' for k, v in s['by_action'].items())})"
            if s["by_action"]
            else ""
        ),
        f"detected: {', '.join(f'{k} {v}' for k, v in s['by_detector'].items()) or 'nothing'}",
        f"outcomes: {s['recovered']} recovered, {s['not_recovered']} not recovered",
        f"lost to rollbacks: {s['steps_lost_to_rollbacks']} steps, "
        f"{s['tokens_lost_to_rollbacks']:,} tokens",
        f"restarts: {sum(s['restarts_by_cause'].values())}{by_cause_text(s['restarts_by_cause'])}",
        f"lost to restarts: {s['steps_lost_to_restarts']} steps, "
        f"{s['tokens_lost_to_restarts']:,} tokens, {s['time_lost_to_restarts_s'] / 3600:.2f} h",
        f"compute: {s['gpu_hours']:,.2f} GPU-hours, {s['energy_kwh']:,.2f} kWh, "
        f"{s['co2e_kg']:,.2f} kg CO2e (CPU runs are not counted)",
        f"stragglers named: {'; '.join(s['stragglers']) or 'none'}",
        f"starts (fresh or resumed): {s['starts']}; notes: {s['notes']}",
        f"current factors: lr_scale {s['current']['lr_scale']}, grad_clip {s['current']['grad_clip']}",
    ]
    return "\n".join(lines)


def by_cause_text(counts: dict) -> str:
    """ " (preemption 1, process failure 2)", or "" when there were none."""
    if not counts:
        return ""
    return " (" + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(counts.items())) + ")"
