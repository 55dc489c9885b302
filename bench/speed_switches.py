"""The measured effect of each speed switch: our trainer with its defaults against the same
run with one switch set the other way, each in a fresh process.

    python bench/speed_switches.py                      # opt-125m shape, seq 512, fp32 + bf16
    python bench/speed_switches.py --quick              # smoke run: 2 layers, seq 128
    python bench/speed_switches.py --write BENCHMARKS.md

A fresh process per variant because some switches are process-wide and one-way (the
allocator setting) and a compiled model cannot be uncompiled. Variants run in rounds
(defaults, switch 1, switch 2, ..., then again) so slow drift of the machine hits all of
them; each row is the median over all measured steps of all rounds. The loss of the first
measured step is printed for every variant: dropout is off, so it shows each switch keeps
the numbers (tests/test_speed.py checks that properly).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from report import command_line, machine_info, write_section

# (label, precision, overrides that differ from the defaults)
VARIANTS = (
    ("defaults", "fp32", {}),
    ("full logits + F.cross_entropy (loss_chunk 0)", "fp32", {"train.loss_chunk": 0}),
    ("allocator at glibc defaults (keep_host_memory off)", "fp32",
     {"train.keep_host_memory": False}),
    ("math SDPA instead of the fused CPU kernel", "fp32", {"train.attention": "math"}),
    ("unfused AdamW (for-each kernels)", "fp32", {"optim.fused": False}),
    ("no prefetch", "fp32", {"data.prefetch": False}),
    ("torch.compile of each block", "fp32", {"train.compile": "on"}),
    ("selective activation checkpointing", "fp32",
     {"parallel.activation_checkpoint": "selective"}),
    ("full activation checkpointing", "fp32", {"parallel.activation_checkpoint": "full"}),
    ("defaults", "bf16", {}),
    ("native bf16 CPU kernels (cpu_bf16_compute native)", "bf16",
     {"train.cpu_bf16_compute": "native"}),
)  # fmt: skip


def run_variant(spec: dict) -> dict:
    """One variant in this process: build the trainer, time steps, report as JSON."""
    from opt.config import load_config
    from opt.train.trainer import Trainer

    torch.set_num_threads(spec["threads"])
    trainer = Trainer(load_config(None, spec["overrides"]))
    times, losses = [], []
    for i in range(spec["warmup"] + spec["steps"]):
        start = time.perf_counter()
        result = trainer.train_step()
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - start)
            losses.append(result.loss)
    return {"times": times, "loss": losses[0], "data_wait_s": getattr(trainer.loader, "wait_s", 0)}


def overrides(args, precision: str, switch: dict, data: Path, tmp: Path) -> list[str]:
    values = {
        "run.dir": str(tmp / "runs"),
        "model.name": args.model,
        **({"model.n_layers": args.layers} if args.layers else {}),  # 0: the size's own
        "model.dropout": 0.0,
        "data.path": str(data),
        "data.seq_len": args.seq_len,
        "train.micro_batch_size": args.batch,
        "train.batch_tokens": args.batch * args.seq_len,
        "train.precision": precision,
        "train.device": "cpu",
        "checkpoint.dir": str(tmp / "checkpoints"),
        "metrics.tensorboard": False,
        "metrics.peak_tflops": 1.0,
        **switch,
    }
    return [f"--{k}={json.dumps(v)}" for k, v in values.items()]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_variant(json.loads(args.worker))))
        return

    from opt.data.prepare import ensure_builtin_dataset
    from opt.models.sizes import OPT_VOCAB_SIZE

    variants = [v for v in VARIANTS if v[1] in args.dtypes]
    measured: dict[int, list[float]] = {i: [] for i in range(len(variants))}
    first_loss: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="opt-switches-") as tmp:
        data = ensure_builtin_dataset(Path(tmp) / "data", vocab_size=OPT_VOCAB_SIZE)
        for round_ in range(args.rounds):
            for i, (label, precision, switch) in enumerate(variants):
                spec = {"overrides": overrides(args, precision, switch, data, Path(tmp)),
                        "threads": args.threads, "warmup": args.warmup, "steps": args.steps}  # fmt: skip
                out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                                     capture_output=True, text=True, check=True)  # fmt: skip
                result = json.loads(out.stdout.strip().splitlines()[-1])
                measured[i] += result["times"]
                first_loss.setdefault(i, result["loss"])
                print(f"round {round_ + 1} {precision} {label}: "
                      f"{statistics.median(result['times']):.3f} s/step, "
                      f"loss {result['loss']:.4f}", flush=True)  # fmt: skip
    table = markdown(variants, measured, first_loss)
    print(table)
    if args.write:
        info = machine_info(args.threads)
        layers = f", {args.layers} layers" if args.layers else ""
        title = f"## Speed switches, one at a time ({args.model} shape{layers}, seq {args.seq_len}, CPU)"
        body = "\n".join([
            f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}",
            f"- Machine: {info['cpu']}; {info['software']}; {info['threads']} threads",
            f"- Command: `{command_line(argv)}`",
            f"- Micro-batch {args.batch} x {args.seq_len} tokens, dropout off, one process per "
            f"variant; {args.rounds} rounds of {args.warmup} warm-up + {args.steps} measured steps",
            "",
            table,
            "",
            "Each row changes one switch from the default; `vs defaults` is the defaults' "
            "median step time over this row's (above 1: the default is faster). The loss is "
            "that of the first measured step (same weights and batch in every variant).",
        ])  # fmt: skip
        write_section(args.write, title, body)
        print(f"wrote section {title!r} to {args.write}")


def markdown(variants, measured, first_loss) -> str:
    lines = ["| precision | variant | median s/step | min-max | vs defaults | first loss |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    defaults = {p: statistics.median(measured[i]) for i, (lbl, p, _) in enumerate(variants)
                if lbl == "defaults"}  # fmt: skip
    for i, (label, precision, _) in enumerate(variants):
        median = statistics.median(measured[i])
        ratio = defaults[precision] / median if precision in defaults else float("nan")
        lines.append(f"| {precision} | {label} | {median:.3f} | {min(measured[i]):.3f}-"
                     f"{max(measured[i]):.3f} | {ratio:.2f}x | {first_loss[i]:.4f} |")  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="opt-125m")
    parser.add_argument("--layers", type=int, default=0, help="cut the size to this many layers")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="measured steps per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--write", type=Path, metavar="FILE")
    parser.add_argument("--quick", action="store_true", help="2 layers, seq 128, 1 round")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.seq_len, args.rounds, args.steps = 2, 128, 1, 2
    args.dtypes = args.dtypes.split(",")
    return args


if __name__ == "__main__":
    main()
