"""Training throughput of our OPT trainer, side by side with transformers' OPTForCausalLM.

    python bench/train_throughput.py                      # opt-125m shape, 1 x 512, fp32 + bf16
    python bench/train_throughput.py --quick              # smoke run: 2 layers, seq 128, 2 steps
    python bench/train_throughput.py --write BENCHMARKS.md
    python bench/train_throughput.py --dtypes fp32 --profile 3
    python bench/train_throughput.py --device cuda --model opt-1.3b --dtypes bf16 \
        --seq-len 2048 --batch 8                          # one GPU (bench/gpu_throughput.sh)

Both sides train the same shape on the same token batches with the same dtype, dropout,
optimizer, clipping and thread count:

- ours: ``Trainer.train_step()`` exactly as a run calls it (data loading, forward, loss,
  backward, clip, fused AdamW), built from a config like any run, with its default speed
  switches (README: Speed);
- HF: ``OPTForCausalLM`` with our initial weights, HF's own loss and the same optimizer and
  clipping, in a worker process of its own (bench/hf_peer.py) that runs with the defaults a
  transformers user has.

On a CPU, steps alternate (ours, HF, ours, HF, ...) so machine noise hits both alike, and
each waits while the other runs. On a GPU the sides run one after the other, HF first, each
alone on the card: a GPU is not shared with other jobs, and a 6.7B model with its AdamW
state leaves no room for a second one. Each dtype reports the median step time of the
measured steps. MFU divides ``training_flops_per_token`` x tok/s (the same model FLOPs for
both) by a matmul peak measured in the same dtype in this run, through the kernels the
trainer uses; on a GPU also by the card's datasheet dense bf16 peak, the convention of the
published MFU figures (OPT, Megatron-LM, torchtitan).
"""

from __future__ import annotations

import os

# Nothing may come from the hub; set before transformers (and huggingface_hub) is imported.
os.environ["HF_HUB_OFFLINE"] = "1"

import argparse
import contextlib
import gc
import json
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers

from opt.config import load_config
from opt.data.prepare import ensure_builtin_dataset
from opt.device import measure_matmul_peak
from opt.hardware import ACCELERATORS
from opt.models.flops import training_flops_per_token
from opt.models.sizes import OPT_VOCAB_SIZE, ModelArgs
from opt.train.precision import AUTOCAST_DTYPES
from opt.train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from hf_peer import HFPeer
from profiling import profile_steps
from report import aligned_table, command_line, machine_info, write_section

DTYPES = ("fp32", "bf16")
QUICK = {"layers": 2, "seq_len": 128, "warmup": 1, "steps": 2, "peak_repeats": 1}
DEFAULTS = {"layers": 0, "seq_len": 512, "warmup": 2, "steps": 5, "peak_repeats": 9}
MIN_STEPS = 5
CPU = torch.device("cpu")


# ----- the two sides ------------------------------------------------------------------------
def config_overrides(args: argparse.Namespace, precision: str, data: Path, tmp: Path) -> list[str]:
    """A run config for one precision: grad_accum 1, no TensorBoard, no peak measurement."""
    overrides = {
        "run.name": f"bench-{precision}",
        "run.dir": str(tmp / "runs"),
        "run.seed": args.seed,
        "model.name": args.model,
        **({"model.n_layers": args.layers} if args.layers else {}),  # 0: the size's own
        "data.path": str(data),
        "data.seq_len": args.seq_len,
        "train.micro_batch_size": args.batch,
        "train.batch_tokens": args.batch * args.seq_len,
        "train.precision": precision,
        "train.device": args.device,
        "checkpoint.dir": str(tmp / "checkpoints"),
        "metrics.tensorboard": False,
        "metrics.peak_tflops": 1.0,  # > 0: the trainer measures nothing itself
    }
    # json.dumps gives TOML-compatible literals for strings, ints, floats and booleans.
    return [f"--{k}={json.dumps(v)}" for k, v in overrides.items()] + [
        f"--{setting}" for setting in args.set
    ]


# ----- measuring ----------------------------------------------------------------------------
@dataclass
class Result:
    precision: str
    model_args: ModelArgs
    hf_attention: str
    tokens_per_step: int
    flops_per_token: float
    peak_flops: float
    native_peak_flops: float  # bf16 on CPU: torch's own bf16 kernels, when the trainer's differ
    ours_times: list[float]
    hf_times: list[float]
    ours_loss: float  # first measured step: same weights and batch, so close up to dropout
    hf_loss: float
    datasheet_flops: float = 0.0  # GPUs: the card's dense bf16 peak; 0 when unknown / CPU
    ours_memory: float = 0.0  # GPUs: peak bytes allocated by each side
    hf_memory: float = 0.0

    def step_time(self, side: str) -> float:
        return statistics.median(self.ours_times if side == "ours" else self.hf_times)

    def tokens_per_s(self, side: str) -> float:
        return self.tokens_per_step / self.step_time(side)

    def mfu(self, side: str, peak: float = 0.0) -> float:
        return self.tokens_per_s(side) * self.flops_per_token / (peak or self.peak_flops)


GPU_PEAK_MATMUL = 8192  # a 2048^3 matmul takes tens of microseconds on a GPU: too short


def matmul_peak(
    precision: str, repeats: int, device: str = "cpu", bf16_via_fp32: bool = False
) -> float:
    """The trainer's own peak measurement (FLOP/s): median of ``repeats`` timed matmuls,
    computed as the trainer computes them (``Trainer.bf16_via_fp32``)."""
    dtype = AUTOCAST_DTYPES.get(precision, torch.float32)
    if device == "cuda":
        return measure_matmul_peak(dtype, torch.device(device), GPU_PEAK_MATMUL, 10 * repeats)
    cpu = torch.device(device)
    return measure_matmul_peak(dtype, cpu, repeats=repeats, bf16_via_fp32=bf16_via_fp32)


def datasheet_peak(device: str) -> float:
    """Dense bf16 FLOP/s of this GPU model from `opt plan`'s table; 0 if it is not there."""
    if device != "cuda":
        return 0.0
    name = torch.cuda.get_device_name().lower()
    for accelerator in ACCELERATORS.values():
        if accelerator.name.split("-")[0] in name:
            return accelerator.peak_tflops * 1e12
    return 0.0


def _timed(step: Callable[[], object], device: str = "cpu") -> tuple[float, object]:
    """Wall time of ``step``; on a GPU until its queued kernels (the optimizer's) finish."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def _page_faults() -> int:
    """Minor page faults of this process so far: memory the allocator gave back and re-faults."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(args: argparse.Namespace, precision: str, data: Path, tmp: Path) -> Result:
    overrides = config_overrides(args, precision, data, tmp)
    cfg = load_config(None, overrides)
    gpu = args.device == "cuda"
    steps = args.warmup + args.steps
    hf = HFPeer(overrides, args.threads)  # its own process: started before ours allocates
    hf_times, hf_losses, hf_memory = [], [], 0.0
    if gpu:  # HF alone on the card first; its process exits and frees it before ours starts
        hf_times, hf_losses = _run_side("HF", precision, steps, args.warmup, hf.train_step)
        if args.profile:
            print(hf.profile(args.profile))
        hf_memory = hf.close()
    trainer = Trainer(cfg)
    print(
        f"[{precision}] measuring the {precision} matmul peak ({args.peak_repeats + 1} matmuls)...",
        flush=True,
    )
    via_fp32 = trainer.bf16_via_fp32
    peak = matmul_peak(precision, args.peak_repeats, args.device, via_fp32)
    native_peak = 0.0  # set where the trainer's matmul is not PyTorch's own bf16 kernel
    if via_fp32:
        native_peak = matmul_peak(precision, 1)  # slow: a single timed matmul
    print(f"[{precision}] peak {peak / 1e9:.1f} GFLOP/s (native kernels: "
          f"{(native_peak or peak) / 1e9:.1f}); HF attention: {hf.attn_implementation}", flush=True)  # fmt: skip

    def ours_step() -> tuple[float, float, int]:
        faults = _page_faults()
        seconds, result = _timed(trainer.train_step, args.device)
        return seconds, result.loss, _page_faults() - faults

    if gpu:
        torch.cuda.reset_peak_memory_stats()
        ours_times, ours_losses = _run_side("ours", precision, steps, args.warmup, ours_step)
    else:
        ours_times, ours_losses, hf_times, hf_losses = [], [], [], []
        peaks = [peak]
        for i in range(steps):
            ours_time, ours_loss, ours_faults = ours_step()
            hf_time, hf_loss, hf_faults = hf.train_step()
            phase = "warmup" if i < args.warmup else "step"
            print(
                f"[{precision}] {phase} {i + 1:>2}: ours {ours_time:7.3f}s loss {ours_loss:.4f}"
                f" {ours_faults / 1e3:4.0f}k faults | HF {hf_time:7.3f}s loss {hf_loss:.4f}"
                f" {hf_faults / 1e3:4.0f}k faults",
                flush=True,
            )
            if i >= args.warmup:
                ours_times.append(ours_time)
                hf_times.append(hf_time)
                ours_losses.append(ours_loss)
                hf_losses.append(hf_loss)
                # A shared CPU's speed drifts over a long run: the peak is sampled along
                # with the steps, so that MFU's denominator is the machine the steps ran on.
                peaks.append(matmul_peak(precision, args.peak_repeats, bf16_via_fp32=via_fp32))
        peak = statistics.median(peaks)
        print(f"[{precision}] matmul peak over the run: median {peak / 1e9:.1f} GFLOP/s of "
              f"{', '.join(f'{p / 1e9:.0f}' for p in peaks)}", flush=True)  # fmt: skip
    if args.profile:
        print(profile_steps(trainer.train_step, args.profile, f"ours {precision}"))
        if not gpu:
            print(hf.profile(args.profile))
    hf.close()
    result = Result(
        precision=precision,
        native_peak_flops=native_peak or peak,
        model_args=trainer.model_args,
        hf_attention=hf.attn_implementation,
        tokens_per_step=cfg.train.batch_tokens,
        flops_per_token=training_flops_per_token(trainer.model_args, cfg.data.seq_len),
        peak_flops=peak,
        ours_times=ours_times,
        hf_times=hf_times,
        ours_loss=ours_losses[0],
        hf_loss=hf_losses[0],
        datasheet_flops=datasheet_peak(args.device),
        ours_memory=torch.cuda.max_memory_allocated() if gpu else 0.0,
        hf_memory=hf_memory,
    )
    return result


def _run_side(
    side: str, precision: str, steps: int, warmup: int, step: Callable[[], tuple]
) -> tuple[list[float], list[float]]:
    """Run one side's steps back to back; the measured steps' times and losses."""
    times, losses = [], []
    for i in range(steps):
        seconds, loss, _ = step()
        phase = "warmup" if i < warmup else "step"
        print(
            f"[{precision}] {side} {phase} {i + 1:>2}: {seconds:7.3f}s loss {loss:.4f}", flush=True
        )
        if i >= warmup:
            times.append(seconds)
            losses.append(loss)
    return times, losses


# ----- reporting ----------------------------------------------------------------------------


def markdown_table(results: list[Result]) -> str:
    gpu = any(r.datasheet_flops or r.ours_memory for r in results)
    header = (
        "dtype",
        "ours tok/s",
        "HF tok/s",
        "ours/HF",
        "ours MFU",
        "HF MFU",
        *(("ours MFU (datasheet)", "HF MFU (datasheet)") if gpu else ()),
        "matmul peak (GFLOP/s)",
        "ours s/step",
        "HF s/step",
        *(("ours peak GiB", "HF peak GiB") if gpu else ()),
    )
    rows = [header]
    for r in results:
        rows.append(
            (
                r.precision,
                f"{r.tokens_per_s('ours'):.1f}",
                f"{r.tokens_per_s('hf'):.1f}",
                f"{r.tokens_per_s('ours') / r.tokens_per_s('hf'):.3f}",
                f"{r.mfu('ours'):.1%}",
                f"{r.mfu('hf'):.1%}",
                *((_datasheet_mfu(r, "ours"), _datasheet_mfu(r, "hf")) if gpu else ()),
                f"{r.peak_flops / 1e9:.1f}",
                f"{r.step_time('ours'):.3f}",
                f"{r.step_time('hf'):.3f}",
                *((f"{r.ours_memory / 2**30:.1f}", f"{r.hf_memory / 2**30:.1f}") if gpu else ()),
            )
        )
    return aligned_table(rows)


def _datasheet_mfu(r: Result, side: str) -> str:
    return f"{r.mfu(side, r.datasheet_flops):.1%}" if r.datasheet_flops else "unknown card"


def heading(args: argparse.Namespace) -> str:
    layers = f", {args.layers} layer{'s' * (args.layers != 1)}" if args.layers else ""
    shape = f"{args.model} shape{layers}"
    batch = f", batch {args.batch}" if args.batch != 1 else ""
    where = "CPU" if args.device == "cpu" else "GPU"
    layout = "".join(f", {s}" for s in args.set)
    return f"## {where} training throughput ({shape}, seq {args.seq_len}{batch}{layout})"


def section_body(
    args: argparse.Namespace, results: list[Result], command: str, pending: list[str] = ()
) -> str:
    info = machine_info(args.threads)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    m = results[0].model_args
    flops = results[0].flops_per_token
    spreads = "; ".join(
        f"{r.precision} ours {min(r.ours_times):.2f}-{max(r.ours_times):.2f} s, "
        f"HF {min(r.hf_times):.2f}-{max(r.hf_times):.2f} s"
        for r in results
    )
    gpu = args.device == "cuda"
    order = (
        "Figures are medians of {steps} steps after {warmup} warmup step{s}, per dtype, each "
        "side alone on the GPU (HF first, in its own process, which exits before ours starts)."
        if gpu
        else "Figures are medians of {steps} interleaved steps (ours, HF, ours, HF, ...) "
        "after {warmup} warmup step{s}, per dtype."
    ).format(steps=args.steps, warmup=args.warmup, s="s" * (args.warmup != 1))
    peak_text = (
        f"the median FLOP/s of a {GPU_PEAK_MATMUL}x{GPU_PEAK_MATMUL} matmul in the same dtype, "
        "measured in the same run; MFU (datasheet) divides by the card's dense bf16 peak "
        f"({results[0].datasheet_flops / 1e12:.0f} TFLOP/s), as published MFU figures do."
        if gpu
        else "the FLOP/s of a 2048x2048 matmul in the same dtype through the trainer's "
        f"matmul: the median of {args.peak_repeats} timed matmuls, sampled before the steps "
        "and after each measured pair, median over those samples (a shared CPU's speed "
        "drifts during a run)."
    )
    return "\n".join(
        [
            f"- Date: {date}",
            f"- Machine: {info['cpu']}; {info['software']}; {info['threads']} threads",
            f"- Command: `{command}`",
            *([f"- Incomplete: written before {', '.join(pending)} finished"] if pending else []),
            f"- Shape: {m.n_layers} layer{'s' * (m.n_layers != 1)}, {m.n_heads} heads, d_model {m.d_model}, "
            f"ffn {m.ffn_dim}, vocab {m.vocab_size}, max positions {m.max_positions}; "
            f"micro-batch {args.batch} x {args.seq_len} tokens (grad_accum 1), dropout "
            f"{m.dropout}; fused AdamW, grad clip 1.0, fp32 master weights",
            "",
            markdown_table(results),
            "",
            f"{order} Ours is "
            "`Trainer.train_step()` with the default speed switches (data loading, forward, "
            "fused head and loss, backward, clip, fused AdamW), in this process; HF is "
            f"`OPTForCausalLM` ({results[0].hf_attention} attention) with its own loss, on the "
            "same batches, with the same optimizer and clipping, in a worker process of its "
            "own with a transformers user's defaults (bench/hf_peer.py); each side idles while "
            "the other runs. bf16 is `torch.autocast` around the forward on both. "
            f"{_settings_text(args)}"
            f"MFU = {flops / 1e9:.3f} GFLOP/token (`training_flops_per_token`) x tok/s / "
            f"{peak_text} "
            f"Step-time range (min-max): {spreads}.",
            *_native_peaks(results),
        ]
    )


def _settings_text(args: argparse.Namespace) -> str:
    if not args.set:
        return ""
    settings = ", ".join(f"`{s}`" for s in args.set)
    hf_ac = (
        " HF runs its activation checkpointing to match full recompute."
        if "parallel.activation_checkpoint=" + json.dumps("full") in args.set
        else ""
    )
    return f"Config settings on both sides: {settings}.{hf_ac} "


def _native_peaks(results: list[Result]) -> list[str]:
    """Where the trainer's matmul for a dtype is not PyTorch's own kernel, both peaks."""
    lines = [
        f"{r.precision}: this CPU has no bf16 instructions, so the trainer computes bf16 "
        f"matmuls with fp32 kernels (`train.cpu_bf16_compute = auto`); the peak above is "
        f"that matmul's, {r.peak_flops / 1e9:.1f} GFLOP/s, and PyTorch's native bf16 kernel "
        f"reached {r.native_peak_flops / 1e9:.1f} GFLOP/s on this square `a @ b` (faster in "
        "the `x @ W.T` layout of `F.linear`); HF's bf16 runs on the native kernels."
        for r in results
        if r.native_peak_flops != r.peak_flops
    ]
    return ["", *lines] if lines else []


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="CPU training throughput of opt's Trainer vs transformers' OPTForCausalLM "
        "(same shape, batches, dtype, optimizer, clipping and threads; one process).",
        epilog="Steps alternate between the two implementations; figures are medians.",
    )
    parser.add_argument("--model", default="opt-125m", help="size name (default: opt-125m)")
    parser.add_argument(
        "--layers", type=int, help="override the size's layer count (default: keep; quick: 2)"
    )
    parser.add_argument("--batch", type=int, default=1, help="micro-batch size (default: 1)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default 512; quick 128)")
    parser.add_argument(
        "--dtypes",
        default="fp32,bf16",
        help="comma-separated precisions among fp32, bf16; bf16 = autocast around the forward, "
        "fp32 master weights (default: fp32,bf16)",
    )
    parser.add_argument("--warmup", type=int, help="unmeasured steps per side (default 2; quick 1)")
    parser.add_argument(
        "--steps",
        type=int,
        help=f"measured steps per side and dtype, at least {MIN_STEPS} (default 5; quick 2)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help=f"torch.set_num_threads for both sides (default: {torch.get_num_threads()})",
    )
    parser.add_argument(
        "--peak-repeats",
        type=int,
        help="timed 2048x2048 matmuls (after one untimed) of measure_matmul_peak per dtype, "
        "median taken; on a GPU ten times as many, 8192x8192 (default 9; quick 1)",
    )
    parser.add_argument("--seed", type=int, default=0, help="weight init / data order seed")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config setting for both sides, TOML value (e.g. parallel.activation_checkpoint="
        "'\"full\"'); repeatable",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="cuda: one GPU, both sides on it (e.g. --model opt-1.3b --dtypes bf16); the "
        "figures then go under a GPU heading (default: cpu)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after timing each dtype, torch.profiler N steps of each side: top-15 ops by self "
        "CPU time and a GEMM/attention/optimizer/... breakdown (default: 0, off)",
    )
    parser.add_argument(
        "--write",
        type=Path,
        metavar="FILE",
        help="add or replace this benchmark's section in a markdown file (e.g. BENCHMARKS.md)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2 layers, seq 128, 1 warmup, 2 steps, 1 peak measurement "
        "(explicit flags still win)",
    )
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in args.dtypes if d not in DTYPES]
    if bad or not args.dtypes:
        parser.error(f"--dtypes takes {', '.join(DTYPES)}; got {bad or 'nothing'}")
    if args.steps < MIN_STEPS and not args.quick:
        parser.error(f"--steps must be at least {MIN_STEPS} for a median (or use --quick)")
    for name in ("batch", "seq_len", "threads", "peak_repeats", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.warmup < 0 or args.layers < 0 or args.profile < 0:
        parser.error("--warmup, --layers and --profile must not be negative")
    return args


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine_info(args.threads)
    print(f"{info['cpu']}\n{info['software']}; torch threads: {torch.get_num_threads()}")
    results = []
    with tempfile.TemporaryDirectory(prefix="opt-bench-") as tmp, _quiet_transformers():
        # The pydoc corpus's own vocabulary is ~9k tokens: it fits the OPT embedding as is.
        data = ensure_builtin_dataset(Path(tmp) / "data", vocab_size=OPT_VOCAB_SIZE)
        for precision in args.dtypes:
            results.append(measure(args, precision, data, Path(tmp)))
            gc.collect()  # a model with AdamW state: free it before the next dtype
            if args.device == "cuda":
                torch.cuda.empty_cache()
            if args.write and len(results) < len(args.dtypes):
                # A long bf16 run that dies still leaves the dtypes measured so far.
                pending = args.dtypes[len(results) :]
                body = section_body(args, results, command_line(argv), pending)
                write_section(args.write, heading(args), body)
    title = heading(args)
    print(f"\n{title}\n")
    print(markdown_table(results))
    print(
        f"\nMedians of {args.steps} interleaved steps after {args.warmup} warmup; "
        f"{args.batch * args.seq_len} tokens/step; {args.threads} threads."
    )
    for line in _native_peaks(results):
        print(line)
    for r in results:
        print(
            f"{r.precision}: first measured loss ours {r.ours_loss:.4f}, HF {r.hf_loss:.4f} "
            "(same weights and batch; they differ by dropout only)"
        )
    if args.write:
        write_section(args.write, title, section_body(args, results, command_line(argv)))
        print(f"wrote section {title!r} to {args.write}")


if __name__ == "__main__":
    main()
