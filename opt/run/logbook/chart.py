"""The report's chart, drawn with matplotlib to an inline SVG from the logbook alone: the
training and validation loss of every logged step, the LR scale and clip threshold in a
panel under it (and the fp16 loss scale when it moved), and every intervention and note
marked at its step with a numbered label that never sits on a neighbour's.

A run that went back (a rollback, or a resume from an older checkpoint after a crash)
trains some steps twice. The curve is the history the run kept; the steps it abandoned
branch off it in grey, so the chart shows both honestly.

matplotlib is imported inside ``svg`` only: `opt --help` and `opt data prepare` never load it.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

from opt.run.logbook.events import Event, ManualIntervention, Note, StopForHuman
from opt.run.logbook.series import Point
from opt.run.logbook.summary import INTERVENTIONS

# Colours by what a mark is (the curves use their own, below).
MARK_COLORS = {
    "intervention": "#d62728",
    "drill": "#9467bd",
    "manual": "#8c564b",
    "stop": "#000000",
    "note": "#2ca02c",
}
TRAIN, VALID, ABANDONED = "#1f77b4", "#ff7f0e", "#a0a0a0"
LR_SCALE, CLIP, LOSS_SCALE = "#17becf", "#e377c2", "#7f7f7f"

DPI = 100
WIDTH_IN = 10.0
LEFT_PX, RIGHT_PX, BOTTOM_PX, TOP_PX = 72, 72, 52, 12  # margins around the panels
LABEL_ROW_PX, LABEL_GAP_PX = 17, 8  # stacked labels: row height, least gap within a row
MAX_LABEL_ROWS = 5  # past this, labels shrink to their numbers (the table names them)


@dataclass(frozen=True)
class Mark:
    """An event marked on the chart at its step."""

    number: int
    step: int
    text: str
    kind: str  # a key of MARK_COLORS
    event: Event = field(compare=False, repr=False)


def marks_of(events: list[Event]) -> list[Mark]:
    """Every intervention (a drill's marked as one, when its event says so), stop and note
    with a step, numbered in step order."""
    found = []
    for e in events:
        if e.step is None:
            continue
        if isinstance(e, Note):
            found.append((e.step, "note", "note", e))
        elif isinstance(e, StopForHuman):
            found.append((e.step, "stop for a human", "stop", e))
        elif isinstance(e, ManualIntervention):
            found.append((e.step, "manual", "manual", e))
        elif isinstance(e, INTERVENTIONS):
            # `drill` is set on the events of an injected fault; older events have no such field.
            drill = bool(getattr(e, "drill", False))
            found.append((e.step, f"drill: {e.action}" if drill else e.action,
                          "drill" if drill else "intervention", e))  # fmt: skip
    found.sort(key=lambda m: m[0])  # stable: same-step events keep the logbook's order
    return [Mark(n, *mark) for n, mark in enumerate(found, start=1)]


@dataclass
class History:
    """A series as the run kept it, and the branches it abandoned by going back."""

    kept: list[Point] = field(default_factory=list)
    abandoned: list[list[Point]] = field(default_factory=list)
    """Each branch starts at the kept point it left from (when there is one)."""


def history(points: list[Point]) -> History:
    """Split a series at every step that is not above the one before it: the run went back
    there, so the points at or past it were trained again and the earlier ones abandoned."""
    h = History()
    for p in points:
        if h.kept and p.step <= h.kept[-1].step:
            stay = [q for q in h.kept if q.step < p.step]
            branch = [q for q in h.kept if q.step >= p.step]
            h.abandoned.append(stay[-1:] + branch)
            h.kept = stay
        h.kept.append(p)
    return h


def stack_labels(labels: list[tuple[float, float, float]], gap: float) -> list[int]:
    """The row of each label above the chart, given (its line's x, its left, its right):
    the lowest row where it clears every label already there by ``gap``, and where the line
    up to it crosses no label in the rows below.

    A label that runs over another mark's line must sit above that mark's label, so the
    labels are placed in that order: those that cover no unplaced line first. (Labels that
    cover each other's lines have no such order; ``_aligned`` never makes them.)"""
    n = len(labels)
    covers = [
        {j for j in range(n) if j != i and labels[i][1] - gap < labels[j][0] < labels[i][2] + gap}
        for i in range(n)
    ]
    spans: list[list[tuple[float, float]]] = []  # per row: the labels in it
    lines: list[list[float]] = []  # per row: the lines passing through it to higher rows
    rows = [0] * n

    def clear(a: float, b: float, row: int) -> bool:
        return all(b + gap <= left or a >= right + gap for left, right in spans[row]) and all(
            not a - gap < x < b + gap for x in lines[row]
        )

    unplaced = set(range(n))
    while unplaced:
        ready = [i for i in unplaced if not covers[i] & unplaced] or list(unplaced)
        i = max(ready, key=lambda i: labels[i][0])
        unplaced.remove(i)
        x, left, right = labels[i]
        row = 0
        while row < len(spans) and not (
            clear(left, right, row) and all(clear(x, x, below) for below in range(row))
        ):
            row += 1
        if row == len(spans):
            spans.append([])
            lines.append([])
        spans[row].append((left, right))
        for below in range(row):
            lines[below].append(x)
        rows[i] = row
    return rows


def _aligned(xs: list[float], widths: list[float], limit: float) -> list[tuple[float, float]]:
    """Each label's extent: right of its line, or left of it where it would run past
    ``limit``, and left too where it would run over the line of a label that went left
    (so that no two labels cover each other's lines)."""
    leftwards = [x + 3 + w > limit for x, w in zip(xs, widths, strict=True)]
    changed = True
    while changed:
        changed = False
        for i, (x, w) in enumerate(zip(xs, widths, strict=True)):
            if not leftwards[i] and any(
                leftwards[j] and x < xs[j] <= x + 3 + w for j in range(len(xs))
            ):
                leftwards[i] = changed = True
    return [(x - 3 - w, x - 3) if left else (x + 3, x + 3 + w)
            for x, w, left in zip(xs, widths, leftwards, strict=True)]  # fmt: skip


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def _loss_limits(values: list[float]) -> tuple[float, float]:
    """The loss axis: every value, unless a few lie far above the rest (a spike, the first
    steps of a short run's log): those are drawn at the top edge with their value."""
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return 0.0, 1.0
    lo, top = finite[0], finite[-1]
    p90 = finite[int(0.9 * (len(finite) - 1))]
    ceiling = p90 + 3 * max(p90 - lo, 1e-3)
    if top > ceiling:
        top = max(v for v in finite if v <= ceiling)
    pad = max(top - lo, 1e-3) * 0.06
    return lo - pad, top + pad


STYLE = {
    "svg.hashsalt": "opt-logbook",  # ids that do not change from one render to the next
    "font.size": 9,
    "axes.spines.top": False,
    "axes.grid": True,
    "grid.color": "#e6e6e6",
    "grid.linewidth": 0.6,
}


def svg(points: list[Point], marks: list[Mark]) -> str:
    """The chart as an ``<svg>`` element (no XML prolog, no metadata), ready to inline in
    HTML. Text is drawn as glyph paths: the browser shows what was measured when the labels
    were placed, whatever fonts it has."""
    import matplotlib

    with matplotlib.rc_context(STYLE):
        out = io.StringIO()
        figure(points, marks).savefig(out, format="svg", metadata=NO_METADATA)
    text = out.getvalue()
    return text[text.index("<svg") :]


# Leaves out the SVG's <metadata> block (creator, date, licence links).
NO_METADATA = {"Date": None, "Creator": None, "Format": None, "Type": None}


def figure(points: list[Point], marks: list[Mark]):
    """The chart of a non-empty series as a matplotlib Figure (on an Agg canvas; ``svg``
    saves it)."""
    import matplotlib
    from matplotlib import transforms
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties

    h = history(points)
    with matplotlib.rc_context(STYLE):
        fp16 = any(p.loss_scale != 1.0 for p in points)
        steps = [p.step for p in points] + [m.step for m in marks]
        x0, x1 = min(steps), max(steps)
        span = max(x1 - x0, 1)
        x0, x1 = x0 - 0.02 * span, x1 + 0.02 * span
        width_px = WIDTH_IN * DPI
        plot_w = width_px - LEFT_PX - RIGHT_PX

        def x_px(step: float) -> float:
            return LEFT_PX + (step - x0) / (x1 - x0) * plot_w

        # Labels first: their rows decide the height of the band above the loss panel.
        fig = Figure(dpi=DPI)
        renderer = FigureCanvasAgg(fig).get_renderer()
        prop = FontProperties(size=8.5)

        def layout(texts: list[str]) -> tuple[list[tuple[float, float]], list[int]]:
            xs = [x_px(m.step) for m in marks]
            widths = [renderer.get_text_width_height_descent(t, prop, ismath=False)[0]
                      for t in texts]  # fmt: skip
            spans = _aligned(xs, widths, width_px - 4)
            return spans, stack_labels(
                [(x, a, b) for x, (a, b) in zip(xs, spans, strict=True)], LABEL_GAP_PX
            )

        texts = [f"{m.number} {m.text}" for m in marks]
        spans, rows = layout(texts)
        if rows and max(rows) + 1 > MAX_LABEL_ROWS:
            texts = [str(m.number) for m in marks]
            spans, rows = layout(texts)
        band_px = (max(rows) + 1) * LABEL_ROW_PX + 8 if marks else 0

        panels = [("loss", 300)] + [("factors", 110)] + ([("loss_scale", 90)] if fp16 else [])
        hspace_px = 14
        plots_px = sum(px for _, px in panels) + hspace_px * (len(panels) - 1)
        height_px = TOP_PX + band_px + plots_px + BOTTOM_PX
        fig.set_size_inches(WIDTH_IN, height_px / DPI)
        grid = fig.add_gridspec(
            len(panels), 1, height_ratios=[px for _, px in panels],
            left=LEFT_PX / width_px, right=1 - RIGHT_PX / width_px,
            bottom=BOTTOM_PX / height_px, top=1 - (TOP_PX + band_px) / height_px,
            hspace=hspace_px / (plots_px / len(panels)),
        )  # fmt: skip
        ax = fig.add_subplot(grid[0])
        axes = [ax] + [fig.add_subplot(grid[i], sharex=ax) for i in range(1, len(panels))]
        ax.set_xlim(x0, x1)
        for a in axes[:-1]:
            a.tick_params(labelbottom=False)
        tokens_per_step = _tokens_per_step(points)
        axes[-1].set_xlabel(
            f"step ({tokens_per_step:,} tokens each)" if tokens_per_step else "step"
        )

        # ----- the loss panel ----------------------------------------------------------------
        values = [p.loss for p in points] + [p.val_loss for p in points if p.val_loss is not None]
        lo, hi = _loss_limits(values)
        ax.set_ylim(lo, hi)

        def top(v: float) -> float:
            """Off the scale: on the top edge (_off_scale marks it); NaN breaks the line."""
            return min(v, hi) if not math.isnan(v) else v

        ax.set_ylabel("loss (nats per token)")
        for i, branch in enumerate(h.abandoned):
            label = "abandoned: trained again after going back" if i == 0 else None
            ax.plot([p.step for p in branch], [top(p.loss) for p in branch], color=ABANDONED,
                    linewidth=1.2, linestyle=(0, (4, 2)), gid=f"abandoned-{i + 1}",
                    label=label)  # fmt: skip
        ax.plot([p.step for p in h.kept], [top(p.loss) for p in h.kept], color=TRAIN,
                linewidth=1.6, label="training loss", gid="train-loss")  # fmt: skip
        valid = [p for p in h.kept if p.val_loss is not None]
        if valid:
            ax.plot([p.step for p in valid], [top(p.val_loss) for p in valid], color=VALID,
                    linewidth=1.4, marker="o", markersize=3.5, label="validation loss",
                    gid="valid-loss")  # fmt: skip
        _off_scale(ax, [(p.step, p.loss, TRAIN) for p in h.kept]
                   + [(p.step, p.loss, ABANDONED) for b in h.abandoned for p in b[1:]]
                   + [(p.step, p.val_loss, VALID) for p in valid], hi)  # fmt: skip
        ax.legend(loc="upper right", fontsize=8, framealpha=0.9)

        # ----- the supervisor's factors ------------------------------------------------------
        # A factor logged at a step held since the point before it (a rollback's lowered
        # factors, from the rollback target on): drawn as steps ending at each point.
        factors = axes[1]
        kept_steps = [p.step for p in h.kept]
        (lr_line,) = factors.plot(kept_steps, [p.lr_scale for p in h.kept], color=LR_SCALE,
                                  linewidth=1.6, drawstyle="steps-pre", gid="lr-scale",
                                  label="LR scale (left)")  # fmt: skip
        factors.set_ylabel("LR scale", color=LR_SCALE)
        _pad_limits(factors, [p.lr_scale for p in h.kept], floor=0.0)
        clip = factors.twinx()
        clip.grid(False)
        clip.spines["top"].set_visible(False)
        (clip_line,) = clip.plot(kept_steps, [p.grad_clip for p in h.kept], color=CLIP,
                                 linewidth=1.4, linestyle=(0, (5, 2)), drawstyle="steps-pre",
                                 gid="grad-clip", label="clip threshold (right)")  # fmt: skip
        clip.set_ylabel("clip threshold", color=CLIP)
        _pad_limits(clip, [p.grad_clip for p in h.kept], floor=0.0)
        clip.legend(handles=[lr_line, clip_line], loc="lower left", fontsize=8, framealpha=0.9)
        if fp16:
            scale = axes[2]
            scale.plot(kept_steps, [p.loss_scale for p in h.kept], color=LOSS_SCALE,
                       drawstyle="steps-pre", gid="loss-scale")  # fmt: skip
            scale.set_yscale("log", base=2)
            scale.set_ylabel("fp16 loss scale")

        # ----- the marks: a line through every panel, a label in the band above -------------
        for m, text, (left, _), row in zip(marks, texts, spans, rows, strict=True):
            color = MARK_COLORS[m.kind]
            style = {"color": color, "linewidth": 1.0, "linestyle": (0, (3, 2)), "alpha": 0.85}
            for panel, a in enumerate(axes):
                a.axvline(m.step, gid=f"mark-line-{m.number}-{panel}", **style)
            above = transforms.blended_transform_factory(ax.transData, ax.transAxes)
            plot_h = ax.get_position().height * height_px
            y = 1 + (6 + row * LABEL_ROW_PX) / plot_h
            ax.plot([m.step, m.step], [1, y], transform=above, clip_on=False,
                    gid=f"mark-leader-{m.number}", **style)  # fmt: skip
            label_at = transforms.blended_transform_factory(fig.transFigure, ax.transAxes)
            ax.text(left / width_px, y, text, transform=label_at, fontsize=prop.get_size(),
                    color=color, va="bottom", ha="left", gid=f"mark-{m.number}",
                    clip_on=False)  # fmt: skip
    return fig


def _tokens_per_step(points: list[Point]) -> int | None:
    """The tokens of one step, when every point agrees on it."""
    if not points or points[0].step <= 0:
        return None
    each = points[0].tokens // points[0].step
    return each if each and all(p.tokens == p.step * each for p in points) else None


def _pad_limits(ax, values: list[float], floor: float) -> None:
    lo, hi = min([*values, floor]), max(values)
    ax.set_ylim(lo, hi * 1.15 if hi > 0 else 1.0)


def _off_scale(ax, points: list[tuple[int, float | None, str]], top: float) -> None:
    """A marker on the top edge, with its value, for each point above the axis (or not
    finite): a spike stays visible without flattening the rest of the curve."""
    from matplotlib import transforms

    edge = transforms.blended_transform_factory(ax.transData, ax.transAxes)
    for step, value, color in points:
        if value is None or (math.isfinite(value) and value <= top):
            continue
        text = f"{value:.1f}" if math.isfinite(value) else str(value)
        ax.plot([step], [0.985], marker="^", color=color, markersize=6, transform=edge,
                clip_on=False, gid="off-scale")  # fmt: skip
        ax.text(step, 0.95, f" {text}", transform=edge, color=color, fontsize=8, va="top",
                ha="left", bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})  # fmt: skip
