"""How training cost grows with sequence length and width, against the FLOP model.

    python bench/cost_growth.py                        # 2-layer opt-125m cut, ~5-6 min, 2 cores
    python bench/cost_growth.py --quick                # smoke run: smaller points, 2 steps each
    python bench/cost_growth.py --write BENCHMARKS.md  # + bench/cost_growth.svg, linked from it

Two series of the real training step (``Trainer.train_step()``: data, forward, loss, backward,
clip, fused AdamW), fp32, at a fixed number of tokens per step:

1. sequence length doubling, 256 -> 2048, at d_model 768 (opt-125m), micro-batch
   tokens / seq_len, so every matmul has the same shape and only attention grows;
2. width doubling, d_model 384 -> 1536 (heads d_model / 64, FFN 4 x d_model), seq 512.

Each point runs in a process of its own (this script with ``--point``), so its max RSS is
its own. The prediction is ``training_flops_per_token(model_args, seq_len) x tokens/step``;
a point's measured/predicted ratio is its seconds per FLOP over the first point's, so 1.0
means cost grew exactly as the FLOP model says. A series passes when every ratio is within
20% of 1.0. The FLOP model counts attention in full (the MFU convention), while causal SDPA
computes about half of it, so a causal-aware ratio (attention FLOPs halved) is shown beside.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from opt.config import load_config
from opt.data.prepare import ensure_builtin_dataset
from opt.models.flops import training_flops_per_token
from opt.models.sizes import OPT_VOCAB_SIZE
from opt.train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from report import aligned_table, command_line, machine_info, write_section

TITLE = "## Cost growth: sequence length and width against the FLOP model (CPU)"
QUICK_TITLE = "## Cost growth: sequence length and width against the FLOP model (CPU, --quick)"
SVG_PATH = Path(__file__).parent / "cost_growth.svg"
MODEL = "opt-125m"
HEAD_DIM = 64
TOLERANCE = 0.20
MIN_STEPS = 5
MAX_SEQ_LEN = 2048  # opt-125m's learned position table
RESULT_MARKER = "COST_GROWTH_POINT "
MiB = 2**20

DEFAULTS = {"layers": 2, "tokens": 2048, "seq_lens": "256,512,1024,2048",
            "widths": "384,768,1536", "width_seq": 512, "warmup": 1, "steps": 5}  # fmt: skip
QUICK = {"layers": 2, "tokens": 256, "seq_lens": "64,128,256",
         "widths": "192,384,768", "width_seq": 128, "warmup": 1, "steps": 2}  # fmt: skip


# ----- one point, in its own process ---------------------------------------------------------
@dataclass(frozen=True)
class Point:
    layers: int
    d_model: int
    seq_len: int
    tokens: int
    """Tokens per optimizer step: micro-batch tokens / seq_len, grad_accum 1."""

    @property
    def n_heads(self) -> int:
        return self.d_model // HEAD_DIM

    @property
    def micro_batch(self) -> int:
        return self.tokens // self.seq_len

    @property
    def shape(self) -> str:
        return f"d {self.d_model}, {self.n_heads} heads, {self.micro_batch} x {self.seq_len}"


@dataclass
class Measurement:
    times: list[float]
    """Seconds of each measured step."""
    cpu_times: list[float]
    """CPU seconds of this process (all threads) in each measured step."""
    flops: float
    """Predicted FLOPs per step: training_flops_per_token x tokens, attention in full (MFU)."""
    causal_flops: float
    """The same with the attention term halved: what a causal kernel computes."""
    attention_flops: float
    """The attention term of ``flops`` (QK^T and AV, forward and backward)."""
    max_rss: int
    """Bytes: this point's process at its peak."""
    base_rss: int
    """Bytes: the same process's peak before the Trainer was built (interpreter, torch)."""
    loss: float
    """Loss of the first measured step, a sanity check that it trained."""

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def cores_used(self) -> float:
        """CPU over wall time in a median step: below the thread count, the step waited, for
        cores other work held (a shared machine) or in its own serial parts."""
        return statistics.median(c / t for c, t in zip(self.cpu_times, self.times, strict=True))


def config_overrides(point: Point, data: Path, tmp: Path) -> list[str]:
    overrides = {
        "run.name": "cost-growth",
        "run.dir": str(tmp / "runs"),
        "model.name": MODEL,
        "model.n_layers": point.layers,
        "model.n_heads": point.n_heads,
        "model.d_model": point.d_model,
        "data.path": str(data),
        "data.seq_len": point.seq_len,
        "train.micro_batch_size": point.micro_batch,
        "train.batch_tokens": point.tokens,
        "train.precision": "fp32",
        "train.device": "cpu",
        "checkpoint.dir": str(tmp / "checkpoints"),
        "logbook.dir": str(tmp / "logbook"),
        "metrics.tensorboard": False,
        "metrics.peak_tflops": 1.0,  # > 0: the trainer measures no matmul peak itself
    }
    # json.dumps gives TOML-compatible literals for strings, ints and booleans.
    return [f"--{k}={json.dumps(v)}" for k, v in overrides.items()]


def _max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_point(spec: dict) -> Measurement:
    """Build a trainer for one point and time its steps (runs in the point's own process)."""
    point = Point(**spec["point"])
    torch.set_num_threads(spec["threads"])
    base_rss = _max_rss()
    cfg = load_config(None, config_overrides(point, Path(spec["data"]), Path(spec["tmp"])))
    trainer = Trainer(cfg)
    times, cpu_times, losses = [], [], []
    for i in range(spec["warmup"] + spec["steps"]):
        start, cpu_start = time.perf_counter(), time.process_time()
        result = trainer.train_step()
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        phase = "warmup" if i < spec["warmup"] else "step"
        progress = f"  [{point.shape}] {phase} {i + 1}: {elapsed:.3f} s, loss {result.loss:.4f}"
        print(progress, file=sys.stderr, flush=True)
        if i >= spec["warmup"]:
            times.append(elapsed)
            cpu_times.append(cpu)
            losses.append(result.loss)
    per_token = training_flops_per_token(trainer.model_args, point.seq_len)
    attention = per_token - training_flops_per_token(trainer.model_args, 0)  # seq 0: matmuls
    return Measurement(
        times=times,
        cpu_times=cpu_times,
        flops=per_token * point.tokens,
        causal_flops=(per_token - attention / 2) * point.tokens,
        attention_flops=attention * point.tokens,
        max_rss=_max_rss(),
        base_rss=base_rss,
        loss=losses[0],
    )


def measure(point: Point, args: argparse.Namespace, data: Path, tmp: Path) -> Measurement:
    """Run one point in a fresh process of this script; its progress goes to our stderr."""
    spec = {
        "point": asdict(point),
        "threads": args.threads,
        "warmup": args.warmup,
        "steps": args.steps,
        "data": str(data),
        "tmp": str(tmp),
    }
    command = [sys.executable, str(Path(__file__).resolve()), "--point", json.dumps(spec)]
    proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if proc.returncode != 0 or not lines:
        sys.exit(f"point {point.shape} failed (exit {proc.returncode}):\n{proc.stdout}")
    return Measurement(**json.loads(lines[-1][len(RESULT_MARKER) :]))


# ----- a series ------------------------------------------------------------------------------
@dataclass
class Series:
    name: str
    axis: str
    """The dimension that doubles: seq_len or d_model."""
    points: list[Point]
    results: list[Measurement]

    def x(self, point: Point) -> int:
        return getattr(point, self.axis)

    def ratios(self, causal: bool = False) -> list[float]:
        """Measured over predicted time, predicted from the first point's FLOP rate."""
        flops = [m.causal_flops if causal else m.flops for m in self.results]
        rates = [f / m.median for f, m in zip(flops, self.results, strict=True)]
        return [rates[0] / rate for rate in rates]

    def predicted_seconds(self, causal: bool = False) -> list[float]:
        return [m.median / r for m, r in zip(self.results, self.ratios(causal), strict=True)]

    def passed(self, causal: bool = False) -> bool:
        return all(abs(r - 1.0) <= TOLERANCE for r in self.ratios(causal))

    def verdict(self) -> str:
        worst = max(self.ratios(), key=lambda r: abs(r - 1.0))
        causal_worst = max(self.ratios(causal=True), key=lambda r: abs(r - 1.0))
        return (
            f"{self.name}: {'PASS' if self.passed() else 'FAIL'} (ratios "
            f"{_range(self.ratios())}, furthest from 1.0: {worst:.3f}; tolerance "
            f"{TOLERANCE:.0%}); causal-aware: {'PASS' if self.passed(True) else 'FAIL'} "
            f"({_range(self.ratios(True))}, furthest {causal_worst:.3f})"
        )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def _range(values: list[float]) -> str:
    return f"{min(values):.3f}-{max(values):.3f}"


def build_series(args: argparse.Namespace, data: Path, tmp: Path) -> list[Series]:
    seq = [Point(args.layers, 768, s, args.tokens) for s in args.seq_lens]
    width = [Point(args.layers, d, args.width_seq, args.tokens) for d in args.widths]
    measured: dict[Point, Measurement] = {}
    for i, point in enumerate(dict.fromkeys(seq + width)):  # a shared point is measured once
        print(f"point {i + 1}: {point.shape}, {point.layers} layers", file=sys.stderr, flush=True)
        measured[point] = measure(point, args, data, tmp / f"point{i}")
    return [
        Series("sequence length", "seq_len", seq, [measured[p] for p in seq]),
        Series("width", "d_model", width, [measured[p] for p in width]),
    ]


# ----- reporting -----------------------------------------------------------------------------
def markdown_table(series: Series) -> str:
    header = (
        "shape",
        "tokens/step",
        "predicted GFLOP/step",
        "attention share",
        "median s/step",
        "min-max s",
        "GFLOP/s",
        "measured/predicted",
        "causal-aware measured/predicted",
        "cores used",
        "max RSS MiB",
    )
    rows = [header]
    zipped = zip(series.points, series.results, series.ratios(), series.ratios(True), strict=True)
    for point, m, ratio, causal in zipped:
        rows.append(
            (
                point.shape,
                str(point.tokens),
                f"{m.flops / 1e9:.1f}",
                f"{m.attention_flops / m.flops:.1%}",
                f"{m.median:.3f}",
                f"{min(m.times):.2f}-{max(m.times):.2f}",
                f"{m.flops / m.median / 1e9:.1f}",
                f"{ratio:.3f}",
                f"{causal:.3f}",
                f"{m.cores_used:.2f}",
                f"{m.max_rss / MiB:.0f}",
            )
        )
    return aligned_table(rows)


def causal_note(seq: Series) -> str:
    """The two attention counts, and how far each leaves the sequence series from 1.0."""
    full = max(abs(r - 1.0) for r in seq.ratios())
    causal = max(abs(r - 1.0) for r in seq.ratios(True))
    return (
        "`training_flops_per_token` counts attention as 2 x 2 x seq_len x d_model FLOPs per "
        "layer and token, in full, as the MFU convention (Megatron, PaLM) does. The trainer's "
        "attention is causal SDPA, and PyTorch's fused CPU kernel stops each query block at "
        "the diagonal, so it does about half that work. The causal-aware column predicts with "
        "the attention term halved. In this run the sequence series' ratio furthest from 1.0 "
        f"is {causal:.1%} off with the causal-aware count and {full:.1%} off with the full one. "
        "The PASS/FAIL above is on the full (MFU) count."
    )


def section_body(
    series: list[Series],
    args: argparse.Namespace,
    info: dict,
    command: str,
    load: tuple[float, float],
    svg_link: str,
) -> str:
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    seq, width = series
    base_rss = max(m.base_rss for s in series for m in s.results) / MiB
    lines = [
        f"- Date: {date}",
        f"- Machine: {info['cpu']}; {info['software']}; {info['threads']} threads",
        f"- Command: `{command}`",
        f"- Load average (1 min) at start and end: {load[0]:.2f}, {load[1]:.2f} (the machine "
        "is shared: a load above the thread count means other work competed for the cores)",
        f"- Model: {MODEL} shape cut to {_count(args.layers, 'layer')}, head_dim "
        f"{HEAD_DIM}, FFN 4 x d_model, vocab {OPT_VOCAB_SIZE} (tied head), dropout 0.1; fp32; "
        f"{args.tokens} tokens a step (micro-batch tokens / seq_len, grad_accum 1); fused "
        "AdamW, grad clip 1.0",
        f"- Timing: `Trainer.train_step()`, median of {_count(args.steps, 'step')} after "
        f"{_count(args.warmup, 'warmup step')}; each point in a fresh process of its own, "
        "so its max RSS is its own (`ru_maxrss`; the interpreter and torch alone reach at "
        f"most {base_rss:.0f} MiB before the Trainer is built)",
        "",
        f"![measured and predicted seconds per step]({svg_link})",
        "",
        f"### Sequence length (d_model 768, {args.tokens} tokens a step)",
        "",
        markdown_table(seq),
        "",
        f"### Width (seq {args.width_seq}, {args.tokens} tokens a step)",
        "",
        markdown_table(width),
        "",
        f"- {seq.verdict()}",
        f"- {width.verdict()}",
        "",
        "Predicted GFLOP/step is `training_flops_per_token(model_args, seq_len)` x tokens/step "
        "(forward + backward = 3 x forward, no recompute); attention share is its attention "
        "term. Measured/predicted is a point's seconds per predicted FLOP over the first "
        "point's of its series: 1.0 means time grew exactly as the FLOPs did, below 1.0 that "
        "the point ran at a higher FLOP rate than the first. A series passes when every "
        f"ratio is within {TOLERANCE:.0%} of 1.0. In the sequence series every matmul has the "
        "same shape (micro-batch x seq_len is constant), so only attention changes. In the "
        "width series, work the FLOP model leaves out weighs differently at each width: the "
        f"softmax and cross-entropy over {OPT_VOCAB_SIZE} logits a token (the same at every "
        "width), LayerNorm, dropout and the embedding gradient (linear in d_model) and the "
        "optimizer (per parameter, not per token). Cores used is the process's CPU time over "
        f"wall time in a median step, out of {args.threads} threads: below the thread count "
        "the step waited, in serial parts of its own (which weigh most in the smallest "
        "shapes) or for cores that other work held; a point well below its neighbours was "
        "slowed by the machine rather than by the model.",
        "",
        causal_note(seq),
    ]
    return "\n".join(lines)


# ----- the figure: hand-written SVG, no plotting library -------------------------------------
CURVES = (  # (label, colour, dash pattern)
    ("measured", "#1f77b4", "none"),
    ("predicted: FLOP model", "#d62728", "6 4"),
    ("predicted: causal attention halved", "#2ca02c", "2 3"),
)
PANEL_W, PANEL_H = 420, 300
CENTRED = {"text_anchor": "middle"}


def svg_figure(series: list[Series]) -> str:
    """One panel per series: measured s/step and the two predictions, scaled by the FLOP
    rate of the series' first point."""
    width = PANEL_W * len(series)
    root = {
        "xmlns": "http://www.w3.org/2000/svg",
        "width": width,
        "height": PANEL_H,
        "viewBox": f"0 0 {width} {PANEL_H}",
        "font-family": "sans-serif",
        "font-size": 11,
    }
    body = [_el("rect", width="100%", height="100%", fill="white")]
    body += [el for i, s in enumerate(series) for el in _svg_panel(s, i * PANEL_W)]
    return f"<svg {_attrs(root)}>\n" + "\n".join(body) + "\n</svg>\n"


def _attrs(attrs: dict) -> str:
    def value(v) -> str:
        return f"{v:.1f}" if isinstance(v, float) else html.escape(str(v))

    return " ".join(f'{k}="{value(v)}"' for k, v in attrs.items())


def _el(tag: str, text: str = "", **attrs) -> str:
    """An SVG element; keyword names take '_' for '-' (stroke_width: stroke-width)."""
    inner = _attrs({k.replace("_", "-"): v for k, v in attrs.items()})
    return f"<{tag} {inner}>{html.escape(text)}</{tag}>" if text else f"<{tag} {inner}/>"


def _pen(colour: str, dash: str) -> dict:
    return {"stroke": colour, "stroke_width": 2, "stroke_dasharray": dash}


def _ticks(top: float) -> list[float]:
    """0, step, 2 step, ... up to the first tick at or above ``top``; step 1, 2 or 5 x 10^k."""
    raw = top / 4
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    return [i * step for i in range(math.ceil(top / step - 1e-9) + 1)]


def _svg_panel(series: Series, left: int) -> list[str]:
    x0, x1, bottom, top = left + 60, left + PANEL_W - 20, PANEL_H - 45, 75  # the plot area
    curves = [[m.median for m in series.results], *map(series.predicted_seconds, (False, True))]
    ticks = _ticks(max(max(c) for c in curves))
    n = len(series.points)
    xs = [x0 + (x1 - x0) * i / (n - 1) for i in range(n)]  # doublings: evenly spaced

    def y(seconds: float) -> float:
        return bottom - (bottom - top) * seconds / ticks[-1]

    mid_x, mid_y = (x0 + x1) / 2, (top + bottom) / 2
    title = f"{series.name} doubling"
    out = [_el("text", title, x=mid_x, y=18, font_size=13, font_weight="bold", **CENTRED)]
    for i, (label, colour, dash) in enumerate(CURVES):  # legend
        ly = 34 + 13 * i
        out.append(_el("line", x1=x0, y1=ly, x2=x0 + 24, y2=ly, **_pen(colour, dash)))
        out.append(_el("text", label, x=x0 + 30, y=ly + 4))
    for tick in ticks:  # horizontal grid, labelled in seconds
        out.append(_el("line", x1=x0, y1=y(tick), x2=x1, y2=y(tick), stroke="#ddd"))
        out.append(_el("text", f"{tick:g}", x=x0 - 6, y=y(tick) + 4, text_anchor="end"))
    for x, point in zip(xs, series.points, strict=True):
        out.append(_el("text", str(series.x(point)), x=x, y=bottom + 16, **CENTRED))
    out.append(_el("line", x1=x0, y1=bottom, x2=x1, y2=bottom, stroke="black"))
    out.append(_el("line", x1=x0, y1=bottom, x2=x0, y2=top, stroke="black"))
    out.append(_el("text", series.axis, x=mid_x, y=bottom + 34, **CENTRED))
    turn = f"rotate(-90 {left + 16} {mid_y:.1f})"
    out.append(_el("text", "s/step", x=left + 16, y=mid_y, transform=turn, **CENTRED))
    for values, (_, colour, dash) in zip(curves, CURVES, strict=True):
        line = " ".join(f"{x:.1f},{y(v):.1f}" for x, v in zip(xs, values, strict=True))
        out.append(_el("polyline", points=line, fill="none", **_pen(colour, dash)))
    out += [
        _el("circle", cx=x, cy=y(v), r=3, fill=CURVES[0][1])
        for x, v in zip(xs, curves[0], strict=True)
    ]
    return out


# ----- command line --------------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Training step time as sequence length and width double, against "
        "training_flops_per_token (opt-125m shape cut to a few layers, fp32, CPU).",
        epilog="Each point runs in its own process; figures are medians.",
    )
    parser.add_argument("--layers", type=int, help="layers of the cut (default 2)")
    parser.add_argument("--tokens", type=int, help="tokens per step (default 2048; quick 256)")
    parser.add_argument(
        "--seq-lens", help="sequence series, comma-separated (default 256,512,1024,2048)"
    )
    parser.add_argument("--widths", help="width series d_model values (default 384,768,1536)")
    parser.add_argument("--width-seq", type=int, help="seq_len of the width series (default 512)")
    parser.add_argument("--warmup", type=int, help="unmeasured steps per point (default 1)")
    parser.add_argument(
        "--steps", type=int, help=f"measured steps per point, at least {MIN_STEPS} (default 5)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help=f"torch.set_num_threads in every point (default: {torch.get_num_threads()})",
    )
    parser.add_argument(
        "--write",
        type=Path,
        metavar="FILE",
        help="add or replace this benchmark's section in a markdown file (e.g. BENCHMARKS.md) "
        "and write the figure",
    )
    parser.add_argument(
        "--svg",
        type=Path,
        default=SVG_PATH,
        help="where --write puts the figure (default bench/cost_growth.svg)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: seq 64-256 and d_model 192-768 at 256 tokens a step, 1 warmup and "
        "2 measured steps (explicit flags still win)",
    )
    parser.add_argument("--point", help=argparse.SUPPRESS)  # internal: measure one point
    args = parser.parse_args(argv)
    if args.point:
        return args
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.seq_lens, args.widths = _ints(args.seq_lens), _ints(args.widths)
    if len(args.seq_lens) < 2 or len(args.widths) < 2:
        parser.error("--seq-lens and --widths need at least two points each")
    if args.steps < MIN_STEPS and not args.quick:
        parser.error(f"--steps must be at least {MIN_STEPS} for a median (or use --quick)")
    if min(args.layers, args.tokens, args.steps, args.threads, *args.seq_lens) < 1:
        parser.error("--layers, --tokens, --steps, --threads and --seq-lens must be positive")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    for seq in [*args.seq_lens, args.width_seq]:
        if args.tokens % seq or seq > MAX_SEQ_LEN:
            parser.error(f"seq_len {seq} must divide --tokens {args.tokens} and be <= 2048")
    if any(d < HEAD_DIM or d % HEAD_DIM for d in args.widths):
        parser.error(f"--widths must be multiples of the head dimension, {HEAD_DIM}")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.point:
        print(RESULT_MARKER + json.dumps(asdict(run_point(json.loads(args.point)))), flush=True)
        return

    info = machine_info(args.threads)
    print(f"{info['cpu']}\n{info['software']}; torch threads: {args.threads}", flush=True)
    load_at_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="opt-cost-growth-") as tmp:
        data = ensure_builtin_dataset(Path(tmp) / "data", vocab_size=OPT_VOCAB_SIZE)
        series = build_series(args, data, Path(tmp))
    load = (load_at_start, os.getloadavg()[0])
    title = QUICK_TITLE if args.quick else TITLE
    print(f"\n{title}\n")
    for s in series:
        print(f"{s.name} ({s.axis} doubling)\n{markdown_table(s)}\n")
    for s in series:
        print(s.verdict())
    print(f"\n{causal_note(series[0])}")
    print(f"load average (1 min) at start and end: {load[0]:.2f}, {load[1]:.2f}")
    if args.write:
        args.svg.write_text(svg_figure(series))
        link = os.path.relpath(args.svg.resolve(), args.write.resolve().parent)
        write_section(
            args.write, title, section_body(series, args, info, command_line(argv), load, link)
        )
        print(f"wrote {args.svg} and section {title!r} to {args.write}")


if __name__ == "__main__":
    main()
