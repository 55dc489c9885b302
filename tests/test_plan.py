"""`opt plan`: weights/gradients/AdamW bytes equal the dry run's sharded tensors exactly,
OPT-175B is planned without being told its speed, deep and interleaved pipelines are
searched, and a written config (FSDP, replicated, interleaved) is accepted by the trainer.
The time model's own checks are in test_plan_fit.py."""

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
def test_opt_175b_on_992_a100s_is_planned_without_being_told_its_speed():
    """No achieved TFLOP/s is given: the time model's fitted constants price the layouts."""
    plan = _plan("--model", "opt-175b", "--gpus", "992", "--gpu", "a100-80gb", "--tokens",
                 "300B", "--global-batch", "2097152", "--top", "400")  # fmt: skip
    assert "Megatron-LM" in plan["efficiency"]["fitted_on"]
    top = plan["candidates"][0]
    assert top["tp"] == 8 and top["memory"]["total"] <= 80 * 2**30, top
    # OPT's own layout (TP 8 x FSDP 124, full recompute) fits and is priced.
    opt_like = [c for c in plan["candidates"] if (c["tp"], c["pp"], c["data_parallel"],
                c["activation_checkpoint"]) == (8, 1, "fsdp", "full")]  # fmt: skip
    assert opt_like and all(c["dp"] == 124 for c in opt_like)
    assert all(abs(c["batch_tokens"] - 2_097_152) <= 0.05 * 2_097_152 for c in opt_like)
    excluded = {c["excluded"].split(" ")[0] for c in plan["excluded"]}
    assert "needs" in excluded  # e.g. no checkpointing at tp 1 cannot fit 175B


@pytest.mark.parametrize(("layers", "heads", "d_model", "gpus", "pp"),
                         [(105, 128, 20480, 2240, 35), (128, 160, 25600, 3072, 64)])  # fmt: skip
def test_the_deep_pipelines_real_teams_use_can_be_planned(layers, heads, d_model, gpus, pp):
    """MT-NLG's 105 layers on 35 stages and Megatron's 1T on 64: pipeline degrees that are
    not powers of two, with and without the interleaved schedule."""
    from opt.hardware import get_accelerator
    from opt.models.sizes import ModelArgs
    from opt.plan.planner import Cluster, Job, evaluate
    from opt.plan.timing import EFFICIENCY

    args = ModelArgs(layers, heads, d_model, vocab_size=51200)
    dp = gpus // (8 * pp)
    job = Job(args, "custom", 2048, 2048 * dp * 2 * pp, 10**11)  # 2 * pp micro-batches of 1
    cluster = Cluster(get_accelerator("a100-80gb"), gpus, 8, EFFICIENCY["a100-80gb"])
    plain = evaluate(job, cluster, 8, pp, 1, "full", True, v=1, data_parallel="replicate")
    interleaved = evaluate(job, cluster, 8, pp, 1, "full", True, v=2, data_parallel="replicate")
    assert plain.fits and interleaved.fits, (plain.excluded, interleaved.excluded)
    assert interleaved.bubble < plain.bubble
    assert interleaved.step_s < plain.step_s


def test_checking_a_few_pipeline_ranks_finds_the_same_worst_rank(monkeypatch):
    """The planner checks the memory of the first, the last and the first rank of each stage
    shape; checking every rank gives the same per-GPU memory."""
    from opt.hardware import get_accelerator
    from opt.models.sizes import get_model_args
    from opt.plan import planner
    from opt.plan.timing import EFFICIENCY

    job = planner.Job(get_model_args("opt-175b"), "opt-175b", 2048, 2**21, 10**11)
    cluster = planner.Cluster(get_accelerator("a100-80gb"), 960, 8, EFFICIENCY["a100-80gb"])
    layouts = [(8, pp, mb, ac, sp, v, kind) for pp in (5, 12, 24) for mb in (1, 2)
               for ac in ("none", "full") for sp in (False, True) for v in (1, 2)
               for kind in ("fsdp", "replicate")]  # fmt: skip
    few = [planner.evaluate(job, cluster, *layout) for layout in layouts]
    monkeypatch.setattr(planner, "_ranks_to_check", lambda ranks: list(range(len(ranks))))
    every = [planner.evaluate(job, cluster, *layout) for layout in layouts]
    assert [c.memory for c in few] == [c.memory for c in every]
    assert any(c.memory for c in few)


@pytest.mark.slow
@pytest.mark.parametrize("wanted", ["fastest", "interleaved", "replicate"])
def test_a_written_config_is_accepted_by_the_trainer_unchanged(tmp_path, wanted):
    args = ["--model", "opt-1.3b", "--gpus", "16", "--gpu", "h100-80gb", "--tokens", "26B",
            "--global-batch", "1M"]  # fmt: skip
    candidates = _plan(*args, "--top", "5000")["candidates"]
    pick = 1 + next(i for i, c in enumerate(candidates) if wanted == "fastest"
                    or (wanted == "interleaved" and c["stages_per_rank"] > 1)
                    or (wanted == "replicate" and c["data_parallel"] == "replicate"))  # fmt: skip
    out = tmp_path / "planned.toml"
    result = run_cli("plan", *args, "--write-config", str(out), "--pick", str(pick))
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and "GiB/GPU" in result.stdout
    cfg = load_config(out)
    check_job(cfg, 16)
    chosen = candidates[pick - 1]
    assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.pp_stages_per_rank) == (
        chosen["tp"], chosen["pp"], chosen["stages_per_rank"])  # fmt: skip
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
    assert h100["efficiency"]["peak_fraction"] == pytest.approx(400.0 / 989.0)
    assert h100["efficiency"]["half_width"] == 0 and "calibrated" in h100["efficiency"]["fitted_on"]
    a100 = _plan(*args, "--gpu", "a100-80gb")
    assert "Megatron-LM" in a100["efficiency"]["fitted_on"]


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
    from opt.plan.timing import Efficiency

    tp, pp = layout.get("tp", 1), layout.get("pp", 1)
    flags = ["--train.micro_batch_size", "1", "--train.batch_tokens", str(batch_tokens)]
    for key, value in layout.items():
        flags += [f"--parallel.{key}", str(value)]
    cfg = load_config(f"configs/{model}.toml", flags)
    with pytest.raises(OptError) as refused:
        check_job(cfg, gpus)
    job = Job(resolve_model_args(cfg), model, cfg.data.seq_len, batch_tokens, 10**9)
    cluster = Cluster(get_accelerator("h100-80gb"), gpus, gpus, Efficiency(0.5, 0.0, "test"))
    candidate = evaluate(job, cluster, tp, pp, 1, "none", False)
    assert not candidate.fits and candidate.excluded == str(refused.value)
