"""The HTML report of a run (`opt logbook render`), from the public logbook alone: the
chart (training and validation loss, the supervisor's factors, every intervention and note
marked and numbered; see ``chart``), the marks by number, the timeline, the resolved config
and the events. One self-contained file: the chart is inline SVG, nothing is fetched.

A logbook written before the series existed has no chart; the report says so and shows
the rest.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

from opt.run.logbook.chart import MARK_COLORS, Mark, marks_of
from opt.run.logbook.codec import to_json
from opt.run.logbook.describe import describe
from opt.run.logbook.events import Event, RunStart
from opt.run.logbook.series import SERIES, Point
from opt.run.logbook.summary import summary

CONFIG = "config.toml"  # the resolved config, copied into the logbook by the run recorder


def run_dir_of(events: list[Event]) -> Path | None:
    """The run directory named by the newest start of the run, if any."""
    return next(
        (Path(e.run_dir) for e in reversed(events) if isinstance(e, RunStart) and e.run_dir), None
    )


def config_of(logbook_dir: Path, events: list[Event]) -> str | None:
    """The resolved config: the logbook's copy, else (a logbook written before it carried
    one) the run directory's, when it is at hand."""
    for candidate in (logbook_dir / CONFIG, (run_dir_of(events) or Path("/nonexistent")) / CONFIG):
        if candidate.is_file():
            return candidate.read_text()
    return None


def inline(text: str) -> str:
    """One line of ``describe``'s prose as HTML: escaped, its Markdown bold as <strong>."""
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(text))


def _chart(points: list[Point], marks: list[Mark]) -> str:
    if not points:
        return (
            "<p>No chart: there is no series in this logbook (it was written before opt "
            f"kept one in <code>{SERIES}</code>).</p>"
        )
    from opt.run.logbook.chart import svg  # matplotlib, only when there is something to draw

    chart = f'<figure class="chart">{svg(points, marks)}</figure>'
    if not marks:
        return chart
    rows = "\n".join(
        f'<tr><td class="n" style="color:{MARK_COLORS[m.kind]}">{m.number}</td>'
        f"<td>{m.step}</td><td>{inline(describe(m.event))}</td></tr>"
        for m in marks
    )
    return (
        f'{chart}\n<table class="marks"><tr><th>#</th><th>step</th><th>marked on the chart'
        f"</th></tr>\n{rows}\n</table>"
    )


def render_html(
    run: str, events: list[Event], points: list[Point] | None = None, config: str | None = None
) -> str:
    points = points or []
    marks = marks_of(events)
    rows = "\n".join(
        f"<tr><td>{html.escape(e.time)}</td><td>{'' if e.step is None else e.step}</td>"
        f"<td>{html.escape(e.kind)}</td><td>{inline(describe(e))}</td></tr>"
        for e in events
    )
    s = summary(events)
    lines = json.dumps([to_json(e) for e in events], indent=1)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Logbook: {html.escape(run)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1000px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top;font-size:13px}}
td.n{{font-weight:bold;text-align:right}}td:first-child{{white-space:nowrap}}
figure.chart{{margin:0 0 1em 0}}figure.chart svg{{max-width:100%;height:auto}}
pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style></head><body>
<h1>Logbook: {html.escape(run)}</h1>
<p>{s["interventions"]} intervention(s); {s["steps_lost_to_rollbacks"]} steps
({s["tokens_lost_to_rollbacks"]:,} tokens) lost to rollbacks; current lr_scale
{s["current"]["lr_scale"]}, grad_clip {s["current"]["grad_clip"]}.</p>
<h2>Loss</h2>
{_chart(points, marks)}
<h2>Timeline</h2>
<table><tr><th>time (UTC)</th><th>step</th><th>kind</th><th>event</th></tr>
{rows}
</table>
<h2>Config</h2>
<pre>{html.escape(config) if config else "(no config in this logbook)"}</pre>
<h2>Events (JSON)</h2>
<pre>{html.escape(lines)}</pre>
</body></html>
"""
