"""The trainer's pieces, each built by one small function from the job: the device and the
process groups, the data loader, the held-out batches, the parallel model, and the pipeline
schedule."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from opt import dist
from opt.config import JobConfig, to_toml
from opt.data.dataset import valid_prefix
from opt.data.prefetch import PrefetchingLoader
from opt.errors import OptError
from opt.host_memory import retain_freed_memory
from opt.job import Job
from opt.parallel.data_parallel import fsdp_param_dtype
from opt.parallel.parallelize import (
    ParallelModel,
    materialize,
    parallelize,
    tied_embedding_group,
)
from opt.parallel.pipeline import build_schedule
from opt.train.data_setup import build_loader, held_out_dataset, resolve_tokenizer_file, share
from opt.train.evaluate import HeldOutBatches, HeldOutSet


@dataclass(frozen=True)
class Placement:
    """Where this process sits: its device, the job's meshes, and its coordinates."""

    device: torch.device
    meshes: dict | None
    rank: int
    pp_rank: int = 0
    dp_rank: int = 0
    tp_rank: int = 0

    def group(self, name: str):
        """The process group of mesh dimension ``name``, or None where it has one rank."""
        if self.meshes is None or self.meshes[name].size() == 1:
            return None
        return self.meshes[name].get_group()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise OptError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


def check_speed_switches(cfg: JobConfig, device: torch.device) -> None:
    if device.type != "cuda" and cfg.train.attention in ("efficient", "cudnn"):
        raise OptError(f"train.attention={cfg.train.attention} needs a GPU; use flash or math")
    bf16_on_gpu = cfg.train.precision == "bf16" and device.type == "cuda"
    if bf16_on_gpu and not torch.cuda.is_bf16_supported():
        raise OptError("train.precision=bf16 needs a GPU with bf16 support")


def compile_enabled(cfg: JobConfig, device: torch.device) -> bool:
    """``train.compile``; auto compiles on GPUs only: on CPUs inductor's blocks measured
    slower than eager ones (BENCHMARKS.md), and compiling costs time at every start."""
    if cfg.train.compile == "auto":
        return device.type == "cuda"
    return cfg.train.compile == "on"


def place(job: Job) -> Placement:
    """Join the job's process group (when it has more than one rank) and build its meshes."""
    cfg = job.cfg
    device = resolve_device(cfg.train.device)
    check_speed_switches(cfg, device)
    meshes = None
    if job.dims.world_size > 1:
        device = dist.init_distributed(cfg.parallel.timeout_s, device.type)
        meshes = job.dims.build_meshes(device.type)
    rank = dist.rank_and_world()[0]
    if meshes is None:
        return Placement(device, None, rank)
    return Placement(
        device,
        meshes,
        rank,
        pp_rank=meshes["pp"].get_local_rank(),
        dp_rank=meshes["dp"].get_local_rank(),
        tp_rank=meshes["tp"].get_local_rank(),
    )


def build_data(job: Job, where: Placement) -> tuple[PrefetchingLoader, Path]:
    """This rank's loader (prefetching unless turned off) and the token files' prefix.
    Everything fallible about the data happens here, before the model is allocated."""
    cfg = job.cfg
    loader, prefix = dist.first_rank_then_all(
        lambda: build_loader(cfg, job.model_args, where.dp_rank, job.dims.dp)
    )
    if cfg.data.prefetch:
        pin = cfg.data.pin_memory and where.device.type == "cuda"
        loader = PrefetchingLoader(loader, pin_memory=pin)
    return loader, prefix


def build_validation(
    job: Job, where: Placement, train_prefix: Path
) -> tuple[HeldOutBatches | list[HeldOutSet] | None, str]:
    """This rank's share of the held-out batches one evaluation reads (a mixture: each
    source's), or None without validation; and the line that says which (the first line
    of a run)."""
    cfg, valid = job.cfg, job.cfg.validation
    if not valid.enabled:
        return None, "validation: off (validation.enabled = false)"
    if cfg.finetune.mixture is not None:
        return None, (
            "validation: off: fine-tuning has no held-out token set; held-out tasks are "
            "evaluated by [downstream]"
        )
    if cfg.data.sources is not None:
        return _mixture_validation(job, where)
    dataset = held_out_dataset(cfg, train_prefix)
    if dataset is None:
        return None, (
            f"validation: off: no held-out set at {valid_prefix(train_prefix)} "
            "(`opt data prepare --valid-fraction F` makes one; or set validation.path)"
        )
    seq_len, batch_tokens = cfg.data.seq_len, cfg.train.batch_tokens
    if valid.path is None and HeldOutBatches.available(dataset, seq_len, batch_tokens) == 0:
        return None, (
            f"validation: off: the held-out set {dataset.prefix} holds less than one global "
            f"batch ({batch_tokens:,} tokens); hold out more, or set validation.path"
        )
    batches = HeldOutBatches.of(
        dataset, seq_len=seq_len, batch_tokens=batch_tokens, tokens=valid.tokens,
        micro_batch_size=cfg.train.micro_batch_size, grad_accum=job.grad_accum,
        dp_rank=where.dp_rank, dp_size=job.dims.dp,
    )  # fmt: skip
    return batches, (
        f"validation: {batches.tokens:,} tokens ({batches.n_batches} batch(es)) of "
        f"{dataset.prefix} every {valid.every} steps and at every checkpoint save"
    )


def _mixture_validation(job: Job, where: Placement) -> tuple[list[HeldOutSet] | None, str]:
    """Each mixture source's held-out set (``<path>-valid``) that holds a global batch."""
    cfg, valid = job.cfg, job.cfg.validation
    if valid.path is not None:
        raise OptError(
            "validation.path names one held-out set; with data.sources each source's "
            "<path>-valid is evaluated: unset validation.path"
        )
    seq_len, batch_tokens = cfg.data.seq_len, cfg.train.batch_tokens
    sets, missing = [], []
    for source in cfg.data.sources:
        dataset = held_out_dataset(cfg, Path(source.path), derived=True)
        if dataset is None or HeldOutBatches.available(dataset, seq_len, batch_tokens) == 0:
            missing.append(source.label)
            continue
        batches = HeldOutBatches.of(
            dataset, seq_len=seq_len, batch_tokens=batch_tokens, tokens=valid.tokens,
            micro_batch_size=cfg.train.micro_batch_size, grad_accum=job.grad_accum,
            dp_rank=where.dp_rank, dp_size=job.dims.dp,
        )  # fmt: skip
        sets.append(HeldOutSet(batches, source.label, share(source)))
    without = (
        f"; none for {', '.join(missing)} (no <path>-valid holding a global batch of "
        f"{batch_tokens:,} tokens: `opt data prepare --valid-fraction F` makes one)"
        if missing else ""
    )  # fmt: skip
    if not sets:
        return None, f"validation: off{without}"
    each = ", ".join(f"{s.name} {s.batches.tokens:,}" for s in sets)
    return sets, (
        f"validation: the held-out tokens of each source ({each}) every {valid.every} steps "
        f"and at every checkpoint save; the run's loss weights them by their mixture "
        f"shares{without}"
    )


def build_model(job: Job, where: Placement, bf16_via_fp32: bool) -> ParallelModel:
    """This rank's part(s) of the model with every parallelism and compute swap applied,
    allocated and initialised (the same weights as one process, whatever the layout)."""
    cfg = job.cfg
    if cfg.train.keep_host_memory:
        retain_freed_memory()
    # Dropout: the same masks across a TP group where activations are replicated, and
    # different ones where each rank holds its own sequence shard (SP) or batch.
    dims = job.dims
    tp_stream = where.tp_rank if cfg.parallel.sequence_parallel else 0
    torch.manual_seed(
        cfg.run.seed + ((where.pp_rank * dims.dp + where.dp_rank) * dims.tp + tp_stream)
    )
    model = parallelize(
        job.model_args, dims, where.meshes, cfg.parallel, cfg.data.seq_len, where.pp_rank,
        compile_blocks=compile_enabled(cfg, where.device),
        fsdp_param_dtype=fsdp_param_dtype(cfg.train.precision, cfg.parallel),
        loss_chunk=cfg.train.loss_chunk, bf16_via_fp32=bf16_via_fp32,
    )  # fmt: skip
    materialize(model, where.device, cfg.run.seed)
    return model


def checkpoint_files(cfg: JobConfig, dataset_prefix: Path) -> dict[str, bytes]:
    """The files every checkpoint carries beside the tensors: the resolved config, and the
    tokenizer, so that `opt score` and `opt convert` read text back without the run."""
    files = {"config.toml": to_toml(cfg).encode()}
    tokenizer = resolve_tokenizer_file(cfg, dataset_prefix)
    if tokenizer is not None:
        files["tokenizer.json"] = tokenizer.read_bytes()
    return files


def build_pipeline(job: Job, where: Placement, model: ParallelModel, loss_fn):
    """The pipeline schedule over this rank's stages, or None without pipeline parallelism."""
    if job.dims.pp == 1:
        return None
    return build_schedule(
        model.parts,
        model.stage_indices,
        model.n_stages,
        where.device,
        where.group("pp"),
        job.cfg.parallel.pp_schedule,
        job.grad_accum,
        loss_fn,
    )


def embedding_group(job: Job, where: Placement):
    """The first and last pipeline stages' group for the tied embedding, or None."""
    return tied_embedding_group(where.meshes, job.dims) if job.dims.pp > 1 else None
