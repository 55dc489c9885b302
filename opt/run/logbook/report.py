"""The HTML report of a run (`opt logbook render`): the loss curve with every intervention
and note marked on it, the timeline, the resolved config and the events.

The loss curve and the config come from the run's private directory (``runs/<run>/``,
named by its ``run_start`` events); without it the report says so and shows the rest.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from opt.run.logbook.codec import to_json
from opt.run.logbook.describe import describe
from opt.run.logbook.events import Event, Note, RunStart
from opt.run.logbook.summary import INTERVENTIONS, summary


def run_dir_of(events: list[Event]) -> Path | None:
    """The run directory named by the newest start of the run, if any."""
    return next(
        (Path(e.run_dir) for e in reversed(events) if isinstance(e, RunStart) and e.run_dir), None
    )


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


def _label(mark: Event) -> str:
    return mark.action if isinstance(mark, INTERVENTIONS) else mark.kind


def _svg(points: list[tuple[float, int, float]], marks: list[Event]) -> str:
    if not points:
        return "<p>No loss curve: the run wrote no TensorBoard events.</p>"
    width, height, pad = 900, 320, 45
    steps = [p[1] for p in points] + [m.step for m in marks]
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
        color = "#2ca02c" if isinstance(m, Note) else "#d62728"
        label = html.escape(_label(m))
        parts.append(
            f'<line x1="{x(m.step):.1f}" x2="{x(m.step):.1f}" y1="{pad}" y2="{height - pad}" '
            f'stroke="{color}" stroke-dasharray="4,3"><title>step {m.step}: {label}</title></line>'
        )
        parts.append(
            f'<text x="{x(m.step) + 3:.1f}" y="{pad + 12}" font-size="11" fill="{color}">{label}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts)


def render_html(run: str, events: list[Event], run_dir: Path | None) -> str:
    config = ""
    if run_dir is not None and (run_dir / "config.toml").is_file():
        config = (run_dir / "config.toml").read_text()
    points = loss_curve(run_dir) if run_dir is not None else []
    marks = [e for e in events if isinstance(e, (*INTERVENTIONS, Note)) and e.step is not None]
    rows = "\n".join(
        f"<tr><td>{html.escape(e.time)}</td><td>{'' if e.step is None else e.step}</td>"
        f"<td>{html.escape(e.kind)}</td><td>{html.escape(describe(e))}</td></tr>"
        for e in events
    )
    s = summary(events)
    lines = json.dumps([to_json(e) for e in events], indent=1)
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
<pre>{html.escape(lines)}</pre>
</body></html>
"""
