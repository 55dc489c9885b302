"""`opt train CONFIG --dry-run --world-size N`: the whole layout checked on paper.

Each pipeline stage's model is built on the meta device and parallelized exactly as a real
rank would do it, inside a fake process group of N ranks (collectives are no-ops), so the
shapes and per-rank memory reported are those of the real sharded parameters, not a
formula. Nothing is allocated; OPT-175B on 1024 ranks takes seconds on a laptop.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from opt import dist as distributed
from opt.config import JobConfig
from opt.job import check_job
from opt.models.model import canonical_name, count_parameters
from opt.parallel.data_parallel import GRAD_BYTES, OPTIM_BYTES, PARAM_BYTES, fsdp_param_dtype
from opt.parallel.parallelize import parallelize


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _local_numel(param: torch.Tensor) -> int:
    return param.to_local().numel() if isinstance(param, DTensor) else param.numel()


def _placements(param: torch.Tensor) -> str:
    if not isinstance(param, DTensor):
        return "unsharded"
    names = param.device_mesh.mesh_dim_names or ()
    return ", ".join(f"{n}:{p}" for n, p in zip(names, param.placements, strict=True))


def dry_run_report(cfg: JobConfig, world_size: int) -> dict:
    job = check_job(cfg, world_size)
    args, dims, grad_accum = job.model_args, job.dims, job.grad_accum
    n_stages = dims.pp * cfg.parallel.pp_stages_per_rank
    ranks_per_stage = world_size // dims.pp
    stages, split = [], []
    try:
        for pp_rank in range(dims.pp):
            # The first rank of each pipeline rank's block: it holds the first (largest,
            # FSDP pads the last) shard of every tensor.
            distributed.init_fake(world_size, pp_rank * ranks_per_stage)
            meshes = dims.build_meshes("cpu") if world_size > 1 else None
            model = parallelize(
                args, dims, meshes, cfg.parallel, cfg.data.seq_len, pp_rank,
                fsdp_param_dtype=fsdp_param_dtype(cfg.train.precision, cfg.parallel),
            )  # fmt: skip
            split = model.layer_split
            stages.append(_stage_report(pp_rank, model))
    finally:
        distributed.destroy()
    return {
        "model": cfg.model.name,
        "parameters": count_parameters(args),
        "world_size": world_size,
        "layout": {**dims.degrees, "dp": dims.dp},
        "pipeline": {
            "stages": n_stages,
            "schedule": cfg.parallel.pp_schedule if dims.pp > 1 else "none",
            "layers_per_stage": [len(r) for r in split] or [args.n_layers],
            "microbatches_per_step": grad_accum,
        },
        "batch": {
            "tokens": cfg.train.batch_tokens,
            "sequences": cfg.train.batch_tokens // cfg.data.seq_len,
            "micro_batch_size": cfg.train.micro_batch_size,
            "gradient_accumulation": grad_accum,
        },
        "sequence_parallel": cfg.parallel.sequence_parallel,
        "activation_checkpoint": cfg.parallel.activation_checkpoint,
        "per_rank": stages,
    }


def _stage_report(pp_rank: int, model) -> dict:
    numel, shapes = 0, []
    for part, stage in zip(model.parts, model.stage_indices, strict=True):
        for name, param in part.named_parameters():
            numel += _local_numel(param)
            local = param.to_local() if isinstance(param, DTensor) else param
            shapes.append(
                {
                    "stage": stage,
                    "name": canonical_name(name),
                    "global": list(param.shape),
                    "local": list(local.shape),
                    "placements": _placements(param),
                }
            )
    return {
        "pp_rank": pp_rank,
        "stages": model.stage_indices,
        "local_parameters": numel,
        "bytes": {
            "parameters": numel * PARAM_BYTES,
            "gradients": numel * GRAD_BYTES,
            "optimizer": numel * OPTIM_BYTES,
            "total": numel * (PARAM_BYTES + GRAD_BYTES + OPTIM_BYTES),
        },
        "shapes": shapes,
    }


def format_report(report: dict, shapes: bool = True) -> str:
    layout = report["layout"]
    pipe = report["pipeline"]
    batch = report["batch"]
    lines = [
        f"dry run: {report['model']} ({report['parameters']:,} parameters) on "
        f"{report['world_size']} ranks",
        "layout: "
        + " x ".join(f"{k}={layout[k]}" for k in ("pp", "dp_replicate", "dp_shard", "tp"))
        + f" (data-parallel {layout['dp']}); sequence_parallel={report['sequence_parallel']}, "
        f"activation_checkpoint={report['activation_checkpoint']}",
        f"pipeline: {pipe['stages']} stage(s), schedule {pipe['schedule']}, layers per stage "
        f"{pipe['layers_per_stage']}, {pipe['microbatches_per_step']} microbatches per step",
        f"batch: {batch['tokens']:,} tokens = {batch['sequences']:,} sequences; micro-batch "
        f"{batch['micro_batch_size']} x {batch['gradient_accumulation']} accumulation per "
        "data-parallel rank",
        "",
        "memory per rank (fp32 weights and gradients, AdamW moments; activations excluded):",
        f"{'pp rank':>7} {'stages':>10} {'parameters':>15} {'weights':>11} "
        f"{'gradients':>11} {'AdamW':>11} {'total':>11}",
    ]
    for stage in report["per_rank"]:
        b = stage["bytes"]
        lines.append(
            f"{stage['pp_rank']:>7} {','.join(map(str, stage['stages'])):>10} "
            f"{stage['local_parameters']:>15,} {_size(b['parameters']):>11} "
            f"{_size(b['gradients']):>11} {_size(b['optimizer']):>11} {_size(b['total']):>11}"
        )
    if not shapes:
        return "\n".join(lines)
    lines += ["", "shapes on the first rank of pp rank 0 (global -> local):"]
    first = report["per_rank"][0]["shapes"]
    for entry in _one_layer(first):
        lines.append(
            f"  {entry['name']:<40} {entry['global']!s:>16} -> {entry['local']!s:<16} "
            f"{entry['placements']}"
        )
    return "\n".join(lines)


def _one_layer(shapes: list[dict]) -> list[dict]:
    """Non-layer tensors and the first layer's: every layer after it has the same shapes."""
    first_layer = next(
        (s["name"].split(".")[1] for s in shapes if s["name"].startswith("layers.")), None
    )
    return [
        s
        for s in shapes
        if not s["name"].startswith("layers.") or s["name"].split(".")[1] == first_layer
    ]
