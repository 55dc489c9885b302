"""Parallel layouts on CPU/gloo, checkpoint stalls and the 175B dry run.

    python bench/parallel_layouts.py --write BENCHMARKS.md
    python bench/parallel_layouts.py --quick

Three measurements, all in one run so that they share the machine's state:
1. Step time of one model under several layouts started by torchrun, against the single
   process (the peer) with the same total thread count. On a 2-core CPU this measures the
   overhead of DTensor, gloo collectives and pipeline schedules, not a speed-up.
2. The stall a checkpoint adds to training: synchronous save vs async save (time until
   ``checkpoints.save`` returns and training may continue), against the step time.
3. Wall time of `opt train configs/opt-175b.toml --dry-run --world-size 1024`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TITLE = "## Parallel layouts, checkpoint stall and the 175B dry run (CPU)"

LAYOUTS = {
    "1 process (peer)": (1, []),
    "DP2 (FSDP2)": (2, ["--parallel.dp_shard", "2"]),
    "TP2": (2, ["--parallel.tp", "2"]),
    "TP2 + SP": (2, ["--parallel.tp", "2", "--parallel.sequence_parallel", "true"]),
    "PP2 (1F1B)": (2, ["--parallel.pp", "2"]),
}


def model_overrides(args: argparse.Namespace, data: Path, root: Path) -> list[str]:
    values = {
        "model.name": "opt-125m",
        "model.n_layers": args.layers,
        "data.path": str(data),
        "data.seq_len": args.seq_len,
        "train.micro_batch_size": args.micro_batch,
        "train.batch_tokens": args.micro_batch * args.seq_len * 4,
        "metrics.peak_tflops": 1.0,
        "metrics.tensorboard": "false",
        "run.dir": str(root / "runs"),
        "checkpoint.dir": str(root / "ckpt"),
        "checkpoint.resume": "none",
    }
    return [item for k, v in values.items() for item in (f"--{k}", str(v))]


# ----- 1. layouts (each rank runs this file with --worker) -----------------------------------
def worker(argv: list[str]) -> None:
    from opt import dist as distributed
    from opt.config import load_config
    from opt.train.trainer import Trainer

    out, warmup, steps, *overrides = argv
    trainer = Trainer(load_config(None, overrides))
    times = []
    for i in range(int(warmup) + int(steps)):
        start = time.perf_counter()
        trainer.train_step()
        if i >= int(warmup):
            times.append(time.perf_counter() - start)
    if trainer.rank == 0:
        Path(out).write_text(json.dumps(times))
    distributed.destroy()


def run_layout(nproc: int, flags: list[str], common: list[str], args, tmp: Path) -> list[float]:
    out = tmp / f"times_{nproc}_{abs(hash(tuple(flags)))}.json"
    # The same two cores either way: one process with 2 threads, or 2 processes with 1.
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // nproc)), "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
    ]
    cmd += [__file__, "--worker", str(out), str(args.warmup), str(args.steps), *common, *flags]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return json.loads(out.read_text())


# ----- 2. checkpoint stall ---------------------------------------------------------------------
def checkpoint_stall(common: list[str], args, tmp: Path) -> dict[str, float]:
    from opt.config import load_config
    from opt.train.trainer import Trainer

    trainer = Trainer(load_config(None, common))
    step_times, sync_saves, async_stalls, async_totals = [], [], [], []
    for _ in range(args.saves):
        start = time.perf_counter()
        trainer.train_step()
        step_times.append(time.perf_counter() - start)
        trainer.cfg.checkpoint.async_save = False
        start = time.perf_counter()
        trainer.checkpoints.save(trainer.step)
        sync_saves.append(time.perf_counter() - start)
        trainer.train_step()
        trainer.cfg.checkpoint.async_save = True
        start = time.perf_counter()
        trainer.checkpoints.save(trainer.step)
        async_stalls.append(time.perf_counter() - start)
        trainer.checkpoints.finish()
        async_totals.append(time.perf_counter() - start)
    size = sum(f.stat().st_size for f in trainer.cfg.checkpoint_dir.rglob("*") if f.is_file())
    n_ckpt = len(list(trainer.cfg.checkpoint_dir.iterdir()))
    return {
        "step": statistics.median(step_times),
        "sync": statistics.median(sync_saves),
        "async_stall": statistics.median(async_stalls),
        "async_total": statistics.median(async_totals),
        "mb": size / max(n_ckpt, 1) / 2**20,
    }


# ----- 3. dry run ------------------------------------------------------------------------------
def dry_run_times(repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "opt", "train", "configs/opt-175b.toml", "--dry-run", "--world-size", "1024"],
            cwd=REPO, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        times.append(time.perf_counter() - start)
    return times


def report(args, layouts: dict[str, list[float]], stall: dict[str, float], dry: list[float]) -> str:
    from report import machine_info

    info = machine_info(threads=2)
    peer = statistics.median(layouts["1 process (peer)"])
    tokens = args.micro_batch * args.seq_len * 4
    lines = [
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- Machine: {info['cpu']}; {info['software']}; 2 cores shared by all ranks",
        f"- Command: `python bench/parallel_layouts.py{' --quick' if args.quick else ''} --write BENCHMARKS.md`",
        f"- Model: opt-125m shape cut to {args.layers} layers, seq {args.seq_len}, "
        f"{tokens} tokens a step (4 micro-batches of {args.micro_batch} on one data-parallel "
        "rank), fp32, dropout 0.1",
        "",
        "| layout | processes x threads | median s/step | min-max | vs 1 process |",
        "|---|---|---|---|---|",
    ]
    for name, times in layouts.items():
        nproc = LAYOUTS[name][0]
        med = statistics.median(times)
        lines.append(
            f"| {name} | {nproc} x {max(1, 2 // nproc)} | {med:.3f} | {min(times):.3f}-{max(times):.3f} "
            f"| {peer / med:.2f}x |"
        )
    lines += [
        "",
        f"Medians of {args.steps} steps after {args.warmup} warmup. On 2 cores the layouts "
        "split the same compute over processes and add gloo collectives, DTensor dispatch and "
        "pipeline bubbles, so the ratio is the overhead paid here, not a speed-up; they "
        "exist for GPUs, where the per-GPU memory is the point.",
        "",
        f"Checkpoint stall (1 process, same model, {stall['mb']:.0f} MiB per checkpoint, medians "
        f"of {args.saves}): step {stall['step']:.3f} s; synchronous save {stall['sync']:.3f} s "
        f"({stall['sync'] / stall['step']:.0%} of a step); async save returns after "
        f"{stall['async_stall']:.3f} s ({stall['async_stall'] / stall['step']:.0%} of a step: "
        f"staging to host memory) and is committed after {stall['async_total']:.3f} s.",
        "",
        f"Dry run of OPT-175B on 1024 ranks (`opt train configs/opt-175b.toml --dry-run "
        f"--world-size 1024`, process start included): median {statistics.median(dry):.1f} s "
        f"of {len(dry)} (range {min(dry):.1f}-{max(dry):.1f} s).",
    ]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2 layers, seq 64, 5 steps")
    parser.add_argument("--write", type=Path, help="replace this section of BENCHMARKS.md")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.seq_len, args.steps, args.warmup, args.saves = 2, 64, 5, 1, 1
    from opt.data.prepare import ensure_builtin_dataset

    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        data = ensure_builtin_dataset(tmp / "pydoc", vocab_size=50272)
        common = model_overrides(args, data, tmp)
        layouts = {}
        for layout, (nproc, flags) in LAYOUTS.items():
            layouts[layout] = run_layout(nproc, flags, common, args, tmp)
            print(f"{layout}: median {statistics.median(layouts[layout]):.3f} s/step", flush=True)
        stall = checkpoint_stall(common, args, tmp)
        print(f"checkpoint: {stall}", flush=True)
        dry = dry_run_times(3 if not args.quick else 1)
    body = report(args, layouts, stall, dry)
    print(body)
    if args.write:
        from report import write_section

        write_section(args.write, TITLE, body)


if __name__ == "__main__":
    main()
