"""`opt plan`: weights/gradients/AdamW bytes equal the dry run's sharded tensors exactly,
the 175B plan agrees with OPT's setup and days, and a written config is accepted."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli

from opt.config import load_config
from opt.dry_run import dry_run_report
from opt.errors import OptError
from opt.job import check_job, resolve_model_args
from opt.plan.memory import training_state_bytes


@pytest.mark.parametrize(
    ("config", "world", "overrides"),
    [
        ("configs/demo.toml", 2, {"parallel.tp": 2}),  # the tiny shape
        ("configs/demo.toml", 2, {"parallel.pp": 2}),
        ("configs/opt-125m.toml", 1, {}),
        ("configs/opt-125m.toml", 2, {"parallel.tp": 2}),
        ("configs/opt-125m.toml", 2, {"parallel.pp": 2}),
        ("configs/opt-125m.toml", 2, {}),  # DP2 (FSDP)
        ("configs/opt-125m.toml", 3, {}),  # FSDP3: uneven shards, the first rank is largest
        ("configs/opt-350m.toml", 8, {"parallel.tp": 2, "parallel.pp": 2}),
        ("configs/opt-350m.toml", 12, {"parallel.tp": 4}),
        (
            "configs/opt-125m.toml",
            8,
            {
                "parallel.pp": 2,
                "parallel.dp_replicate": 2,
                "parallel.pp_schedule": "interleaved_1f1b",
                "parallel.pp_stages_per_rank": 2,
            },
        ),
    ],
)
def test_state_memory_equals_the_sharded_tensors_exactly(config, world, overrides):
    flags = ["--train.batch_tokens", str(2048 * 8 * world * 4)]
    for key, value in overrides.items():
        flags += [f"--{key}", json.dumps(value)]
    cfg = load_config(config, flags)
    report = dry_run_report(cfg, world)
    layout = report["layout"]
    predicted = training_state_bytes(resolve_model_args(cfg), layout["tp"], layout["pp"],
                                     layout["dp_shard"], cfg.parallel.pp_stages_per_rank,
                                     cfg.data.seq_len)  # fmt: skip
    for real, ours in zip(report["per_rank"], predicted, strict=True):
        assert ours["parameters"] == real["local_parameters"]
        assert ours["weights"] == real["bytes"]["parameters"]
        assert ours["gradients"] == real["bytes"]["gradients"]
        assert ours["optimizer"] == real["bytes"]["optimizer"]


def _plan(*args: str):
    result = run_cli("plan", *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_opt_175b_on_992_a100s_matches_opts_setup_and_days():
    plan = _plan("--model", "opt-175b", "--gpus", "992", "--gpu", "a100-80gb", "--tokens",
                 "300B", "--global-batch", "2097152", "--achieved-tflops", "147", "--top", "200")  # fmt: skip
    top = plan["candidates"][:3]
    assert all(c["tp"] == 8 and c["dp"] >= 62 for c in top), top
    assert all(c["memory"]["total"] <= 80 * 2**30 for c in top)
    # OPT's own layout: TP 8 x FSDP 124 with full recompute. The paper's ~33 days are at
    # 147 TFLOP/s of hardware FLOPs (recompute included), so compare that row.
    opt_like = next(c for c in plan["candidates"] if (c["tp"], c["pp"], c["activation_checkpoint"])
                    == (8, 1, "full"))  # fmt: skip
    assert abs(opt_like["batch_tokens"] - 2_097_152) <= 0.05 * 2_097_152
    assert opt_like["days"] == pytest.approx(33, rel=0.15), opt_like
    excluded = {c["excluded"].split(" ")[0] for c in plan["excluded"]}
    assert "needs" in excluded  # e.g. no checkpointing at tp 1 cannot fit 175B


@pytest.mark.slow
def test_a_written_config_is_accepted_by_the_trainer_unchanged(tmp_path):
    out = tmp_path / "planned.toml"
    result = run_cli("plan", "--model", "opt-1.3b", "--gpus", "16", "--gpu", "h100-80gb",
                     "--tokens", "26B", "--global-batch", "1M", "--write-config", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and "GiB/GPU" in result.stdout
    cfg = load_config(out)
    check_job(cfg, 16)
    assert cfg.slurm.nodes * cfg.slurm.gpus_per_node == 16
    dry = run_cli("train", str(out), "--dry-run", "--world-size", "16")
    assert dry.returncode == 0, dry.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpus", "8", "--gpu", "v100"], "invalid choice"),
        (["--gpus", "8", "--model", "opt-9b"], "unknown model size"),
        (["--gpus", "8", "--tokens", "lots"], "not a count"),
        (["--gpus", "1", "--model", "opt-175b", "--gpu", "a100-40gb"], "no layout fits"),
    ],
)
def test_bad_requests_get_one_line(args, message):
    result = run_cli("plan", *args)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.slow
def test_calibration_measures_this_machine_and_is_used_only_for_its_own_gpu(tmp_path):
    stored = tmp_path / "calibration.json"
    result = run_cli("plan", "--model", "opt-tiny", "--gpus", "1", "--seq-len", "128",
                     "--global-batch", "1024", "--tokens", "1M", "--calibrate",
                     "--calibration", str(stored))  # fmt: skip
    assert result.returncode == 0, result.stderr
    measured = json.loads(stored.read_text())
    assert measured["device"] == "cpu" and measured["accelerator"] is None
    assert measured["achieved_tflops"] > 0 and 0 < measured["fraction_of_matmul_peak"] < 1.5
    assert "calibration on cpu does not apply to a100-80gb" in result.stdout

    # A calibration taken on an H100 replaces the default fraction of peak for --gpu h100.
    stored.write_text(json.dumps({**measured, "device": "NVIDIA H100 80GB HBM3",
                                  "accelerator": "h100-80gb", "achieved_tflops": 400.0}))  # fmt: skip
    args = ["--model", "opt-125m", "--gpus", "8", "--tokens", "1B", "--global-batch", "524288",
            "--calibration", str(stored)]  # fmt: skip
    h100 = _plan(*args, "--gpu", "h100-80gb")
    assert h100["achieved_fraction_of_peak"] == pytest.approx(400.0 / 989.0)
    a100 = _plan(*args, "--gpu", "a100-80gb")
    assert a100["achieved_fraction_of_peak"] == pytest.approx(0.47)


@pytest.mark.parametrize(
    ("model", "gpus", "layout", "batch_tokens"),
    [
        ("opt-125m", 8, {"tp": 8}, 2**19),  # 12 heads
        ("opt-350m", 32, {"pp": 32}, 2**21),  # 24 layers
        ("opt-125m", 8, {"pp": 4}, 8192),  # 2 micro-batches of 1 x 2048 for 4 stages
    ],
)
def test_the_planner_excludes_what_the_job_refuses_in_the_jobs_words(
    model, gpus, layout, batch_tokens
):
    """One set of layout rules (opt/parallel/rules.py): a layout the trainer would refuse is
    excluded by `opt plan` with the trainer's own message."""
    from opt.hardware import get_accelerator
    from opt.plan.planner import Cluster, Job, evaluate

    tp, pp = layout.get("tp", 1), layout.get("pp", 1)
    flags = ["--train.micro_batch_size", "1", "--train.batch_tokens", str(batch_tokens)]
    for key, value in layout.items():
        flags += [f"--parallel.{key}", str(value)]
    cfg = load_config(f"configs/{model}.toml", flags)
    with pytest.raises(OptError) as refused:
        check_job(cfg, gpus)
    job = Job(resolve_model_args(cfg), model, cfg.data.seq_len, batch_tokens, 10**9)
    cluster = Cluster(get_accelerator("h100-80gb"), gpus, gpus, 0.5)
    candidate = evaluate(job, cluster, tp, pp, 1, "none", False)
    assert not candidate.fits and candidate.excluded == str(refused.value)
