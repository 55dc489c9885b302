"""The Megatron tensor-parallel split, applied to the plain model by a plan keyed by module
name (the model itself knows nothing about it).

- q/k/v and fc1 are column-parallel (each rank holds whole heads / a slice of the FFN), and
  out_proj and fc2 are row-parallel, so a block costs one all-reduce in the forward per
  sub-layer (or a reduce-scatter plus all-gather with sequence parallelism).
- The token embedding is vocab-parallel, and the tied head multiplies by the same sharded
  matrix, so its logits come out sharded over the vocabulary; ``loss_parallel`` computes the
  cross-entropy on those shards and the full logits are never gathered.
- Every other parameter (LayerNorms, positions, 350M's projections) is a replicated DTensor,
  so that after FSDP every parameter lives on the same mesh.
- Sequence parallelism shards the residual stream by sequence between the sub-layers: the
  LayerNorms and dropouts then work on 1/tp of the tokens.
"""

from __future__ import annotations

import warnings

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.distributed.tensor.parallel.style import ParallelStyle

from opt.models.model import OPTModel, canonical_name

# The plan's hooks on the embeddings see token ids, which never require gradients; torch
# warns about that on every backward. It is expected here, not a sign of a broken graph.
warnings.filterwarnings(
    "ignore", message="Full backward hook is firing when gradients are computed with respect"
)


class ReplicateParallel(ParallelStyle):
    """Parameters replicated over the TP group; the input (a local tensor of
    ``input_layout``) is computed on as a DTensor and handed on as ``output_layout``."""

    def __init__(
        self, input_layout: Placement | None = None, output_layout: Placement | None = None
    ):
        super().__init__()
        self.input_layout = input_layout or Replicate()
        self.output_layout = output_layout or Replicate()

    def _prepare_input(self, module, inputs, mesh):
        return tuple(
            DTensor.from_local(x, mesh, (self.input_layout,), run_check=False)
            if not isinstance(x, DTensor)
            else x
            for x in inputs
        )

    def _prepare_output(self, module, output, mesh):
        return output.redistribute(placements=(self.output_layout,)).to_local()

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(
            module,
            device_mesh,
            partition_fn=None,  # None replicates every parameter
            input_fn=self._prepare_input,
            output_fn=self._prepare_output,
        )


# The split, one entry per sharded module (its name in the model, or within a block): how
# the plan lays it out. Every other parameter is replicated over the TP group.
TP_SPLIT = {
    "embed_tokens": "vocab",
    "attn.q_proj": "colwise",
    "attn.k_proj": "colwise",
    "attn.v_proj": "colwise",
    "attn.out_proj": "rowwise",
    "ffn.fc1": "colwise",
    "ffn.fc2": "rowwise",
}
# Which dimension of each parameter a kind of split divides by tp: column-parallel weights
# and biases by output rows, row-parallel weights by input columns (their bias is added
# once, after the reduction: replicated), the embedding by vocabulary rows.
SHARD_DIM = {
    "colwise": {"weight": 0, "bias": 0},
    "rowwise": {"weight": 1},
    "vocab": {"weight": 0},
}


def tp_shard_dim(name: str) -> int | None:
    """The dimension the plan splits parameter ``name`` along, or None if replicated."""
    module, _, param = canonical_name(name).rpartition(".")
    if module.startswith("layers."):
        module = module.split(".", 2)[2]  # layers.{i}.attn.q_proj -> attn.q_proj
    kind = TP_SPLIT.get(module)
    return None if kind is None else SHARD_DIM[kind].get(param)


def tensor_parallel_plan(model: OPTModel, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """The plan for whatever parts this (possibly pipeline-stage) model holds."""
    residual = Shard(1) if sequence_parallel else Replicate()  # layout between sub-layers
    styles = {
        # Token ids in, replicated; out in the residual stream's layout (sharded by
        # sequence under SP), the partial lookups of each vocabulary shard reduced.
        "vocab": lambda: RowwiseParallel(input_layouts=Replicate(), output_layouts=residual),
        "colwise": ColwiseParallel,
        "rowwise": lambda: RowwiseParallel(output_layouts=residual),
    }

    def norm() -> ParallelStyle:
        if sequence_parallel:
            return SequenceParallel(use_local_output=True)
        return ReplicateParallel()

    def gather_input() -> PrepareModuleInput:
        return PrepareModuleInput(input_layouts=(residual,), desired_input_layouts=(Replicate(),))

    plan: dict[str, ParallelStyle] = {}
    if model.embed_tokens is not None:
        plan["embed_tokens"] = styles[TP_SPLIT["embed_tokens"]]()
    if model.embed_positions is not None:
        # (T, D) positions are added to (B, T, D) tokens: under SP both are sharded by T.
        plan["embed_positions"] = ReplicateParallel(
            output_layout=Shard(0) if sequence_parallel else Replicate()
        )
    for name in ("project_in", "project_out"):
        if getattr(model, name) is not None:
            plan[name] = ReplicateParallel(residual, residual)
    for layer_id in model.layers:
        prefix = f"layers.{layer_id}"
        plan[f"{prefix}.attn_norm"] = norm()
        plan[f"{prefix}.ffn_norm"] = norm()
        plan[f"{prefix}.attn"] = gather_input()
        plan[f"{prefix}.ffn"] = gather_input()
        for name, kind in TP_SPLIT.items():
            if name.startswith(("attn.", "ffn.")):
                plan[f"{prefix}.{name}"] = styles[kind]()
    if model.final_norm is not None:
        plan["final_norm"] = norm()
    if model.lm_head is not None:
        # Hidden states gathered to every rank, times the vocab-sharded tied weight: logits
        # sharded over the vocabulary, kept as a DTensor for loss_parallel.
        plan["lm_head"] = PrepareModuleInput(
            input_layouts=(residual, None),
            desired_input_layouts=(Replicate(), None),
            use_local_output=False,
        )
    return plan


def apply_tensor_parallel(model: OPTModel, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    parallelize_module(model, tp_mesh, tensor_parallel_plan(model, sequence_parallel))
