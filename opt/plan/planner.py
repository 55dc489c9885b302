"""Candidate layouts for a model on a cluster: memory per GPU, step time, cost; ranked.

The search covers what real teams run: tensor parallelism within a node, every pipeline
degree that divides the GPUs left (35 stages for 105 layers, 64 for 128), one, two or four
virtual stages per pipeline rank (the interleaved schedule), micro-batches of 1 to 16,
no/selective/full activation checkpointing, sequence parallelism, and FSDP or a replicated
model for the data-parallel degree that remains. The step time is opt/plan/timing.py's
model; memory per GPU is: weights, gradients and AdamW exactly as the parallel code shards
them (memory.py), activations of the micro-batches in flight (activations.py), buffers
(the FSDP all-gathers of two blocks, pipeline sends and receives, and the bf16 weight
copies that autocast keeps for backward), and a safety margin.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from functools import cache

from opt.hardware import Accelerator, GiB
from opt.models.sizes import ModelArgs
from opt.parallel.pipeline import split_layers, stage_costs, stage_ids
from opt.parallel.rules import layout_problem, microbatch_problem
from opt.plan.activations import (
    activation_bytes_per_layer,
    autocast_weight_copy_bytes,
    embedding_activation_bytes,
    head_activation_bytes,
)
from opt.plan.memory import training_state_bytes
from opt.plan.timing import OURS, Efficiency, Layout, step_time

CHECKPOINTING = ("none", "selective", "full")
MICRO_BATCHES = (1, 2, 4, 8, 16)
TP_DEGREES = (1, 2, 4, 8, 16)
STAGES_PER_RANK = (1, 2, 4)
DATA_PARALLEL = ("fsdp", "replicate")
BF16 = 2


@dataclass(frozen=True)
class Cluster:
    gpu: Accelerator
    gpus: int
    gpus_per_node: int
    efficiency: Efficiency
    pue: float = 1.1
    carbon_kg_per_kwh: float = 0.231
    margin: float = 0.10  # of GPU memory, kept free (allocator fragmentation, CUDA context)
    network_gbps: float | None = None  # per GPU between nodes; None: the GPU type's


@dataclass(frozen=True)
class Job:
    args: ModelArgs
    model: str
    seq_len: int
    batch_tokens: int
    tokens: int


@dataclass
class Candidate:
    tp: int
    pp: int
    dp: int
    micro_batch: int
    grad_accum: int
    activation_checkpoint: str
    sequence_parallel: bool
    stages_per_rank: int = 1
    data_parallel: str = "fsdp"
    batch_tokens: int = 0
    memory: dict[str, int] = field(default_factory=dict)
    fits: bool = True
    excluded: str = ""
    step_s: float = 0.0
    mfu: float = 0.0
    bubble: float = 0.0
    comm_bytes_per_gpu: int = 0
    days: float = 0.0
    gpu_hours: float = 0.0
    energy_mwh: float = 0.0
    co2_tonnes: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def schedule(self) -> str:
        return "interleaved_1f1b" if self.stages_per_rank > 1 else "1f1b"


def pipeline_degrees(args: ModelArgs, gpus: int) -> list[int]:
    """Every pipeline degree dividing ``gpus`` that leaves each stage a layer."""
    return [pp for pp in range(1, min(gpus, args.n_layers) + 1) if gpus % pp == 0]


def layouts(job: Job, cluster: Cluster):
    """Every (tp, pp, v, micro_batch, checkpointing, sp, data parallel) worth estimating."""
    for tp in (t for t in TP_DEGREES if t <= cluster.gpus_per_node and cluster.gpus % t == 0):
        for pp in pipeline_degrees(job.args, cluster.gpus // tp):
            dp = cluster.gpus // (tp * pp)
            for v in STAGES_PER_RANK if pp > 1 else (1,):
                for mb, ac in itertools.product(MICRO_BATCHES, CHECKPOINTING):
                    for sp in (False, True) if tp > 1 else (False,):
                        for kind in DATA_PARALLEL if dp > 1 else ("fsdp",):
                            yield tp, pp, v, mb, ac, sp, kind


def evaluate(job: Job, cluster: Cluster, tp: int, pp: int, mb: int, ac: str, sp: bool,
             v: int = 1, data_parallel: str = "fsdp") -> Candidate:  # fmt: skip
    dp = cluster.gpus // (tp * pp)
    per_pass = mb * job.seq_len * dp
    # The batch is rounded to what the layout divides (OPT's "2M tokens" on 992 GPUs was
    # 2,031,616); a layout that would change it by more than 5% is left out.
    grad_accum = max(1, round(job.batch_tokens / per_pass))
    c = Candidate(tp, pp, dp, mb, grad_accum, ac, sp, v, data_parallel,
                  batch_tokens=grad_accum * per_pass)  # fmt: skip
    # The trainer's own rules (opt/parallel/rules.py), with the trainer's words.
    if (problem := layout_problem(job.args, tp, pp, v)) is not None:
        return _exclude(c, problem)
    if abs(c.batch_tokens - job.batch_tokens) > 0.05 * job.batch_tokens:
        return _exclude(c, f"micro-batch x seq_len x dp = {per_pass:,} tokens cannot make a "
                           f"batch within 5% of {job.batch_tokens:,}")  # fmt: skip
    if (problem := microbatch_problem(pp, grad_accum, c.schedule)) is not None:
        return _exclude(c, problem)
    c.memory = memory_per_gpu(job, cluster, c)
    budget = cluster.gpu.memory_bytes
    if c.memory["total"] > budget:
        return _exclude(c, f"needs {c.memory['total'] / GiB:.1f} GiB of "
                           f"{budget / GiB:.0f} GiB")  # fmt: skip
    _estimate_time(job, cluster, c)
    return c


def _exclude(c: Candidate, reason: str) -> Candidate:
    c.fits, c.excluded = False, reason
    return c


@cache
def _states(args: ModelArgs, tp: int, pp: int, dp_shard: int, v: int, seq_len: int):
    return training_state_bytes(args, tp, pp, dp_shard, v, seq_len)


@cache
def _rank_layers(args: ModelArgs, pp: int, v: int, seq_len: int) -> tuple[tuple[int, ...], ...]:
    """Blocks in each stage of each pipeline rank, as the pipeline splits them."""
    if pp == 1:
        return ((args.n_layers,),)
    split = split_layers(args.n_layers, pp * v, stage_costs(args, seq_len))
    return tuple(tuple(len(split[s]) for s in stage_ids(r, pp, v)) for r in range(pp))


def _ranks_to_check(ranks: tuple[tuple[int, ...], ...]) -> list[int]:
    """The ranks that can hold the most: the first and last (embedding, head), and the first
    rank of each stage shape. Ranks further down the pipeline keep fewer micro-batches in
    flight, so a later rank of the same shape never needs more than an earlier one."""
    seen, out = set(), {0, len(ranks) - 1}
    for r, shape in enumerate(ranks):
        if shape not in seen:
            seen.add(shape)
            out.add(r)
    return sorted(out)


def _in_flight(c: Candidate, pp_rank: int) -> int:
    """Stage-micro-batches whose activations a rank holds at most: 1F1B's warm-up of pp - r
    (one without a pipeline); the interleaved schedule's (v - 1) * pp + 2 * (pp - 1 - r) + 1,
    as torch.distributed.pipelining runs it."""
    if c.stages_per_rank == 1:
        return min(c.pp - pp_rank, c.grad_accum)
    v = c.stages_per_rank
    return min(v * c.grad_accum, (v - 1) * c.pp + 2 * (c.pp - 1 - pp_rank) + 1)


def memory_per_gpu(job: Job, cluster: Cluster, c: Candidate) -> dict[str, int]:
    a, s, mb = job.args, job.seq_len, c.micro_batch
    dp_shard = c.dp if c.data_parallel == "fsdp" else 1
    states = _states(a, c.tp, c.pp, dp_shard, c.stages_per_rank, s)
    ranks = _rank_layers(a, c.pp, c.stages_per_rank, s)
    per_layer = activation_bytes_per_layer(a, s, mb, c.tp, c.sequence_parallel,
                                           c.activation_checkpoint, BF16)  # fmt: skip
    worst: dict[str, int] = {}
    for pp_rank in _ranks_to_check(ranks):
        state, first, last = states[pp_rank], pp_rank == 0, pp_rank == c.pp - 1
        acts = _in_flight(c, pp_rank) * max(ranks[pp_rank]) * per_layer
        if first:
            acts += min(c.pp, c.grad_accum) * embedding_activation_bytes(
                a, s, mb, c.tp, c.sequence_parallel, BF16)  # fmt: skip
        if last:
            acts += head_activation_bytes(a, s, mb, c.tp, c.sequence_parallel, BF16)
        # The trainer autocasts over fp32 weights: the matmuls keep bf16 copies of them.
        copies = autocast_weight_copy_bytes(
            a, c.tp, c.activation_checkpoint, BF16, layers=sum(ranks[pp_rank]),
            embedding=first, head=last, autocast_spans_step=c.pp > 1,
        )  # fmt: skip
        block = (4 * a.d_model**2 + 2 * a.d_model * a.ffn_dim) // c.tp
        gather = 2 * block * BF16 if dp_shard > 1 else 0  # this block's and the prefetched one's
        pipe = 4 * mb * s * a.d_model * BF16 if c.pp > 1 else 0
        entry = {
            "weights": state["weights"], "gradients": state["gradients"],
            "optimizer": state["optimizer"], "activations": acts, "buffers": gather + pipe + copies,
        }  # fmt: skip
        entry["margin"] = int(cluster.margin * cluster.gpu.memory_bytes)
        entry["total"] = sum(entry.values())
        if entry["total"] > worst.get("total", -1):
            worst = entry
    return worst


def _estimate_time(job: Job, cluster: Cluster, c: Candidate) -> None:
    a, gpu = job.args, cluster.gpu
    layout = Layout(c.tp, c.pp, c.dp, c.micro_batch, c.grad_accum, c.activation_checkpoint,
                    c.sequence_parallel, c.stages_per_rank, c.data_parallel)  # fmt: skip
    local = _states(a, c.tp, c.pp, 1, c.stages_per_rank, job.seq_len)[0]["parameters"]
    t = step_time(a, job.seq_len, layout, gpu, cluster.gpus_per_node,
                  cluster.efficiency.at(a.d_model, c.tp), OURS,
                  network_gbps=cluster.network_gbps, local_parameters=local)  # fmt: skip
    c.step_s, c.bubble, c.comm_bytes_per_gpu = t.total_s, t.bubble, t.comm_bytes
    c.mfu = t.model_flops / cluster.gpus / t.total_s / (gpu.peak_tflops * 1e12)
    seconds = math.ceil(job.tokens / c.batch_tokens) * t.total_s
    c.days = seconds / 86400
    c.gpu_hours = seconds / 3600 * cluster.gpus
    c.energy_mwh = c.gpu_hours * gpu.tdp_watts / 1e6 * cluster.pue
    c.co2_tonnes = c.energy_mwh * 1000 * cluster.carbon_kg_per_kwh / 1000


def plan(job: Job, cluster: Cluster) -> tuple[list[Candidate], list[Candidate]]:
    """(fitting candidates, fastest first; excluded ones with their reasons)."""
    results = [evaluate(job, cluster, tp, pp, mb, ac, sp, v, kind)
               for tp, pp, v, mb, ac, sp, kind in layouts(job, cluster)]  # fmt: skip
    fits = sorted((c for c in results if c.fits), key=lambda c: (c.step_s, c.memory["total"]))
    return fits, [c for c in results if not c.fits]
