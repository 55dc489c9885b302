"""`opt plan`: ranked layouts for a model on a cluster, as a table, JSON or a config."""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from opt.errors import OptError
from opt.fsutil import atomic_write
from opt.hardware import ACCELERATORS, DEFAULT_FILE, GiB, get_accelerator


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="rank parallel layouts by memory per GPU, step time, days and cost",
        description="Estimate every TP x PP x DP x micro-batch x activation-checkpointing x "
        "sequence-parallel layout of a model on a cluster: memory per GPU (weights, "
        "gradients, AdamW exactly as sharded; activations; buffers; margin), step time, "
        "MFU, pipeline bubble, communication, days, GPU-hours, energy and CO2e. Layouts "
        "that do not fit are listed with the reason.",
    )
    p.add_argument("--model", default="opt-125m", help="size from `opt configs`")
    p.add_argument("--layers", type=int, help="custom shape: number of layers")
    p.add_argument("--heads", type=int, help="custom shape: attention heads")
    p.add_argument("--d-model", type=int, help="custom shape: hidden size (ffn = 4x)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in all")
    p.add_argument("--gpu", default="a100-80gb", choices=sorted(ACCELERATORS))
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--tokens", default="300B", help="training tokens (e.g. 300B, 1.5e11)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--global-batch", default="2M", help="tokens per step (e.g. 2M, 524288)")
    p.add_argument("--achieved-tflops", type=float,
                   help="achieved bf16 TFLOP/s per GPU, executed FLOPs (recompute included) "
                        "(default: the time model's efficiency fitted on published runs)")  # fmt: skip
    p.add_argument(
        "--network-gbps",
        type=float,
        help="GB/s per GPU and direction between nodes (default: the GPU type's)",
    )
    p.add_argument("--pue", type=float, default=1.1, help="data-centre power usage effectiveness")
    p.add_argument("--carbon-intensity", type=float, default=0.231, help="kg CO2e per kWh")
    p.add_argument("--margin", type=float, default=0.10, help="share of GPU memory kept free")
    p.add_argument("--top", type=int, default=10, help="candidates to show")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--write-config", type=Path, help="write the chosen layout as a TOML config")
    p.add_argument("--pick", type=int, default=1, help="which ranked candidate to write")
    p.add_argument("--calibrate", action="store_true",
                   help="first measure this machine (matmul peak, training steps of the "
                        "model on one device) and store it in --calibration")  # fmt: skip
    p.add_argument("--calibration", type=Path, default=DEFAULT_FILE,
                   help=f"calibration file (default {DEFAULT_FILE}); used when it was taken "
                        "on the --gpu type")  # fmt: skip
    p.add_argument("--calibrate-micro-batch", type=int, default=1,
                   help="sequences per calibration step")  # fmt: skip
    p.set_defaults(func=run_plan)


def parse_count(text: str) -> int:
    """300B, 2M, 1.5e11, 524288 -> an int."""
    match = re.fullmatch(r"([0-9.]+(?:e[0-9]+)?)([kKMBT]?)", text.strip())
    if match is None:
        raise OptError(f"not a count: {text!r} (e.g. 300B, 2M, 524288)")
    scale = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}[match.group(2)]
    value = float(match.group(1)) * scale
    if value < 1:
        raise OptError(f"not a positive count: {text!r}")
    return int(value)


def _job_and_cluster(args):
    from opt.models.sizes import get_model_args
    from opt.plan.calibrate import load_calibration
    from opt.plan.planner import Cluster, Job

    model_args = get_model_args(args.model).reshaped(args.layers, args.heads, args.d_model)
    if args.seq_len > model_args.max_positions:
        raise OptError(f"--seq-len {args.seq_len} exceeds max_positions {model_args.max_positions}")
    if args.gpus < 1 or args.gpus_per_node < 1:
        raise OptError("--gpus and --gpus-per-node must be positive")
    from opt.plan.timing import EFFICIENCY, Efficiency

    gpu = get_accelerator(args.gpu)
    efficiency = EFFICIENCY[gpu.name]
    if args.achieved_tflops:
        efficiency = Efficiency(args.achieved_tflops / gpu.peak_tflops, 0.0, "--achieved-tflops")
    elif (measured := load_calibration(args.calibration)) is not None:
        if measured.get("accelerator") == gpu.name:
            efficiency = Efficiency(measured["achieved_tflops"] / gpu.peak_tflops, 0.0,
                                    f"calibrated on {measured['device']} at "
                                    f"{measured['measured_at']}")  # fmt: skip
        else:
            efficiency = Efficiency(efficiency.peak_fraction, efficiency.half_width,
                                    f"{efficiency.fitted_on}; the calibration on "
                                    f"{measured['device']} does not apply to {gpu.name}")  # fmt: skip
    if not 0 < efficiency.peak_fraction <= 1:
        raise OptError(f"--achieved-tflops must be within (0, {gpu.peak_tflops}]")
    if args.network_gbps is not None and args.network_gbps <= 0:
        raise OptError("--network-gbps must be positive")
    cluster = Cluster(gpu, args.gpus, args.gpus_per_node, efficiency, args.pue,
                      args.carbon_intensity, args.margin, args.network_gbps)  # fmt: skip
    job = Job(model_args, args.model, args.seq_len, parse_count(args.global_batch),
              parse_count(args.tokens))  # fmt: skip
    return job, cluster


def run_plan(args) -> int:
    from opt.plan.calibrate import calibrate
    from opt.plan.planner import plan

    if args.calibrate:
        job, _ = _job_and_cluster(args)
        m = calibrate(job.args, args.model, args.seq_len, args.calibrate_micro_batch,
                      args.calibration)  # fmt: skip
        print(f"calibrated on {m['device']}: matmul peak {m['matmul_peak_tflops']:.3g} "
              f"TFLOP/s ({m['dtype']}), training {m['achieved_tflops']:.3g} TFLOP/s "
              f"({m['fraction_of_matmul_peak']:.0%} of it); stored in {args.calibration}")  # fmt: skip
    job, cluster = _job_and_cluster(args)
    fits, excluded = plan(job, cluster)
    if args.write_config:
        if not 1 <= args.pick <= len(fits):
            raise OptError(f"--pick {args.pick}: there are {len(fits)} fitting layouts")
        write_config(args.write_config, job, cluster, fits[args.pick - 1])
    if args.json:
        print(json.dumps({"model": job.model, "gpus": cluster.gpus, "gpu": cluster.gpu.name,
                          "efficiency": asdict(cluster.efficiency),
                          "candidates": [c.to_dict() for c in fits[: args.top]],
                          "excluded": [c.to_dict() for c in excluded]}, indent=1))  # fmt: skip
    else:
        print(format_plan(job, cluster, fits[: args.top], excluded))
    if args.write_config:
        print(f"wrote {args.write_config} (candidate {args.pick})")
    if not fits:
        raise OptError("no layout fits; try more GPUs, a larger GPU or a smaller model")
    return 0


def format_plan(job, cluster, fits, excluded) -> str:
    from opt.models.model import count_parameters

    gpu, e = cluster.gpu, cluster.efficiency
    lines = [
        f"opt plan: {job.model} ({count_parameters(job.args) / 1e9:.2f}B parameters) on "
        f"{cluster.gpus} x {gpu.name} ({cluster.gpus_per_node} per node); "
        f"{job.tokens / 1e9:g}B tokens, seq {job.seq_len}, ~{job.batch_tokens:,} tokens a step",
        f"time model: compute at {e.peak_fraction:.1%} x w / (w + {e.half_width:g}) of the "
        f"{gpu.peak_tflops:.0f} bf16 TFLOP/s peak, w = d_model / tp ({e.fitted_on}); "
        f"PUE {cluster.pue}, {cluster.carbon_kg_per_kwh} kg CO2e/kWh, "
        f"{cluster.margin:.0%} of memory kept free",
        "",
        f"{'#':>3} {'tp':>3} {'pp':>3} {'v':>2} {'dp':>5} {'DP':>4} {'mb':>3} {'acc':>4} "
        f"{'AC':>9} {'SP':>3} {'GiB/GPU':>8} {'(states':>8} {'act':>6} {'buf)':>6} "
        f"{'step s':>7} {'MFU':>5} {'bubble':>6} {'comm GB':>8} {'days':>6} {'GPU-h':>9} "
        f"{'MWh':>7} {'tCO2e':>6}",
    ]
    for i, c in enumerate(fits, 1):
        m = c.memory
        states = m["weights"] + m["gradients"] + m["optimizer"]
        lines.append(
            f"{i:>3} {c.tp:>3} {c.pp:>3} {c.stages_per_rank:>2} {c.dp:>5} "
            f"{'fsdp' if c.data_parallel == 'fsdp' else 'repl':>4} {c.micro_batch:>3} {c.grad_accum:>4} "
            f"{c.activation_checkpoint:>9} {'yes' if c.sequence_parallel else 'no':>3} "
            f"{m['total'] / GiB:>8.1f} {states / GiB:>8.1f} {m['activations'] / GiB:>6.1f} "
            f"{m['buffers'] / GiB:>6.1f} {c.step_s:>7.2f} {c.mfu:>5.1%} {c.bubble:>6.1%} "
            f"{c.comm_bytes_per_gpu / 1e9:>8.1f} {c.days:>6.1f} {c.gpu_hours:>9,.0f} "
            f"{c.energy_mwh:>7.1f} {c.co2_tonnes:>6.1f}"
        )
    if not fits:
        lines.append("  (no layout fits)")
    reasons = Counter(_kind(c.excluded) for c in excluded)
    if reasons:
        lines += ["", f"excluded {len(excluded)} layouts: " + "; ".join(
            f"{n} {kind}" for kind, n in reasons.most_common())]  # fmt: skip
        for kind in reasons:
            example = next(c for c in excluded if _kind(c.excluded) == kind)
            lines.append(
                f"  e.g. tp {example.tp} pp {example.pp} mb {example.micro_batch} "
                f"{example.activation_checkpoint}: {example.excluded}"
            )
    lines.append(f"GiB/GPU includes the {cluster.margin:.0%} margin; v: virtual pipeline stages "
                 "per rank (interleaved 1F1B); DP: FSDP or a replicated model. The time model's "
                 "errors on published runs are in BENCHMARKS.md.")  # fmt: skip
    return "\n".join(lines)


def _kind(reason: str) -> str:
    if reason.startswith("needs"):
        return "do not fit in memory"
    if reason.startswith("parallel."):  # opt/parallel/rules.py's words
        return "cannot split this model"
    if "pipeline" in reason:
        return "have too few micro-batches for the pipeline"
    return "cannot make the batch"


def write_config(path: Path, job, cluster, c) -> None:
    from opt.config import load_config, to_toml
    from opt.job import check_job

    base = Path("configs") / f"{job.model}.toml"
    overrides = {
        "model.name": job.model, "data.seq_len": job.seq_len, "train.precision": "bf16",
        "train.micro_batch_size": c.micro_batch, "train.batch_tokens": c.batch_tokens,
        "schedule.decay_tokens": job.tokens, "parallel.tp": c.tp, "parallel.pp": c.pp,
        "parallel.sequence_parallel": c.sequence_parallel,
        "parallel.pp_schedule": c.schedule, "parallel.pp_stages_per_rank": c.stages_per_rank,
        "parallel.activation_checkpoint": c.activation_checkpoint,
        "slurm.nodes": max(1, cluster.gpus // cluster.gpus_per_node),
        "slurm.gpus_per_node": min(cluster.gpus, cluster.gpus_per_node),
    }  # fmt: skip
    if c.data_parallel == "fsdp":
        overrides |= {"parallel.dp_replicate": 1, "parallel.dp_shard": -1}
    else:
        overrides |= {"parallel.dp_replicate": c.dp, "parallel.dp_shard": 1}
    for key, attr in (("model.n_layers", "n_layers"), ("model.n_heads", "n_heads"),
                      ("model.d_model", "d_model")):  # fmt: skip
        overrides[key] = getattr(job.args, attr)
    cfg = load_config(base if base.is_file() else None, values=overrides)
    check_job(cfg, cluster.gpus)  # the trainer must accept it as written
    atomic_write(
        path, f"# written by `opt plan` for {cluster.gpus} x {cluster.gpu.name}\n" + to_toml(cfg)
    )
