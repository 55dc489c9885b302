"""Training throughput of our OPT trainer against transformers' OPTForCausalLM, each side in
its fastest reasonable setup, on the same machine in the same run.

    python bench/train_throughput.py                      # opt-125m shape, 1 x 512, fp32 + bf16
    python bench/train_throughput.py --quick              # smoke run: 2 layers, seq 128, 2 steps
    python bench/train_throughput.py --write BENCHMARKS.md
    python bench/train_throughput.py --dtypes fp32 --hf eager,compile --profile 3
    python bench/train_throughput.py --device cuda --model opt-1.3b --dtypes bf16 \
        --seq-len 2048 --batch 8                          # one GPU (bench/gpu_throughput.sh)

All sides train the same shape on the same token batches with the same dtype, dropout,
optimizer (fused AdamW, our decay grouping), clipping and thread count. Sides:

- ours: ``Trainer.train_step()`` exactly as a run calls it (data loading, forward, loss,
  backward, clip, fused AdamW), built from a config like any run, with its default speed
  switches (README: Speed); ``--ours`` lists the ``train.compile`` settings to run (default:
  auto on a CPU, where it means off; on and off on a GPU);
- HF: ``OPTForCausalLM`` with our initial weights, HF's own loss and the same optimizer and
  clipping, each setup in a worker process of its own (bench/hf_peer.py) that starts with
  the defaults a transformers user has; ``--hf`` lists the setups (eager or
  ``torch.compile``, with or without our glibc allocator setting).

On a CPU, steps rotate (ours, HF, HF, ...), each side idle while another runs, so machine
noise hits all alike. On a GPU the sides run one after another, each alone on the card (HF's
setups first, each in a process that exits before the next starts): a GPU is not shared with
other jobs, and a 6.7B model with its AdamW state leaves no room for a second one. Figures are
medians of the measured steps. After them each side runs one profiled step, from which the
table reports the attention kernel and the AdamW implementation that actually ran.

MFU divides ``training_flops_per_token`` x tok/s (the same model FLOPs for every side) by a
stated peak. On a GPU: the card's datasheet dense bf16 peak (the convention of OPT,
Megatron-LM and torchtitan); a measured matmul is shown beside it, not divided by. On a CPU:
the highest sustained matmul rate measured on this machine today, in the dtype and kernel
the side's matmuls use. A burst is the median of a few back-to-back 2048^3 matmuls; every
burst of every run is appended to a per-machine record (``~/.cache/opt/matmul-peaks.jsonl``),
and the peak is the maximum over today's records for this machine, dtype, kernel and thread
count, this run's bursts included. A shared CPU only ever runs slower than it can, so the
maximum is the figure closest to the machine's own capacity.
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
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers

from opt.config import load_config
from opt.data.prepare import ensure_builtin_dataset
from opt.device import accelerator_of, measure_matmul_peak
from opt.hardware import ACCELERATORS
from opt.job import resolve_model_args
from opt.models.flops import training_flops_per_token
from opt.models.sizes import OPT_VOCAB_SIZE, ModelArgs
from opt.train.precision import AUTOCAST_DTYPES
from opt.train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from hf_peer import HFPeer, observed_kernels
from profiling import profile_steps
from report import aligned_table, command_line, machine_info, write_section

DTYPES = ("fp32", "bf16")
QUICK = {"layers": 2, "seq_len": 128, "warmup": 1, "steps": 2, "peak_repeats": 3}
DEFAULTS = {"layers": 0, "seq_len": 512, "warmup": 2, "steps": 5, "peak_repeats": 5}
MIN_STEPS = 5
OURS_COMPILE = ("auto", "on", "off")  # train.compile
HF_SETUPS = {"eager": "none", "compile": "model", "compile-layers": "layers"}
DEFAULT_SIDES = {  # device: (--ours, --hf)
    "cpu": ("auto", "eager,eager+alloc,compile,compile+alloc"),
    "cuda": ("on,off", "eager,compile"),
}
PEAK_RECORD = Path.home() / ".cache" / "opt" / "matmul-peaks.jsonl"
GPU_PEAK_MATMUL = 8192  # a 2048^3 matmul takes tens of microseconds on a GPU: too short


# ----- the sides ----------------------------------------------------------------------------
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


@dataclass
class Side:
    """One row: who (ours or HF), in which setup, and what its steps measured."""

    kind: str  # "ours" or "HF"
    compile: str  # ours: train.compile (auto/on/off); HF: none/model/layers
    keep_host_memory: bool  # the glibc setting of opt/host_memory.py in its process
    compiled: bool = False  # resolved (ours' auto: on for GPUs only)
    kernel: str = "native"  # the matmul its bf16 runs on: "native" or "fp32" (bf16 via fp32)
    times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)
    memory: float = 0.0  # GPUs: peak bytes allocated
    attention: str = "not checked"
    optimizer: str = "not checked"
    error: str = ""  # why this side has no figures (GPU: a failed build or step)

    @property
    def compile_text(self) -> str:
        if self.kind == "ours":
            how = "per block" if self.compiled else "no"
            return f"{how} (`train.compile={self.compile}`)"
        return {"none": "no", "model": "whole model", "layers": "per decoder layer"}[self.compile]

    @property
    def allocator_text(self) -> str:
        return "glibc no-mmap, no-trim" if self.keep_host_memory else "glibc default"

    def step_time(self) -> float:
        return statistics.median(self.times)


def parse_sides(args: argparse.Namespace) -> list[Side]:
    ours = [Side("ours", c, keep_host_memory=True) for c in args.ours]  # the config's default
    hf = []
    for setup in args.hf:
        base, _, alloc = setup.partition("+")
        hf.append(Side("HF", HF_SETUPS[base], keep_host_memory=bool(alloc)))
    return ours + hf


# ----- matmul peaks -------------------------------------------------------------------------
@dataclass
class DayPeak:
    """The highest sustained matmul rate of today's records for one machine/dtype/kernel."""

    dtype: str
    kernel: str
    flops: float
    bursts: int  # how many records it is the maximum of
    first: str  # their time span, UTC
    last: str
    this_run: list[float]


def _machine_key(threads: int) -> dict:
    info = machine_info(threads)
    return {"host": socket.gethostname(), "cpu": info["cpu"], "threads": threads}


def burst(precision: str, kernel: str, repeats: int, device: str = "cpu") -> float:
    """One sustained matmul rate (FLOP/s): the median of ``repeats`` back-to-back timed
    matmuls after an untimed one, through the kernel the side's matmuls use."""
    dtype = AUTOCAST_DTYPES.get(precision, torch.float32)
    if device == "cuda":
        return measure_matmul_peak(dtype, torch.device(device), GPU_PEAK_MATMUL, 10 * repeats)
    via_fp32 = kernel == "fp32"
    return measure_matmul_peak(dtype, torch.device(device), 2048, repeats, via_fp32)


def record_burst(path: Path, key: dict, precision: str, kernel: str, flops: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    line = {**key, "dtype": precision, "kernel": kernel, "size": 2048, "time": now,
            "gflops": round(flops / 1e9, 3)}  # fmt: skip
    with path.open("a") as f:  # one short line per write: appends do not interleave
        f.write(json.dumps(line) + "\n")


def day_peak(path: Path, key: dict, precision: str, kernel: str, this_run: list[float]) -> DayPeak:
    today = datetime.now(timezone.utc).date().isoformat()
    found = []
    with contextlib.suppress(FileNotFoundError), path.open() as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                rec = json.loads(line)
                same = all(rec.get(k) == v for k, v in key.items())
                same = same and (rec.get("dtype"), rec.get("kernel")) == (precision, kernel)
                if same and str(rec.get("time", "")).startswith(today):
                    found.append((rec["time"], rec["gflops"] * 1e9))
    if not found:  # the record could not be written: this run's bursts alone
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        found = [(now, f) for f in this_run]
    times = sorted(t for t, _ in found)
    return DayPeak(
        precision, kernel, max(f for _, f in found), len(found), times[0][11:16],
        times[-1][11:16], this_run,
    )  # fmt: skip


def datasheet_peak(device: str) -> tuple[float, str]:
    """(dense bf16 FLOP/s, card name) of this GPU from `opt plan`'s table; 0 if unknown."""
    if device != "cuda":
        return 0.0, ""
    name, kind = accelerator_of(torch.device("cuda"))
    if kind is None or (kind.startswith("h100") and "pcie" in name.lower()):
        return 0.0, name  # the table holds SXM parts; a PCIe H100's peak is lower
    return ACCELERATORS[kind].peak_tflops * 1e12, name


# ----- measuring ----------------------------------------------------------------------------
@dataclass
class Result:
    precision: str
    model_args: ModelArgs
    tokens_per_step: int
    flops_per_token: float
    sides: list[Side]
    peaks: dict[str, DayPeak] = field(default_factory=dict)  # CPUs: by kernel
    datasheet_flops: float = 0.0  # GPUs: the card's dense bf16 peak; 0 when unknown
    card: str = ""
    gpu_matmul_flops: float = 0.0  # GPUs: measured, shown beside, not the denominator

    def tokens_per_s(self, side: Side) -> float:
        return self.tokens_per_step / side.step_time()

    def peak_of(self, side: Side) -> float:
        if self.datasheet_flops:
            return self.datasheet_flops
        if side.kernel in self.peaks:
            return self.peaks[side.kernel].flops
        return self.gpu_matmul_flops  # an unknown card: the measured matmul, said so

    def mfu(self, side: Side) -> float:
        return self.tokens_per_s(side) * self.flops_per_token / self.peak_of(side)

    def best_hf(self) -> float:
        rates = [self.tokens_per_s(s) for s in self.sides if s.kind == "HF" and s.times]
        return max(rates, default=0.0)


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


def _ours_stepper(trainer: Trainer, device: str) -> Callable[[], tuple[float, float, int]]:
    def step() -> tuple[float, float, int]:
        faults = _page_faults()
        seconds, result = _timed(trainer.train_step, device)
        return seconds, result.loss, _page_faults() - faults

    return step


def _ours_config(overrides: list[str], side: Side):
    return load_config(None, [*overrides, f"--train.compile={json.dumps(side.compile)}"])


def _hf_peer(args, overrides: list[str], side: Side) -> HFPeer:
    peer = HFPeer(overrides, args.threads, side.compile, side.keep_host_memory)
    side.keep_host_memory = peer.keep_host_memory  # what the worker could apply
    side.compiled = side.compile != "none"
    return peer


def measure(
    args: argparse.Namespace,
    precision: str,
    data: Path,
    tmp: Path,
    progress: Callable[[Result], None] = lambda result: None,
) -> Result:
    """One dtype, every side; ``progress`` is called after each side run one by one (a
    GPU call that runs out of time still leaves the rows measured so far)."""
    overrides = config_overrides(args, precision, data, tmp)
    cfg = load_config(None, overrides)
    model_args = resolve_model_args(cfg)
    result = Result(
        precision=precision,
        model_args=model_args,
        tokens_per_step=cfg.train.batch_tokens,
        flops_per_token=training_flops_per_token(model_args, cfg.data.seq_len),
        sides=parse_sides(args),
    )
    if args.sequential or args.device == "cuda":
        _measure_one_by_one(args, precision, overrides, result, progress)
    else:
        _measure_interleaved(args, precision, overrides, result)
    return result


def _measure_interleaved(args, precision: str, overrides: list[str], result: Result) -> None:
    """CPU: all sides alive at once, one step each in turn."""
    steps = args.warmup + args.steps
    hf = [s for s in result.sides if s.kind == "HF"]
    ours = [s for s in result.sides if s.kind == "ours"]
    peers = [_hf_peer(args, overrides, s) for s in hf]  # their own processes, started first
    trainers = [Trainer(_ours_config(overrides, s)) for s in ours]
    for side, trainer in zip(ours, trainers, strict=True):
        side.compiled = side.compile == "on"  # auto is off on CPUs (opt/train/build.py)
        side.kernel = "fp32" if trainer.bf16_via_fp32 and precision == "bf16" else "native"
    steppers = [_ours_stepper(t, "cpu") for t in trainers] + [p.train_step for p in peers]
    kernels = sorted({s.kernel for s in result.sides})
    key = _machine_key(args.threads)
    bursts: dict[str, list[float]] = {k: [] for k in kernels}

    def sample_peaks() -> None:
        for kernel in kernels:
            flops = burst(precision, kernel, args.peak_repeats)
            bursts[kernel].append(flops)
            with contextlib.suppress(OSError):
                record_burst(args.peak_record, key, precision, kernel, flops)

    print(f"[{precision}] sides: {', '.join(_name(s) for s in result.sides)}", flush=True)
    sample_peaks()
    for i in range(steps):
        phase = "warmup" if i < args.warmup else "step"
        cells = []
        for side, stepper in zip(ours + hf, steppers, strict=True):
            seconds, loss, faults = stepper()
            cells.append(f"{_name(side)} {seconds:6.3f}s {loss:.4f} {faults / 1e3:4.0f}kf")
            if i >= args.warmup:
                side.times.append(seconds)
                side.losses.append(loss)
                side.faults.append(faults)
        print(f"[{precision}] {phase} {i + 1:>2}: " + " | ".join(cells), flush=True)
        if i >= args.warmup:  # the machine's speed drifts: sample it along the steps
            sample_peaks()
    for side, trainer in zip(ours, trainers, strict=True):
        side.__dict__.update(observed_kernels(trainer.train_step))
    for side, peer in zip(hf, peers, strict=True):
        side.__dict__.update(peer.kernels())
    for kernel in kernels:
        result.peaks[kernel] = day_peak(args.peak_record, key, precision, kernel, bursts[kernel])
        p = result.peaks[kernel]
        print(f"[{precision}] {kernel} matmul: this run's bursts "
              f"{', '.join(f'{f / 1e9:.0f}' for f in bursts[kernel])} GFLOP/s; peak used "
              f"{p.flops / 1e9:.1f} = max of {p.bursts} today ({p.first}-{p.last} UTC)",
              flush=True)  # fmt: skip
    if args.profile:
        for side, trainer in zip(ours, trainers, strict=True):
            print(profile_steps(trainer.train_step, args.profile, f"{_name(side)} {precision}"))
        for peer in peers:
            print(peer.profile(args.profile))
    for peer in peers:
        peer.close()


def _measure_one_by_one(
    args, precision: str, overrides: list[str], result: Result, progress: Callable
) -> None:
    """GPU: each side alone on the card, HF's setups first. An HF worker that ran eager
    compiles its model in place for the next setup with the same allocator, as a user
    would, rather than build the model again (minutes at 6.7B). A side that fails (out of
    memory, a compile error) is reported as such and the others still run."""
    gpu = args.device == "cuda"
    steps = args.warmup + args.steps
    hf = sorted((s for s in result.sides if s.kind == "HF"), key=lambda s: s.compile != "none")
    peer = None
    for i, side in enumerate(hf):
        try:
            if peer is not None:  # the eager worker, reused: compiled in place
                hf[i - 1].memory = peer.compile(side.compile)
                side.compiled = True
            else:
                peer = _hf_peer(args, overrides, side)
            _run_side(side, precision, steps, args.warmup, peer.train_step)
            side.__dict__.update(peer.kernels())
            if args.profile:
                print(peer.profile(args.profile))
        except Exception as e:  # the worker died: its stderr is in the log above
            side.error = f"{type(e).__name__}: {e}"
            print(f"[{precision}] {_name(side)} failed: {side.error}", flush=True)
        following = hf[i + 1] if i + 1 < len(hf) else None
        reuse = (
            following is not None
            and not side.error
            and side.compile == "none"
            and following.compile != "none"
            and following.keep_host_memory == side.keep_host_memory
        )
        if peer is not None and not reuse:
            with contextlib.suppress(Exception):
                side.memory = peer.close()
            if peer.proc.poll() is None:
                peer.proc.kill()
            peer = None
        progress(result)
    if gpu:
        result.datasheet_flops, result.card = datasheet_peak(args.device)
        result.gpu_matmul_flops = burst(precision, "native", args.peak_repeats, args.device)
        print(f"[{precision}] measured {precision} matmul: {result.gpu_matmul_flops / 1e12:.1f}"
              f" TFLOP/s; datasheet {result.datasheet_flops / 1e12:.0f} ({result.card})",
              flush=True)  # fmt: skip
    for side in (s for s in result.sides if s.kind == "ours"):
        try:
            _run_ours_alone(args, precision, overrides, side)
        except Exception as e:
            side.error = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"[{precision}] {_name(side)} failed: {side.error}", flush=True)
        gc.collect()  # the trainer, its model and AdamW state: gone before the next side
        torch._dynamo.reset()
        if gpu:
            torch.cuda.empty_cache()
            left = torch.cuda.memory_allocated() / 2**30
            print(f"[{precision}] after {_name(side)}: {left:.2f} GiB still allocated", flush=True)
        progress(result)
    if not gpu:  # a CPU run in this order: the same day peaks as the interleaved one
        for kernel in sorted({s.kernel for s in result.sides}):
            flops = burst(precision, kernel, args.peak_repeats)
            key = _machine_key(args.threads)
            with contextlib.suppress(OSError):
                record_burst(args.peak_record, key, precision, kernel, flops)
            result.peaks[kernel] = day_peak(args.peak_record, key, precision, kernel, [flops])


def _run_ours_alone(args, precision: str, overrides: list[str], side: Side) -> None:
    gpu = args.device == "cuda"
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(_ours_config(overrides, side))
    side.compiled = side.compile == "on" or (side.compile == "auto" and gpu)
    side.kernel = "fp32" if trainer.bf16_via_fp32 and precision == "bf16" else "native"
    step = _ours_stepper(trainer, args.device)
    _run_side(side, precision, args.warmup + args.steps, args.warmup, step)
    side.__dict__.update(observed_kernels(trainer.train_step))
    if args.profile:
        print(profile_steps(trainer.train_step, args.profile, f"{_name(side)} {precision}"))
    side.memory = torch.cuda.max_memory_allocated() if gpu else 0.0


def _name(side: Side) -> str:
    if side.kind == "ours":
        return f"ours(compile={side.compile})"
    alloc = "+alloc" if side.keep_host_memory else ""
    return f"HF({side.compile}{alloc})"


def _run_side(side: Side, precision: str, steps: int, warmup: int, step: Callable) -> None:
    """Run one side's steps back to back, keeping the measured steps' figures."""
    for i in range(steps):
        seconds, loss, faults = step()
        phase = "warmup" if i < warmup else "step"
        print(f"[{precision}] {_name(side)} {phase} {i + 1:>2}: {seconds:7.3f}s loss {loss:.4f}",
              flush=True)  # fmt: skip
        if i >= warmup:
            side.times.append(seconds)
            side.losses.append(loss)
            side.faults.append(faults)


# ----- reporting ----------------------------------------------------------------------------
def markdown_table(results: list[Result], gpu: bool) -> str:
    header = (
        "dtype", "side", "compile", *(() if gpu else ("host allocator",)), "attention",
        "optimizer", "tok/s", "s/step", "vs best HF",
        "MFU" + (_datasheet_label(results) if gpu else ""),
        *(("peak GiB",) if gpu else ("faults/step",)),
    )  # fmt: skip
    rows = [header]
    for r in results:
        best = r.best_hf()
        for s in r.sides:
            setup = (r.precision, s.kind, s.compile_text, *(() if gpu else (s.allocator_text,)))
            if not s.times:
                failed = f"failed: {s.error[:80]}" if s.error else "not run"
                rows.append((*setup, "-", "-", failed, "-", "-", "-", "-"))
                continue
            rate = r.tokens_per_s(s)
            rows.append(
                (
                    *setup,
                    s.attention,
                    s.optimizer,
                    f"{rate:.1f}",
                    f"{s.step_time():.3f}",
                    f"{rate / best:.3f}" if best else "-",
                    f"{r.mfu(s):.1%}" if r.peak_of(s) else "-",
                    f"{s.memory / 2**30:.1f}"
                    if gpu
                    else f"{statistics.median(s.faults) / 1e3:.0f}k"
                    if s.faults
                    else "-",
                )
            )
    return aligned_table(rows)


def _datasheet_label(results: list[Result]) -> str:
    r = results[0]
    if r.datasheet_flops:
        return f" (of {r.datasheet_flops / 1e12:.0f} TFLOP/s datasheet)"
    return " (of the measured matmul: card not in the table)"


def peaks_table(results: list[Result]) -> str:
    rows = [("dtype", "matmul kernel", "peak used (GFLOP/s)", "max of", "span (UTC, today)",
             "this run's bursts min / median / max")]  # fmt: skip
    for r in results:
        for kernel, p in r.peaks.items():
            runs = p.this_run
            rows.append(
                (
                    r.precision,
                    _kernel_text(r.precision, kernel),
                    f"{p.flops / 1e9:.1f}",
                    f"{p.bursts} bursts",
                    f"{p.first}-{p.last}",
                    f"{min(runs) / 1e9:.1f} / {statistics.median(runs) / 1e9:.1f} / "
                    f"{max(runs) / 1e9:.1f}",
                )
            )
    return aligned_table(rows)


def _kernel_text(precision: str, kernel: str) -> str:
    if precision == "fp32":
        return "fp32"
    return "bf16 through fp32 kernels" if kernel == "fp32" else f"{precision} native"


def cpu_flags() -> set[str]:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def heading(args: argparse.Namespace) -> str:
    layers = f", {args.layers} layer{'s' * (args.layers != 1)}" if args.layers else ""
    shape = f"{args.model} shape{layers}"
    batch = f", batch {args.batch}" if args.batch != 1 else ""
    where = "CPU" if args.device == "cpu" else "GPU"
    layout = "".join(f", {s}" for s in args.set)
    return f"## {where} training throughput ({shape}, seq {args.seq_len}{batch}{layout})"


def section_body(
    args: argparse.Namespace,
    results: list[Result],
    command: str,
    loads: tuple[str, str] = ("", ""),
    pending: list[str] = (),
) -> str:
    info = machine_info(args.threads)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    m = results[0].model_args
    flops = results[0].flops_per_token
    gpu = args.device == "cuda"
    spreads = "; ".join(
        f"{r.precision} {_name(s)} {min(s.times):.2f}-{max(s.times):.2f} s"
        for r in results
        for s in r.sides
        if s.times
    )
    losses = "; ".join(
        f"{r.precision} " + ", ".join(f"{_name(s)} {s.losses[0]:.4f}" for s in r.sides if s.losses)
        for r in results
    )
    order = (
        f"Each side ran alone{' on the GPU' * gpu}, one after another: HF's setups first, in "
        "a worker process that exits before the next starts (its eager model, once measured, "
        "compiled in place for the compiled row, as a user would, instead of built again), "
        "then ours in this process, each trainer freed before the next is built."
        if gpu or args.sequential
        else "Steps rotate through the sides (ours, then each HF setup) so that the shared "
        "CPU's drift hits all alike; each side idles while another runs."
    )
    parts = [
        f"- Date: {date}",
        f"- Machine: {info['cpu']}; {info['software']}; {info['threads']} threads",
        f"- Command: `{command}`",
        *([f"- Load average (1 min) at start / end: {loads[0]} / {loads[1]}"] if loads[0] else []),
        *([f"- Incomplete: written before {', '.join(pending)} finished"] if pending else []),
        f"- Shape: {m.n_layers} layer{'s' * (m.n_layers != 1)}, {m.n_heads} heads, d_model "
        f"{m.d_model}, ffn {m.ffn_dim}, vocab {m.vocab_size}, max positions {m.max_positions}; "
        f"micro-batch {args.batch} x {args.seq_len} tokens (grad_accum 1), dropout "
        f"{m.dropout}; grad clip 1.0, fp32 master weights",
        "",
        markdown_table(results, gpu),
        "",
        *_best_text(results),
        f"Figures are medians of {args.steps} measured steps after {args.warmup} warmup "
        f"step{'s' * (args.warmup != 1)}, per side and dtype. {order} Ours is "
        "`Trainer.train_step()` with the default speed switches (data loading, forward, fused "
        "head and loss, backward, clip, fused AdamW). HF is `OPTForCausalLM` "
        "(`attn_implementation` at its default, sdpa) with its own loss, on the same batches, "
        "with the same optimizer and clipping, in a worker process of its own that starts with "
        "a transformers user's defaults (bench/hf_peer.py). Compile: ours `train.compile` "
        "compiles each block; HF's \"whole model\" is `model.compile()` (what transformers' "
        "Trainer does with `torch_compile=True`). Attention and optimizer are what one "
        "profiled step after the measured ones ran (aten ops seen), not the settings. bf16 is "
        '`torch.autocast` around the forward on every side. "vs best HF" divides by the '
        f"fastest HF setup of the same dtype. {_settings_text(args)}",
        "",
        _mfu_text(args, results, flops),
        "",
        f"Step-time range (min-max): {spreads}. First measured losses (same weights and "
        f"batch; they differ by dropout only): {losses}.",
    ]
    if not gpu:
        parts += ["", *_cpu_notes(results)]
    return "\n".join(parts)


def _setup_text(side: Side, gpu: bool) -> str:
    scope = "per block" if side.kind == "ours" else side.compile_text
    how = f"compiled {scope}" if side.compiled else "eager"
    alloc = "" if gpu else f", {side.allocator_text}"
    return f"{side.kind} ({how}{alloc})"


def _best_text(results: list[Result]) -> list[str]:
    """Per dtype: our fastest row against HF's fastest, and against HF as a user gets it."""
    lines = []
    gpu = any(r.datasheet_flops or r.gpu_matmul_flops for r in results)
    for r in results:
        ours = [s for s in r.sides if s.kind == "ours" and s.times]
        hf = [s for s in r.sides if s.kind == "HF" and s.times]
        if not ours or not hf:
            continue
        a, b = max(ours, key=r.tokens_per_s), max(hf, key=r.tokens_per_s)
        line = (
            f"- {r.precision}, best against best: {_setup_text(a, gpu)} "
            f"{r.tokens_per_s(a):.1f} tok/s against HF's fastest, {_setup_text(b, gpu)} "
            f"{r.tokens_per_s(b):.1f} tok/s: {r.tokens_per_s(a) / r.tokens_per_s(b):.2f}x"
        )
        plain = [s for s in hf if s.compile == "none" and not s.keep_host_memory]
        if plain and plain[0] is not b:
            rate = r.tokens_per_s(plain[0])
            line += (
                f"; against HF with a transformers user's defaults (eager, glibc default) "
                f"{rate:.1f} tok/s: {r.tokens_per_s(a) / rate:.2f}x"
            )
        lines.append(line + ".")
    return [*lines, ""] if lines else []


def _mfu_text(args: argparse.Namespace, results: list[Result], flops: float) -> str:
    base = (
        f"MFU = {flops / 1e9:.3f} GFLOP/token (`training_flops_per_token`: model FLOPs, a "
        "recomputed forward not counted) x tok/s / "
    )
    if args.device == "cuda":
        r = results[0]
        measured = ", ".join(
            f"{x.precision} {x.gpu_matmul_flops / 1e12:.1f} TFLOP/s" for x in results
        )
        if r.datasheet_flops:
            return (
                base + f"the card's datasheet dense bf16 peak, {r.datasheet_flops / 1e12:.0f} "
                f"TFLOP/s ({r.card}), as OPT, Megatron-LM and torchtitan quote MFU. Measured "
                f"beside it, not divided by: a {GPU_PEAK_MATMUL}^3 matmul, median of "
                f"{10 * args.peak_repeats}: {measured}."
            )
        return (
            base + f"a measured {GPU_PEAK_MATMUL}^3 matmul ({measured}): this card "
            f"({r.card}) is not in the datasheet table (opt/hardware.py)."
        )
    return (
        base + "the highest sustained matmul rate measured on this machine today, in the "
        "side's dtype and matmul kernel, at the same thread count (table below). A burst is "
        f"the median of {args.peak_repeats} back-to-back 2048^3 matmuls after an untimed one; "
        "this run took one before the steps and one after each measured round, and every "
        f"burst of every run is appended to `{_home(args.peak_record)}` (machine, dtype, "
        "kernel, threads, time, GFLOP/s); the peak is the maximum over today's records for "
        "this machine, this run's included. A shared CPU only runs slower than it can, so "
        "the maximum is the figure nearest the machine's capacity; the median of one run's "
        "bursts is shown for comparison.\n\n" + peaks_table(results)
    )


def _home(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return "~/" + str(path.relative_to(Path.home()))
    return str(path)


def _cpu_notes(results: list[Result]) -> list[str]:
    flags = cpu_flags()
    bf16 = [r for r in results if r.precision == "bf16"]
    notes = [
        "Host allocator: our trainer sets glibc's `mallopt` (no mmap, no trim: "
        '`train.keep_host_memory`, opt/host_memory.py) in its own process; "HF glibc no-mmap, '
        'no-trim" is the same call made in the HF worker before its model is built, "glibc '
        'default" is what a transformers user has. faults/step: minor page faults of the '
        "side's process during one step (memory handed back and faulted in again)."
    ]
    if bf16:
        isa = ", ".join(f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags)
        kernels = {s.kernel for r in bf16 for s in r.sides}
        how = (
            "both sides run PyTorch's native bf16 CPU kernels"
            if kernels == {"native"}
            else "ours computes bf16 matmuls with fp32 kernels (`train.cpu_bf16_compute = "
            "auto`), HF runs PyTorch's native bf16 kernels"
        )
        notes += [
            "",
            f"bf16 on a CPU is not a headline: the bf16 rows show PyTorch's bf16 CPU kernels "
            f"(this CPU's flags: {isa or 'no bf16 instructions'}; {how}), not the trainer. "
            "The fair CPU comparison is the fp32 rows. bf16 MFU divides by a bf16 matmul peak "
            "measured the same way.",
        ]
    return notes


def _settings_text(args: argparse.Namespace) -> str:
    if not args.set:
        return ""
    settings = ", ".join(f"`{s}`" for s in args.set)
    hf_ac = (
        " HF runs its activation checkpointing to match full recompute."
        if "parallel.activation_checkpoint=" + json.dumps("full") in args.set
        else ""
    )
    return f"Config settings on every side: {settings}.{hf_ac}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Training throughput of opt's Trainer vs transformers' OPTForCausalLM "
        "(same shape, batches, dtype, optimizer, clipping and threads; each side's fastest "
        "reasonable setups as rows).",
        epilog="On a CPU steps rotate between the sides; figures are medians.",
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
        "--ours",
        help="comma-separated train.compile settings of our rows among auto, on, off "
        f"(default: {DEFAULT_SIDES['cpu'][0]} on a CPU, {DEFAULT_SIDES['cuda'][0]} on a GPU)",
    )
    parser.add_argument(
        "--hf",
        help="comma-separated HF setups among eager, compile (torch.compile of the whole "
        "model), compile-layers (of each decoder layer), each optionally +alloc (our glibc "
        f"allocator setting in its worker) (default: {DEFAULT_SIDES['cpu'][1]} on a CPU, "
        f"{DEFAULT_SIDES['cuda'][1]} on a GPU)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help=f"torch.set_num_threads for every side (default: {torch.get_num_threads()})",
    )
    parser.add_argument(
        "--peak-repeats",
        type=int,
        help="timed 2048^3 matmuls (after one untimed) in a peak burst, median taken; on a "
        "GPU ten times as many, 8192^3 (default 5; quick 3)",
    )
    parser.add_argument(
        "--peak-record",
        type=Path,
        default=PEAK_RECORD,
        help=f"the per-machine record of matmul bursts (default: {_home(PEAK_RECORD)})",
    )
    parser.add_argument("--seed", type=int, default=0, help="weight init / data order seed")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config setting for every side, TOML value (e.g. parallel.activation_checkpoint="
        "'\"full\"'); repeatable",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="cuda: one GPU, the sides one after another on it (e.g. --model opt-1.3b "
        "--dtypes bf16); the figures then go under a GPU heading (default: cpu)",
    )
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="run the sides one after another as on a GPU (implied by --device cuda; on a "
        "CPU it exercises the GPU path's order)",
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
        help="smoke run: 2 layers, seq 128, 1 warmup, 2 steps, 3-matmul peak bursts "
        "(explicit flags still win)",
    )
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.dtypes = _list(args.dtypes)
    bad = [d for d in args.dtypes if d not in DTYPES]
    if bad or not args.dtypes:
        parser.error(f"--dtypes takes {', '.join(DTYPES)}; got {bad or 'nothing'}")
    ours_default, hf_default = DEFAULT_SIDES[args.device]
    args.ours = _list(ours_default if args.ours is None else args.ours)
    args.hf = _list(hf_default if args.hf is None else args.hf)
    if any(c not in OURS_COMPILE for c in args.ours):
        parser.error(f"--ours takes {', '.join(OURS_COMPILE)}; got {args.ours}")
    if any(h.split("+")[0] not in HF_SETUPS or h.count("+") > 1 for h in args.hf) or any(
        h.partition("+")[2] not in ("", "alloc") for h in args.hf
    ):
        parser.error(f"--hf takes {', '.join(HF_SETUPS)}, each optionally +alloc; got {args.hf}")
    if not args.ours or not args.hf:
        parser.error("--ours and --hf each need at least one setup")
    if args.steps < MIN_STEPS and not args.quick:
        parser.error(f"--steps must be at least {MIN_STEPS} for a median (or use --quick)")
    for name in ("batch", "seq_len", "threads", "peak_repeats", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.warmup < 0 or args.layers < 0 or args.profile < 0:
        parser.error("--warmup, --layers and --profile must not be negative")
    return args


def _list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def _load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine_info(args.threads)
    start_load = _load()
    print(f"{info['cpu']}\n{info['software']}; torch threads: {torch.get_num_threads()}; "
          f"load average {start_load}")  # fmt: skip
    results = []
    title = heading(args)
    with tempfile.TemporaryDirectory(prefix="opt-bench-") as tmp, _quiet_transformers():
        # The pydoc corpus's own vocabulary is ~9k tokens: it fits the OPT embedding as is.
        data = ensure_builtin_dataset(Path(tmp) / "data", vocab_size=OPT_VOCAB_SIZE)
        for precision in args.dtypes:

            def progress(current: Result, done: list[Result] = results) -> None:
                if args.write:  # rows so far, marked incomplete
                    pending = [f"{current.precision} " + _name(s) for s in current.sides
                               if not s.times and not s.error]  # fmt: skip
                    pending += args.dtypes[len(done) + 1 :]
                    body = section_body(args, [*done, current], command_line(argv),
                                        (start_load, _load()), pending)  # fmt: skip
                    write_section(args.write, title, body)

            results.append(measure(args, precision, data, Path(tmp), progress))
            gc.collect()  # models with AdamW state: free them before the next dtype
            if args.device == "cuda":
                torch.cuda.empty_cache()
            if args.write and len(results) < len(args.dtypes):
                # A long run that dies still leaves the dtypes measured so far.
                pending = args.dtypes[len(results) :]
                loads = (start_load, _load())
                body = section_body(args, results, command_line(argv), loads, pending)
                write_section(args.write, title, body)
    loads = (start_load, _load())
    gpu = args.device == "cuda"
    print(f"\n{title}\n")
    print(markdown_table(results, gpu))
    print()
    print("\n".join(_best_text(results)))
    print(_mfu_text(args, results, results[0].flops_per_token))
    print(f"\nload average (1 min) at start / end: {loads[0]} / {loads[1]}")
    for r in results:
        first = ", ".join(f"{_name(s)} {s.losses[0]:.4f}" for s in r.sides if s.losses)
        print(f"{r.precision}: first measured losses {first} (they differ by dropout only)")
    if args.write:
        write_section(args.write, title, section_body(args, results, command_line(argv), loads))
        print(f"wrote section {title!r} to {args.write}")


if __name__ == "__main__":
    main()
