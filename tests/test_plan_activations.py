"""The planner's activation-memory and FLOP models against what torch actually does, on CPU.

Memory: a forward is run the way the trainer runs it (autocast around the model, then the
fp32 cross-entropy, the logits held until backward), and every storage the forward created
that is still alive afterwards is summed: that is what autograd (and checkpointing's own
caches) keep for backward. Per-layer bytes are measured as the difference between the model
with two blocks and the same model with one block deleted, so that the head's large logits
cannot hide an error in the per-layer formula.

Tensor parallelism runs in one process on the repo's fake process group (as `--dry-run`
does): collectives are no-ops, but every tensor, gathered ones included, is allocated at its
real size, and memory does not depend on the values.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.tensor import DTensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from opt import dist as distributed
from opt.models.flops import (
    block_forward_flops_per_token,
    training_flops,
    training_flops_per_token,
)
from opt.models.model import OPTModel, build_model
from opt.models.sizes import ModelArgs, get_model_args
from opt.parallel.data_parallel import apply_activation_checkpointing
from opt.parallel.tensor_parallel import apply_tensor_parallel
from opt.plan.activations import (
    activation_bytes,
    activation_bytes_per_layer,
    autocast_weight_copy_bytes,
)

# The formulas model GPUs, where bf16 matmuls and attention are native bf16 ops: the plain
# model's. (On a CPU without bf16 instructions the trainer swaps in kernels that compute
# them from fp32 copies, train.cpu_bf16_compute, and save other tensors.)

# conftest's TINY_OVERRIDES as resolve_model_args applies them (ffn and word width follow).
TINY = get_model_args("opt-tiny").replace(
    n_layers=2, d_model=64, ffn_dim=256, word_embed_dim=64, vocab_size=512
)
# 350M's layout in miniature: post-LN, no final LayerNorm, projected embeddings.
TINY_POST_LN = TINY.replace(pre_norm=False, word_embed_dim=32)
SMALL = get_model_args("opt-125m").replace(n_layers=2)
SMALL_350M = get_model_args("opt-350m").replace(n_layers=2, dropout=0.0)

TOLERANCE = 0.10  # the acceptance criterion for memory
FLOP_TOLERANCE = 0.05
DTYPE_BYTES = {"fp32": 4, "bf16": 2}


# ----- measuring what a forward leaves alive -----------------------------------------------
def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor that owns the memory: DTensors and async collective results wrap one."""
    while isinstance(tensor, (DTensor, AsyncCollectiveTensor)):
        tensor = tensor._local_tensor if isinstance(tensor, DTensor) else tensor.elem
    return tensor


def _storage_key(tensor: torch.Tensor) -> int | None:
    try:
        return _plain(tensor).untyped_storage().data_ptr()
    except RuntimeError:  # a collective's output before its wait: no storage yet
        return None


class LiveStorages(TorchDispatchMode):
    """Weak references to the storage of every tensor an op returns, so that afterwards the
    storages something still holds can be summed, each once (views share their base's)."""

    def __init__(self, excluded: set[int]):
        super().__init__()
        self.excluded = excluded  # parameters and the batch: not activations
        self.seen: dict[int, tuple[StorageWeakRef, int, bool]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # autocast's 16-bit copy of a parameter: weight-sized, counted apart.
        weight_copy = (
            func is torch.ops.aten._to_copy.default and _storage_key(args[0]) in self.excluded
        )
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            key = _storage_key(tensor) if isinstance(tensor, torch.Tensor) else None
            if key is None or key in self.excluded:
                continue
            storage = _plain(tensor).untyped_storage()
            known = self.seen.get(key)
            # A freed storage's address is reused by later tensors: keep the live one.
            if storage.nbytes() and (known is None or known[0].expired()):
                self.seen[key] = (StorageWeakRef(storage), storage.nbytes(), weight_copy)
        return out

    def alive(self) -> dict[int, tuple[int, bool]]:
        gc.collect()
        return {k: (n, copy_) for k, (ref, n, copy_) in self.seen.items() if not ref.expired()}


@dataclass
class Retained:
    activations: int
    weight_copies: int


def _precision(precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _batch(args: ModelArgs, seq_len: int, micro_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shape = (micro_batch, seq_len)
    return (
        torch.randint(0, args.vocab_size, shape, generator=gen),
        torch.randint(0, args.vocab_size, shape, generator=gen),
    )


def _excluded(model: OPTModel, *batch: torch.Tensor) -> set[int]:
    tensors = [*model.parameters(), *batch]
    return {_storage_key(t) for t in tensors}


def retained_for_backward(
    model: OPTModel,
    seq_len: int,
    micro_batch: int,
    precision: str,
    loss_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Retained:
    """Bytes alive between forward and backward of one micro-batch, as in
    Trainer.forward_backward_step (which holds the logits through backward)."""
    inputs, targets = _batch(model.args, seq_len, micro_batch)
    live = LiveStorages(_excluded(model, inputs, targets))
    with live:
        with _precision(precision):
            logits = model(inputs)
        with loss_context():
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    alive = live.alive()
    del logits, loss
    return Retained(
        activations=sum(n for n, is_copy in alive.values() if not is_copy),
        weight_copies=sum(n for n, is_copy in alive.values() if is_copy),
    )


def measure_with_and_without_a_block(
    model: OPTModel, seq_len: int, micro_batch: int, precision: str, **kw
) -> tuple[Retained, int]:
    """(bytes retained by the whole model, bytes of one block): the second by deleting the
    last block, which the model's forward tolerates (it is how a pipeline stage is made)."""
    whole = retained_for_backward(model, seq_len, micro_batch, precision, **kw)
    del model.layers[str(len(model.layers) - 1)]
    fewer = retained_for_backward(model, seq_len, micro_batch, precision, **kw)
    return whole, whole.activations - fewer.activations


@functools.cache
def _built(args: ModelArgs) -> OPTModel:
    return build_model(args)  # 2 s at 125M (the embedding's init); each case takes a copy


def _model(args: ModelArgs, checkpoint: str) -> OPTModel:
    model = copy.deepcopy(_built(args))
    apply_activation_checkpointing(model, checkpoint)  # as the trainer applies it
    return model.train()


def assert_close(measured: int, predicted: int, what: str, tolerance: float = TOLERANCE):
    error = measured / predicted - 1 if predicted else float(measured != 0)
    assert abs(error) <= tolerance, (
        f"{what}: predicted {predicted}, measured {measured} ({error:+.2%})"
    )


# ----- the instrument ----------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_live_storages_are_exactly_what_autograd_saved(precision):
    """The instrument's check: without checkpointing, the storages alive after the forward
    are those saved_tensors_hooks sees autograd save, plus the logits the trainer holds.
    (With checkpointing the hooks cannot see everything: checkpoint pushes its own hooks
    over them, and selective checkpointing keeps its saved outputs in a cache of its own.)"""
    model = _model(TINY, "none")
    inputs, targets = _batch(TINY, 32, 4)
    excluded = _excluded(model, inputs, targets)
    saved = {}

    def pack(tensor):
        key = _storage_key(tensor)
        if key not in excluded:
            saved[key] = _plain(tensor).untyped_storage().nbytes()
        return tensor

    live = LiveStorages(excluded)
    with live, torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with _precision(precision):
            logits = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    saved[_storage_key(logits)] = logits.untyped_storage().nbytes()
    alive = {key: nbytes for key, (nbytes, _) in live.alive().items()}
    alive.pop(_storage_key(loss))  # the loss itself: kept by the caller, 4 bytes
    assert alive == saved
    assert sum(saved.values()) > 0


# ----- one process: every checkpoint mode, fp32 and bf16 autocast ---------------------------
def _cases():
    cases = []
    for name, args in (("tiny", TINY), ("tiny-post-ln", TINY_POST_LN)):
        for dropout in (0.1, 0.0):
            for precision in ("fp32", "bf16"):
                for checkpoint in ("none", "full", "selective"):
                    case = (args.replace(dropout=dropout), 32, 4, precision, checkpoint, False)
                    cases.append(pytest.param(*case, id=f"{name}-{precision}-{checkpoint}-"
                                              f"dropout{dropout}"))  # fmt: skip
    # Attention dropout sends SDPA to the math backend on CPU, which saves the s x s scores.
    for precision in ("fp32", "bf16"):
        for checkpoint in ("none", "full", "selective"):
            case = (TINY.replace(attn_dropout=0.1), 32, 4, precision, checkpoint, True)
            cases.append(pytest.param(*case, id=f"tiny-math-sdpa-{precision}-{checkpoint}"))
    # bf16 matmuls are slow on this CPU: the small shapes run bf16 without checkpointing only
    # (the tiny ones cover every mode in bf16).
    for precision, checkpoint in (("fp32", "none"), ("fp32", "full"), ("fp32", "selective"),
                                  ("bf16", "none")):  # fmt: skip
        case = (SMALL, 128, 2, precision, checkpoint, False)
        cases.append(pytest.param(*case, id=f"125m-2l-s128-{precision}-{checkpoint}"))
    cases.append(pytest.param(SMALL, 256, 1, "fp32", "none", False, id="125m-2l-s256-fp32-none"))
    for precision, checkpoint in (("fp32", "none"), ("bf16", "none")):
        case = (SMALL_350M, 128, 2, precision, checkpoint, False)
        cases.append(pytest.param(*case, id=f"350m-2l-nodropout-{precision}-{checkpoint}"))
    return cases


@pytest.mark.parametrize("args, seq_len, micro_batch, precision, checkpoint, math_sdpa", _cases())
def test_activation_bytes_match_measurement(
    args, seq_len, micro_batch, precision, checkpoint, math_sdpa
):
    model = _model(args, checkpoint)
    whole, one_block = measure_with_and_without_a_block(model, seq_len, micro_batch, precision)
    # On CPU a dropout mask has the dtype of what it drops (CUDA keeps a bool mask).
    formula = dict(
        checkpoint=checkpoint,
        dtype_bytes=DTYPE_BYTES[precision],
        attention_saves_scores=math_sdpa,
        dropout_mask_bytes=None,
    )
    per_layer = activation_bytes_per_layer(args, seq_len, micro_batch, **formula)
    assert_close(one_block, per_layer, "one block")
    total = activation_bytes(args, seq_len, micro_batch, layers=args.n_layers, **formula)
    assert_close(whole.activations, total, "blocks, embedding, head and loss")
    copies = autocast_weight_copy_bytes(
        args, checkpoint=checkpoint, dtype_bytes=DTYPE_BYTES[precision]
    )
    assert_close(whole.weight_copies, copies, "autocast weight copies")


@pytest.mark.parametrize("checkpoint", ["none", "full"])
def test_autocast_region_open_over_micro_batches_keeps_every_weight_copy(checkpoint):
    """As under pipeline parallelism, where autocast wraps the whole schedule: its cache
    keeps every cast parameter, even the checkpointed blocks' (and biases)."""
    model = _model(TINY, checkpoint)
    inputs, targets = _batch(TINY, 32, 4)
    live = LiveStorages(_excluded(model, inputs, targets))
    with live, _precision("bf16"):
        outputs = [model(inputs) for _ in range(2)]  # two micro-batches in flight
        copies = sum(n for n, is_copy in live.alive().values() if is_copy)
    del outputs
    predicted = autocast_weight_copy_bytes(TINY, checkpoint=checkpoint, autocast_spans_step=True)
    assert_close(copies, predicted, "cached weight copies")
    assert copies > autocast_weight_copy_bytes(TINY, checkpoint="full")  # more than one forward


# ----- tensor parallelism (fake process group of 2: this is rank 0) -------------------------
@pytest.fixture(scope="module")
def tp_mesh():
    from torch.distributed.device_mesh import init_device_mesh

    distributed.init_fake(2, 0)
    try:
        yield init_device_mesh("cpu", (2,))
    finally:
        distributed.destroy()


def _tp_model(args: ModelArgs, mesh, sequence_parallel: bool, checkpoint: str) -> OPTModel:
    """Parallelized in the order opt.parallel.parallelize uses: TP, then checkpointing."""
    with torch.device("meta"):
        model = OPTModel(args)
    apply_tensor_parallel(model, mesh, sequence_parallel)
    apply_activation_checkpointing(model, checkpoint)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    for param in model.parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        local.detach().normal_(0, 0.02, generator=gen)  # values do not change memory
    return model.train()


def _tp_cases():
    cases = []
    for name, args in (("tiny", TINY), ("tiny-post-ln", TINY_POST_LN)):
        for precision in ("fp32", "bf16"):
            for sp in (False, True):
                for checkpoint in ("none", "full", "selective"):
                    id_ = f"{name}-{precision}-{'sp' if sp else 'nosp'}-{checkpoint}"
                    cases.append(pytest.param(args, precision, sp, checkpoint, id=id_))
    return cases


@pytest.mark.parametrize("args, precision, sequence_parallel, checkpoint", _tp_cases())
def test_tensor_parallel_activation_bytes_match_measurement(
    tp_mesh, args, precision, sequence_parallel, checkpoint
):
    from torch.distributed.tensor.parallel import loss_parallel

    seq_len, micro_batch = 32, 4
    model = _tp_model(args, tp_mesh, sequence_parallel, checkpoint)
    whole, one_block = measure_with_and_without_a_block(
        model, seq_len, micro_batch, precision, loss_context=loss_parallel
    )
    formula = dict(
        tp=2,
        sequence_parallel=sequence_parallel,
        checkpoint=checkpoint,
        dtype_bytes=DTYPE_BYTES[precision],
        dropout_mask_bytes=None,
    )
    assert_close(one_block, activation_bytes_per_layer(args, seq_len, micro_batch, **formula),
                 "one block")  # fmt: skip
    total = activation_bytes(args, seq_len, micro_batch, **formula)
    assert_close(whole.activations, total, "blocks, embedding, head and loss")
    copies = autocast_weight_copy_bytes(
        args, tp=2, checkpoint=checkpoint, dtype_bytes=DTYPE_BYTES[precision]
    )
    assert_close(whole.weight_copies, copies, "autocast weight copies")


def test_tensor_parallel_autocast_cache_over_micro_batches(tp_mesh):
    model = _tp_model(TINY, tp_mesh, sequence_parallel=True, checkpoint="full")
    inputs, targets = _batch(TINY, 32, 4)
    live = LiveStorages(_excluded(model, inputs, targets))
    with live, _precision("bf16"):
        outputs = [model(inputs) for _ in range(2)]
        copies = sum(n for n, is_copy in live.alive().values() if is_copy)
    del outputs
    predicted = autocast_weight_copy_bytes(TINY, tp=2, checkpoint="full", autocast_spans_step=True)
    assert copies == predicted  # exact: the biases' copies (1%) are in it too


@pytest.mark.parametrize(
    "args, checkpoint",
    [
        pytest.param(TINY, "none", id="tiny-none"),
        pytest.param(TINY, "selective", id="tiny-selective"),
        pytest.param(TINY_POST_LN, "none", id="tiny-post-ln-none"),
    ],
)
def test_formula_is_exact_for_this_torch(tp_mesh, args, checkpoint):
    """Every term to the byte, small ones (LayerNorm statistics, log-sum-exp, the gathered
    head input) included, bf16 with TP and SP. The 10% tests above are the acceptance
    criterion; this one says which term moved if a torch upgrade changes what is saved."""
    from torch.distributed.tensor.parallel import loss_parallel

    model = _tp_model(args, tp_mesh, True, checkpoint)
    whole, one_block = measure_with_and_without_a_block(
        model, 32, 4, "bf16", loss_context=loss_parallel
    )
    formula = dict(tp=2, sequence_parallel=True, checkpoint=checkpoint, dropout_mask_bytes=None)
    assert one_block == activation_bytes_per_layer(args, 32, 4, **formula)
    loss_scalars = 2 * 4  # the loss and cross-entropy's total weight, fp32 scalars
    assert whole.activations == activation_bytes(args, 32, 4, **formula) + loss_scalars
    assert whole.weight_copies == autocast_weight_copy_bytes(args, tp=2, checkpoint=checkpoint)


# ----- the formula against the paper's, where the two should differ ------------------------
@pytest.mark.parametrize(
    "tp, sp, per_sbh",
    [
        (1, False, 26),  # the paper's 34 less GeLU's input (8): ReLU keeps its output only
        (4, False, 10 + 16 / 4),  # paper: 10 + 24/t
        (4, True, 4 + 22 / 4),  # paper: 34/t; torch's TP keeps the gathered LN outputs (4)
    ],
)
def test_per_layer_formula_in_the_papers_setting(tp, sp, per_sbh):
    """Korthikanti et al.'s setting: the whole model in 16-bit, 1-byte masks, no s x s term
    (fused attention). Large h so that the LayerNorm statistics and log-sum-exp vanish."""
    args = ModelArgs(n_layers=1, n_heads=16, d_model=8192)
    s, b = 2048, 1
    got = activation_bytes_per_layer(
        args, s, b, tp, sp, "none", dtype_bytes=2, residual_bytes=2, dropout_mask_bytes=1
    )
    assert got / (s * b * args.d_model) == pytest.approx(per_sbh, rel=2e-3)


# ----- FLOPs -------------------------------------------------------------------------------
def count_training_flops(model: OPTModel, seq_len: int, micro_batch: int, math_sdpa: bool):
    """FLOPs FlopCounterMode counts over one forward and backward.

    FlopCounterMode has no formula for the CPU flash kernel
    (_scaled_dot_product_flash_attention_for_cpu), so attention counts 0 there; and for the
    CUDA kernels it counts 5 matmuls in backward (flash recomputes QK^T) and never halves
    for the causal mask. The math backend runs attention as plain bmm's, 2 forward and 4
    backward, full s x s: the convention of training_flops_per_token, like with like."""
    inputs, targets = _batch(model.args, seq_len, micro_batch)
    backend = SDPBackend.MATH if math_sdpa else SDPBackend.FLASH_ATTENTION
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(backend):
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "args, seq_len, micro_batch",
    [
        pytest.param(TINY, 32, 4, id="tiny"),
        pytest.param(TINY_POST_LN, 32, 4, id="tiny-post-ln"),
        pytest.param(SMALL, 128, 2, id="125m-2l"),
    ],
)
def test_model_flops_match_flop_counter(args, seq_len, micro_batch):
    tokens = seq_len * micro_batch
    predicted = training_flops_per_token(args, seq_len) * tokens
    model = _model(args, "none")
    assert_close(count_training_flops(model, seq_len, micro_batch, True), predicted,
                 "model FLOPs, math attention", FLOP_TOLERANCE)  # fmt: skip
    # The default CPU kernel: the same but for attention, which the counter skips.
    attention = 3 * 2 * 2 * seq_len * args.d_model * args.n_layers * tokens
    assert_close(count_training_flops(model, seq_len, micro_batch, False),
                 predicted - attention, "model FLOPs, flash attention", FLOP_TOLERANCE)  # fmt: skip


@pytest.mark.parametrize("checkpoint", ["none", "full", "selective"])
@pytest.mark.parametrize(
    "args",
    [
        pytest.param(TINY, id="tiny"),
        pytest.param(TINY.replace(dropout=0.0), id="tiny-nodropout"),
        pytest.param(TINY_POST_LN.replace(dropout=0.0), id="tiny-post-ln-nodropout"),
    ],
)
def test_hardware_flops_count_the_recompute(args, checkpoint):
    seq_len, micro_batch = 32, 4
    flops = training_flops(args, seq_len, seq_len * micro_batch, checkpoint)
    counted = count_training_flops(_model(args, checkpoint), seq_len, micro_batch, True)
    assert_close(counted, flops.hardware, "hardware FLOPs", FLOP_TOLERANCE)
    recompute = flops.hardware - flops.model
    forward_of_blocks = (
        args.n_layers * block_forward_flops_per_token(args, seq_len) * seq_len * micro_batch
    )
    assert recompute == 0 if checkpoint != "full" else 0.5 * forward_of_blocks < recompute


# (model FLOPs per token at seq 2048; pipeline stage costs (embedding, layer, head); hardware
# FLOPs of 2**21 tokens with full recompute), as the three copies of the model computed them
# before they became one (opt/models/flops.py).
PINNED_FLOPS = {
    "opt-125m": (967753728, (1536, 20447232, 77217792), 2544098107981824),
    "opt-350m": (2576646144, (1049600, 33554432, 52527104), 7092468474445824),
    "opt-175b": (1076374536192, (24576, 3724541952, 1235484672), 3007170349281312768),
}


@pytest.mark.parametrize("name", list(PINNED_FLOPS))
def test_one_flop_model_for_mfu_the_pipeline_split_and_the_planner(name):
    from opt.parallel.pipeline import stage_costs

    args = get_model_args(name)
    per_token, costs, hardware = PINNED_FLOPS[name]
    assert training_flops_per_token(args, 2048) == per_token
    assert tuple(vars(stage_costs(args, 2048)).values()) == costs
    flops = training_flops(args, 2048, 2**21, "full")
    assert (flops.model, flops.hardware) == (per_token * 2**21, hardware)
    none = training_flops(args, 2048, 2**21, "none")
    assert none.hardware == none.model == per_token * 2**21
    # The pipeline's layer cost is the block the planner counts recompute by.
    assert costs[1] == block_forward_flops_per_token(args, 2048)
