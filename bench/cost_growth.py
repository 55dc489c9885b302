"""How training cost grows with sequence length and width, against three FLOP models.

    python bench/cost_growth.py --plan                 # the shapes' attention shares, no runs
    python bench/cost_growth.py                        # 6 layers, vocab 8192: ~1 min, 2 cores
    python bench/cost_growth.py --quick                # smoke run: smaller points, 2 steps each
    python bench/cost_growth.py --write BENCHMARKS.md  # + bench/cost_growth.svg, linked from it

Shapes where attention weighs: an opt-125m block (head_dim 64, FFN 4 x d_model, pre-LN) cut
to 6 layers, vocabulary 8192 (the demo tokenizer's size, so that the head does not swamp
the narrow widths), and sequences up to 2048. Two series of the real training step
(``Trainer.train_step()``: data, forward, loss, backward, clip, fused AdamW), fp32, at a
fixed number of tokens per step:

1. sequence length doubling, 256 -> 2048, at d_model 128 (2 heads), micro-batch
   tokens / seq_len: every matmul keeps its shape and only attention grows (its share of
   the FLOPs 15% -> 59%);
2. width doubling, d_model 128 -> 512 (heads d_model / 64) at seq 2048 (attention 59% -> 35%).

Three FLOP models predict each point's time from the first point of its series (its seconds
per FLOP): (a) the MFU count, ``training_flops_per_token``, attention in full as Megatron
and PaLM count it; (b) causal-aware, the attention term halved, the work of a causal kernel
that skips the whole masked half; (c) the control, no attention term at all. A model passes
a series when every measured/predicted ratio is within 20% of 1.0, a band fixed before any
measurement. Before measuring, the script prints each point's attention share and how far
the control would be off if time followed (a) or (b) exactly: outside the band, or the
check could not fail. After its steps, each point also times one layer's SDPA alone,
causal and unmasked, to show what the kernel does with the masked half. Each point runs in
a process of its own (this script with ``--point``), so its max RSS is its own.
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
import torch.nn.functional as F

from opt.config import load_config
from opt.data.prepare import ensure_builtin_dataset
from opt.models.flops import training_flops_per_token
from opt.models.sizes import ModelArgs, get_model_args
from opt.train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from report import aligned_table, command_line, machine_info, write_section

TITLE = "## Cost growth: sequence length and width against the FLOP model (CPU)"
QUICK_TITLE = "## Cost growth: sequence length and width against the FLOP model (CPU, --quick)"
SVG_PATH = Path(__file__).parent / "cost_growth.svg"
MODEL = "opt-125m"
HEAD_DIM = 64
BAND = 0.20
"""A FLOP model passes a series when every measured/predicted ratio is within this of 1.0.
Fixed before measuring; not to be tuned to the results."""
MIN_ATTENTION_SHARE = 1 / 3
CONTENDED = 0.75
"""A point whose process used less than this share of its threads' cores is flagged."""
MIN_STEPS = 5
MAX_SEQ_LEN = 2048  # opt-125m's learned position table
RESULT_MARKER = "COST_GROWTH_POINT "
MiB = 2**20

DEFAULTS = {"layers": 6, "vocab": 8192, "tokens": 2048, "seq_lens": "256,512,1024,2048",
            "seq_width": 128, "widths": "128,256,512", "width_seq": 2048, "warmup": 1,
            "steps": 5}  # fmt: skip
QUICK = {"layers": 2, "vocab": 8192, "tokens": 1024, "seq_lens": "256,512,1024",
         "seq_width": 64, "widths": "64,128", "width_seq": 1024, "warmup": 1,
         "steps": 2}  # fmt: skip


# ----- the FLOP models -----------------------------------------------------------------------
@dataclass(frozen=True)
class FlopModel:
    key: str
    name: str
    attention_weight: float
    """How much of ``training_flops_per_token``'s attention term this model counts."""
    why: str


FLOP_MODELS = (
    FlopModel("a", "MFU count", 1.0, "attention in full, as Megatron and PaLM count it"),
    FlopModel(
        "b", "causal-aware", 0.5, "attention halved: the causal kernel skips the masked half"
    ),
    FlopModel("c", "control", 0.0, "no attention term"),
)
MFU, CAUSAL, CONTROL = FLOP_MODELS


# ----- one point -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Point:
    layers: int
    d_model: int
    seq_len: int
    tokens: int
    """Tokens per optimizer step: micro-batch tokens / seq_len, grad_accum 1."""
    vocab: int

    @property
    def n_heads(self) -> int:
        return self.d_model // HEAD_DIM

    @property
    def micro_batch(self) -> int:
        return self.tokens // self.seq_len

    @property
    def shape(self) -> str:
        return (
            f"d {self.d_model}, {_count(self.n_heads, 'head')}, {self.micro_batch} x {self.seq_len}"
        )

    def model_args(self) -> ModelArgs:
        """The shape the trainer builds from ``config_overrides`` (checked in ``run_point``)."""
        return get_model_args(MODEL).reshaped(self.layers, self.n_heads, self.d_model, self.vocab)

    def dense_flops(self) -> float:
        """Training FLOPs of a step without attention's QK^T and AV: every matmul."""
        return training_flops_per_token(self.model_args(), 0) * self.tokens

    def attention_flops(self) -> float:
        """The attention term of ``training_flops_per_token`` x tokens, counted in full."""
        per_token = training_flops_per_token(self.model_args(), self.seq_len)
        return per_token * self.tokens - self.dense_flops()

    def flops(self, model: FlopModel) -> float:
        return self.weighted_flops(model.attention_weight)

    def weighted_flops(self, attention_weight: float) -> float:
        return self.dense_flops() + attention_weight * self.attention_flops()

    def attention_share(self) -> float:
        """Attention's share of the MFU count (the attention term over the total)."""
        return self.attention_flops() / self.flops(MFU)


@dataclass
class Measurement:
    times: list[float]
    """Seconds of each measured step."""
    cpu_times: list[float]
    """CPU seconds of this process (all threads) in each measured step."""
    max_rss: int
    """Bytes: this point's process at its peak."""
    base_rss: int
    """Bytes: the same process's peak before the Trainer was built (interpreter, torch)."""
    loss: float
    """Loss of the first measured step, a sanity check that it trained."""
    sdpa_causal: float
    """Median seconds of one layer's attention alone at this shape, forward + backward,
    causal as the model calls it (``scaled_dot_product_attention(is_causal=True)``)."""
    sdpa_full: float
    """The same without the mask: the work the MFU count describes."""

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
        "model.vocab_size": point.vocab,
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
    if trainer.model_args != point.model_args():  # the FLOP counts were made for this shape
        sys.exit(f"trainer built {trainer.model_args}, not {point.model_args()}")
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
    causal, full = time_sdpa(point, spec["steps"])
    return Measurement(times, cpu_times, _max_rss(), base_rss, losses[0], causal, full)


def time_sdpa(point: Point, repeats: int) -> tuple[float, float]:
    """Median seconds of forward + backward of one layer's ``scaled_dot_product_attention``
    at this point's shape, causal and unmasked, alternating so that drift hits both: what
    the fused kernel does with the masked half, measured rather than assumed."""
    shape = (point.micro_batch, point.n_heads, point.seq_len, HEAD_DIM)  # (B, H, T, Dh)
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(repeats + 1):  # the first round warms up
        for causal in (True, False):
            start = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward()
            if i:
                times[causal].append(time.perf_counter() - start)
    return statistics.median(times[True]), statistics.median(times[False])


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
    results: list[Measurement] | None = None

    def x(self, point: Point) -> int:
        return getattr(point, self.axis)

    def growth(self, model: FlopModel) -> list[float]:
        """Each point's predicted FLOPs over the first point's."""
        flops = [p.flops(model) for p in self.points]
        return [f / flops[0] for f in flops]

    def ratios(self, model: FlopModel) -> list[float]:
        """Measured time over predicted time, predicted from the first point's seconds per
        FLOP: measured growth over ``growth(model)``."""
        times = [m.median for m in self.results]
        return [t / times[0] / g for t, g in zip(times, self.growth(model), strict=True)]

    def ratios_if(self, truth: FlopModel, model: FlopModel) -> list[float]:
        """The ratios ``model`` would get if time grew exactly as ``truth`` counts: what the
        check can tell apart, known before measuring."""
        pairs = zip(self.growth(truth), self.growth(model), strict=True)
        return [t / g for t, g in pairs]

    def kernel_ratios(self) -> list[float]:
        """A diagnostic, not a verdict: the ratios with each point's attention term weighted
        by its kernel's measured causal/unmasked time, so what is left over is the rest of
        the step changing its FLOP rate."""
        flops = [
            p.weighted_flops(m.sdpa_causal / m.sdpa_full)
            for p, m in zip(self.points, self.results, strict=True)
        ]
        times = [m.median for m in self.results]
        return [t / times[0] / (f / flops[0]) for t, f in zip(times, flops, strict=True)]

    def predicted_seconds(self, model: FlopModel) -> list[float]:
        return [self.results[0].median * g for g in self.growth(model)]

    def passed(self, model: FlopModel) -> bool:
        return within_band(self.ratios(model))

    def verdict(self, model: FlopModel) -> str:
        ratios = self.ratios(model)
        return (
            f"{self.name}, ({model.key}) {model.name} ({model.why}): "
            f"{'PASS' if self.passed(model) else 'FAIL'} (ratios {_range(ratios)}, furthest "
            f"from 1.0: {furthest(ratios):.3f}; band {BAND:.0%})"
        )

    def separation(self) -> str:
        """Before measuring: how far the control would be off if (a) or (b) held exactly."""
        off = {m.key: furthest(self.ratios_if(m, CONTROL)) for m in (MFU, CAUSAL)}
        b_under_a = furthest(self.ratios_if(MFU, CAUSAL))
        can_fail = all(not within_band([r]) for r in off.values())
        return (
            f"{self.name}: if time grew as (a) counts, the control's furthest ratio would be "
            f"{off['a']:.3f}; as (b) counts, {off['b']:.3f}: "
            + (
                f"{'both' if can_fail else 'NOT both'} outside the {BAND:.0%} band"
                + ("" if can_fail else ", so the control check cannot fail on this series")
            )
            + f". (b)'s furthest ratio if (a) held: {b_under_a:.3f}."
        )


def within_band(ratios: list[float]) -> bool:
    return all(abs(r - 1.0) <= BAND for r in ratios)


def furthest(ratios: list[float]) -> float:
    return max(ratios, key=lambda r: abs(r - 1.0))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def _range(values: list[float]) -> str:
    return f"{min(values):.3f}-{max(values):.3f}"


def plan_series(args: argparse.Namespace) -> list[Series]:
    def point(d_model: int, seq_len: int) -> Point:
        return Point(args.layers, d_model, seq_len, args.tokens, args.vocab)

    return [
        Series("sequence length", "seq_len", [point(args.seq_width, s) for s in args.seq_lens]),
        Series("width", "d_model", [point(d, args.width_seq) for d in args.widths]),
    ]


def measure_series(series: list[Series], args, data: Path, tmp: Path) -> None:
    points = dict.fromkeys(p for s in series for p in s.points)  # a shared point runs once
    measured: dict[Point, Measurement] = {}
    for i, point in enumerate(points):
        print(f"point {i + 1}/{len(points)}: {point.shape}", file=sys.stderr, flush=True)
        measured[point] = measure(point, args, data, tmp / f"point{i}")
    for s in series:
        s.results = [measured[p] for p in s.points]


# ----- reporting -----------------------------------------------------------------------------
def shares_table(series: Series) -> str:
    """The plan, before measuring: each point's FLOPs and attention share, and its growth
    over the first point under each FLOP model."""
    header = ("shape", "GFLOP/step (a)", "attention share")
    header += tuple(f"growth ({m.key})" for m in FLOP_MODELS)
    rows = [header]
    growth = [series.growth(m) for m in FLOP_MODELS]
    for i, p in enumerate(series.points):
        rows.append(
            (
                p.shape,
                f"{p.flops(MFU) / 1e9:.1f}",
                f"{p.attention_share():.1%}",
                *(f"{g[i]:.3f}" for g in growth),
            )
        )
    return aligned_table(rows)


def markdown_table(series: Series) -> str:
    header = ("shape", "GFLOP/step (a)", "attention share", "median s/step", "min-max s")
    header += ("GFLOP/s (a)", "GFLOP/s (b)")
    header += tuple(f"measured/predicted ({m.key})" for m in FLOP_MODELS)
    header += ("SDPA causal/unmasked", "kernel-weighted measured/predicted")
    header += ("SDPA x layers / step", "cores used", "max RSS MiB")
    rows = [header]
    ratios = [series.ratios(m) for m in FLOP_MODELS]
    kernel = series.kernel_ratios()
    for i, (p, m) in enumerate(zip(series.points, series.results, strict=True)):
        rows.append(
            (
                p.shape,
                f"{p.flops(MFU) / 1e9:.1f}",
                f"{p.attention_share():.1%}",
                f"{m.median:.3f}",
                f"{min(m.times):.2f}-{max(m.times):.2f}",
                f"{p.flops(MFU) / m.median / 1e9:.1f}",
                f"{p.flops(CAUSAL) / m.median / 1e9:.1f}",
                *(f"{r[i]:.3f}" for r in ratios),
                f"{m.sdpa_causal / m.sdpa_full:.2f}",
                f"{kernel[i]:.3f}",
                f"{p.layers * m.sdpa_causal / m.median:.1%}",
                f"{m.cores_used:.2f}",
                f"{m.max_rss / MiB:.0f}",
            )
        )
    return aligned_table(rows)


def findings(series: list[Series], threads: int) -> list[str]:
    """What the verdicts say together: whether the check could fail, (a) against (b), what
    the kernel was measured to do with the masked half, and which points the machine
    slowed."""
    lines = []
    for s in series:
        if s.passed(CONTROL):
            lines.append(
                f"Control on {s.name}: PASS - INSIDE the band: on this run the check could not "
                "tell a FLOP model without attention from one with it."
            )
        else:
            lines.append(
                f"Control on {s.name}: FAIL - outside the band, as it must be for this check "
                "to be able to fail."
            )
        last = s.results[-1].sdpa_causal / s.results[-1].sdpa_full
        if not s.passed(MFU) and s.passed(CAUSAL):
            lines.append(
                f"On {s.name}, (a) fails and (b) passes: time grew as if attention cost about "
                "half the MFU count. The trainer's attention is causal SDPA, and PyTorch's "
                "fused CPU kernel skips key blocks past the diagonal, work the MFU convention "
                "counts: alone, at the series' last point, its causal time is "
                f"{last:.2f} of its unmasked time."
            )
        elif s.passed(MFU) and not s.passed(CAUSAL):
            lines.append(
                f"On {s.name}, (a) passes and (b) fails, although the kernel's causal time is "
                f"{last:.2f} of its unmasked time at the last point: something else in the step "
                "changed its FLOP rate the other way (see the kernel-weighted column)."
            )
        lines.append(
            f"Diagnostic, not a verdict: with each point's attention term weighted by its "
            f"kernel's measured causal/unmasked time, {s.name}'s ratios are "
            f"{_range(s.kernel_ratios())}; what is left is the rest of the step changing its "
            "FLOP rate (work no model counts, matmuls faster or slower at other shapes)."
        )
    kernel = ", ".join(
        f"{p.seq_len}: {m.sdpa_causal / m.sdpa_full:.2f}"
        for p, m in zip(series[0].points, series[0].results, strict=True)
    )
    lines.append(
        "The kernel alone (one layer's SDPA at the sequence series' shapes, forward + "
        f"backward), causal time over unmasked time by seq_len: {kernel}. 0.5 would be the "
        "masked half skipped exactly, 1.0 no saving."
    )
    contended = [
        f"{p.shape} ({m.cores_used:.2f})"
        for s in series
        for p, m in zip(s.points, s.results, strict=True)
        if m.cores_used < CONTENDED * threads
    ]
    if contended:
        lines.append(
            f"CONTENDED: cores used below {CONTENDED:.0%} of the {threads} threads at "
            f"{'; '.join(dict.fromkeys(contended))}: other work held cores during these "
            "points, and their times say more about the machine than about the model."
        )
    return lines


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
        f"- Model: {MODEL}'s block (pre-LN, ReLU FFN 4 x d_model, head_dim {HEAD_DIM}) cut to "
        f"{_count(args.layers, 'layer')}, vocab {args.vocab} (the demo tokenizer's size; tied "
        "head), dropout 0.1 (none on attention probabilities, so SDPA takes its fused "
        f"kernel); fp32; {args.tokens} tokens a step (micro-batch tokens / seq_len, "
        "grad_accum 1); fused AdamW, grad clip 1.0",
        f"- Timing: `Trainer.train_step()`, median of {_count(args.steps, 'step')} after "
        f"{_count(args.warmup, 'warmup step')}; each point in a fresh process of its own, "
        "so its max RSS is its own (`ru_maxrss`; the interpreter and torch alone reach at "
        f"most {base_rss:.0f} MiB before the Trainer is built)",
        "- FLOP models, each predicting a point's time as the first point's time x its FLOP "
        "growth: "
        + "; ".join(f"({m.key}) {m.name}: {m.why}" for m in FLOP_MODELS)
        + f". A model passes a series when every ratio is within {BAND:.0%} of 1.0, a band "
        "fixed before measuring.",
        "",
        f"![measured and predicted seconds per step, and the ratios]({svg_link})",
        "",
        "### The plan: attention's share and the growth each model predicts (before measuring)",
        "",
        f"Sequence length (d_model {args.seq_width}, {args.tokens} tokens a step):",
        "",
        shares_table(seq),
        "",
        f"Width (seq {args.width_seq}, {args.tokens} tokens a step):",
        "",
        shares_table(width),
        "",
        f"- {seq.separation()}",
        f"- {width.separation()}",
        "",
        f"### Sequence length (d_model {args.seq_width}, {args.tokens} tokens a step)",
        "",
        markdown_table(seq),
        "",
        f"### Width (seq {args.width_seq}, {args.tokens} tokens a step)",
        "",
        markdown_table(width),
        "",
        "### Verdicts",
        "",
        *(f"- {s.verdict(m)}" for s in series for m in FLOP_MODELS),
        "",
        *(f"- {line}" for line in findings(series, args.threads)),
        "",
        "GFLOP/step (a) is `training_flops_per_token(model_args, seq_len)` x tokens/step "
        "(forward + backward = 3 x forward, no recompute); attention share is its attention "
        "term (2 x 2 x seq_len x d_model per layer and token, x 3) over the total. "
        "Measured/predicted is a point's seconds per FLOP of that model over the first "
        "point's: 1.0 means time grew exactly as the model's FLOPs did, above 1.0 that it grew "
        "faster. In the sequence series every matmul has the same shape (micro-batch x "
        "seq_len is constant), so only attention changes; work no model counts (LayerNorm, "
        f"dropout, softmax and cross-entropy over {args.vocab} logits a token, the optimizer) "
        "is the same at every point and pulls the ratios below 1.0 as attention grows. In "
        "the width series that work weighs differently at each width (the cross-entropy "
        "does not grow with d_model, the optimizer grows with the parameters), and narrow "
        "matmuls run at a lower FLOP rate than wide ones. Cores used is the process's CPU "
        f"time over wall time in a median step, out of {args.threads} threads: below the "
        "thread count the step waited, in serial parts of its own or for cores that other "
        "work held; a point well below its neighbours was slowed by the machine rather than "
        "by the model. SDPA causal/unmasked is one layer's `scaled_dot_product_attention` "
        "alone at the point's shape (random contiguous q, k, v; forward + backward; medians "
        "of as many rounds as measured steps, causal and unmasked alternating), timed in the "
        "point's process after its steps: the share of the full count that the causal kernel's "
        "time corresponds to. Kernel-weighted measured/predicted is a diagnostic, not a "
        "verdict: the ratio with each point's attention term weighted by that share. SDPA x "
        "layers / step is the causal time x layers over the median step: how much of the "
        "measured step is attention's kernel.",
    ]
    return "\n".join(lines)


# ----- the figure: hand-written SVG, no plotting library -------------------------------------
COLOURS = {"measured": "#1f77b4", "a": "#d62728", "b": "#2ca02c", "c": "#7f7f7f"}
DASHES = {"measured": "none", "a": "6 4", "b": "2 3", "c": "9 3 2 3"}
PANEL_W, PANEL_H = 440, 300
CENTRED = {"text_anchor": "middle"}


def svg_figure(series: list[Series]) -> str:
    """Top row: measured s/step and each model's prediction (scaled by the first point's
    seconds per FLOP). Bottom row: each model's measured/predicted ratio, the band shaded."""
    width, height = PANEL_W * len(series), 2 * PANEL_H
    root = {
        "xmlns": "http://www.w3.org/2000/svg",
        "width": width,
        "height": height,
        "viewBox": f"0 0 {width} {height}",
        "font-family": "sans-serif",
        "font-size": 11,
    }
    body = [_el("rect", width="100%", height="100%", fill="white")]
    for i, s in enumerate(series):
        body += _seconds_panel(s, i * PANEL_W)
        body += _ratio_panel(s, i * PANEL_W, PANEL_H)
    return f"<svg {_attrs(root)}>\n" + "\n".join(body) + "\n</svg>\n"


def _attrs(attrs: dict) -> str:
    def value(v) -> str:
        return f"{v:.1f}" if isinstance(v, float) else html.escape(str(v))

    return " ".join(f'{k}="{value(v)}"' for k, v in attrs.items())


def _el(tag: str, text: str = "", **attrs) -> str:
    """An SVG element; keyword names take '_' for '-' (stroke_width: stroke-width)."""
    inner = _attrs({k.replace("_", "-"): v for k, v in attrs.items()})
    return f"<{tag} {inner}>{html.escape(text)}</{tag}>" if text else f"<{tag} {inner}/>"


def _pen(key: str) -> dict:
    return {"stroke": COLOURS[key], "stroke_width": 2, "stroke_dasharray": DASHES[key]}


def _ticks(low: float, high: float) -> list[float]:
    """Ticks from the last multiple of step at or below ``low`` to the first at or above
    ``high``; step 1, 2 or 5 x 10^k, about four intervals."""
    raw = (high - low) / 4
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    return [i * step for i in range(first, last + 1)]


def _frame(series: Series, left: int, top_y: int, title: str, ticks: list[float], unit: str):
    """Axes, grid, labels and title of one panel; returns its elements, x positions and y()."""
    x0, x1, bottom, top = left + 60, left + PANEL_W - 20, top_y + PANEL_H - 45, top_y + 88
    n = len(series.points)
    xs = [x0 + (x1 - x0) * i / (n - 1) for i in range(n)]  # doublings: evenly spaced

    def y(value: float) -> float:
        return bottom - (bottom - top) * (value - ticks[0]) / (ticks[-1] - ticks[0])

    mid_x, mid_y = (x0 + x1) / 2, (top + bottom) / 2
    out = [_el("text", title, x=mid_x, y=top_y + 18, font_size=13, font_weight="bold", **CENTRED)]
    for tick in ticks:  # horizontal grid
        out.append(_el("line", x1=x0, y1=y(tick), x2=x1, y2=y(tick), stroke="#ddd"))
        out.append(_el("text", f"{tick:g}", x=x0 - 6, y=y(tick) + 4, text_anchor="end"))
    for x, point in zip(xs, series.points, strict=True):
        out.append(_el("text", str(series.x(point)), x=x, y=bottom + 16, **CENTRED))
    out.append(_el("line", x1=x0, y1=bottom, x2=x1, y2=bottom, stroke="black"))
    out.append(_el("line", x1=x0, y1=bottom, x2=x0, y2=top, stroke="black"))
    out.append(_el("text", series.axis, x=mid_x, y=bottom + 34, **CENTRED))
    turn = f"rotate(-90 {left + 16} {mid_y:.1f})"
    out.append(_el("text", unit, x=left + 16, y=mid_y, transform=turn, **CENTRED))
    return out, xs, y, (x0, x1, top, bottom)


def _legend(labels: list[tuple[str, str]], x0: float, top_y: int) -> list[str]:
    out = []
    for i, (key, label) in enumerate(labels):
        ly = top_y + 34 + 13 * i
        out.append(_el("line", x1=x0, y1=ly, x2=x0 + 24, y2=ly, **_pen(key)))
        out.append(_el("text", label, x=x0 + 30, y=ly + 4))
    return out


def _curve(key: str, xs: list[float], values: list[float], y) -> str:
    line = " ".join(f"{x:.1f},{y(v):.1f}" for x, v in zip(xs, values, strict=True))
    return _el("polyline", points=line, fill="none", **_pen(key))


def _seconds_panel(series: Series, left: int) -> list[str]:
    curves = {"measured": [m.median for m in series.results]}
    curves |= {m.key: series.predicted_seconds(m) for m in FLOP_MODELS}
    ticks = _ticks(0.0, max(max(c) for c in curves.values()))
    title = f"{series.name} doubling: seconds per step"
    out, xs, y, (x0, *_) = _frame(series, left, 0, title, ticks, "s/step")
    labels = [("measured", "measured")]
    labels += [(m.key, f"({m.key}) {m.name}: {m.why.split(':')[0]}") for m in FLOP_MODELS]
    out += _legend(labels, x0, 0)
    out += [_curve(key, xs, values, y) for key, values in curves.items()]
    out += [
        _el("circle", cx=x, cy=y(v), r=3, fill=COLOURS["measured"])
        for x, v in zip(xs, curves["measured"], strict=True)
    ]
    return out


def _ratio_panel(series: Series, left: int, top_y: int) -> list[str]:
    ratios = {m.key: series.ratios(m) for m in FLOP_MODELS}
    values = [v for r in ratios.values() for v in r]
    ticks = _ticks(min(0.7, *values), max(1.3, *values))
    title = f"{series.name}: measured / predicted"
    out, xs, y, (x0, x1, *_) = _frame(series, left, top_y, title, ticks, "ratio")
    band = _el(
        "rect", x=x0, y=y(1 + BAND), width=x1 - x0, height=y(1 - BAND) - y(1 + BAND),
        fill="#e8f4e8",
    )  # fmt: skip
    out.insert(1, band)  # under the grid and the curves
    out.append(_el("line", x1=x0, y1=y(1.0), x2=x1, y2=y(1.0), stroke="black", stroke_width=0.5))
    labels = [(m.key, f"({m.key}) {m.name}: {'PASS' if series.passed(m) else 'FAIL'}")
              for m in FLOP_MODELS]  # fmt: skip
    out += _legend(labels, x0, top_y)
    out.append(_el("text", f"shaded: the {BAND:.0%} band", x=x1, y=top_y + 47, text_anchor="end"))
    for key, values in ratios.items():
        out.append(_curve(key, xs, values, y))
        dots = zip(xs, values, strict=True)
        out += [_el("circle", cx=x, cy=y(v), r=2.5, fill=COLOURS[key]) for x, v in dots]
    return out


# ----- command line --------------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Training step time as sequence length and width double, on shapes "
        "where attention weighs, against three FLOP models (fp32, CPU).",
        epilog="Each point runs in its own process; figures are medians.",
    )
    parser.add_argument("--layers", type=int, help="layers of the cut (default 6)")
    parser.add_argument("--vocab", type=int, help="vocabulary size (default 8192)")
    parser.add_argument("--tokens", type=int, help="tokens per step (default 2048; quick 1024)")
    parser.add_argument(
        "--seq-lens", help="sequence series, comma-separated (default 256,512,1024,2048)"
    )
    parser.add_argument("--seq-width", type=int, help="d_model of the sequence series (128)")
    parser.add_argument("--widths", help="width series d_model values (default 128,256,512)")
    parser.add_argument("--width-seq", type=int, help="seq_len of the width series (2048)")
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
        "--plan",
        action="store_true",
        help="print the attention shares and what the check can tell apart, measure nothing",
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
        help="smoke run: 2 layers, seq 256-1024 and d_model 64-128 at 1024 tokens a step, "
        "1 warmup and 2 measured steps (explicit flags still win)",
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
    numbers = (args.layers, args.vocab, args.tokens, args.steps, args.threads, *args.seq_lens)
    if min(numbers) < 1:
        parser.error(
            "--layers, --vocab, --tokens, --steps, --threads and --seq-lens must be positive"
        )
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    for seq in [*args.seq_lens, args.width_seq]:
        if args.tokens % seq or seq > MAX_SEQ_LEN:
            parser.error(f"seq_len {seq} must divide --tokens {args.tokens} and be <= 2048")
    if any(d < HEAD_DIM or d % HEAD_DIM for d in [*args.widths, args.seq_width]):
        parser.error(
            f"--widths and --seq-width must be multiples of the head dimension, {HEAD_DIM}"
        )
    return args


def print_plan(series: list[Series]) -> None:
    for s in series:
        print(f"{s.name} ({s.axis} doubling), the plan:\n{shares_table(s)}\n", flush=True)
        low = [p.shape for p in s.points if p.attention_share() < MIN_ATTENTION_SHARE]
        if low:
            print(f"attention below a third of the FLOPs at: {'; '.join(low)}", flush=True)
    for s in series:
        print(s.separation(), flush=True)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.point:
        print(RESULT_MARKER + json.dumps(asdict(run_point(json.loads(args.point)))), flush=True)
        return

    series = plan_series(args)
    print_plan(series)
    if args.plan:
        return
    info = machine_info(args.threads)
    print(f"\n{info['cpu']}\n{info['software']}; torch threads: {args.threads}", flush=True)
    load_at_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="opt-cost-growth-") as tmp:
        data = ensure_builtin_dataset(Path(tmp) / "data", vocab_size=args.vocab)
        measure_series(series, args, data, Path(tmp))
    load = (load_at_start, os.getloadavg()[0])
    title = QUICK_TITLE if args.quick else TITLE
    print(f"\n{title}\n")
    for s in series:
        print(f"{s.name} ({s.axis} doubling)\n{markdown_table(s)}\n")
    for s in series:
        for m in FLOP_MODELS:
            print(s.verdict(m))
    print("\n" + "\n".join(findings(series, args.threads)))
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
