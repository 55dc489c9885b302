"""Every parallel layout trains like one process: the same per-step losses and the same
gradients after step 1, on real gloo process groups started by torchrun; and it validates
like one process: the same held-out loss before and after training, with an evaluation in
between that the training steps after it do not notice."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import REPO, TINY_OVERRIDES, toml_value, torchrun
from parallel_worker import full_gradients

from opt.config import to_toml
from opt.train.trainer import Trainer

pytestmark = pytest.mark.slow  # multi-process runs, seconds each

STEPS = 5

# fp32, dropout off; 4 layers so that interleaved 1F1B has 4 stages over 2 ranks. The
# clip threshold is below the first steps' norm, so the global norm and clipping are
# exercised too.
EXACT = {
    "model__n_layers": 4,
    "model__dropout": 0.0,
    "train__micro_batch_size": 2,
    "train__batch_tokens": 512,
    "optim__grad_clip": 0.5,
    "checkpoint__resume": "none",
}

LAYOUTS = {
    "tp2": (2, {"parallel.tp": 2}),
    "pp2-1f1b": (2, {"parallel.pp": 2}),
    "pp2-interleaved-1f1b": (
        2,
        {
            "parallel.pp": 2,
            "parallel.pp_schedule": "interleaved_1f1b",
            "parallel.pp_stages_per_rank": 2,
        },
    ),
    "dp2-fsdp": (2, {"parallel.dp_shard": 2}),
    "dp2-fsdp-full-logits": (2, {"parallel.dp_shard": 2, "train.loss_chunk": 0}),
    "tp2xpp2": (4, {"parallel.tp": 2, "parallel.pp": 2}),
    "dp2xtp2": (4, {"parallel.dp_shard": 2, "parallel.tp": 2}),
    "hsdp2x2": (4, {"parallel.dp_replicate": 2, "parallel.dp_shard": 2}),
    "dp2xtp2-sp-selective-ac": (
        4,
        {
            "parallel.dp_shard": 2,
            "parallel.tp": 2,
            "parallel.sequence_parallel": True,
            "parallel.activation_checkpoint": "selective",
        },
    ),
    "dp2xpp2-gpipe-full-ac": (
        4,
        {
            "parallel.dp_shard": 2,
            "parallel.pp": 2,
            "parallel.pp_schedule": "gpipe",
            "parallel.activation_checkpoint": "full",
        },
    ),
}


@pytest.fixture(scope="module")
def exact_run(tmp_path_factory, pydoc_dataset):
    """The single-process reference: config file, losses, gradients after step 1, and the
    held-out loss before step 1 and after the last step."""
    from opt.config import load_config

    root = tmp_path_factory.mktemp("exact")
    values = {**TINY_OVERRIDES, **{k.replace("__", "."): v for k, v in EXACT.items()}}
    values |= {
        "data.path": str(pydoc_dataset),
        "run.dir": str(root / "runs"),
        "checkpoint.dir": str(root / "ckpt"),
        "logbook.dir": str(root / "logbook"),
    }
    args = [item for key, value in values.items() for item in (f"--{key}", toml_value(value))]
    cfg = load_config(None, args)
    config_file = root / "exact.toml"
    config_file.write_text(to_toml(cfg))
    trainer = Trainer(cfg)
    assert trainer.fused_loss  # the layouts without it are held to it too
    valid = [trainer.validate().loss]
    results = [trainer.train_step()]
    grads = full_gradients(trainer)
    results += [trainer.train_step() for _ in range(STEPS - 1)]
    valid.append(trainer.validate().loss)
    losses, activations = [r.loss for r in results], [r.activation_rms for r in results]
    return config_file, losses, grads, valid, activations


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_layout_matches_one_process(layout, exact_run, tmp_path):
    config_file, expected_losses, expected_grads, expected_valid, expected_acts = exact_run
    nproc, overrides = LAYOUTS[layout]
    override_args = [item for k, v in overrides.items() for item in (f"--{k}", toml_value(v))]
    result = torchrun(
        nproc,
        str(REPO / "tests" / "parallel_worker.py"),
        str(tmp_path),
        str(STEPS),
        str(config_file),
        "--parallel.timeout_s",
        "60",
        *override_args,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    losses = json.loads((tmp_path / "losses.json").read_text())
    torch.testing.assert_close(losses, expected_losses, rtol=0, atol=1e-5)
    # The supervisor's early warning sees the whole batch's last-block activations, once
    # per training forward (never the evaluations, nor activation checkpointing's reruns).
    activations = json.loads((tmp_path / "activations.json").read_text())
    torch.testing.assert_close(activations, expected_acts, rtol=1e-5, atol=0)
    valid = json.loads((tmp_path / "valid.json").read_text())
    torch.testing.assert_close([valid[0], valid[2]], expected_valid, rtol=0, atol=1e-5)
    assert valid[2] < valid[0]  # it learns
    grads = {}
    for rank in range(nproc):
        grads.update(torch.load(tmp_path / f"grads_rank{rank}.pt"))
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2-sp"])
def test_dropout_masks_under_tensor_parallel(sequence_parallel, exact_run, tmp_path):
    """Replicated regions draw the same masks on every TP rank (else the replicated
    LayerNorms would drift apart); with sequence parallelism each rank's sequence shard
    draws its own."""
    config_file, *_ = exact_run
    result = torchrun(
        2,
        str(REPO / "tests" / "parallel_worker.py"),
        str(tmp_path),
        "3",
        str(config_file),
        "--model.dropout", "0.1",
        "--parallel.tp", "2",
        "--parallel.sequence_parallel", toml_value(sequence_parallel),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name, value in rank0["norms"].items():
        assert torch.equal(value, rank1["norms"][name]), name
    assert torch.equal(rank0["draw"], rank1["draw"]) is not sequence_parallel
