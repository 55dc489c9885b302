"""`opt plan`'s time model against published training runs it was not fitted on, and how
fast the planner answers.

    python bench/plan_fit.py --write BENCHMARKS.md

1. Held out by source: the time model's two constants are fitted on the 10 runs of
   Megatron-LM's Table 1 (the constants `opt plan` ships, opt/plan/timing.py) and predict
   MT-NLG, OPT-175B and BLOOM-176B: other teams, systems and clusters.
2. Leave one out: each of the 15 runs predicted by constants fitted on the other 14.
A prediction gets the hardware, the model shape and the layout only (opt/plan/fit.py).
3. Planner speed: `plan()` for four model and cluster sizes, in this process: the first call
   pays for building the meta models and pipeline splits, as `opt plan` does; later calls
   reuse them. The ranking is compared with one that checks every pipeline rank's memory
   instead of the few ranks the planner checks.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from report import aligned_table, command_line, machine_info, write_section  # noqa: E402

from opt.hardware import get_accelerator  # noqa: E402
from opt.models.sizes import ModelArgs, get_model_args  # noqa: E402
from opt.plan import planner  # noqa: E402
from opt.plan.fit import HeldOut, fit, held_out, leave_one_out, predict  # noqa: E402
from opt.plan.published import MEGATRON_2021, RUNS  # noqa: E402
from opt.plan.timing import A100_FIT, EFFICIENCY  # noqa: E402

TITLE = "## `opt plan`'s time model against published runs, and the planner's speed"
TARGET = 0.10

SHAPES = (  # (name, args, gpus, gpu, batch tokens)
    ("opt-1.3b on 16 H100", get_model_args("opt-1.3b"), 16, "h100-80gb", 2**20),
    ("opt-175b on 992 A100", get_model_args("opt-175b"), 992, "a100-80gb", 2_000_000),
    ("530B (105 layers) on 2240 A100", ModelArgs(105, 128, 20480, vocab_size=51200), 2240,
     "a100-80gb", 1920 * 2048),
    ("1T (128 layers) on 3072 A100", ModelArgs(128, 160, 25600, vocab_size=51200), 3072,
     "a100-80gb", 3072 * 2048),
)  # fmt: skip


def _layout_text(h: HeldOut) -> str:
    r, lay = h.run, h.layout
    mb = f"mb {lay.micro_batch}" + ("" if r.micro_batch else " (chosen)")
    v = f"v {lay.stages_per_rank}" + ("" if r.stages_per_rank else " (chosen)")
    dp = "FSDP" if r.data_parallel == "fsdp" else "DP"
    return f"TP {r.tp} x PP {r.pp} x {dp} {r.dp}, {mb}, {v}"


def _rows(results: list[HeldOut], in_fit: set[str]) -> list[tuple[str, ...]]:
    rows = [("run", "GPUs", "layout", "reported TFLOP/s", "predicted", "error", "fitted on",
             "within 10%")]  # fmt: skip
    for h in results:
        held = h.run.name not in in_fit
        rows.append((
            h.run.name, str(h.run.gpus), _layout_text(h), f"{h.run.reported_tflops:g}",
            f"{h.predicted:.1f}", f"{h.error:+.1%}",
            h.efficiency.fitted_on if held else "(in the fit)",
            ("yes" if abs(h.error) <= TARGET else "NO") if held else "",
        ))  # fmt: skip
    return rows


def _tally(results: list[HeldOut]) -> str:
    misses = [h for h in results if abs(h.error) > TARGET]
    text = f"{len(results) - len(misses)} of {len(results)}"
    if not misses:
        return text + "."
    return text + "; misses: " + ", ".join(f"{h.run.name} ({h.error:+.1%})" for h in misses)


def _ranked(c: planner.Candidate) -> tuple:
    """What a ranking row is: the layout, its step time and its memory."""
    return (c.tp, c.pp, c.stages_per_rank, c.micro_batch, c.activation_checkpoint,
            c.sequence_parallel, c.data_parallel, c.step_s, c.memory["total"])  # fmt: skip


def planner_speed(repeats: int) -> list[tuple[str, ...]]:
    rows = [("model and cluster", "layouts", "fitting", "first call s", "median of next s",
             "same ranking, every rank checked")]  # fmt: skip
    for name, args, gpus, gpu, batch in SHAPES:
        job = planner.Job(args, name, 2048, batch, 300 * 10**9)
        cluster = planner.Cluster(get_accelerator(gpu), gpus, 8, EFFICIENCY[gpu])
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            fits, excluded = planner.plan(job, cluster)
            times.append(time.perf_counter() - start)
        ranking = [_ranked(c) for c in fits]
        original = planner._ranks_to_check
        planner._ranks_to_check = lambda ranks: list(range(len(ranks)))
        try:
            full, _ = planner.plan(job, cluster)
        finally:
            planner._ranks_to_check = original
        same = ranking == [_ranked(c) for c in full]
        rows.append((name, str(len(fits) + len(excluded)), str(len(fits)), f"{times[0]:.2f}",
                     f"{statistics.median(times[1:]):.2f}", "yes" if same else "NO"))  # fmt: skip
    return rows


CLI = (  # what a user types: process start, imports and the table included
    ["--model", "opt-175b", "--gpus", "992", "--gpu", "a100-80gb", "--global-batch", "2M"],
    ["--model", "opt-175b", "--layers", "128", "--heads", "160", "--d-model", "25600",
     "--gpus", "3072", "--gpu", "a100-80gb", "--global-batch", "6M", "--tokens", "450B"],
)  # fmt: skip


def cli_speed(repeats: int) -> list[tuple[str, ...]]:
    rows = [("`opt plan` command", "median wall s", "runs")]
    for flags in CLI:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "opt", "plan", *flags], check=True,
                           capture_output=True, cwd=REPO)  # fmt: skip
            times.append(time.perf_counter() - start)
        rows.append((f"`opt plan {shlex.join(flags)}`", f"{statistics.median(times):.2f}",
                     str(repeats)))  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()

    megatron = [r for r in RUNS if r.source == MEGATRON_2021]
    others = [r for r in RUNS if r.source != MEGATRON_2021]
    shipped = fit(megatron, A100_FIT.fitted_on)
    by_source = [HeldOut(r, shipped, *predict(r, shipped)) for r in megatron]
    by_source += held_out(megatron, others, "Megatron-LM Table 1")
    loo = leave_one_out(list(RUNS))
    speed = planner_speed(args.repeats)
    cli = cli_speed(args.repeats)

    held = [h for h in by_source if h.run.source != MEGATRON_2021]
    info = machine_info(threads=1)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    body = "\n".join(
        [
            f"- Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- Machine (planner speed only): {info['cpu']}; {info['software']}; pure Python, one "
            f"thread; load average {load} at the start",
            f"- Command: `{command_line(sys.argv[1:])}`",
            "- Runs and sources: `opt/plan/published.py` (each run's source, cluster and FLOP "
            "count); the fit: `opt/plan/fit.py`; the model: `opt/plan/timing.py`",
            "",
            f"Fitted on Megatron-LM's Table 1: compute at {shipped.peak_fraction:.4f} x w / (w + "
            f"{shipped.half_width:g}) of the bf16 peak, w = d_model / tp "
            f"(shipped: {A100_FIT.peak_fraction} and {A100_FIT.half_width:g}).",
            "",
            "### Held out by source: fitted on Megatron-LM's Table 1, predicting the others",
            "",
            aligned_table(_rows(by_source, {r.name for r in megatron})),
            "",
            f"Held-out runs within the 10% target: {_tally(held)}",
            "",
            "### Leave one out: each run predicted by constants fitted on the other 14",
            "",
            aligned_table(_rows(loo, set())),
            "",
            f"Within the 10% target: {_tally(loo)}",
            "",
            "### Planner speed",
            "",
            aligned_table(speed),
            "",
            aligned_table(cli),
        ]
    )
    print(body)
    if args.write:
        write_section(args.write, TITLE, body)


if __name__ == "__main__":
    main()
