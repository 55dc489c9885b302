"""Single-process checks of the parallel machinery: layout-independent init, the pipeline
split, layout refusals before any memory is touched, and the dry run's per-rank numbers
against a hand calculation (OPT-175B on 1024 ranks)."""

from __future__ import annotations

import itertools
import json
import math
import random
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import REPO, run_cli

from opt import dist as distributed
from opt.config import ParallelConfig, load_config
from opt.dry_run import dry_run_report, format_report
from opt.errors import OptError
from opt.models import init as init_module
from opt.models.init import TILE_1D, TILE_COLS, TILE_ROWS, fill_normal_
from opt.models.model import OPTModel, build_model, canonical_name
from opt.models.sizes import ModelArgs
from opt.parallel import ParallelDims
from opt.parallel.parallelize import materialize, parallelize
from opt.parallel.pipeline import (
    StageCosts,
    build_stage_model,
    split_layers,
    stage_costs,
    stage_ids,
)
from opt.parallel.rules import check_layout, check_microbatches

# Dimensions that cross tile boundaries without being multiples of the tile.
ARGS = ModelArgs(n_layers=4, n_heads=4, d_model=80, vocab_size=702, max_positions=300)
ARGS_350M_STYLE = ARGS.replace(word_embed_dim=48, pre_norm=False)


SHAPE_2D = (40, 2500)


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {canonical_name(n): p.detach() for n, p in model.named_parameters()}


# --- 1. fill_normal_: a block filled at its offset is the block of the full fill ----------


def _full(shape, std=0.02, seed=7, name="w") -> torch.Tensor:
    full = torch.empty(shape)
    fill_normal_(full, std, seed, name, shape, (0,) * len(shape))
    return full


def _block(shape, offset, size, std=0.02, seed=7, name="w") -> torch.Tensor:
    local = torch.full(size, float("nan"))
    fill_normal_(local, std, seed, name, shape, offset)
    return local


@pytest.mark.parametrize(
    ("offset", "size"),
    [
        ((0, 0), (16, 2500)),  # first row block, exactly one tile high
        ((16, 0), (24, 2500)),  # the rest: a full tile and a partial one
        ((5, 0), (30, 2500)),  # rows straddling two tile boundaries
        ((0, 0), (40, 1250)),  # a column block
        ((0, 1023), (40, 1477)),  # columns straddling tile edges to the end
        ((17, 3), (20, 2400)),  # an interior block
        ((39, 2499), (1, 1)),  # the last element
        ((20, 0), (0, 2500)),  # an empty block
    ],
)
def test_a_2d_block_filled_at_its_offset_equals_that_slice_of_the_full_fill(offset, size):
    shape = SHAPE_2D
    assert shape[0] % TILE_ROWS and shape[1] % TILE_COLS
    full = _full(shape)
    block = _block(shape, offset, size)
    r, c = offset
    assert torch.equal(block, full[r : r + size[0], c : c + size[1]])


@pytest.mark.parametrize(
    ("offset", "size"),
    [(0, 10), (16000, 1000), (16384, 3616), (19999, 1), (1234, 15432), (500, 0)],
)
def test_a_1d_block_filled_at_its_offset_equals_that_slice_of_the_full_fill(offset, size):
    shape = (20_000,)  # two 1-D tiles, the second partial
    assert TILE_1D < shape[0] < 2 * TILE_1D
    assert torch.equal(_block(shape, (offset,), (size,)), _full(shape)[offset : offset + size])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiles_drawn_in_threads_equal_tiles_drawn_one_by_one(monkeypatch, dtype):
    """Enough tiles for the thread pool; the serial path must give the same bits, and each
    tile must be torch's float32 ``standard normal * std`` (what init always produced)."""
    shape, std = (5 * TILE_ROWS + 3, 3 * TILE_COLS + 7), 0.02
    assert init_module.PARALLEL_MIN_TILES <= 6 * 4
    threaded = torch.full(shape, float("nan"), dtype=dtype)
    fill_normal_(threaded, std, 7, "w", shape, (0, 0))
    monkeypatch.setattr(init_module, "PARALLEL_MIN_TILES", 10**9)
    serial = torch.full(shape, float("nan"), dtype=dtype)
    fill_normal_(serial, std, 7, "w", shape, (0, 0))
    assert torch.equal(threaded, serial)
    key = init_module._name_key("w")
    tile = torch.from_numpy(init_module._tile_values(7, key, (1, 2), [TILE_ROWS, TILE_COLS]))
    expected = tile.mul_(std).to(dtype)
    rows, cols = slice(TILE_ROWS, 2 * TILE_ROWS), slice(2 * TILE_COLS, 3 * TILE_COLS)
    assert torch.equal(threaded[rows, cols], expected)


def test_a_sharded_fill_covers_every_element_exactly_once():
    """Uneven row x column shards, as TP x FSDP would cut them, reassemble to the full fill."""
    shape = SHAPE_2D
    full = _full(shape)
    rebuilt = torch.full(shape, float("nan"))
    for rows in (range(0, 13), range(13, 26), range(26, 40)):
        for cols in (range(0, 1250), range(1250, 2500)):
            rebuilt[rows.start : rows.stop, cols.start : cols.stop] = _block(
                shape, (rows.start, cols.start), (len(rows), len(cols))
            )
    assert torch.equal(rebuilt, full)


def test_names_and_tiles_give_different_values():
    shape = SHAPE_2D
    base = _full(shape)
    assert not torch.isnan(base).any()
    assert not torch.equal(base, _full(shape, name="v"))
    # Neighbouring tiles are different draws, not copies of one tile.
    assert not torch.equal(base[:16, :400], base[16:32, :400])
    assert not torch.equal(base[:16, :400], base[:16, 1024:1424])
    one_d = _full((20_000,))
    assert not torch.equal(one_d[:3616], one_d[TILE_1D:])
    # The same seed and name always give the same values.
    assert torch.equal(base, _full(shape))


@pytest.mark.parametrize(("seed", "other"), [(7, 8), (0, 1), (0, 2**31)])
def test_the_run_seed_changes_the_values(seed, other):
    """run.seed must matter: two runs with different seeds start from different weights."""
    for shape in ((600, 300), (70_000,)):
        assert not torch.equal(_full(shape, seed=seed), _full(shape, seed=other)), shape


@pytest.mark.parametrize("shape", [(600, 300), (180_000,)])
def test_fill_respects_the_std(shape):
    values = _full(shape, std=0.05)
    assert values.std().item() == pytest.approx(0.05, rel=0.02)
    assert abs(values.mean().item()) < 0.05 * 0.02


# --- 2. init_weights: deterministic, layout-independent, OPT's rule -------------------------


def test_init_weights_is_deterministic_per_seed():
    pa, pb = _params(build_model(ARGS, seed=3)), _params(build_model(ARGS, seed=3))
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


def test_init_weights_differs_across_seeds():
    model = build_model(ARGS, seed=3)
    pa, pc = _params(model), _params(build_model(ARGS, seed=4))
    for name in pa:
        if model.init_rule(name)[0] == "normal":
            assert not torch.equal(pa[name], pc[name]), name
        else:  # ones and zeros do not depend on the seed
            assert torch.equal(pa[name], pc[name]), name


def test_layernorms_are_ones_and_zeros_biases_zero_and_residual_projections_scaled():
    model = build_model(ARGS, seed=0)
    params = _params(model)
    norms = [n for n in params if "norm." in n]
    assert len(norms) == 2 * (2 * ARGS.n_layers + 1)  # two per block and the final norm
    for name, value in params.items():
        if "norm." in name and name.endswith("weight"):
            assert torch.equal(value, torch.ones_like(value)), name
        elif name.endswith("bias"):
            assert torch.equal(value, torch.zeros_like(value)), name
    scaled = ARGS.init_std / math.sqrt(2 * ARGS.n_layers)
    for name in ("layers.2.attn.out_proj.weight", "layers.0.ffn.fc2.weight"):
        assert model.init_rule(name) == ("normal", pytest.approx(scaled))
        # Wrappers do not change the rule.
        wrapped = name.replace("layers.2.", "layers.2._checkpoint_wrapped_module.")
        assert model.init_rule("_orig_mod." + wrapped) == model.init_rule(name)
    for name in (
        "layers.1.attn.q_proj.weight",
        "layers.1.ffn.fc1.weight",
        "embed_tokens.weight",
        "embed_positions.weight",
    ):
        assert model.init_rule(name) == ("normal", ARGS.init_std)
    # The drawn values follow the rule (tens of thousands of samples: within 5%).
    assert params["layers.0.ffn.fc2.weight"].std().item() == pytest.approx(scaled, rel=0.05)
    assert params["layers.0.ffn.fc1.weight"].std().item() == pytest.approx(ARGS.init_std, rel=0.05)
    assert params["embed_tokens.weight"].std().item() == pytest.approx(ARGS.init_std, rel=0.05)


def test_canonical_name_strips_wrapper_prefixes():
    assert canonical_name("layers.3._checkpoint_wrapped_module.attn.q_proj.weight") == (
        "layers.3.attn.q_proj.weight"
    )
    assert canonical_name("_orig_mod.layers.0._checkpoint_wrapped_module.ffn.fc1.bias") == (
        "layers.0.ffn.fc1.bias"
    )
    assert canonical_name("embed_tokens.weight") == "embed_tokens.weight"


@pytest.mark.parametrize("args", [ARGS, ARGS_350M_STYLE], ids=["pre-ln", "350m-style"])
def test_pipeline_stages_built_on_meta_hold_the_full_models_values(args):
    seed, n_stages = 11, 3
    full = _params(build_model(args, seed=seed))
    with torch.device("meta"):
        meta = OPTModel(args)
    split = split_layers(args.n_layers, n_stages, stage_costs(args, 64))
    seen: set[str] = set()
    for stage, layers in enumerate(split):
        model = build_stage_model(meta, layers, stage, n_stages)
        assert [int(i) for i in model.layers] == list(layers)
        model.to_empty(device="cpu")
        model.init_weights(seed)
        params = _params(model)
        for name, value in params.items():
            assert torch.equal(value, full[name]), (stage, name)
        first, last = stage == 0, stage == n_stages - 1
        assert ("embed_positions.weight" in params) == first
        # The last stage holds its own copy of the tied embedding, with the same values.
        assert ("embed_tokens.weight" in params) == (first or last)
        assert ("final_norm.weight" in params) == (last and args.pre_norm)
        assert ("project_in.weight" in params) == (first and args.projects_embeddings)
        assert ("project_out.weight" in params) == (last and args.projects_embeddings)
        seen |= params.keys()
    assert seen == full.keys()


def test_parallelize_and_materialize_give_every_pipeline_layout_the_same_weights():
    """The trainer's path (parallelize on meta, materialize) with pipeline stages, looped
    virtual stages and activation checkpointing (wrapped names) needs no process group
    when tp = dp = 1; every part must hold the plain model's values."""
    seed = 5
    full = _params(build_model(ARGS, seed=seed))
    par = ParallelConfig(
        pp=2, pp_schedule="interleaved_1f1b", pp_stages_per_rank=2, activation_checkpoint="full"
    )
    dims = ParallelDims(world_size=2, pp=2)
    seen: set[str] = set()
    for pp_rank in range(2):
        model = parallelize(ARGS, dims, None, par, seq_len=64, pp_rank=pp_rank)
        assert model.stage_indices == [pp_rank, pp_rank + 2] and model.n_stages == 4
        assert any("_checkpoint_wrapped_module" in n for n, _ in model.parts[0].named_parameters())
        materialize(model, torch.device("cpu"), seed)
        for part in model.parts:
            for name, value in _params(part).items():
                assert torch.equal(value, full[name]), (pp_rank, name)
                seen.add(name)
    assert seen == full.keys()


TP_FSDP_SCRIPT = textwrap.dedent(
    """
    import math, sys, torch
    from opt.config import ParallelConfig, load_config
    from opt.models.model import build_model, canonical_name
    from opt.models.sizes import ModelArgs
    from opt import dist as distributed
    from opt.parallel import ParallelDims
    from opt.parallel.parallelize import materialize, parallelize

    args = ModelArgs(n_layers=2, n_heads=4, d_model=80, vocab_size=702, max_positions=300)
    rank, seed, tp, dp = int(sys.argv[1]), 9, 2, 2
    d, t = divmod(rank, tp)  # mesh (pp, dp_replicate, dp_shard, tp): tp innermost
    full = {n: p.detach() for n, p in build_model(args, seed=seed).named_parameters()}
    dims = ParallelDims(world_size=tp * dp, tp=tp)
    distributed.init_fake(tp * dp, rank)
    try:
        model = parallelize(args, dims, dims.build_meshes("cpu"), ParallelConfig(tp=tp), 64)
        materialize(model, torch.device("cpu"), seed)
        checked = 0
        for raw, param in model.parts[0].named_parameters():
            name = canonical_name(raw)
            value = full[name]
            # Tensor parallel: column-parallel and the vocab-parallel embedding by rows,
            # row-parallel weights by columns, everything else replicated.
            if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight",
                              "q_proj.bias", "k_proj.bias", "v_proj.bias",
                              "fc1.weight", "fc1.bias", "embed_tokens.weight")):
                value = value.chunk(tp, dim=0)[t]
            elif name.endswith(("out_proj.weight", "fc2.weight")):
                value = value.chunk(tp, dim=1)[t]
            # FSDP: ceil(rows / dp)-row chunks of the tensor-parallel block.
            rows = math.ceil(value.shape[0] / dp)
            value = value[d * rows : (d + 1) * rows]
            local = param.to_local()
            assert local.shape == value.shape, (name, local.shape, value.shape)
            assert torch.equal(local, value), name
            checked += 1
        assert checked == len(full), (checked, len(full))
    finally:
        distributed.destroy()
    print("ok", checked)
    """
)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_tensor_and_fsdp_sharded_rank_holds_its_slice_of_the_plain_models_weights():
    """Rank 3 of tp=2 x dp_shard=2 on a fake process group: the second TP shard and the
    second (shorter, uneven: 351 rows -> 176 + 175) FSDP chunk, crossing tile boundaries.

    A subprocess because a second fake process group in one process reuses DTensor specs
    cached for the first: DeviceMesh equality ignores the rank, so coordinates go stale."""
    result = subprocess.run(
        [sys.executable, "-c", TP_FSDP_SCRIPT, "3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["ok", "36"]  # 16 tensors per block x 2, and 4 more


@pytest.mark.parametrize("args", [ARGS, ARGS_350M_STYLE], ids=["pre-ln", "350m-style"])
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp-sp"])
def test_the_tp_table_is_what_the_plan_shards(args, sequence_parallel):
    """TP_SPLIT, which the plan is built from and `opt plan`'s memory model reads, names the
    dimension of every sharded parameter: the real DTensor placements (fake group of 2)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    from opt.parallel.tensor_parallel import apply_tensor_parallel, tp_shard_dim
    from opt.plan.memory import local_numel

    with torch.device("meta"):
        model = OPTModel(args)
    try:
        distributed.init_fake(2, 0)
        apply_tensor_parallel(model, init_device_mesh("cpu", (2,)), sequence_parallel)
    finally:
        distributed.destroy()
    sharded = set()
    for name, param in model.named_parameters():
        assert isinstance(param, DTensor), name  # replicated ones too: one mesh for FSDP
        dim = tp_shard_dim(name)
        assert param.placements == ((Replicate(),) if dim is None else (Shard(dim),)), name
        assert local_numel(name, tuple(param.shape), 2, 1) == param.to_local().numel(), name
        sharded |= {name} if dim is not None else set()
    per_block = {
        f"attn.{p}.{k}" for p in ("q_proj", "k_proj", "v_proj") for k in ("weight", "bias")
    }
    per_block |= {"attn.out_proj.weight", "ffn.fc1.weight", "ffn.fc1.bias", "ffn.fc2.weight"}
    expected = {f"layers.{i}.{n}" for i in range(args.n_layers) for n in per_block}
    assert sharded == expected | {"embed_tokens.weight"}


# --- 3. the pipeline split ------------------------------------------------------------------


def _stage_cost(costs: StageCosts, split: list[range], stage: int) -> float:
    extra = (costs.embedding if stage == 0 else 0.0) + (
        costs.head if stage == len(split) - 1 else 0.0
    )
    return len(split[stage]) * costs.layer + extra


def _max_cost(costs: StageCosts, split: list[range]) -> float:
    return max(_stage_cost(costs, split, s) for s in range(len(split)))


def _check_partition(split: list[range], n_layers: int, n_stages: int) -> None:
    assert len(split) == n_stages
    assert all(len(r) >= 1 and r.step == 1 for r in split)
    assert split[0].start == 0 and split[-1].stop == n_layers
    assert all(a.stop == b.start for a, b in itertools.pairwise(split))


def _brute_force_best(n_layers: int, n_stages: int, costs: StageCosts) -> float:
    best = math.inf
    for cuts in itertools.combinations(range(1, n_layers), n_stages - 1):
        bounds = (0, *cuts, n_layers)
        split = [range(a, b) for a, b in itertools.pairwise(bounds)]
        best = min(best, _max_cost(costs, split))
    return best


@pytest.mark.parametrize(("n_layers", "n_stages"), [(1, 1), (5, 1), (4, 4), (7, 3), (12, 4)])
def test_split_is_contiguous_and_gives_every_stage_a_layer(n_layers, n_stages):
    split = split_layers(n_layers, n_stages, StageCosts(embedding=5.0, layer=1.0, head=50.0))
    _check_partition(split, n_layers, n_stages)


def test_split_is_even_without_embedding_and_head_costs():
    for n_layers, n_stages in [(8, 4), (12, 3), (96, 8), (6, 6)]:
        split = split_layers(n_layers, n_stages, StageCosts(0.0, 1.0, 0.0))
        assert [len(r) for r in split] == [n_layers // n_stages] * n_stages


def test_an_expensive_head_gives_the_last_stage_fewer_layers():
    split = split_layers(12, 3, StageCosts(embedding=0.0, layer=1.0, head=6.0))
    _check_partition(split, 12, 3)
    assert len(split[-1]) < len(split[0])
    # The last stage's one layer and the head cost 7; the other 11 layers fit under that.
    assert len(split[-1]) == 1 and _max_cost(StageCosts(0.0, 1.0, 6.0), split) == 7.0
    # OPT-125M at seq 2048: the tied head costs several layers' worth.
    costs = stage_costs(ModelArgs(n_layers=12, n_heads=12, d_model=768), 2048)
    assert costs.head > 3 * costs.layer > 0 and costs.embedding < costs.layer
    sizes = [len(r) for r in split_layers(12, 4, costs)]
    assert sum(sizes) == 12 and sizes[-1] == min(sizes) < sizes[0]


def test_split_minimises_the_most_expensive_stage():
    rng = random.Random(0)
    for _ in range(60):
        n_layers = rng.randint(1, 9)
        n_stages = rng.randint(1, n_layers)
        costs = StageCosts(
            embedding=rng.choice([0.0, rng.uniform(0, 5)]),
            layer=rng.uniform(0.1, 3),
            head=rng.choice([0.0, rng.uniform(0, 20)]),
        )
        split = split_layers(n_layers, n_stages, costs)
        _check_partition(split, n_layers, n_stages)
        assert _max_cost(costs, split) == pytest.approx(
            _brute_force_best(n_layers, n_stages, costs)
        ), (n_layers, n_stages, costs)


def test_split_refuses_fewer_layers_than_stages():
    with pytest.raises(OptError, match="5 pipeline stages need at least 5 layers"):
        split_layers(4, 5, StageCosts(0.0, 1.0, 0.0))


def test_stage_ids_are_looped():
    assert stage_ids(0, 1, 1) == [0]
    assert stage_ids(2, 4, 1) == [2]
    assert stage_ids(1, 4, 3) == [1, 5, 9]
    # Over all ranks, every stage is run by exactly one rank.
    pp, v = 4, 3
    assert sorted(s for r in range(pp) for s in stage_ids(r, pp, v)) == list(range(pp * v))


# --- 4. layouts refused before any memory ---------------------------------------------------


@pytest.mark.parametrize(
    ("args", "dims", "par", "message"),
    [
        (ARGS.replace(n_heads=8), {"tp": 3, "world_size": 3}, {}, "tp=3 does not divide n_heads"),
        (ARGS.replace(ffn_dim=322), {"tp": 4, "world_size": 4}, {}, "does not divide ffn_dim=322"),
        (ARGS.replace(vocab_size=510), {"tp": 4, "world_size": 4}, {}, "vocab_size=510"),
        (ARGS, {"pp": 8, "world_size": 8}, {}, "pp=8 needs at least 8 layers"),
        (
            ARGS,
            {"pp": 2, "world_size": 2},
            {"pp_schedule": "interleaved_1f1b", "pp_stages_per_rank": 3},
            "= 6 stages need at least 6 layers, the model has 4",
        ),
        (
            ARGS,
            {"world_size": 1},
            {"pp_schedule": "interleaved_1f1b", "pp_stages_per_rank": 2},
            "pp_stages_per_rank > 1 needs",
        ),
    ],
)
def test_check_layout_refuses_what_the_model_cannot_be_split_by(args, dims, par, message):
    with pytest.raises(OptError, match=message):
        check_layout(args, ParallelDims(**dims), ParallelConfig(**par))


def test_check_layout_accepts_and_counts_stages():
    par = ParallelConfig(pp=2, pp_schedule="interleaved_1f1b", pp_stages_per_rank=2)
    assert check_layout(ARGS, ParallelDims(world_size=4, pp=2, tp=2), par) == 4
    assert check_layout(ARGS, ParallelDims(world_size=2, tp=2), ParallelConfig()) == 1


def test_check_microbatches():
    one_f_one_b = ParallelConfig(pp=4)
    interleaved = ParallelConfig(pp=2, pp_schedule="interleaved_1f1b", pp_stages_per_rank=2)
    with pytest.raises(OptError, match=r"only 3 microbatches per step.*at least pp"):
        check_microbatches(ParallelDims(world_size=4, pp=4), one_f_one_b, 3)
    check_microbatches(ParallelDims(world_size=4, pp=4), one_f_one_b, 4)
    check_microbatches(ParallelDims(world_size=2, pp=2), ParallelConfig(pp=2), 3)
    with pytest.raises(OptError, match=r"microbatches per step \(3\) to be a multiple of pp=2"):
        check_microbatches(ParallelDims(world_size=2, pp=2), interleaved, 3)
    check_microbatches(ParallelDims(world_size=2, pp=2), interleaved, 4)
    check_microbatches(ParallelDims(world_size=1), ParallelConfig(), 1)  # no pipeline


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    return lines[0]


@pytest.mark.slow
def test_dry_run_refuses_world_sizes_that_do_not_fit_175b():
    # 1000 = 8 x 125 is divisible by tp, but 125 data-parallel ranks cannot split the
    # 2M-token batch of 2048-token sequences.
    line = _one_error_line(
        run_cli("train", "configs/opt-175b.toml", "--dry-run", "--world-size", "1000")
    )
    assert "batch_tokens=2097152" in line and "dp = 256000" in line
    # The same report function the CLI calls, in-process (it fails before any process
    # group is made): 1020 is not a multiple of tp=8.
    cfg = load_config(REPO / "configs/opt-175b.toml")
    with pytest.raises(OptError, match=r"world size 1020 is not divisible by dp_replicate\*tp\*pp"):
        dry_run_report(cfg, 1020)


@pytest.mark.slow
def test_dry_run_refuses_a_tp_degree_that_does_not_divide_the_heads():
    line = _one_error_line(
        run_cli(
            "train",
            "configs/opt-125m.toml",
            "--parallel.tp",
            "7",
            "--dry-run",
            "--world-size",
            "14",
        )
    )
    assert "parallel.tp=7" in line and "n_heads=12" in line


# --- 5. OPT-175B on 1024 ranks, on paper ----------------------------------------------------


def _hand_count_175b() -> tuple[dict[str, tuple[int, ...]], int]:
    """Local shapes on the first rank, from the shapes alone: TP splits first, then FSDP
    takes ceil(rows / dp_shard)-row chunks of dim 0 and the first rank holds a full one."""
    n_layers, d, ffn, vocab, positions = 96, 12288, 49152, 50272, 2048 + 2
    tp, dp_shard = 8, 1024 // 8

    def local(rows: int, *rest: int) -> tuple[int, ...]:
        return (min(math.ceil(rows / dp_shard), rows), *rest)

    shapes = {
        "embed_tokens.weight": local(vocab // tp, d),  # vocab-parallel
        "embed_positions.weight": local(positions, d),  # replicated over tp
        "final_norm.weight": local(d),
        "final_norm.bias": local(d),
    }
    layer = {
        "attn_norm.weight": local(d),
        "attn_norm.bias": local(d),
        "ffn_norm.weight": local(d),
        "ffn_norm.bias": local(d),
        "attn.out_proj.weight": local(d, d // tp),  # row-parallel: input dim split
        "attn.out_proj.bias": local(d),  # replicated
        "ffn.fc1.weight": local(ffn // tp, d),  # column-parallel
        "ffn.fc1.bias": local(ffn // tp),
        "ffn.fc2.weight": local(d, ffn // tp),
        "ffn.fc2.bias": local(d),
    }
    for proj in ("q_proj", "k_proj", "v_proj"):
        layer[f"attn.{proj}.weight"] = local(d // tp, d)
        layer[f"attn.{proj}.bias"] = local(d // tp)
    for i in range(n_layers):
        shapes.update({f"layers.{i}.{name}": shape for name, shape in layer.items()})
    return shapes, sum(math.prod(s) for s in shapes.values())


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_dry_run_of_opt_175b_on_1024_ranks_matches_a_hand_count():
    result = run_cli(
        "train", "configs/opt-175b.toml", "--dry-run", "--world-size", "1024", "--json"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["layout"] == {"pp": 1, "dp_replicate": 1, "dp_shard": 128, "tp": 8, "dp": 128}
    assert report["parameters"] == 174_604_468_224
    assert report["pipeline"]["layers_per_stage"] == [96]
    (rank,) = report["per_rank"]
    shapes, total = _hand_count_175b()
    assert {s["name"]: tuple(s["local"]) for s in rank["shapes"]} == shapes
    assert rank["local_parameters"] == total == 170_756_160
    assert total == pytest.approx(174.6e9 / 1024, rel=0.01)
    assert rank["bytes"] == {
        "parameters": 4 * total,
        "gradients": 4 * total,
        "optimizer": 8 * total,
        "total": 16 * total,
    }
    # Spot checks of what is sharded how.
    by_name = {s["name"]: s for s in rank["shapes"]}
    assert by_name["embed_tokens.weight"]["global"] == [50272, 12288]
    assert by_name["layers.95.ffn.fc2.weight"]["placements"] == "dp_shard:S(0), tp:S(1)"
    assert by_name["embed_positions.weight"]["placements"] == "dp_shard:S(0), tp:R"

    # The text mode prints format_report of this same report (a second 175B run would
    # double the test's time).
    text = format_report(report)
    assert "tp=8" in text and "dp_shard=128" in text
    assert "170,756,160" in text and "on 1024 ranks" in text
    assert "2.54 GiB" in text  # 16 bytes x 170,756,160


# --- 6. a pipelined, tensor-parallel dry run -----------------------------------------------

TINY_PP_TP = """
[model]
name = "opt-tiny"
n_layers = 2
d_model = 64
vocab_size = 512
[data]
seq_len = 32
[train]
micro_batch_size = 4
batch_tokens = 512  # dp=2: 2 microbatches per step, enough for pp=2
[parallel]
pp = 2
tp = 2
"""


@pytest.mark.slow
def test_dry_run_with_pipeline_and_tensor_parallelism_reports_each_stage(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_PP_TP)
    result = run_cli("train", str(config), "--dry-run", "--world-size", "8", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["layout"] == {"pp": 2, "dp_replicate": 1, "dp_shard": 2, "tp": 2, "dp": 2}
    assert report["pipeline"]["stages"] == 2
    assert sum(report["pipeline"]["layers_per_stage"]) == 2
    assert report["pipeline"]["microbatches_per_step"] == 2
    first, last = report["per_rank"]
    assert (first["pp_rank"], first["stages"], last["pp_rank"], last["stages"]) == (0, [0], 1, [1])
    names = [{s["name"] for s in stage["shapes"]} for stage in (first, last)]
    assert "embed_positions.weight" in names[0] and "embed_positions.weight" not in names[1]
    assert "final_norm.weight" in names[1] and "final_norm.weight" not in names[0]
    assert "embed_tokens.weight" in names[0] & names[1]  # the tied copy on the last stage
    # By hand (d=64, ffn=256, vocab=512, positions 512+2=514; tp=2, then dp_shard=2):
    layer = 3 * (16 * 64 + 16) + (32 * 32 + 32) + (64 * 64 + 64) + (32 * 128 + 32) + 4 * 32
    embed = 128 * 64
    assert first["local_parameters"] == embed + 257 * 64 + layer
    assert last["local_parameters"] == embed + layer + 2 * 32
    assert first["local_parameters"] != last["local_parameters"]
