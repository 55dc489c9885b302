"""How long one optimizer step of a layout takes: the work each GPU does, priced by the
accelerator's peak and links, with one fitted constant.

The terms, per GPU and step:
- compute: the FLOPs the system executes (model FLOPs plus the forward work its activation
  recompute redoes) over the bf16 peak times ``efficiency``, the one constant fitted on
  published training runs (opt/plan/published.py, fitted by opt/plan/fit.py);
- tensor parallelism: 2 all-reduces of one micro-batch's activations per block in the
  forward, 2 in the backward and those the recompute repeats (reduce-scatter plus
  all-gather under sequence parallelism: the same bytes), ring cost 2(t-1)/t of them, over
  NVLink when the group is within a node; on the critical path;
- pipeline: stage i waits while the pipeline fills and drains, (pp - 1) / (v * m + pp - 1)
  of the time for m micro-batches and v virtual stages per rank (Narayanan et al. 2021,
  the interleaved schedule divides the bubble by v); the slowest stage sets the pace, so
  the time is scaled by its cost over the mean stage's; activations are sent to the next
  stage and gradients back, v * m times each way, over the network;
- data parallelism: FSDP gathers the bf16 weights in every micro-batch's forward and
  backward and reduce-scatters gradients once a step, overlapped with compute (only what
  exceeds it shows); a replicated model all-reduces its gradients once a step after the
  backward, exposed.
Not modelled: the optimizer step, kernels' efficiency varying with shape (it is inside the
fitted constant), network congestion, stragglers and failures.
"""

from __future__ import annotations

from dataclasses import dataclass

from opt.hardware import Accelerator
from opt.models.flops import block_forward_flops_per_token, training_flops
from opt.models.sizes import ModelArgs
from opt.parallel.pipeline import split_layers, stage_costs

BF16 = 2


@dataclass(frozen=True)
class System:
    """What differs between training systems running the same layout."""

    name: str
    whole_block_recompute: bool
    """Full activation checkpointing reruns the whole block forward (Megatron, fairscale's
    checkpoint_wrapper), rather than stopping at the last tensor backward needs (ours)."""
    grad_reduce_bytes: int
    """Bytes per gradient element in the data-parallel reduction: 4 for ours (FSDP reduces
    in fp32), 2 for Megatron-LM in fp16 (it all-reduces 16-bit gradients unless
    ``accumulate_allreduce_grads_in_fp32`` is set)."""
    pp_send_split_by_tp: bool
    """Each tensor-parallel rank sends only its 1/tp of the activation between stages
    (Megatron's scatter-gather; ours does under sequence parallelism only)."""


OURS = System("opt", whole_block_recompute=False, grad_reduce_bytes=4, pp_send_split_by_tp=False)
MEGATRON = System("megatron", whole_block_recompute=True, grad_reduce_bytes=2,
                  pp_send_split_by_tp=True)  # fmt: skip


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    micro_batch: int
    grad_accum: int
    activation_checkpoint: str = "full"
    sequence_parallel: bool = False
    stages_per_rank: int = 1
    data_parallel: str = "fsdp"  # or "replicate"

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp


@dataclass
class StepTime:
    total_s: float
    compute_s: float
    bubble: float
    stage_imbalance: float
    tp_s: float
    pp_s: float
    dp_s: float
    dp_exposed_s: float
    executed_flops: float
    model_flops: float
    comm_bytes: int


def executed_flops(args: ModelArgs, seq_len: int, tokens: int, checkpoint: str,
                   system: System) -> tuple[float, float]:  # fmt: skip
    """(model FLOPs, FLOPs the system executes) of training on ``tokens`` tokens."""
    flops = training_flops(args, seq_len, tokens, checkpoint)
    if checkpoint == "full" and system.whole_block_recompute:
        recompute = args.n_layers * block_forward_flops_per_token(args, seq_len) * tokens
        return flops.model, flops.model + recompute
    return flops.model, flops.hardware


def stage_imbalance(args: ModelArgs, seq_len: int, pp: int, stages_per_rank: int = 1) -> float:
    """The busiest pipeline rank's forward cost over the mean rank's, for the trainer's
    split (a rank runs stages r, r + pp, ... under the interleaved schedule)."""
    n_stages = pp * stages_per_rank
    if n_stages == 1:
        return 1.0
    costs = stage_costs(args, seq_len)
    per_stage = [len(r) * costs.layer for r in split_layers(args.n_layers, n_stages, costs)]
    per_stage[0] += costs.embedding
    per_stage[-1] += costs.head
    per_rank = [sum(per_stage[r::pp]) for r in range(pp)]
    return max(per_rank) / (sum(per_rank) / pp)


@dataclass(frozen=True)
class Efficiency:
    """The fraction of the dense bf16 peak that executed training FLOPs reach, growing with
    the width of the matmuls each GPU runs: ``peak_fraction * x / (x + half_width)`` for
    x = d_model / tp (narrow matmuls leave the tensor cores idler)."""

    peak_fraction: float
    half_width: float
    fitted_on: str

    def at(self, d_model: int, tp: int) -> float:
        x = d_model / tp
        return self.peak_fraction * x / (x + self.half_width)


def step_time(
    args: ModelArgs,
    seq_len: int,
    layout: Layout,
    gpu: Accelerator,
    gpus_per_node: int,
    efficiency: float,
    system: System = OURS,
    *,
    network_gbps: float | None = None,
    local_parameters: int,
) -> StepTime:
    """``local_parameters``: the parameters one GPU holds before data-parallel sharding (the
    first pipeline rank's, from opt/plan/memory.py)."""
    lay = layout
    network = (network_gbps or gpu.network_gbps) * 1e9
    nvlink = gpu.nvlink_gbps * 1e9
    m, v = lay.grad_accum, lay.stages_per_rank
    tokens = lay.micro_batch * seq_len * lay.dp * m
    model, executed = executed_flops(args, seq_len, tokens, lay.activation_checkpoint, system)
    compute = executed / lay.gpus / (gpu.peak_tflops * 1e12 * efficiency)

    activation = lay.micro_batch * seq_len * args.d_model * BF16
    tp_bytes = 0.0
    if lay.tp > 1:
        recomputed = 0
        if lay.activation_checkpoint == "full":
            # Ours stops before fc2, so only attention's all-reduce is repeated.
            recomputed = 2 if system.whole_block_recompute else 1
        per_block = (4 + recomputed) * 2 * (lay.tp - 1) / lay.tp * activation
        tp_bytes = per_block * args.n_layers / lay.pp * m
    tp_link = nvlink if lay.tp <= gpus_per_node else network
    tp_s = tp_bytes / tp_link

    bubble = (lay.pp - 1) / (v * m + lay.pp - 1)
    imbalance = stage_imbalance(args, seq_len, lay.pp, v)
    pipe_s = (compute + tp_s) * imbalance / (1 - bubble)

    pp_bytes = 0.0
    if lay.pp > 1:
        split = lay.tp if (system.pp_send_split_by_tp or lay.sequence_parallel) else 1
        pp_bytes = 2 * v * m * activation / split
    pp_link = nvlink if lay.gpus <= gpus_per_node else network  # pp is the outermost dim
    pp_s = pp_bytes / pp_link

    dp_bytes, dp_exposed = 0.0, 0.0
    dp_link = nvlink if lay.tp * lay.dp <= gpus_per_node else network
    if lay.dp > 1:
        share = (lay.dp - 1) / lay.dp
        if lay.data_parallel == "fsdp":
            gathers = share * local_parameters * BF16 * 2 * m
            dp_bytes = gathers + share * local_parameters * system.grad_reduce_bytes
        else:
            dp_bytes = 2 * share * local_parameters * system.grad_reduce_bytes
            dp_exposed = dp_bytes / dp_link
    dp_s = dp_bytes / dp_link
    overlapped = dp_s if lay.data_parallel == "fsdp" else 0.0
    total = max(pipe_s, overlapped) + pp_s + dp_exposed
    return StepTime(
        total_s=total, compute_s=compute, bubble=bubble, stage_imbalance=imbalance,
        tp_s=tp_s, pp_s=pp_s, dp_s=dp_s, dp_exposed_s=max(0.0, total - pipe_s - pp_s),
        executed_flops=executed, model_flops=model,
        comm_bytes=int(tp_bytes + pp_bytes + dp_bytes),
    )  # fmt: skip


# Fitted by opt/plan/fit.py (bench/plan_fit.py prints it) on the 10 A100 runs of Narayanan
# et al. 2021, Table 1; tests/test_plan_fit.py holds these figures equal to that fit.
A100_FIT = Efficiency(
    0.6156, 194.0, "fitted on the 10 A100 runs of Megatron-LM's Table 1 (Narayanan et al. 2021)"
)
# No published H100 run of a GPT-style model with its layout is in opt/plan/published.py,
# so H100s get the A100 figures: unvalidated, and likely optimistic (the peak tripled, the
# memory bandwidth and network did not).
EFFICIENCY = {
    "a100-40gb": A100_FIT,
    "a100-80gb": A100_FIT,
    "h100-80gb": Efficiency(
        A100_FIT.peak_fraction, A100_FIT.half_width, "the A100 fit, not validated on H100s"
    ),
    "h200": Efficiency(
        A100_FIT.peak_fraction, A100_FIT.half_width, "the A100 fit, not validated on H200s"
    ),
}
