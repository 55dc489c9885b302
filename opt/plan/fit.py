"""Fitting the time model's constants on published runs, and checking them on others.

A run's prediction uses only what a planner knows before training: the hardware (peak,
links), the model shape and the layout (TP, PP, DP, micro-batch, schedule, recompute).
Where a source does not state the micro-batch or the number of virtual pipeline stages,
the prediction takes the planner's choice: the fastest of the planner's options by the
model itself. The reported throughput enters only the fit, never a prediction of the run
it came from when that run is held out.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import cache

from opt.hardware import get_accelerator
from opt.plan.memory import training_state_bytes
from opt.plan.published import PublishedRun
from opt.plan.timing import MEGATRON, Efficiency, Layout, executed_flops, step_time

MICRO_BATCHES = (1, 2, 4, 8, 16)
STAGES_PER_RANK = (1, 2, 4)


@dataclass(frozen=True)
class Terms:
    """A layout's step time at efficiency 1, split so that any efficiency is arithmetic."""

    layout: Layout
    compute_at_1: float
    tp_s: float
    stretch: float  # stage imbalance / (1 - bubble)
    overlapped_s: float  # FSDP traffic, hidden under compute when it is shorter
    exposed_s: float  # pipeline sends and a replicated model's gradient all-reduce

    def total(self, efficiency: float) -> float:
        pipe = (self.compute_at_1 / efficiency + self.tp_s) * self.stretch
        return max(pipe, self.overlapped_s) + self.exposed_s


def candidate_layouts(run: PublishedRun) -> list[Layout]:
    per_rank = run.batch_sequences // run.dp
    mbs = [run.micro_batch] if run.micro_batch else [b for b in MICRO_BATCHES if per_rank % b == 0]
    vs = [run.stages_per_rank] if run.stages_per_rank else STAGES_PER_RANK
    out = []
    for mb, v in itertools.product(mbs, vs):
        m = per_rank // mb
        if v > 1 and (run.pp == 1 or run.pp * v > run.args.n_layers or m % run.pp):
            continue  # the interleaved schedule's own rules (opt/parallel/rules.py)
        if run.pp > 1 and m < run.pp:
            continue
        out.append(Layout(run.tp, run.pp, run.dp, mb, m, "full", False, v, run.data_parallel))
    return out


@cache
def run_terms(run: PublishedRun) -> tuple[Terms, ...]:
    terms = []
    for lay in candidate_layouts(run):
        local = training_state_bytes(run.args, lay.tp, lay.pp, 1, lay.stages_per_rank,
                                     run.seq_len)[0]["parameters"]  # fmt: skip
        # fairscale's FSDP (OPT) and Megatron both rerun the whole block under recompute.
        s = step_time(run.args, run.seq_len, lay, get_accelerator(run.gpu), run.gpus_per_node,
                      1.0, MEGATRON, network_gbps=run.network_gbps,
                      local_parameters=local)  # fmt: skip
        stretch = s.stage_imbalance / (1 - s.bubble)
        overlapped = s.dp_s if lay.data_parallel == "fsdp" else 0.0
        exposed = s.pp_s + (s.dp_s if lay.data_parallel == "replicate" else 0.0)
        terms.append(Terms(lay, s.compute_s, s.tp_s, stretch, overlapped, exposed))
    return tuple(terms)


def counted_flops(run: PublishedRun) -> float:
    """One step's FLOPs in the source's own count."""
    tokens = run.batch_sequences * run.seq_len
    model, executed = executed_flops(run.args, run.seq_len, tokens, "full", MEGATRON)
    return executed if run.counts_recompute else model


def predict(run: PublishedRun, eff: Efficiency) -> tuple[float, Layout]:
    """(TFLOP/s per GPU in the source's count, the layout chosen where the source is silent)."""
    e = eff.at(run.args.d_model, run.tp)
    best = min(run_terms(run), key=lambda t: t.total(e))
    return counted_flops(run) / run.gpus / best.total(e) / 1e12, best.layout


def fit(runs, fitted_on: str) -> Efficiency:
    """The two constants minimising the squared log error over ``runs``: a grid, then
    coordinate-wise golden-section refinement."""

    def loss(peak_fraction: float, half_width: float) -> float:
        eff = Efficiency(peak_fraction, half_width, "")
        return sum(math.log(predict(r, eff)[0] / r.reported_tflops) ** 2 for r in runs)

    grid = itertools.product([0.30 + 0.02 * i for i in range(36)], [0, 50, 100, 200, 400, 800])
    p, w = min(grid, key=lambda pw: loss(*pw))
    for _ in range(6):
        p = _golden(lambda x, w=w: loss(x, w), max(0.05, p - 0.05), min(1.0, p + 0.05))
        w = _golden(lambda x, p=p: loss(p, x), max(0.0, w - 200), w + 200)
    return Efficiency(round(p, 4), round(w, 1), fitted_on)


def _golden(f, lo: float, hi: float, steps: int = 30) -> float:
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(steps):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if f(a) < f(b):
            hi = b
        else:
            lo = a
    return (lo + hi) / 2


@dataclass
class HeldOut:
    run: PublishedRun
    efficiency: Efficiency
    predicted: float
    layout: Layout

    @property
    def error(self) -> float:
        return self.predicted / self.run.reported_tflops - 1


def held_out(train, test, fitted_on: str) -> list[HeldOut]:
    eff = fit(train, fitted_on)
    return [HeldOut(r, eff, *predict(r, eff)) for r in test]


def leave_one_out(runs) -> list[HeldOut]:
    out = []
    for i, run in enumerate(runs):
        rest = [r for j, r in enumerate(runs) if j != i]
        out += held_out(rest, [run], f"the other {len(rest)} runs")
    return out
