"""Parallel degrees of a run, checked against the world size before any memory is allocated
(what the model can be split by is in rules.py), and the named device meshes built from them.

Mesh order, outermost first: pp, dp_replicate, dp_shard, tp. Tensor parallelism is innermost
so its heavy collectives stay within a node; pipeline stages are outermost because they
exchange only activations.
"""

from __future__ import annotations

from dataclasses import dataclass

from opt.errors import OptError

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class ParallelDims:
    """Degrees whose product is the world size; ``dp_shard=-1`` takes whatever is left."""

    world_size: int
    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise OptError(f"world size must be positive, got {self.world_size}")
        for name in ("dp_replicate", "tp", "pp"):
            if getattr(self, name) < 1:
                raise OptError(f"parallel.{name} must be at least 1, got {getattr(self, name)}")
        fixed = self.dp_replicate * self.tp * self.pp
        if self.dp_shard == -1:
            if self.world_size % fixed != 0:
                raise OptError(
                    f"world size {self.world_size} is not divisible by dp_replicate*tp*pp = {fixed}"
                )
            object.__setattr__(self, "dp_shard", self.world_size // fixed)
        elif self.dp_shard < 1:
            raise OptError(f"parallel.dp_shard must be -1 or at least 1, got {self.dp_shard}")
        product = fixed * self.dp_shard
        if product != self.world_size:
            raise OptError(
                f"parallel layout pp={self.pp} x dp_replicate={self.dp_replicate} x "
                f"dp_shard={self.dp_shard} x tp={self.tp} = {product} does not match "
                f"the world size {self.world_size}"
            )

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many different batches one step sees."""
        return self.dp_replicate * self.dp_shard

    @property
    def degrees(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in MESH_DIMS}

    def build_meshes(self, device_type: str) -> dict:
        """Named meshes: ``world`` (4-D), each of its dims, ``hsdp`` (replicate x shard) and
        ``dp`` (the same flattened, for data loading and loss averaging). The flattened mesh is kept here rather than sliced
        from the root later, which torch is deprecating."""
        from torch.distributed.device_mesh import init_device_mesh

        world = init_device_mesh(
            device_type, tuple(self.degrees.values()), mesh_dim_names=MESH_DIMS
        )
        meshes = {"world": world, **{name: world[name] for name in MESH_DIMS}}
        meshes["hsdp"] = world["dp_replicate", "dp_shard"]  # FSDP's 2-D (replicate, shard) mesh
        meshes["dp"] = meshes["hsdp"]._flatten(mesh_dim_name="dp")
        return meshes
