"""The model without switches, and the compute swaps applied from outside it: each computes
exactly what it replaces or what its kernel computes, and parallelize applies each only
where it can (the rules today's runs follow)."""

from __future__ import annotations

import ast
import copy
import inspect
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from opt import dist as distributed
from opt.config import ATTENTION, CPU_BF16_COMPUTE, PP_SCHEDULES, ParallelConfig
from opt.device import native_bf16_cpu
from opt.models import kernels
from opt.models import model as model_module
from opt.models.fused_loss import ChunkedLossHead, chunked_cross_entropy
from opt.models.model import LMHead, OPTModel, ScaledDotProductAttention, build_model
from opt.models.sizes import ModelArgs
from opt.parallel import ParallelDims
from opt.parallel.compute import (
    apply_compute,
    use_bf16_via_fp32,
    use_chunked_loss,
    use_sparse_embedding_grad,
)
from opt.parallel.parallelize import parallelize
from opt.parallel.pipeline import SCHEDULES

SMALL = ModelArgs(n_layers=2, n_heads=4, d_model=32, vocab_size=97, max_positions=40)
SMALL_350M_STYLE = SMALL.replace(word_embed_dim=16, pre_norm=False)
ARGS = [pytest.param(SMALL, id="pre-ln"), pytest.param(SMALL_350M_STYLE, id="350m-style")]


def _batch(args: ModelArgs) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, args.vocab_size, (2, 24), generator=gen)
    return tokens, torch.randint(0, args.vocab_size, (2, 24), generator=gen)


def _loss_and_grads(model: OPTModel, fused: bool, autocast: bool = False):
    """The trainer's step: the loss in forward (fused) or from the logits; then backward."""
    tokens, targets = _batch(model.args)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks in every run
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(tokens, targets) if fused else model(tokens)
    loss = out if fused else model_module.cross_entropy(out, targets)
    loss.backward()
    grads = {n: p.grad.to_dense() for n, p in model.named_parameters()}
    return loss.detach(), grads


def assert_identical(a, b):
    loss_a, grads_a = a
    loss_b, grads_b = b
    assert torch.equal(loss_a, loss_b), (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


# ----- the model file -------------------------------------------------------------------------
def test_the_model_has_no_switches():
    """No attribute that outside code could flip: the instance holds its shape and modules;
    the file names no switch and imports no kernel policy."""
    model = build_model(SMALL_350M_STYLE)
    for module in model.modules():
        # (None: a part this shape has not, such as 350M's final LayerNorm)
        own = {k for k, v in vars(module).items() if not k.startswith("_") and v is not None}
        own -= {"training"}
        allowed = {OPTModel: {"args"}, model_module.Attention: {"head_dim", "attn_dropout"},
                   model_module.Block: {"pre_norm", "dropout"}}  # fmt: skip
        assert own <= allowed.get(type(module), set()) | _torch_fields(module), (module, own)
    assert not model.embed_tokens.sparse
    tree = ast.parse(Path(inspect.getfile(model_module)).read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not names & {"emit_logits", "sparse", "sparse_embedding_grad", "loss_chunk"}
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    # (dataclasses: the KV cache's records for generation, no policy)
    assert imported <= {"__future__", "dataclasses", "math", "torch", "torch.nn.functional",
                        "torch.nn", "opt.errors", "opt.models.init", "opt.models.sizes"}, imported  # fmt: skip


def _torch_fields(module: nn.Module) -> set[str]:
    """The configuration torch's own modules keep (in_features, eps, ...)."""
    if type(module).__module__.startswith("torch."):
        return {k for k in vars(module) if not k.startswith("_")}
    return set()


def test_the_plain_model_uses_plain_modules():
    model = build_model(SMALL_350M_STYLE)
    block = model.layers["0"]
    linears = [block.attn.q_proj, block.attn.k_proj, block.attn.v_proj, block.attn.out_proj,
               block.ffn.fc1, block.ffn.fc2, model.project_in, model.project_out]  # fmt: skip
    assert all(type(m) is nn.Linear for m in linears)
    assert type(block.attn.sdpa) is ScaledDotProductAttention
    assert type(model.lm_head) is LMHead
    # Logits, or with targets the loss (what scoring, conversion and calibration use).
    tokens, targets = _batch(SMALL_350M_STYLE)
    model.eval()
    loss = model_module.cross_entropy(model(tokens), targets)
    assert torch.equal(model(tokens, targets), loss)


# ----- each swap, exactly -----------------------------------------------------------------------
def _hidden(model: OPTModel, tokens: torch.Tensor) -> torch.Tensor:
    """What the head sees: the trunk, the final norm and 350M's projection."""
    h = model.embed(tokens)
    for layer in model.layers.values():
        h = layer(h)
    if model.final_norm is not None:
        h = model.final_norm(h)
    return model.project_out(h) if model.project_out is not None else h


@pytest.mark.parametrize("args", ARGS)
@pytest.mark.parametrize("chunk", [7, 4096])
def test_chunked_loss_swap_is_the_chunked_kernel_on_the_plain_models_hidden_states(args, chunk):
    plain = build_model(args.replace(dropout=0.0))
    fused = copy.deepcopy(plain)
    use_chunked_loss(fused, chunk)
    assert type(fused.lm_head) is ChunkedLossHead
    tokens, targets = _batch(args)

    def reference():
        plain.zero_grad(set_to_none=True)
        loss = chunked_cross_entropy(_hidden(plain, tokens), plain.embed_tokens.weight,
                                     targets, chunk)  # fmt: skip
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in plain.named_parameters()}

    assert_identical(_loss_and_grads(fused, fused=True), reference())
    # Without targets the swapped head still gives the plain model's logits.
    assert torch.equal(fused(tokens), plain(tokens))
    # And the loss is the full-logits one, up to fp32 summation order.
    torch.testing.assert_close(
        _loss_and_grads(fused, fused=True)[0], _loss_and_grads(plain, fused=False)[0],
        rtol=1e-5, atol=0,
    )  # fmt: skip


@pytest.mark.parametrize("args", ARGS)
def test_sparse_embedding_swap_keeps_the_loss_and_the_gradient(args):
    dense = build_model(args)
    sparse = copy.deepcopy(dense)
    use_sparse_embedding_grad(sparse)
    assert sparse.embed_tokens.sparse
    (dense_loss, dense_grads), (sparse_loss, sparse_grads) = (
        _loss_and_grads(m, fused=False) for m in (dense, sparse)
    )
    assert torch.equal(sparse_loss, dense_loss)
    assert sparse.embed_tokens.weight.grad.layout == torch.strided  # dense for the optimizer
    for name, grad in dense_grads.items():
        if name == "embed_tokens.weight":  # summed in another order
            torch.testing.assert_close(sparse_grads[name], grad, rtol=1e-5, atol=1e-9)
        else:
            assert torch.equal(sparse_grads[name], grad), name


class Bf16ViaFp32Ops(TorchFunctionMode):
    """The reference for the bf16 swap, by other means: every SDPA call and every linear by
    the given weights computed as kernels.py computes them; everything else as it is."""

    def __init__(self, weights: list[torch.Tensor]):
        super().__init__()
        self.weights = {id(w) for w in weights}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and id(args[1]) in self.weights:
            return kernels.linear_via_fp32(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            return kernels.attention_via_fp32(*args, **kwargs)
        return func(*args, **kwargs)


@pytest.mark.parametrize("args", ARGS)
@pytest.mark.parametrize("fused", [False, True], ids=["full-logits", "chunked-loss"])
def test_bf16_via_fp32_swap_covers_the_blocks_linears_attention_and_head(args, fused):
    """Exactly those ops: the blocks' six linears, attention and the tied head (350M's
    projections stay native bf16), and only under CPU bf16 autocast."""
    plain = build_model(args)
    swapped = copy.deepcopy(plain)
    apply_compute(swapped, loss_chunk=7 if fused else 0, bf16_via_fp32=True, data_parallel=True)
    if fused:
        use_chunked_loss(plain, 7, bf16_via_fp32=True)
    emulated = [plain.embed_tokens.weight] + [
        m.weight for m in plain.layers.modules() if isinstance(m, nn.Linear)
    ]
    with Bf16ViaFp32Ops(emulated):
        reference = _loss_and_grads(plain, fused, autocast=True)
    assert_identical(_loss_and_grads(swapped, fused, autocast=True), reference)
    native = _loss_and_grads(plain, fused, autocast=True)
    assert any(not torch.equal(g, native[1][n]) for n, g in reference[1].items())  # it did
    # Outside bf16 autocast the swapped modules compute natively: fp32 stays bit for bit.
    if not fused:
        assert_identical(_loss_and_grads(swapped, False), _loss_and_grads(plain, False))


def test_bf16_swap_keeps_the_parameters_and_their_names():
    plain = build_model(SMALL_350M_STYLE)
    before = dict(plain.named_parameters())
    use_bf16_via_fp32(plain)
    after = dict(plain.named_parameters())
    assert before.keys() == after.keys()
    assert all(after[n] is p for n, p in before.items())
    assert type(plain.project_in) is nn.Linear and type(plain.project_out) is nn.Linear
    assert isinstance(plain.layers["0"].ffn.fc1, nn.Linear)  # TP plans still recognise it


# ----- where parallelize applies them ----------------------------------------------------------
def _parts(world: int, loss_chunk: int, bf16_via_fp32=False, rank=0, **degrees):
    """This rank's part(s) on meta, in a fake process group of ``world`` ranks."""
    dims = ParallelDims(world_size=world, **degrees)
    par = ParallelConfig(**degrees)
    try:
        distributed.init_fake(world, rank)
        meshes = dims.build_meshes("cpu") if world > 1 else None
        pp_rank = meshes["pp"].get_local_rank() if meshes else 0
        return parallelize(SMALL.replace(n_layers=4, vocab_size=96), dims, meshes, par, 16, pp_rank,
                           loss_chunk=loss_chunk, bf16_via_fp32=bf16_via_fp32)  # fmt: skip
    finally:
        distributed.destroy()


@pytest.mark.parametrize(
    "world, degrees, fused, sparse",
    [
        (1, {}, True, True),  # one device: both
        (2, {"dp_shard": 2}, True, False),  # FSDP: no sparse gradient on sharded weights
        (2, {"tp": 2}, False, False),  # TP: vocab-sharded logits, DTensor weights
        (2, {"pp": 2}, False, False),  # a pipeline: no part holds both ends
    ],
    ids=["one-device", "fsdp", "tp", "pp"],
)
def test_parallelize_applies_each_swap_where_it_can(world, degrees, fused, sparse):
    for rank in range(world):
        model = _parts(world, 64, rank=rank, **degrees)
        assert model.fused_loss == fused
        for part in model.parts:
            assert (type(part.lm_head) is ChunkedLossHead) == fused
            if part.embed_tokens is not None:
                assert part.embed_tokens.sparse == sparse
        assert not _parts(world, 0, rank=rank, **degrees).fused_loss


def test_a_pipeline_stage_that_does_not_end_the_model_has_no_head():
    (first,), (last,) = (_parts(2, 64, rank=rank, pp=2).parts for rank in (0, 1))
    assert first.lm_head is None and first.final_norm is None
    assert first.embed_positions is not None and last.embed_positions is None
    assert type(last.lm_head) is LMHead  # the whole head, but not the whole model: no fusion


def test_bf16_via_fp32_is_applied_to_every_part_under_any_layout():
    for world, degrees in ((1, {}), (2, {"tp": 2}), (2, {"pp": 2})):
        parts = [p for rank in range(world) for p in _parts(world, 0, True, rank, **degrees).parts]
        for part in parts:
            block = next(iter(part.layers.values()))
            assert type(block.attn.q_proj) is kernels.Bf16ViaFp32Linear
            assert type(block.attn.sdpa) is kernels.Bf16ViaFp32Attention
            assert part.lm_head is None or type(part.lm_head) is kernels.Bf16ViaFp32Head


# ----- the run's choice, and the choices the config offers --------------------------------------
def test_bf16_via_fp32_is_decided_by_device_precision_and_setting():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert kernels.cpu_bf16_via_fp32(cpu, "bf16", "fp32")
    assert not kernels.cpu_bf16_via_fp32(cpu, "bf16", "native")
    assert kernels.cpu_bf16_via_fp32(cpu, "bf16", "auto") == (not native_bf16_cpu())
    for precision in ("fp32", "fp16"):
        assert not kernels.cpu_bf16_via_fp32(cpu, precision, "fp32")
    assert not kernels.cpu_bf16_via_fp32(cuda, "bf16", "fp32")
    with pytest.raises(ValueError, match="cpu_bf16_compute must be one of"):
        kernels.cpu_bf16_via_fp32(cpu, "bf16", "fp8")
    for mode in CPU_BF16_COMPUTE:
        kernels.cpu_bf16_via_fp32(cpu, "bf16", mode)


def test_every_config_choice_has_its_kernel_and_schedule():
    assert {"auto", *kernels.SDPA_BACKENDS} == set(ATTENTION)
    assert set(SCHEDULES) == set(PP_SCHEDULES)
    for name in ATTENTION:
        with kernels.attention_backend(name):
            pass
