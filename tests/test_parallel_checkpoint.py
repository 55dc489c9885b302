"""Sharded checkpoints through the CLI: save under one layout, resume under another (or one
process) with the same losses; export a sharded checkpoint to transformers; async saves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, TINY_OVERRIDES, run_cli, toml_value
from safetensors.torch import load_file

from opt.checkpoint import list_checkpoints, manifest, verify_checkpoint
from opt.config import load_config, to_toml

pytestmark = pytest.mark.slow  # multi-process runs, seconds each

LAYOUT_FLAGS = {
    "tp2xpp2": (4, ["--parallel.tp", "2", "--parallel.pp", "2"]),
    "dp2": (2, ["--parallel.dp_shard", "2"]),
    "tp2": (2, ["--parallel.tp", "2"]),
}


def launch(nproc: int, *args: str) -> subprocess.CompletedProcess:
    """`opt launch local`, the command users run, with a bounded wait."""
    return subprocess.run(
        [sys.executable, "-m", "opt", "launch", "local", "--nproc", str(nproc), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def tensorboard_losses(run_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars("train/loss")}


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, pydoc_dataset) -> Path:
    root = tmp_path_factory.mktemp("reshard")
    values = {
        **TINY_OVERRIDES,
        "model.n_layers": 4,
        "model.dropout": 0.0,
        "train.micro_batch_size": 2,
        "train.batch_tokens": 512,
        "metrics.tensorboard": True,
        "checkpoint.every": 3,
        "data.path": str(pydoc_dataset),
        "run.dir": str(root / "runs"),
        "checkpoint.dir": str(root / "ckpt"),
        "logbook.dir": str(root / "logbook"),
    }
    cfg = load_config(None, [item for k, v in values.items() for item in (f"--{k}", toml_value(v))])
    path = root / "tiny.toml"
    path.write_text(to_toml(cfg))
    return path


@pytest.fixture(scope="module")
def reference(config_file) -> tuple[dict[int, float], Path]:
    """Five steps in one process, never stopped; its step-3 checkpoint."""
    result = run_cli("train", str(config_file), "--run.name", "reference", "--max-steps", "5")
    assert result.returncode == 0, result.stderr
    cfg = load_config(config_file, ["--run.name", "reference"])
    return tensorboard_losses(cfg.run_dir), cfg.checkpoint_dir / "step_00000003"


@pytest.fixture(scope="module")
def sharded_checkpoint(config_file) -> Path:
    """Three steps under TP2 x PP2 (four processes), saved with async DCP."""
    nproc, flags = LAYOUT_FLAGS["tp2xpp2"]
    result = launch(
        nproc, str(config_file), "--run.name", "sharded", "--max-steps", "3",
        "--checkpoint.async_save", "true", *flags,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = load_config(config_file, ["--run.name", "sharded"])
    (path,) = [p for p in list_checkpoints(cfg.checkpoint_dir) if p.name != "step_00000000"]
    return path  # (the supervised fresh run also saved step 0)


def test_sharded_checkpoint_is_complete_and_records_its_layout(sharded_checkpoint):
    info = verify_checkpoint(sharded_checkpoint)  # every file's size and sha256
    assert info["layout"]["tp"] == 2 and info["layout"]["pp"] == 2
    # IO_THREADS shard files per rank, written (and hashed) in parallel
    assert len(list(sharded_checkpoint.glob("*.distcp"))) == 4 * manifest.IO_THREADS
    assert not list(sharded_checkpoint.parent.glob(".*.tmp"))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("target", ["dp2", "single"])
def test_resume_under_another_layout_continues_with_the_same_losses(
    target, config_file, reference, sharded_checkpoint, tmp_path
):
    expected, _ = reference
    name = f"resumed-{target}"
    args = [str(config_file), "--run.name", name, "--max-steps", "5"]
    args += ["--resume", str(sharded_checkpoint)]
    if target == "single":
        result = run_cli("train", *args)
    else:
        nproc, flags = LAYOUT_FLAGS[target]
        result = launch(nproc, *args, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {sharded_checkpoint} at step 3" in result.stdout
    losses = tensorboard_losses(load_config(config_file, ["--run.name", name]).run_dir)
    assert sorted(losses) == [4, 5]
    for step in (4, 5):
        assert losses[step] == pytest.approx(expected[step], abs=1e-5)


def test_to_hf_exports_a_sharded_checkpoint(sharded_checkpoint, tmp_path):
    """The export holds exactly the sharded checkpoint's (resharded) weights, and
    transformers computes the same logits from it as our model does from the checkpoint."""
    from transformers import OPTForCausalLM

    from opt.checkpoint import load_model
    from opt.convert.hf import our_key_to_hf

    out = tmp_path / "hf"
    result = run_cli("convert", "to-hf", str(sharded_checkpoint), str(out))
    assert result.returncode == 0, result.stderr
    ours = load_model(sharded_checkpoint).eval()
    exported = load_file(out / "model.safetensors")
    expected = {our_key_to_hf(k): v for k, v in ours.state_dict().items()}
    assert exported.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(exported[key], value), key
    hf = OPTForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(
        0, ours.args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), rtol=1e-4, atol=1e-5)


@pytest.mark.timeout(300)
def test_resume_under_the_same_layout_matches_the_uninterrupted_run(
    config_file, reference, sharded_checkpoint
):
    """Same layout: RNG streams restored per rank; also an async-saved checkpoint loads."""
    expected, _ = reference
    nproc, flags = LAYOUT_FLAGS["tp2xpp2"]
    result = launch(nproc, str(config_file), "--run.name", "sharded", "--max-steps", "5", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = tensorboard_losses(load_config(config_file, ["--run.name", "sharded"]).run_dir)
    for step in range(1, 6):
        assert losses[step] == pytest.approx(expected[step], abs=1e-5)
