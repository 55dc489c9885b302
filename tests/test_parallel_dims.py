"""ParallelDims: degrees checked against the world size and the model; named meshes."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from opt.config import ParallelConfig
from opt.errors import OptError
from opt.models.sizes import get_model_args
from opt.parallel import ParallelDims
from opt.parallel.rules import check_layout


def test_dp_shard_takes_what_is_left_of_the_world():
    dims = ParallelDims(world_size=1024, tp=8, pp=2, dp_replicate=4)
    assert dims.dp_shard == 16 and dims.dp == 64
    assert dims.degrees == {"pp": 2, "dp_replicate": 4, "dp_shard": 16, "tp": 8}
    assert ParallelDims(world_size=1).degrees == {
        "pp": 1,
        "dp_replicate": 1,
        "dp_shard": 1,
        "tp": 1,
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"world_size": 8, "tp": 3}, "not divisible"),
        ({"world_size": 8, "tp": 2, "dp_shard": 2}, "does not match the world size 8"),
        ({"world_size": 8, "tp": 0}, "tp must be at least 1"),
        ({"world_size": 8, "dp_shard": 0}, "dp_shard must be -1 or at least 1"),
        ({"world_size": 0}, "world size must be positive"),
    ],
)
def test_inconsistent_layouts_are_refused(kwargs, message):
    with pytest.raises(OptError, match=message):
        ParallelDims(**kwargs)


@pytest.mark.parametrize(
    ("size", "kwargs", "message"),
    [
        ("opt-125m", {"tp": 8}, "does not divide n_heads=12"),
        ("opt-30b", {"tp": 16}, "does not divide n_heads=56"),
        ("opt-tiny", {"pp": 8}, "needs at least 8 layers"),
        ("opt-175b", {"tp": 96}, "does not divide vocab_size=50272"),
        ("opt-66b", {"tp": 3}, "does not divide vocab_size=50272"),
    ],
)
def test_layouts_the_model_cannot_be_split_by_are_refused(size, kwargs, message):
    dims = ParallelDims(world_size=kwargs.get("tp", 1) * kwargs.get("pp", 1), **kwargs)
    with pytest.raises(OptError, match=message):
        check_layout(get_model_args(size), dims, ParallelConfig())


def test_opt_175b_layout_is_accepted():
    """OPT-175B's own layout: TP=8 with sharded data parallelism over 992 GPUs."""
    dims = ParallelDims(world_size=992, tp=8)
    assert check_layout(get_model_args("opt-175b"), dims, ParallelConfig(tp=8)) == 1
    assert dims.dp_shard == 124


def test_named_meshes_at_175b_scale_with_a_fake_process_group():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dims = ParallelDims(world_size=1024, tp=8, pp=2, dp_replicate=8)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=1024)
    try:
        meshes = dims.build_meshes("cpu")
        assert meshes["world"].mesh_dim_names == ("pp", "dp_replicate", "dp_shard", "tp")
        assert meshes["world"].size() == 1024
        sizes = [meshes[name].size() for name in ("pp", "dp_replicate", "dp_shard", "tp", "dp")]
        assert sizes == [2, 8, 8, 8, 64]
    finally:
        dist.destroy_process_group()
