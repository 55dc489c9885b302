"""The rules a parallel layout must follow, in one place.

Each ``*_problem`` function returns the first rule a layout breaks, as one line, or None.
The job's checks (opt/job.py, through ``check_layout`` and ``check_microbatches``) raise it
before anything is allocated; `opt plan` excludes a candidate layout with it as the reason.
"""

from __future__ import annotations

from opt.config import ParallelConfig
from opt.errors import OptError
from opt.models.sizes import ModelArgs
from opt.parallel.dims import ParallelDims


def tensor_parallel_problem(args: ModelArgs, tp: int) -> str | None:
    """The Megatron split divides whole heads, the FFN and the vocabulary over tp ranks."""
    if args.n_heads % tp != 0:
        return f"parallel.tp={tp} does not divide n_heads={args.n_heads}"
    if args.ffn_dim % tp != 0:
        return f"parallel.tp={tp} does not divide ffn_dim={args.ffn_dim}"
    if args.vocab_size % tp != 0:
        return (
            f"parallel.tp={tp} does not divide vocab_size={args.vocab_size} "
            "(the embedding is split by vocabulary rows)"
        )
    return None


def pipeline_problem(args: ModelArgs, pp: int, stages_per_rank: int = 1) -> str | None:
    """Every pipeline stage holds at least one layer; virtual stages need a pipeline."""
    if args.n_layers < pp:
        return f"parallel.pp={pp} needs at least {pp} layers, the model has {args.n_layers}"
    if pp == 1 and stages_per_rank > 1:
        return "parallel.pp_stages_per_rank > 1 needs parallel.pp > 1"
    n_stages = pp * stages_per_rank
    if n_stages > args.n_layers:
        return (
            f"parallel.pp={pp} x pp_stages_per_rank={stages_per_rank} = {n_stages} "
            f"stages need at least {n_stages} layers, the model has {args.n_layers}"
        )
    return None


def layout_problem(args: ModelArgs, tp: int, pp: int, stages_per_rank: int = 1) -> str | None:
    """Whether the model can be split so: tensor parallelism, then the pipeline."""
    return tensor_parallel_problem(args, tp) or pipeline_problem(args, pp, stages_per_rank)


def microbatch_problem(pp: int, n_microbatches: int, schedule: str) -> str | None:
    """A pipeline schedule keeps every stage busy only with at least pp microbatches per
    step; interleaved 1F1B sends them round in groups of pp."""
    if pp == 1:
        return None
    if n_microbatches < pp:
        return (
            f"pipeline with pp={pp} gets only {n_microbatches} microbatches per step "
            "(batch_tokens / (micro_batch_size * seq_len * dp)); it needs at least pp"
        )
    if schedule == "interleaved_1f1b" and n_microbatches % pp != 0:
        return (
            f"interleaved_1f1b needs the microbatches per step ({n_microbatches}) to be a "
            f"multiple of pp={pp}"
        )
    return None


def check_layout(args: ModelArgs, dims: ParallelDims, par: ParallelConfig) -> int:
    """Refuse a layout the model cannot be split by; returns the number of pipeline stages."""
    if (problem := layout_problem(args, dims.tp, dims.pp, par.pp_stages_per_rank)) is not None:
        raise OptError(problem)
    return dims.pp * par.pp_stages_per_rank


def check_microbatches(dims: ParallelDims, par: ParallelConfig, n_microbatches: int) -> None:
    if (problem := microbatch_problem(dims.pp, n_microbatches, par.pp_schedule)) is not None:
        raise OptError(problem)
