"""Every speed switch keeps the numbers: the same losses with it on as off, within the
tolerance of the dtype involved, and bad values refused in one line."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from helpers import REPO, toml_value, torchrun

from opt.config import load_config, to_toml
from opt.data.prefetch import PrefetchingLoader
from opt.errors import OptError
from opt.models import kernels
from opt.models.fused_loss import chunked_cross_entropy
from opt.models.model import ScaledDotProductAttention, cross_entropy
from opt.models.sizes import get_model_args
from opt.train.data_setup import build_loader
from opt.train.trainer import Trainer

STEPS = 3


def _losses(tiny_config, steps: int = STEPS, **overrides) -> list[float]:
    cfg = tiny_config(model__dropout=0.0, checkpoint__resume="none", **overrides)
    trainer = Trainer(cfg)
    return [trainer.train_step().loss for _ in range(steps)]


# ----- the fused head + cross-entropy ---------------------------------------------------------
def _head_case(dtype: torch.dtype | None):
    torch.manual_seed(0)
    hidden = torch.randn(3, 40, 32, requires_grad=True)
    weight = (torch.randn(300, 32) * 0.2).requires_grad_()
    targets = torch.randint(0, 300, (3, 40))
    return hidden, weight, targets


def _grads(loss_fn, dtype):
    hidden, weight, targets = _head_case(dtype)
    ctx = torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)
    with ctx:
        loss = loss_fn(hidden, weight, targets)
    (loss * 0.5).backward()  # a scaled loss, as under gradient accumulation
    return loss.detach(), hidden.grad, weight.grad


def _plain(hidden, weight, targets):
    return cross_entropy(hidden @ weight.T, targets)


@pytest.mark.parametrize("chunk", [7, 64, 120, 4096])  # uneven, several, exact, one chunk
def test_chunked_cross_entropy_equals_the_full_logits_path_in_fp32(chunk):
    expected = _grads(_plain, None)
    got = _grads(lambda h, w, t: chunked_cross_entropy(h, w, t, chunk), None)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("chunk", [7, 4096])
def test_chunked_cross_entropy_skips_ignored_targets_as_the_full_logits_path_does(chunk):
    """Positions whose target is -100 (fine-tuning's prompt tokens) are left out of the mean
    and get no gradient, as ``F.cross_entropy`` leaves them out."""

    def ignoring(loss_fn):
        def wrapped(hidden, weight, targets):
            targets = targets.clone()
            targets[0, :25] = -100  # a prompt, then its answer
            targets[2, 10:] = -100  # an answer, then padding
            return loss_fn(hidden, weight, targets)

        return wrapped

    expected = _grads(ignoring(_plain), None)
    got = _grads(ignoring(lambda h, w, t: chunked_cross_entropy(h, w, t, chunk)), None)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert not got[1][0, :25].any() and got[1][0, 25:].abs().sum() > 0
    assert expected[0] != _grads(_plain, None)[0]  # the ignored positions did count there


@pytest.mark.parametrize(
    "dtype, via_fp32",
    [(torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, False)],
    ids=["bf16", "bf16-via-fp32", "fp16"],
)
def test_chunked_cross_entropy_under_autocast_is_within_dtype_tolerance(dtype, via_fp32):
    exact = _grads(_plain, None)
    plain = _grads(_plain, dtype)
    chunked = _grads(lambda h, w, t: chunked_cross_entropy(h, w, t, 50, via_fp32), dtype)
    for c, p, e in zip(chunked, plain, exact, strict=True):
        # No further from fp32 than autocast's own full-logits path (bf16: 8 mantissa bits).
        assert (c.float() - e).norm() <= 1.5 * (p.float() - e).norm() + 1e-6
        torch.testing.assert_close(c.float(), e, rtol=3e-2, atol=3e-3)


# ----- bf16 on CPUs without bf16 instructions -------------------------------------------------
def _linear_grads(mode: str | None):
    """Output and gradients of a linear layer under bf16 autocast (None: plain fp32)."""
    torch.manual_seed(1)
    layer = kernels.Bf16ViaFp32Linear(48, 40) if mode == "fp32" else torch.nn.Linear(48, 40)
    x = torch.randn(4, 10, 48, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode is not None):
        y = layer(x)
    y.float().square().sum().backward()
    return y, x.grad, layer.weight.grad, layer.bias.grad


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def test_bf16_linear_via_fp32_matches_native_bf16_kernels():
    exact, native, via_fp32 = _linear_grads(None), _linear_grads("native"), _linear_grads("fp32")
    assert via_fp32[0].dtype == torch.bfloat16  # a bf16 op to everything around it
    assert [t.dtype for t in via_fp32[1:]] == [torch.float32] * 3  # fp32 master gradients
    for fast, slow, truth in zip(via_fp32, native, exact, strict=True):
        assert _relative_error(fast, slow) < 1e-2  # bf16 has 8 mantissa bits: ~4e-3 per value
        assert _relative_error(fast, truth) <= 1.5 * _relative_error(slow, truth) + 1e-6


def test_bf16_attention_via_fp32_matches_native_bf16_kernels():
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    kinds = {"native": ScaledDotProductAttention(), "fp32": kernels.Bf16ViaFp32Attention()}
    outs = {}
    for mode, attention in kinds.items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs[mode] = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.0)
    assert outs["fp32"].dtype == torch.bfloat16
    torch.testing.assert_close(outs["fp32"], outs["native"], rtol=2e-2, atol=2e-2)


def test_bf16_training_losses_agree_across_cpu_compute_modes(tiny_config):
    native = _losses(tiny_config, train__precision="bf16", train__cpu_bf16_compute="native")
    via_fp32 = _losses(tiny_config, train__precision="bf16", train__cpu_bf16_compute="fp32")
    fp32 = _losses(tiny_config)
    torch.testing.assert_close(via_fp32, native, rtol=1e-2, atol=0)
    torch.testing.assert_close(via_fp32, fp32, rtol=1e-2, atol=0)


# ----- every switch, through the trainer ------------------------------------------------------
SWITCHES = {
    "full-logits loss": {"train__loss_chunk": 0},
    "loss chunks of 50 tokens": {"train__loss_chunk": 50},
    "math attention": {"train__attention": "math"},
    "flash attention (CPU kernel)": {"train__attention": "flash"},
    "unfused AdamW": {"optim__fused": False},
    "selective activation checkpointing": {"parallel__activation_checkpoint": "selective"},
    "full activation checkpointing": {"parallel__activation_checkpoint": "full"},
}


@pytest.mark.parametrize("switch", list(SWITCHES), ids=list(SWITCHES))
def test_speed_switch_keeps_the_fp32_losses(tiny_config, switch):
    torch.testing.assert_close(
        _losses(tiny_config, **SWITCHES[switch]), _losses(tiny_config), rtol=1e-5, atol=0
    )


@pytest.mark.parametrize("switch", ["data__prefetch", "train__keep_host_memory"])
def test_host_side_switches_change_nothing_at_all(tiny_config, switch):
    assert _losses(tiny_config, **{switch: False}) == _losses(tiny_config)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compiled_blocks_keep_the_losses(tiny_config):
    eager = _losses(tiny_config, train__compile="off")
    compiled_cfg = tiny_config(model__dropout=0.0, train__compile="on")
    compiled = Trainer(compiled_cfg)
    block = next(iter(compiled.model.layers.values()))
    assert block._compiled_call_impl is not None  # really compiled, names unchanged
    assert "layers.0.attn.q_proj.weight" in dict(compiled.model.named_parameters())
    losses = [compiled.train_step().loss for _ in range(STEPS)]
    torch.testing.assert_close(losses, eager, rtol=1e-5, atol=0)


def test_compile_auto_stays_eager_on_cpu(tiny_config):
    trainer = Trainer(tiny_config())
    block = next(iter(trainer.model.layers.values()))
    assert block._compiled_call_impl is None


def test_synchronous_checkpoints_resume_exactly_like_async_ones(tiny_config):
    runs = []
    for async_save, staging in ((True, True), (True, False), (False, False)):
        name = f"async-{async_save}-{staging}"
        common = dict(
            run__name=name, checkpoint__async_save=async_save, checkpoint__async_staging=staging
        )
        Trainer(tiny_config(train__max_steps=2, checkpoint__every=2, **common)).fit()
        resumed = Trainer(tiny_config(train__max_steps=4, **common))
        runs.append([r.loss for r in resumed.fit()])
    straight = Trainer(tiny_config(train__max_steps=4, run__name="straight")).fit()
    assert runs == [[r.loss for r in straight][2:]] * 3


@pytest.mark.slow
def test_background_staging_copies_the_weights_of_the_save_step(tiny_config, monkeypatch):
    """The copy of an async save runs beside the next steps; the optimizer waits for it.

    The copy is held back until an optimizer step has run, or for 2 s if none does. With
    the wait in place no optimizer step can run first (it waits for the copy), so the copy
    goes after its 2 s and the checkpoint holds the save step's weights; without it, the
    optimizer would step, release the copy, and the checkpoint would hold the next step's
    weights. The outcome is decided by the order of events, not by the machine's speed.
    """
    import threading

    from opt.checkpoint.staging import BackgroundStager

    copy = BackgroundStager._copy
    copying, stepped = threading.Event(), threading.Event()

    def held_copy(self, *args):
        copying.set()
        stepped.wait(timeout=2.0)
        return copy(self, *args)

    monkeypatch.setattr(BackgroundStager, "_copy", held_copy)
    common = dict(checkpoint__keep_last=0, model__dropout=0.0)
    trainer = Trainer(tiny_config(run__name="staged", train__max_steps=4, **common))
    trainer.train_step(), trainer.train_step()
    trainer.optimizer.register_step_post_hook(lambda *_: stepped.set())
    trainer.checkpoints.save(trainer.step)
    assert copying.wait(timeout=60) and not stepped.is_set()  # the call returned, copy pending
    later = [trainer.train_step().loss for _ in range(2)]
    trainer.checkpoints.close()
    step_2 = str(tiny_config().checkpoint_dir.parent / "staged" / "step_00000002")
    resumed = Trainer(tiny_config(run__name="resumed", checkpoint__resume=step_2, **common))
    resumed.restore()
    assert [resumed.train_step().loss for _ in range(2)] == later


# ----- prefetching ----------------------------------------------------------------------------
def test_prefetch_follows_skips_and_rewinds_exactly(tiny_config):
    """The supervisor skips data and rolls the stream back between steps: a read-ahead made
    before must not leak into the batches."""
    cfg = tiny_config()
    args = get_model_args(cfg.model.name).reshaped(n_layers=2, d_model=64, vocab_size=512)
    plain, _ = build_loader(cfg, args)
    ahead = PrefetchingLoader(build_loader(cfg, args)[0])
    script = [("next",), ("skip", 3), ("next",), ("save",), ("next",), ("next",), ("load",)]
    script += [("next",), ("next",)]
    saved = {}
    try:
        for op in script:
            if op[0] == "next":
                a, b = plain.next_microbatches(2), ahead.next_microbatches(2)
                assert len(a) == len(b) == 2
                for pa, pb in zip(a, b, strict=True):
                    assert all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))
            elif op[0] == "skip":
                for loader in (plain, ahead):
                    pos = loader.state_dict()["pos"]
                    loader.stream.skip(pos, pos + op[1] * loader.samples_per_step(2))
            elif op[0] == "save":
                saved = {"plain": plain.state_dict(), "ahead": copy.deepcopy(ahead.state_dict())}
            else:
                plain.load_state_dict(saved["plain"])
                ahead.load_state_dict(saved["ahead"])
            assert plain.state_dict() == ahead.state_dict()
        assert ahead.wait_s > 0
    finally:
        ahead.close()


# ----- host memory ----------------------------------------------------------------------------
MALLOC_SCRIPT = """
import ctypes, sys, torch
from opt.host_memory import retain_freed_memory
if sys.argv[1] == "on":
    assert retain_freed_memory()
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
x = torch.ones(64 * 2**20 // 4)  # 64 MiB, like one activation or gradient buffer
mmapped = libc.mallinfo2().hblkhd
del x
print(mmapped, libc.mallinfo2().arena)
"""


@pytest.mark.slow
def test_kept_host_memory_stays_in_the_heap_after_free():
    """glibc by default serves a 64 MiB tensor from its own mmap and unmaps it on free, so
    the next step faults it in again page by page; kept, it comes from the heap and the
    heap is not trimmed after it is freed."""
    mib = 2**20
    readings = {}
    for mode in ("on", "off"):
        out = subprocess.run([sys.executable, "-c", MALLOC_SCRIPT, mode], capture_output=True,
                             text=True, timeout=60, cwd=REPO, check=True)  # fmt: skip
        readings[mode] = [int(v) for v in out.stdout.split()]
    assert readings["off"][0] >= 64 * mib  # mmapped while alive, so unmapped on free
    mmapped, heap_after_free = readings["on"]
    assert mmapped < 64 * mib
    assert heap_after_free >= 64 * mib  # still the process's, ready for the next step


# ----- FSDP mixed precision -------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fsdp_bf16_parameters_train_like_one_bf16_process(tiny_config, tmp_path):
    cfg = tiny_config(model__dropout=0.0, train__precision="bf16", train__micro_batch_size=2,
                      train__batch_tokens=512, checkpoint__resume="none")  # fmt: skip
    config_file = tmp_path / "bf16.toml"
    config_file.write_text(to_toml(cfg))
    trainer = Trainer(cfg)
    expected = [trainer.train_step().loss for _ in range(STEPS)]
    result = torchrun(2, str(REPO / "tests" / "parallel_worker.py"), str(tmp_path), str(STEPS),
                      str(config_file), "--parallel.dp_shard", "2", "--parallel.timeout_s", "60")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    losses = json.loads((tmp_path / "losses.json").read_text())
    torch.testing.assert_close(losses, expected, rtol=1e-2, atol=0)


@pytest.mark.parametrize("enabled", [True, False])
def test_fsdp_gathers_bf16_block_parameters_and_keeps_fp32_masters(tiny_config, enabled):
    from opt import dist as distributed
    from opt.job import check_job
    from opt.parallel.data_parallel import fsdp_param_dtype
    from opt.parallel.parallelize import parallelize

    cfg = tiny_config(train__precision="bf16", parallel__fsdp_mixed_precision=enabled)
    job = check_job(cfg, 2)
    args, dims = job.model_args, job.dims
    try:
        distributed.init_fake(2, 0)
        model = parallelize(args, dims, dims.build_meshes("cpu"), cfg.parallel, 32,
                            fsdp_param_dtype=fsdp_param_dtype("bf16", cfg.parallel))  # fmt: skip
        part = model.parts[0]
        block = next(iter(part.layers.values()))
        policy = block._get_fsdp_state()._mp_policy
        root_policy = part._get_fsdp_state()._mp_policy
        norm_is_own_unit = hasattr(block.attn_norm, "_get_fsdp_state")
    finally:
        distributed.destroy()
    assert policy.param_dtype == (torch.bfloat16 if enabled else None)
    assert policy.reduce_dtype == (torch.float32 if enabled else None)
    assert not policy.cast_forward_inputs or not enabled  # the residual stream stays fp32
    assert root_policy.param_dtype is None  # embeddings, final norm and head: fp32
    assert norm_is_own_unit == enabled  # LayerNorms gather fp32, as autocast runs them
    assert all(p.dtype == torch.float32 for p in part.parameters())  # sharded masters


# ----- refused values -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key, value, message",
    [
        ("train.compile", "yes", "train.compile must be one of auto, on, off"),
        ("train.attention", "xformers", "train.attention must be one of"),
        ("train.cpu_bf16_compute", "fp8", "train.cpu_bf16_compute must be one of"),
        ("train.loss_chunk", -1, "train.loss_chunk must not be negative"),
    ],
)
def test_bad_speed_switch_values_are_refused(key, value, message):
    with pytest.raises(OptError, match=message):
        load_config(None, [f"--{key}", toml_value(value)])


def test_gpu_only_attention_kernel_is_refused_on_cpu(tiny_config):
    with pytest.raises(OptError, match=r"train\.attention=efficient needs a GPU"):
        Trainer(tiny_config(train__attention="efficient"))
