"""The logbook's series and the report drawn from the logbook alone, without training:
the series through its file (torn lines, bad lines, a run that went back), the label
placement, the chart's curves and marks, the HTML (no Markdown, self-contained), and old
logbooks without a series."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from helpers import REPO, run_cli

from opt.errors import OptError
from opt.run.logbook import read_events
from opt.run.logbook.chart import _aligned, figure, history, marks_of, stack_labels, svg
from opt.run.logbook.events import Hyperparameters, Intervention, Note, RunStart, StopForHuman
from opt.run.logbook.report import render_html
from opt.run.logbook.series import SERIES, Point, Series, read_series
from opt.run.recorder import public_config

BEFORE = Hyperparameters(lr_scale=1.0, grad_clip=1.0, adam_eps=1e-8, adam_beta2=0.95)
LOWER = Hyperparameters(lr_scale=0.9, grad_clip=0.6, adam_eps=1e-8, adam_beta2=0.95)
DEMO_V0 = REPO / "tests" / "data" / "logbook_v0_demo"


def point(step: int, loss: float, *, factors: Hyperparameters = BEFORE, **fields) -> Point:
    return Point(step=step, tokens=step * 2048, loss=loss, lr=1e-3 * factors.lr_scale,
                 lr_scale=factors.lr_scale, grad_clip=factors.grad_clip, loss_scale=1.0,
                 **fields)  # fmt: skip


def demo_like() -> tuple[list[Point], list]:
    """A run shaped like the demo: a spike at 120 (skipped), a rollback at 121 to step 100
    with the factors lowered, steps 101-120 trained again, validation every 40 steps."""

    def loss(step: int) -> float:
        return 5.9 + 4.9 * math.exp(-step / 40)

    points = [point(s, loss(s), val_loss=loss(s) + 0.1 if s % 40 == 0 else None)
              for s in range(20, 101, 20)]  # fmt: skip
    points.append(point(120, 18.3))  # the spike: logged, then abandoned by the rollback
    points += [point(s, loss(s) - 0.01, factors=LOWER, val_loss=loss(s) + 0.09 if s % 40 == 0
                     else None) for s in range(120, 201, 20)]  # fmt: skip
    events = [
        RunStart(step=0, reason="fresh", world_size=1, layout={}, model="m", run_dir="runs/d"),
        Intervention(step=120, detector="loss_spike", action="skip", before=BEFORE, after=BEFORE),
        Intervention(step=121, detector="loss_spike", action="rollback+lower_lr_clip",
                     before=BEFORE, after=LOWER, rolled_back_to_step=100,
                     checkpoint="ck/step_00000100", tokens_lost=43008),
        Note(step=150, text="looked at the spike"),
        Intervention(step=197, detector="loss_spike", action="rollback+lower_lr_clip+skip_data",
                     before=LOWER, after=LOWER),
        StopForHuman(step=199, detector="nonfinite", action="stop", before=LOWER, reason="r"),
    ]  # fmt: skip
    return points, events


# ----- the series ------------------------------------------------------------------------
def test_the_series_round_trips_through_its_file(tmp_path):
    series = Series(tmp_path, "r")
    points = [point(1, 10.8), point(2, float("nan")), point(3, 9.0, val_loss=9.5),
              point(4, float("inf"), val_loss=float("nan"))]  # fmt: skip
    for p in points:
        series.append(p)
    path = tmp_path / "r" / SERIES
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON lines
    lines = [json.loads(line) for line in text.splitlines()]
    assert [line["v"] for line in lines] == [1] * 4
    assert "val_loss" not in lines[0] and lines[2]["val_loss"] == 9.5  # None is left out
    read = series.points()
    assert [p.model_dump(exclude={"loss", "val_loss"}) for p in read] == [
        p.model_dump(exclude={"loss", "val_loss"}) for p in points
    ]
    assert [p.loss for p in read][::2] == [10.8, 9.0] and math.isnan(read[1].loss)
    assert read[3].loss == math.inf and math.isnan(read[3].val_loss)


def test_a_torn_last_line_is_skipped_and_the_next_append_cuts_it_off(tmp_path):
    series = Series(tmp_path, "r")
    series.append(point(1, 7.0))
    with series.path.open("ab") as f:
        f.write(b'{"v": 1, "step": 2, "tok')  # what a machine dying mid-write leaves
    assert [p.step for p in read_series(series.path)] == [1]
    series.append(point(3, 6.0))
    assert [p.step for p in series.points()] == [1, 3]
    assert series.path.read_bytes().count(b"\n") == 2


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{not json", "not a JSON line"),
        ('{"v": 2, "step": 1}', "series version 2"),
        ('{"v": 1, "step": 1, "tokens": 2, "loss": 1, "lr": 1, "lr_scale": 1, "grad_clip": 1}',
         "field 'loss_scale'"),
        ('{"v": 1, "step": 1, "tokens": 2, "loss": 1, "lr": 1, "lr_scale": 1, "grad_clip": 1, '
         '"loss_scale": 1, "lose": 3}', "field 'lose'"),
    ],
)  # fmt: skip
def test_a_bad_line_in_the_middle_is_an_error_with_the_file_and_line(bad, message, tmp_path):
    good = json.dumps({"v": 1, **point(1, 7.0).model_dump(exclude={"v", "val_loss"})})
    path = tmp_path / SERIES
    path.write_text(f"{good}\n{bad}\n{good}\n")
    with pytest.raises(OptError, match=f"^{path}:2: .*{message}"):
        read_series(path)


def test_a_logbook_without_a_series_has_no_points(tmp_path):
    assert read_series(tmp_path / SERIES) == []


def test_a_run_that_went_back_keeps_its_last_history_and_the_branches_it_left():
    points, _ = demo_like()
    h = history(points)
    assert [p.step for p in h.kept] == [20, 40, 60, 80, 100, 120, 140, 160, 180, 200]
    assert h.kept[5].loss < 7  # the step trained again, not the spike
    ((branch_from, spike),) = h.abandoned
    assert (branch_from.step, spike.step, spike.loss) == (100, 120, 18.3)
    # A resume from an older checkpoint after a crash, then a rollback past the first point.
    h = history([point(s, 5.0) for s in (10, 20, 30, 20, 30, 40, 10, 20)])
    assert [p.step for p in h.kept] == [10, 20]
    assert [[p.step for p in b] for b in h.abandoned] == [[10, 20, 30], [10, 20, 30, 40]]
    h = history([point(s, 5.0) for s in (10, 20, 5)])
    assert [[p.step for p in b] for b in h.abandoned] == [[10, 20]]  # nothing kept before 5


def test_the_public_config_is_the_resolved_one_unless_a_secret_is_in_it(monkeypatch):
    text = '[run]\nname = "r"\n\n[data]\npath = "data/x"\n'
    assert public_config(text) == text  # as written, byte for byte
    monkeypatch.setenv("HF_TOKEN", "hf_" + "q" * 30)
    secret = f'[run]\nname = "r"\n\n[data]\npath = "/d/{"hf_" + "q" * 30}"\napi_key = "k3y-v4lue"\n'
    public = public_config(secret)
    assert "q" * 30 not in public and "k3y-v4lue" not in public
    assert public.count("[redacted]") == 2 and 'name = "r"' in public
    # A sentinel the run resolved is shown resolved.
    layout = "[parallel]\ndp_shard = -1\ntp = 2\n"
    assert (
        public_config(layout, {"parallel": {"dp_shard": 4}}) == "[parallel]\ndp_shard = 4\ntp = 2\n"
    )


# ----- labels and marks ------------------------------------------------------------------
def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def test_labels_of_neighbouring_marks_are_stacked_and_no_line_crosses_a_label():
    # (line x, left, right): two marks 4 px apart with long labels, one far off, and two at
    # the right edge whose labels run leftwards, over their neighbours' lines.
    labels = [
        (100, 103, 150),
        (104, 107, 260),
        (400, 403, 430),
        (600, 540, 597),
        (580, 540, 577),
        (560, 563, 570),
    ]
    rows = stack_labels(labels, gap=6)
    assert rows[2] == 0  # nothing near it: the first row
    for (i, (x, a, b)), (j, (_, c, d)) in itertools.permutations(enumerate(labels), 2):
        if rows[i] == rows[j]:
            assert not _overlap((a - 6, b + 6), (c, d)), (i, j)
        if rows[j] < rows[i]:  # i's line passes through j's row
            assert not (c - 6 < x < d + 6), (i, j)
    assert stack_labels([], gap=6) == []
    # Near the right edge a label goes left of its line, and so does a neighbour of it whose
    # label would run over that line.
    assert _aligned([100, 560, 590], [20, 60, 30], limit=600) == [
        (103, 123), (497, 557), (557, 587)
    ]  # fmt: skip


def test_interventions_notes_and_stops_are_marked_and_numbered_in_step_order():
    _, events = demo_like()
    drill = DrillIntervention(step=90, detector="loss_spike", action="skip", before=BEFORE,
                              after=BEFORE, drill=True)  # fmt: skip
    marks = marks_of([*events, drill])
    assert [(m.number, m.step, m.text, m.kind) for m in marks] == [
        (1, 90, "drill: skip", "drill"),
        (2, 120, "skip", "intervention"),
        (3, 121, "rollback+lower_lr_clip", "intervention"),
        (4, 150, "note", "note"),
        (5, 197, "rollback+lower_lr_clip+skip_data", "intervention"),
        (6, 199, "stop for a human", "stop"),
    ]


class DrillIntervention(Intervention):
    """An intervention event with the `drill` flag that injected faults will carry (events
    without it, all of today's, are not drills)."""

    drill: bool = False


def _gids(svg_text: str) -> dict[str, ET.Element]:
    return {el.get("id"): el for el in ET.fromstring(svg_text).iter() if el.get("id")}


def test_the_chart_has_the_curves_and_one_mark_per_event_with_labels_apart():
    points, events = demo_like()
    marks = marks_of(events)
    ids = _gids(svg(points, marks))
    assert {"train-loss", "valid-loss", "abandoned-1", "lr-scale", "grad-clip"} <= set(ids)
    assert "loss-scale" not in ids  # not fp16: no loss-scale panel
    assert sorted(i for i in ids if re.fullmatch(r"mark-\d+", i)) == [
        f"mark-{m.number}" for m in marks
    ]
    # Where matplotlib put them: no label overlaps another or its neighbours' leader lines.
    fig = figure(points, marks)
    renderer = fig.canvas.get_renderer()
    boxes = {a.get_gid(): a.get_window_extent(renderer) for a in fig.findobj()
             if (a.get_gid() or "").startswith("mark-")}  # fmt: skip
    labels = {m.number: boxes[f"mark-{m.number}"] for m in marks}
    assert len({(round(b.x0), round(b.y0)) for b in labels.values()}) == len(marks)
    for (i, a), (j, b) in itertools.combinations(labels.items(), 2):
        assert not a.overlaps(b), (i, j)
    for m in marks:
        leader = boxes[f"mark-leader-{m.number}"]
        for n, box in labels.items():
            if n != m.number:
                assert not leader.overlaps(box), (m.number, n)
    # The skip (120) and the rollback (121) are a step apart: stacked, not side by side.
    assert labels[1].y0 != labels[2].y0


def test_an_fp16_run_gets_a_loss_scale_panel_and_off_scale_points_stay_visible():
    points = [point(s, 6.0 + 1 / s).model_copy(update={"loss_scale": 2.0 ** (15 - s % 3)})
              for s in range(1, 30)]  # fmt: skip
    points[10] = points[10].model_copy(update={"loss": float("nan")})
    points[20] = points[20].model_copy(update={"loss": 40.0})
    ids = _gids(svg(points, []))
    assert "loss-scale" in ids and not any(i.startswith("mark-") for i in ids)
    assert sum(1 for el in ET.fromstring(svg(points, [])).iter()
               if el.get("id", "").startswith("off-scale")) == 2  # fmt: skip


# ----- the report ------------------------------------------------------------------------
def test_the_report_draws_from_the_logbook_alone_and_leaks_no_markdown():
    points, events = demo_like()
    page = render_html("d", events, points, '[run]\nname = "d"\n')
    assert "**" not in page and "<strong>rollback+lower_lr_clip</strong>" in page
    chart = page[page.index("<svg") : page.index("</svg>") + 6]
    ET.fromstring(chart)  # well-formed, inline
    marks_table = page[page.index('<table class="marks">') : page.index("<h2>Timeline")]
    assert marks_table.count("<tr><td") == len(marks_of(events)) == 5
    assert "[run]\nname = &quot;d&quot;" in page
    # Self-contained: nothing to fetch (the only URLs are the SVG namespaces).
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert set(re.findall(r"https?://[^\s\"'<]+", page)) <= {
        "http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"
    }  # fmt: skip
    assert render_html("d", events, points) == render_html("d", events, points)  # stable


def test_a_logbook_without_a_series_renders_and_says_so():
    events = read_events(DEMO_V0 / "events.jsonl")
    page = render_html("demo", events, [], None)
    assert "no series in this logbook" in page and "<svg" not in page
    assert "(no config in this logbook)" in page and "**" not in page


def test_render_from_the_command_line_uses_the_logbook_directory_only(tmp_path):
    from opt.run.logbook import Logbook

    points, events = demo_like()
    book = Logbook(tmp_path, "d")
    for e in events:
        book.append(e)
    series = Series(tmp_path, "d")
    for p in points:
        series.append(p)
    (tmp_path / "d" / "config.toml").write_text('[run]\nname = "d"\n')
    result = run_cli("logbook", "render", "d", "--dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    page = (tmp_path / "d" / "report.html").read_text()
    assert 'id="train-loss"' in page and "name = &quot;d&quot;" in page


def test_help_and_data_prepare_do_not_load_matplotlib():
    code = (
        "import sys\n"
        "from opt.cli import build_parser\n"
        "for argv in (['--help'], ['data', 'prepare', '--help'], ['logbook', 'render', '-h']):\n"
        "    try:\n"
        "        build_parser().parse_args(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "import opt.run.logbook.report, opt.cli.data\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'torch')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
