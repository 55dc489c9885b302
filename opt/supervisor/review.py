"""Reading a logbook back: the terminal timeline, the summary, and the HTML report."""

from __future__ import annotations

import html
import json
from collections import Counter
from pathlib import Path

from opt.supervisor.logbook import describe

INTERVENTION_KINDS = ("intervention", "stop_for_human", "manual_intervention")


def timeline(events: list[dict]) -> str:
    lines = [f"{'time (UTC)':<26} {'step':>8} {'tokens':>14}  event"]
    for e in events:
        tokens = e.get("tokens")
        tokens = f"{tokens:,}" if isinstance(tokens, int) else ""
        lines.append(f"{e.get('time', ''):<26} {e.get('step', ''):>8} {tokens:>14}  {describe(e)}")
    return "\n".join(lines)


def summary(events: list[dict]) -> dict:
    actions = Counter(
        e.get("action", e["kind"]) for e in events if e.get("kind") in INTERVENTION_KINDS
    )
    detectors = Counter(e.get("detector") for e in events if e.get("kind") == "intervention")
    factors = {"lr_scale": 1.0, "grad_clip": None}
    for e in events:
        if e.get("after"):
            factors = {k: e["after"].get(k) for k in ("lr_scale", "grad_clip")}
    outcomes = [e for e in events if e.get("kind") == "outcome"]
    return {
        "interventions": sum(actions.values()),
        "by_action": dict(actions),
        "by_detector": dict(detectors),
        "tokens_lost_to_rollbacks": sum(_int(e.get("tokens_lost")) for e in events),
        "steps_lost_to_rollbacks": sum(
            e["step"] - e["rolled_back_to_step"] for e in events if "rolled_back_to_step" in e
        ),
        "recovered": sum(1 for e in outcomes if e.get("recovered")),
        "not_recovered": sum(1 for e in outcomes if not e.get("recovered")),
        "starts": sum(1 for e in events if e.get("kind") == "run_start"),
        "restarts_by_cause": dict(
            Counter(e.get("cause") for e in events if e.get("kind") == "requeue")
        ),
        "steps_lost_to_restarts": sum(_int(e.get("lost_steps")) for e in events),
        "tokens_lost_to_restarts": sum(_int(e.get("lost_tokens")) for e in events),
        "time_lost_to_restarts_s": round(
            sum(e.get("lost_s") or 0.0 for e in events if e.get("kind") == "run_start"), 1
        ),
        "gpu_hours": round(sum(e.get("gpu_hours") or 0.0 for e in events), 4),
        "energy_kwh": round(sum(e.get("energy_kwh") or 0.0 for e in events), 4),
        "co2e_kg": round(sum(e.get("co2e_kg") or 0.0 for e in events), 4),
        "notes": sum(1 for e in events if e.get("kind") == "note"),
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
        f"starts (fresh or resumed): {s['starts']}; notes: {s['notes']}",
        f"current factors: lr_scale {s['current']['lr_scale']}, grad_clip {s['current']['grad_clip']}",
    ]
    return "\n".join(lines)


def by_cause_text(counts: dict) -> str:
    """ " (preemption 1, process failure 2)", or "" when there were none."""
    if not counts:
        return ""
    return " (" + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(counts.items())) + ")"


def _int(value) -> int:
    return value if isinstance(value, int) else 0


def loss_curve(run_dir: Path) -> list[tuple[float, int, float]]:
    """(wall time, step, loss) from the run's TensorBoard event files, in time order."""
    tb = run_dir / "tensorboard"
    if not tb.is_dir():
        return []
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points = []
    for events_dir in sorted({p.parent for p in tb.rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(events_dir))
        acc.Reload()
        if "train/loss" in acc.Tags().get("scalars", []):
            points += [(e.wall_time, e.step, e.value) for e in acc.Scalars("train/loss")]
    return sorted(points)


def _svg(points: list[tuple[float, int, float]], marks: list[dict]) -> str:
    if not points:
        return "<p>No loss curve: the run wrote no TensorBoard events.</p>"
    width, height, pad = 900, 320, 45
    steps = [p[1] for p in points] + [m["step"] for m in marks]
    losses = [p[2] for p in points]
    x0, x1 = min(steps), max(steps) or 1
    y0, y1 = min(losses), max(losses)
    y1 = y1 if y1 > y0 else y0 + 1

    def x(step):
        return pad + (step - x0) / max(x1 - x0, 1) * (width - 2 * pad)

    def y(loss):
        return height - pad - (min(loss, y1) - y0) / (y1 - y0) * (height - 2 * pad)

    path = " ".join(
        f"{'M' if i == 0 else 'L'}{x(s):.1f},{y(v):.1f}" for i, (_, s, v) in enumerate(points)
    )
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        'aria-label="training loss with interventions">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>',
        f'<path d="{path}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>',
        f'<text x="{pad}" y="{pad - 10}" font-size="12">loss {y1:.3f}</text>',
        f'<text x="{pad}" y="{height - 10}" font-size="12">step {x0} (loss {y0:.3f})</text>',
        f'<text x="{width - pad - 80}" y="{height - 10}" font-size="12">step {x1}</text>',
    ]
    for m in marks:
        color = "#d62728" if m.get("kind") != "note" else "#2ca02c"
        label = html.escape(m.get("action") or m.get("kind", ""))
        parts.append(
            f'<line x1="{x(m["step"]):.1f}" x2="{x(m["step"]):.1f}" y1="{pad}" y2="{height - pad}" '
            f'stroke="{color}" stroke-dasharray="4,3"><title>step {m["step"]}: {label}</title></line>'
        )
        parts.append(
            f'<text x="{x(m["step"]) + 3:.1f}" y="{pad + 12}" font-size="11" fill="{color}">{label}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts)


def render_html(run: str, events: list[dict], run_dir: Path | None) -> str:
    config = ""
    if run_dir is not None and (run_dir / "config.toml").is_file():
        config = (run_dir / "config.toml").read_text()
    points = loss_curve(run_dir) if run_dir is not None else []
    marks = [e for e in events if e.get("kind") in (*INTERVENTION_KINDS, "note") and "step" in e]
    rows = "\n".join(
        f"<tr><td>{html.escape(str(e.get('time', '')))}</td><td>{e.get('step', '')}</td>"
        f"<td>{html.escape(e.get('kind', ''))}</td><td>{html.escape(describe(e))}</td></tr>"
        for e in events
    )
    s = summary(events)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Logbook: {html.escape(run)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1000px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top;font-size:13px}}
pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style></head><body>
<h1>Logbook: {html.escape(run)}</h1>
<p>{s["interventions"]} intervention(s); {s["steps_lost_to_rollbacks"]} steps
({s["tokens_lost_to_rollbacks"]:,} tokens) lost to rollbacks; current lr_scale
{s["current"]["lr_scale"]}, grad_clip {s["current"]["grad_clip"]}.</p>
<h2>Loss</h2>
{_svg(points, marks)}
<h2>Timeline</h2>
<table><tr><th>time (UTC)</th><th>step</th><th>kind</th><th>event</th></tr>
{rows}
</table>
<h2>Config</h2>
<pre>{html.escape(config) or "(no config.toml found)"}</pre>
<h2>Events (JSON)</h2>
<pre>{html.escape(json.dumps(events, indent=1))}</pre>
</body></html>
"""
