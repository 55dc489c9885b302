"""Candidate layouts for a model on a cluster: memory per GPU, step time, cost; ranked.

The time model, per optimizer step:
- compute: hardware FLOPs (model FLOPs plus activation recompute) over every GPU at the
  achieved fraction of the accelerator's bf16 peak;
- pipeline bubble: 1F1B idles (pp - 1) / (m * v + pp - 1) of the time, m micro-batches per
  step and v virtual stages per rank;
- tensor parallelism: 2 all-reduces (or reduce-scatter + all-gather under SP, the same
  volume) of one micro-batch's activations per block in the forward, 2 in the backward,
  2 more when the block is recomputed; on the critical path, over NVLink within a node;
- FSDP: bf16 all-gathers of the weights in each micro-batch's forward and backward and one
  gradient reduce-scatter per step, over the network when the shard group spans nodes;
  overlapped with compute, so only what exceeds compute shows;
- pipeline sends: one activation per micro-batch per stage boundary each way.
Memory per GPU: weights, gradients and AdamW exactly as the parallel code shards them
(memory.py), activations of the micro-batches in flight (activations.py), buffers (the
FSDP all-gathers of two blocks, pipeline sends and receives, and the bf16 weight copies
that autocast keeps for backward), and a safety margin.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field

from opt.hardware import Accelerator, GiB
from opt.models.flops import training_flops
from opt.models.sizes import ModelArgs
from opt.parallel.pipeline import split_layers, stage_costs
from opt.parallel.rules import layout_problem, microbatch_problem
from opt.plan.activations import activation_bytes, autocast_weight_copy_bytes
from opt.plan.memory import training_state_bytes

CHECKPOINTING = ("none", "selective", "full")
MICRO_BATCHES = (1, 2, 4, 8, 16)
TP_DEGREES = (1, 2, 4, 8, 16)
PP_DEGREES = (1, 2, 4, 8, 16, 32)
PP_SCHEDULE = "1f1b"  # one stage per pipeline rank, as write_config sets it
BF16 = 2


@dataclass(frozen=True)
class Cluster:
    gpu: Accelerator
    gpus: int
    gpus_per_node: int
    achieved: float  # fraction of peak
    pue: float = 1.1
    carbon_kg_per_kwh: float = 0.231
    margin: float = 0.10  # of GPU memory, kept free (allocator fragmentation, CUDA context)
    achieved_source: str = "default"  # where the fraction of peak came from


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


def layouts(job: Job, cluster: Cluster):
    """Every (tp, pp, micro_batch, checkpointing, sp) worth estimating: TP within a node,
    and tp x pp dividing the GPUs (the data-parallel degree takes the rest)."""
    for tp in (t for t in TP_DEGREES if t <= cluster.gpus_per_node):
        for pp in PP_DEGREES:
            if cluster.gpus % (tp * pp):
                continue
            for mb, ac in itertools.product(MICRO_BATCHES, CHECKPOINTING):
                for sp in (False, True) if tp > 1 else (False,):
                    yield tp, pp, mb, ac, sp


def evaluate(job: Job, cluster: Cluster, tp: int, pp: int, mb: int, ac: str, sp: bool):
    dp = cluster.gpus // (tp * pp)
    per_pass = mb * job.seq_len * dp
    # The batch is rounded to what the layout divides (OPT's "2M tokens" on 992 GPUs was
    # 2,031,616); a layout that would change it by more than 5% is left out.
    grad_accum = max(1, round(job.batch_tokens / per_pass))
    c = Candidate(tp, pp, dp, mb, grad_accum, ac, sp, batch_tokens=grad_accum * per_pass)
    # The trainer's own rules (opt/parallel/rules.py), with the trainer's words.
    if (problem := layout_problem(job.args, tp, pp)) is not None:
        return _exclude(c, problem)
    if abs(c.batch_tokens - job.batch_tokens) > 0.05 * job.batch_tokens:
        return _exclude(c, f"micro-batch x seq_len x dp = {per_pass:,} tokens cannot make a "
                           f"batch within 5% of {job.batch_tokens:,}")  # fmt: skip
    if (problem := microbatch_problem(pp, grad_accum, PP_SCHEDULE)) is not None:
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


def memory_per_gpu(job: Job, cluster: Cluster, c: Candidate) -> dict[str, int]:
    a = job.args
    states = training_state_bytes(a, c.tp, c.pp, c.dp, 1, job.seq_len)
    # The first pipeline rank holds the most: its own layers' activations for up to pp
    # micro-batches in flight under 1F1B (one without a pipeline).
    worst: dict[str, int] = {}
    for pp_rank, state in enumerate(states):
        layers = _layers(job, c.pp)[pp_rank]
        in_flight = min(c.pp - pp_rank, c.grad_accum)
        acts = in_flight * activation_bytes(
            a, job.seq_len, c.micro_batch, c.tp, c.sequence_parallel, c.activation_checkpoint,
            BF16, layers=layers, embedding=pp_rank == 0, head=pp_rank == c.pp - 1,
        )  # fmt: skip
        # The trainer autocasts over fp32 weights: the matmuls keep bf16 copies of them.
        copies = autocast_weight_copy_bytes(
            a, c.tp, c.activation_checkpoint, BF16, layers=layers, embedding=pp_rank == 0,
            head=pp_rank == c.pp - 1, autocast_spans_step=c.pp > 1,
        )  # fmt: skip
        block = (4 * a.d_model**2 + 2 * a.d_model * a.ffn_dim) // c.tp
        gather = 2 * block * BF16 if c.dp > 1 else 0  # this block's and the prefetched one's
        pipe = 4 * c.micro_batch * job.seq_len * a.d_model * BF16 if c.pp > 1 else 0
        entry = {
            "weights": state["weights"], "gradients": state["gradients"],
            "optimizer": state["optimizer"], "activations": acts, "buffers": gather + pipe + copies,
        }  # fmt: skip
        entry["margin"] = int(cluster.margin * cluster.gpu.memory_bytes)
        entry["total"] = sum(entry.values())
        if entry["total"] > worst.get("total", -1):
            worst = entry
    return worst


def _layers(job: Job, pp: int) -> list[int]:
    """Blocks on each pipeline rank (one stage per rank), as the pipeline splits them."""
    if pp == 1:
        return [job.args.n_layers]
    return [len(r) for r in split_layers(job.args.n_layers, pp, stage_costs(job.args, job.seq_len))]


def _estimate_time(job: Job, cluster: Cluster, c: Candidate) -> None:
    a, gpu = job.args, cluster.gpu
    flops = training_flops(a, job.seq_len, c.batch_tokens, c.activation_checkpoint)
    model_flops, hardware_flops = flops.model, flops.hardware
    compute = hardware_flops / cluster.gpus / (gpu.peak_tflops * 1e12 * cluster.achieved)
    m = c.grad_accum
    c.bubble = (c.pp - 1) / (m + c.pp - 1)
    layers = a.n_layers / c.pp
    activation = c.micro_batch * job.seq_len * a.d_model * BF16
    tp_ops = 6 if c.activation_checkpoint == "full" else 4
    tp_bytes = 2 * (c.tp - 1) / c.tp * activation * tp_ops * layers * m if c.tp > 1 else 0
    tp_link = gpu.nvlink_gbps if c.tp <= cluster.gpus_per_node else gpu.network_gbps
    weights_bf16 = training_state_bytes(a, c.tp, c.pp, 1, 1, job.seq_len)[0]["parameters"] * BF16
    shard = (c.dp - 1) / c.dp
    fsdp_bytes = shard * weights_bf16 * (2 * m + 1) if c.dp > 1 else 0
    fsdp_link = gpu.nvlink_gbps if c.tp * c.dp <= cluster.gpus_per_node else gpu.network_gbps
    pp_bytes = 2 * activation * m if c.pp > 1 else 0
    step = (
        max(compute / (1 - c.bubble), fsdp_bytes / (fsdp_link * 1e9))
        + tp_bytes / (tp_link * 1e9)
        + pp_bytes / (gpu.network_gbps * 1e9)
    )
    c.step_s = step
    c.comm_bytes_per_gpu = int(tp_bytes + fsdp_bytes + pp_bytes)
    c.mfu = model_flops / cluster.gpus / step / (gpu.peak_tflops * 1e12)
    steps = math.ceil(job.tokens / c.batch_tokens)
    seconds = steps * step
    c.days = seconds / 86400
    c.gpu_hours = seconds / 3600 * cluster.gpus
    c.energy_mwh = c.gpu_hours * gpu.tdp_watts / 1e6 * cluster.pue
    c.co2_tonnes = c.energy_mwh * 1000 * cluster.carbon_kg_per_kwh / 1000


def plan(job: Job, cluster: Cluster) -> tuple[list[Candidate], list[Candidate]]:
    """(fitting candidates, fastest first; excluded ones with their reasons)."""
    results = [evaluate(job, cluster, *layout) for layout in layouts(job, cluster)]
    fits = sorted((c for c in results if c.fits), key=lambda c: (c.step_s, c.memory["total"]))
    return fits, [c for c in results if not c.fits]
