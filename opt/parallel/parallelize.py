"""Turn the plain model into this rank's parallel part(s): pipeline split, then the compute
swaps (chunked loss, sparse embedding gradient, CPU bf16 via fp32), then tensor parallel,
then activation checkpointing, then FSDP; all on meta. Only then is the local shard
allocated and initialised."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from opt.config import ParallelConfig
from opt.models.init import init_parameters, plain_view
from opt.models.model import OPTModel, canonical_name
from opt.models.sizes import ModelArgs
from opt.parallel.compute import apply_compute
from opt.parallel.data_parallel import apply_activation_checkpointing, apply_fsdp
from opt.parallel.dims import ParallelDims
from opt.parallel.pipeline import build_stage_model, split_layers, stage_costs, stage_ids
from opt.parallel.rules import check_layout
from opt.parallel.tensor_parallel import apply_tensor_parallel


@dataclass
class ParallelModel:
    """This rank's share of the model: one part, or one per virtual pipeline stage."""

    dims: ParallelDims
    parts: list[OPTModel]
    stage_indices: list[int] = field(default_factory=lambda: [0])
    n_stages: int = 1
    layer_split: list[range] = field(default_factory=list)
    fused_loss: bool = False
    """Whether ``part(tokens, targets)`` computes the loss by the chunked head (one part)."""

    @property
    def has_first_stage(self) -> bool:
        return 0 in self.stage_indices

    @property
    def has_last_stage(self) -> bool:
        return self.n_stages - 1 in self.stage_indices

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for part in self.parts for p in part.parameters()]

    def norm_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters counted once in the global gradient norm: the last stage's copy of
        the tied embedding is the first stage's twin and is left out."""
        params = []
        for part, stage in zip(self.parts, self.stage_indices, strict=True):
            twin = part.embed_tokens if stage != 0 and part.embed_tokens is not None else None
            params += [p for p in part.parameters() if twin is None or p is not twin.weight]
        return params

    def tied_embeddings(self) -> list[torch.nn.Parameter]:
        """The tied embedding copies this rank holds on the first or last pipeline stage."""
        if self.n_stages == 1:
            return []
        return [
            part.embed_tokens.weight
            for part, stage in zip(self.parts, self.stage_indices, strict=True)
            if part.embed_tokens is not None and stage in (0, self.n_stages - 1)
        ]


def parallelize(
    args: ModelArgs,
    dims: ParallelDims,
    meshes: dict | None,
    par: ParallelConfig,
    seq_len: int,
    pp_rank: int = 0,
    compile_blocks: bool = False,
    fsdp_param_dtype: torch.dtype | None = None,
    loss_chunk: int = 0,
    bf16_via_fp32: bool = False,
) -> ParallelModel:
    """Build this rank's part(s) on the meta device with every parallelism applied, in
    torchtitan's order: tensor parallel, activation checkpointing, compile, FSDP. Before
    them, the compute swaps each part can take (compute.py): ``loss_chunk`` tokens per
    chunk of the fused head + loss (0: off) and ``bf16_via_fp32`` (kernels.cpu_bf16_via_fp32)."""
    n_stages = check_layout(args, dims, par)
    with torch.device("meta"):
        full = OPTModel(args)
    if n_stages == 1:
        parts, indices, split = [full], [0], []
    else:
        split = split_layers(args.n_layers, n_stages, stage_costs(args, seq_len))
        indices = stage_ids(pp_rank, dims.pp, par.pp_stages_per_rank)
        parts = [build_stage_model(full, split[i], i, n_stages) for i in indices]
    fused_loss = False
    for part in parts:
        fused_loss |= apply_compute(
            part, loss_chunk=loss_chunk, bf16_via_fp32=bf16_via_fp32,
            tensor_parallel=dims.tp > 1, data_parallel=dims.dp > 1,
        )  # fmt: skip
        if dims.tp > 1:
            apply_tensor_parallel(part, meshes["tp"], par.sequence_parallel)
        apply_activation_checkpointing(part, par.activation_checkpoint)
        if compile_blocks:
            for block in part.layers.values():
                block.compile()  # in place: parameter names stay those of the plain model
        if dims.dp > 1:
            dp_mesh = meshes["dp_shard"] if dims.dp_replicate == 1 else meshes["hsdp"]
            apply_fsdp(part, dp_mesh, dims.pp == 1, fsdp_param_dtype)
    return ParallelModel(dims, parts, indices, n_stages, split, fused_loss)


def dtensor_view(param: torch.Tensor):
    """The local block of a (possibly sharded) parameter and where it sits globally."""
    if isinstance(param, DTensor):
        local = param.to_local()
        shape, offset = compute_local_shape_and_global_offset(
            param.shape, param.device_mesh, param.placements
        )
        assert tuple(shape) == tuple(local.shape), (shape, local.shape)
        return local, param.shape, offset
    return plain_view(param)


def materialize(model: ParallelModel, device: torch.device, seed: int) -> None:
    """Allocate only the local shards and fill them with the layout-independent init."""
    for part in model.parts:
        part.to_empty(device=device)
        named = [(canonical_name(n), p) for n, p in part.named_parameters()]
        init_parameters(named, part.init_rule, seed, local_view=dtensor_view)


def tied_embedding_group(meshes: dict, dims: ParallelDims):
    """Process group of the first and last pipeline rank that hold this rank's data-parallel
    and tensor-parallel coordinates: the two copies of the tied embedding."""
    if dims.pp == 1:
        return None
    world = meshes["world"].mesh  # (pp, dp_replicate, dp_shard, tp) of global ranks
    mine = None
    columns = world.reshape(dims.pp, -1)
    for column in range(columns.shape[1]):
        ranks = sorted({int(columns[0, column]), int(columns[-1, column])})
        group = dist.new_group(ranks)  # every rank creates every group, in the same order
        if dist.get_rank() in ranks:
            mine = group
    return mine
