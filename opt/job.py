"""A run's job: everything derived from the config and the world size before any memory is
allocated, and every check that needs no memory.

Training, the dry run, both launchers and the planner start here, so a layout that cannot
work is refused with one line, before a process is started or a byte is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass

from opt.config import JobConfig
from opt.errors import OptError
from opt.models.sizes import ModelArgs, get_model_args
from opt.parallel.dims import ParallelDims
from opt.parallel.rules import check_layout, check_microbatches


@dataclass(frozen=True)
class Job:
    """The config with what follows from it: the model's shape, the parallel degrees, the
    gradient accumulation per data-parallel rank and the number of optimizer steps."""

    cfg: JobConfig
    model_args: ModelArgs
    dims: ParallelDims
    grad_accum: int
    max_steps: int

    @property
    def layout(self) -> dict:
        """The parallel layout as checkpoints record it."""
        return {
            "world_size": self.dims.world_size,
            **self.dims.degrees,
            "pp_stages_per_rank": self.cfg.parallel.pp_stages_per_rank,
            "sequence_parallel": self.cfg.parallel.sequence_parallel,
        }


def check_job(cfg: JobConfig, world_size: int) -> Job:
    """Every check that needs no memory: the shape, the layout against the world size and
    the model, and the batch arithmetic."""
    args = resolve_model_args(cfg)
    dims = parallel_dims(cfg, world_size)
    check_layout(args, dims, cfg.parallel)
    grad_accum = gradient_accumulation_steps(cfg, dims.dp)
    check_microbatches(dims, cfg.parallel, grad_accum)
    return Job(cfg, args, dims, grad_accum, max_steps(cfg))


def resolve_model_args(cfg: JobConfig) -> ModelArgs:
    m = cfg.model
    args = get_model_args(m.name).reshaped(m.n_layers, m.n_heads, m.d_model, m.vocab_size)
    if m.dropout is not None:
        args = args.replace(dropout=m.dropout)
    if cfg.data.seq_len > args.max_positions:
        raise OptError(
            f"data.seq_len={cfg.data.seq_len} exceeds {cfg.model.name}'s "
            f"max_positions={args.max_positions}"
        )
    return args


def parallel_dims(cfg: JobConfig, world_size: int) -> ParallelDims:
    par = cfg.parallel
    try:
        return ParallelDims(
            world_size, dp_replicate=par.dp_replicate, dp_shard=par.dp_shard, tp=par.tp, pp=par.pp
        )
    except OptError as err:
        if world_size == 1:  # a parallel config started without a launcher
            raise OptError(f"{err}; start it with `opt launch local --nproc N`") from None
        raise


def gradient_accumulation_steps(cfg: JobConfig, dp_size: int = 1) -> int:
    per_pass = cfg.train.micro_batch_size * cfg.data.seq_len * dp_size
    if cfg.train.batch_tokens % per_pass != 0:
        raise OptError(
            f"train.batch_tokens={cfg.train.batch_tokens} is not a multiple of "
            f"micro_batch_size * seq_len * dp = {per_pass} (micro_batch_size="
            f"{cfg.train.micro_batch_size}, seq_len={cfg.data.seq_len}, dp={dp_size})"
        )
    return cfg.train.batch_tokens // per_pass


def max_steps(cfg: JobConfig) -> int:
    """``train.max_steps``, or as many steps as the LR decay lasts."""
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return max(1, cfg.schedule.decay_tokens // cfg.train.batch_tokens)
