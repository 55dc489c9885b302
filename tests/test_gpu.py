"""The GPU path, tested where it runs: the trainer on CUDA in fp32 and bf16, torch.compile
on CUDA, DCP's async save with its pinned-memory stager and a resume through the CLI, pinned
prefetch, FSDP's bf16 gathers, and the energy NVML reports.

Every test here is marked `gpu`. Without a CUDA device conftest.py skips them all, however
they were selected, and ends the report with one line saying how many; CI never runs them.
`bash bench/gpu_check.sh OUT_DIR` runs them on a lent GPU machine, beside the GPU
benchmarks; with $OPT_GPU_RECORD set, each test appends what it measured (the differences
it compared) to that JSON-lines file.

Bitwise equality, which the CPU tests demand of a resume, cannot be asked of a GPU run in
general: some CUDA kernels the trainer uses accumulate with atomics in no fixed order (the
memory-efficient and flash attention backward, the sparse embedding gradient's index_add),
so two runs of the same step may differ in the last bits; and the trainer has no
deterministic mode to switch that off (`torch.use_deterministic_algorithms` is nowhere in
opt/). The comparisons below are therefore to a tolerance, one per kind of difference:

- FP32_RTOL = 1e-5 (relative) for fp32 runs that differ only in kernels or reduction order
  (CPU against CUDA, compiled against eager, resumed against straight, pinned against
  pageable). fp32 rounds at 2^-24 (6e-8) relative; sums of at most a few hundred terms in
  another order move a result by well under 1e-6. The trainer sets no TF32 switch, and
  PyTorch's default keeps fp32 matmuls in IEEE fp32 (checked below): TF32 (2^-11) would
  move the gradient norms by about 1e-4, ten times this. One optimizer step moves this
  model's loss by 2.5e-3 to 7e-3 relative (measured on CPU), 250x this, so a lost or
  doubled step cannot pass.
- BF16_LOSS_RTOL = 1e-3 for a bf16 run against another bf16 or fp32 run: bf16 keeps 8
  significant bits (2^-8 = 3.9e-3 spacing); the loss is a mean over 256 tokens, which
  averages those roundings (CPU bf16 moves this model's loss by at most 1.5e-5 over 8
  steps); still under half of one step's change.
- BF16_NORM_RTOL = 2^-6 for gradient norms under bf16: gradients are not averaged like the
  loss, and pass through a few bf16 roundings per block (2^-8 each); CPU bf16 moves this
  model's gradient norm by up to 1.8e-3, a ninth of this.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO, metrics_losses, run_cli

from opt.config import to_toml
from opt.data.prefetch import PrefetchingLoader
from opt.train.trainer import Trainer

pytestmark = pytest.mark.gpu

FP32_RTOL = 1e-5
BF16_LOSS_RTOL = 1e-3
BF16_NORM_RTOL = 2**-6
STEPS = 6
SUBPROCESS_TIMEOUT = 240  # seconds; a tiny run takes seconds, the first compile tens


@pytest.fixture
def record(request):
    """Append one JSON line of measurements to $OPT_GPU_RECORD (when set)."""

    def write(**values) -> None:
        path = os.environ.get("OPT_GPU_RECORD")
        if path:
            with open(path, "a") as f:
                f.write(json.dumps({"test": request.node.name, **values}) + "\n")

    return write


def cuda_trainer(tiny_config, name: str, **overrides) -> Trainer:
    """A tiny run on the GPU: no dropout (the CPU and compiled runs draw other masks), no
    compile (its own test) unless asked for."""
    values = dict(run__name=name, train__device="cuda", train__compile="off",
                  model__dropout=0.0, train__max_steps=STEPS)  # fmt: skip
    return Trainer(tiny_config(**{**values, **overrides}))


def bf16_or_skip() -> None:
    if not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name()} has no bf16 (the trainer refuses it)")


def losses_and_norms(trainer: Trainer) -> tuple[list[float], list[float]]:
    results = trainer.fit()
    assert len(results) == STEPS
    return [r.loss for r in results], [r.grad_norm for r in results]


def worst(a: list[float], b: list[float]) -> float:
    """The largest relative difference between two series."""
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def assert_close(actual: list[float], expected: list[float], rtol: float, what: str) -> None:
    assert all(math.isfinite(x) for x in actual), f"{what}: {actual}"
    assert worst(actual, expected) <= rtol, f"{what}: {actual} against {expected}"


# ----- the trainer's device path ------------------------------------------------------------
def test_fp32_on_cuda_starts_from_the_cpu_weights_and_trains_like_the_cpu(tiny_config, record):
    cpu = cuda_trainer(tiny_config, "cpu", train__device="cpu")
    gpu = cuda_trainer(tiny_config, "gpu")
    assert {p.device.type for p in gpu.model.parameters()} == {"cuda"}
    # The trainer sets no TF32 switch; PyTorch's default keeps fp32 matmuls IEEE fp32.
    assert torch.get_float32_matmul_precision() == "highest"
    assert not torch.backends.cuda.matmul.allow_tf32
    # The init is drawn on the host whatever the device: the same weights, bit for bit.
    cpu_weights, gpu_weights = cpu.model.state_dict(), gpu.model.state_dict()
    assert all(torch.equal(cpu_weights[k], gpu_weights[k].cpu()) for k in cpu_weights)

    cpu_losses, cpu_norms = losses_and_norms(cpu)
    gpu_losses, gpu_norms = losses_and_norms(gpu)
    record(loss_rdiff=worst(gpu_losses, cpu_losses), norm_rdiff=worst(gpu_norms, cpu_norms),
           cpu_losses=cpu_losses, gpu_losses=gpu_losses)  # fmt: skip
    assert_close(gpu_losses, cpu_losses, FP32_RTOL, "fp32 losses, CUDA against CPU")
    assert_close(gpu_norms, cpu_norms, FP32_RTOL, "fp32 gradient norms, CUDA against CPU")


def test_bf16_on_cuda_trains_close_to_fp32(tiny_config, record):
    bf16_or_skip()
    fp32_losses, fp32_norms = losses_and_norms(cuda_trainer(tiny_config, "fp32"))
    bf16 = cuda_trainer(tiny_config, "bf16", train__precision="bf16")
    assert not bf16.bf16_via_fp32  # native bf16 kernels on the GPU
    bf16_losses, bf16_norms = losses_and_norms(bf16)
    record(loss_rdiff=worst(bf16_losses, fp32_losses), norm_rdiff=worst(bf16_norms, fp32_norms),
           bf16_losses=bf16_losses)  # fmt: skip
    assert_close(bf16_losses, fp32_losses, BF16_LOSS_RTOL, "bf16 losses against fp32")
    assert_close(bf16_norms, fp32_norms, BF16_NORM_RTOL, "bf16 gradient norms against fp32")


# ----- torch.compile on CUDA ----------------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_blocks_train_like_eager_ones(tiny_config, record, precision):
    from torch._dynamo.utils import counters

    if precision == "bf16":
        bf16_or_skip()
    eager_losses, eager_norms = losses_and_norms(
        cuda_trainer(tiny_config, "eager", train__precision=precision)
    )
    graphs_before = counters["stats"]["unique_graphs"]
    compiled = cuda_trainer(tiny_config, "compiled", train__precision=precision,
                            train__compile="on")  # fmt: skip
    assert all(b._compiled_call_impl is not None for b in compiled.model.layers.values())
    compiled_losses, compiled_norms = losses_and_norms(compiled)
    assert counters["stats"]["unique_graphs"] > graphs_before  # dynamo did compile them
    loss_rtol, norm_rtol = (
        (FP32_RTOL, FP32_RTOL) if precision == "fp32" else (BF16_LOSS_RTOL, BF16_NORM_RTOL)
    )
    record(loss_rdiff=worst(compiled_losses, eager_losses),
           norm_rdiff=worst(compiled_norms, eager_norms))  # fmt: skip
    assert_close(compiled_losses, eager_losses, loss_rtol, f"{precision} compiled losses")
    assert_close(compiled_norms, eager_norms, norm_rtol, f"{precision} compiled grad norms")


# ----- DCP: the pinned stager, async save, resume in a new process ---------------------------
def test_the_stager_copies_to_pinned_memory_after_the_queued_kernels():
    """BackgroundStager hands GPU tensors to DCP's stager (pinned buffers, non-blocking
    copies on a side stream). The copy must start after the kernels already queued on the
    compute stream, which the side stream does not wait for by itself."""
    from opt.checkpoint.staging import BackgroundStager

    device = torch.device("cuda")
    stager = BackgroundStager(device)
    try:
        x = torch.zeros(2**26, device=device)  # 256 MiB: 20 passes over it stay queued a while
        for _ in range(20):
            x.add_(1.0)
        staged = stager.stage({"x": x, "step": 20}).result(timeout=60)
        torch.cuda.synchronize()
        x.add_(1.0)  # after the copy: the staged buffer must not follow
        copy = staged["x"]
        assert copy.device.type == "cpu" and copy.is_pinned()
        assert staged["step"] == 20
        assert torch.equal(copy, torch.full_like(copy, 20.0))
    finally:
        stager.close()


@pytest.mark.slow
@pytest.mark.timeout(4 * SUBPROCESS_TIMEOUT)
def test_async_save_resumes_in_a_new_process_like_a_run_that_never_stopped(
    tiny_config, tmp_path, record
):
    """`opt train` on the GPU, as users resume: a run stopped after a pinned async save at
    step 4 and started again must continue as one that never stopped. fp32, dropout on (the
    CUDA generator comes back from the checkpoint), compile off (tested above; it would add
    its start to each of the three processes)."""

    def train(name: str, max_steps: int) -> subprocess.CompletedProcess:
        cfg = tiny_config(run__name=name, train__device="cuda", train__compile="off",
                          model__dropout=0.1, checkpoint__every=4, checkpoint__keep_last=0,
                          checkpoint__async_save=True, checkpoint__async_staging=True)  # fmt: skip
        path = tmp_path / f"{name}.toml"
        path.write_text(to_toml(cfg))
        result = run_cli("train", str(path), "--max-steps", str(max_steps),
                         timeout=SUBPROCESS_TIMEOUT)  # fmt: skip
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        return result

    def norms(name: str) -> dict[int, float]:
        rows = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["grad_norm"] for r in map(json.loads, rows) if "grad_norm" in r}

    train("straight", 8)
    train("stopped", 4)
    resumed = train("stopped", 8)
    assert "resumed from" in resumed.stdout and "step_00000004" in resumed.stdout
    expected = metrics_losses(tmp_path / "runs" / "straight")
    got = metrics_losses(tmp_path / "runs" / "stopped")
    assert sorted(got) == sorted(expected) == list(range(1, 9))
    steps = range(5, 9)
    after = [got[s] for s in steps]
    straight = [expected[s] for s in steps]
    after_norms = [norms("stopped")[s] for s in steps]
    straight_norms = [norms("straight")[s] for s in steps]
    record(loss_rdiff=worst(after, straight), norm_rdiff=worst(after_norms, straight_norms),
           bitwise=after == straight)  # fmt: skip
    assert_close(after, straight, FP32_RTOL, "losses after the resume")
    assert_close(after_norms, straight_norms, FP32_RTOL, "gradient norms after the resume")


# ----- pinned prefetch ------------------------------------------------------------------------
def memcpy_kinds(trainer: Trainer) -> dict[str, int]:
    """Host-to-device copies of one training step, by source memory (the CUDA trace's
    'Memcpy HtoD (Pinned -> Device)' and 'Memcpy HtoD (Pageable -> Device)')."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        trainer.train_step()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.name.startswith("Memcpy HtoD")]
    return {kind: sum(f"({kind} -> Device)" in n for n in names) for kind in ("Pinned", "Pageable")}


def test_pinned_prefetch_copies_asynchronously_and_changes_no_loss(tiny_config, record):
    runs = {}
    for pin in (True, False):
        trainer = cuda_trainer(tiny_config, f"pin-{pin}", model__dropout=0.1,
                               data__prefetch=True, data__pin_memory=pin)  # fmt: skip
        assert isinstance(trainer.loader, PrefetchingLoader)
        assert trainer.loader.pin_memory is pin
        results = [trainer.train_step() for _ in range(STEPS)]
        # The next two steps' batches: one made in the background thread, one in this one.
        batches = [t for _ in range(2)
                   for pair in trainer.loader.next_microbatches(trainer.grad_accum)
                   for t in pair]  # fmt: skip
        assert all(t.is_pinned() is pin for t in batches)
        runs[pin] = ([r.loss for r in results], [r.grad_norm for r in results],
                     memcpy_kinds(trainer))  # fmt: skip
        copies = 2 * trainer.grad_accum  # inputs and targets of each micro-batch
        trainer.loader.close()
    (pinned_losses, pinned_norms, pinned), (paged_losses, paged_norms, paged) = runs.values()
    record(loss_rdiff=worst(pinned_losses, paged_losses), bitwise=pinned_losses == paged_losses,
           memcpy_pinned_run=pinned, memcpy_pageable_run=paged)  # fmt: skip
    # Pinned, the batches go to the GPU from page-locked memory (an asynchronous DMA);
    # unpinned, from pageable memory (staged through a driver buffer, synchronously).
    assert pinned["Pinned"] - paged["Pinned"] >= copies, (pinned, paged)
    assert paged["Pageable"] - pinned["Pageable"] >= copies, (pinned, paged)
    assert_close(pinned_losses, paged_losses, FP32_RTOL, "losses, pinned against pageable")
    assert_close(pinned_norms, paged_norms, FP32_RTOL, "grad norms, pinned against pageable")


# ----- FSDP's bf16 gathers --------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(SUBPROCESS_TIMEOUT + 30)
def test_fsdp_gathers_bf16_block_weights_on_one_gpu(tmp_path, record):
    """FSDP2 over a one-rank NCCL mesh (tests/gpu_fsdp_worker.py): the blocks' matmul
    weights arrive in their forward as bf16, LayerNorms and embeddings as fp32, the sharded
    masters and their gradients stay fp32, and the losses and gradients are those of the
    same model under plain bf16 autocast, which rounds the same weights to bf16 itself."""
    bf16_or_skip()
    out = tmp_path / "fsdp.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "gpu_fsdp_worker.py"), str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    record(losses_plain=report["plain_losses"], losses_fsdp=report["fsdp_losses"],
           worst_grad_distance=max(report["grad_distance"].values()))  # fmt: skip

    seen = report["fsdp_forward_dtypes"]
    block_matmuls = {n for n in seen if n.startswith("layers.") and "norm" not in n}
    assert block_matmuls and all(seen[n] == "torch.bfloat16" for n in block_matmuls), seen
    others = set(seen) - block_matmuls  # LayerNorms, the embeddings (and the tied head)
    assert others and all(seen[n] == "torch.float32" for n in others), seen
    assert set(report["plain_forward_dtypes"].values()) == {"torch.float32"}
    for name, kinds in report["fsdp_after_backward"].items():
        assert kinds == {"param": "DTensor", "param_dtype": "torch.float32",
                         "grad": "DTensor", "grad_dtype": "torch.float32"}, name  # fmt: skip

    assert_close(report["fsdp_losses"], report["plain_losses"], BF16_LOSS_RTOL, "FSDP losses")
    # Gradients as vectors, each parameter's: within a few bf16 roundings of the plain ones.
    far = {n: d for n, d in report["grad_distance"].items() if not d <= BF16_NORM_RTOL}
    assert not far, far


@pytest.mark.slow
@pytest.mark.timeout(2 * SUBPROCESS_TIMEOUT + 30)
def test_fsdp_bf16_gathers_train_like_fp32_gathers_on_two_gpus(tiny_config, tmp_path, record):
    """The trainer's own FSDP path (`opt launch local`, one rank per GPU, NCCL): bf16 gathers
    (parallel.fsdp_mixed_precision) against fp32 gathers that autocast rounds to bf16."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs for the trainer's FSDP (one rank per GPU, dp > 1); "
                    f"{torch.cuda.device_count()} here")  # fmt: skip
    bf16_or_skip()
    losses = {}
    for gathers in ("bf16", "fp32"):
        name = f"fsdp-{gathers}"
        cfg = tiny_config(run__name=name, train__device="cuda", train__compile="off",
                          model__dropout=0.0, train__precision="bf16", train__max_steps=STEPS,
                          parallel__dp_shard=2, parallel__timeout_s=120.0,
                          parallel__fsdp_mixed_precision=gathers == "bf16")  # fmt: skip
        path = tmp_path / f"{name}.toml"
        path.write_text(to_toml(cfg))
        result = run_cli("launch", "local", "--nproc", "2", str(path),
                         timeout=SUBPROCESS_TIMEOUT)  # fmt: skip
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        by_step = metrics_losses(tmp_path / "runs" / name)
        losses[gathers] = [by_step[s] for s in range(1, STEPS + 1)]
    record(loss_rdiff=worst(losses["bf16"], losses["fp32"]))
    assert_close(losses["bf16"], losses["fp32"], BF16_LOSS_RTOL, "bf16-gather losses")


# ----- energy from NVML -----------------------------------------------------------------------
def nvml_energy_joules() -> float:
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    return pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000  # mJ


@pytest.mark.timeout(SUBPROCESS_TIMEOUT)
def test_run_stop_records_the_energy_nvml_measured(tiny_config, record):
    """The logbook's run_stop event carries the GPU's energy from NVML's counter, within
    what the counter read around the whole run from outside.

    The event rounds energy to 0.0001 kWh (360 J), so the run must use more than half of
    that for "> 0" to show: it does about 900 TFLOP (80 steps of a 4-layer, 1024-wide model
    on 32k tokens), and no GPU this targets spends less than about 0.7 J a TFLOP (an H100's
    700 W at its 989 TFLOP/s dense bf16 peak), so over 600 J, before its idle draw."""
    bf16_or_skip()
    try:
        import pynvml
    except ImportError:
        pytest.skip("nvidia-ml-py is not installed: run_stop falls back to the GPU's TDP")
    try:
        before = nvml_energy_joules()
    except pynvml.NVMLError as err:
        pytest.skip(f"NVML cannot read this GPU's energy counter: {err}")
    from opt.run.logbook.store import read_events

    trainer = cuda_trainer(
        tiny_config, "energy", model__name="opt-125m", model__n_layers=4, model__n_heads=16,
        model__d_model=1024, data__seq_len=1024, train__micro_batch_size=16,
        train__batch_tokens=32768, train__precision="bf16", train__max_steps=80,
        validation__enabled=False, supervisor__enabled=False, metrics__log_every=20,
    )  # fmt: skip
    trainer.fit()
    after = nvml_energy_joules()
    stop = [e for e in read_events(trainer.cfg.logbook_dir / "events.jsonl")
            if e.kind == "run_stop"][-1]  # fmt: skip
    record(energy_kwh=stop.energy_kwh, outside_joules=after - before,
           energy_source=stop.energy_source)  # fmt: skip
    assert stop.energy_source.startswith("NVML"), stop.energy_source
    assert stop.energy_kwh is not None and stop.energy_kwh > 0
    assert stop.gpu_hours > 0
    # Measured inside the interval the outside readings bracket (plus the rounding).
    assert stop.energy_kwh * 3.6e6 <= after - before + 180
