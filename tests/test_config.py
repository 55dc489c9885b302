"""Config loading: TOML, overrides, precedence, errors; every shipped config is valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from opt.config import JobConfig, load_config, parse_overrides, to_toml
from opt.errors import OptError
from opt.job import gradient_accumulation_steps, resolve_model_args
from opt.models.sizes import get_model_args

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.toml"))
PEAK_LR = {  # OPT paper, table 1
    "opt-125m": 6.0e-4,
    "opt-350m": 3.0e-4,
    "opt-1.3b": 2.0e-4,
    "opt-2.7b": 1.6e-4,
    "opt-6.7b": 1.2e-4,
    "opt-13b": 1.0e-4,
    "opt-30b": 1.0e-4,
    "opt-66b": 0.8e-4,
    "opt-175b": 1.2e-4,
}
BATCH_TOKENS_M = {"opt-125m": 0.5, "opt-350m": 0.5, "opt-1.3b": 1, "opt-2.7b": 1,
                  "opt-6.7b": 2, "opt-13b": 4, "opt-30b": 4, "opt-66b": 2, "opt-175b": 2}  # fmt: skip


def test_there_is_a_config_per_size_and_a_demo():
    assert {p.stem for p in CONFIGS} == set(PEAK_LR) | {"demo"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_load_and_follow_the_paper(path):
    cfg = load_config(path)
    args = resolve_model_args(cfg)
    assert gradient_accumulation_steps(cfg) >= 1
    if path.stem == "demo":
        return
    assert cfg.model.name == path.stem and args == get_model_args(path.stem)
    assert cfg.optim.lr == PEAK_LR[path.stem]
    assert cfg.train.batch_tokens == BATCH_TOKENS_M[path.stem] * 2**20
    assert (cfg.optim.betas, cfg.optim.eps, cfg.optim.weight_decay) == ([0.9, 0.95], 1e-8, 0.1)
    assert cfg.schedule.decay_tokens == 300_000_000_000 and cfg.schedule.min_lr_ratio == 0.1
    warmup = 2000 * cfg.train.batch_tokens if path.stem == "opt-175b" else 375_000_000
    assert cfg.schedule.warmup_tokens == warmup
    assert cfg.data.seq_len == 2048 and cfg.optim.grad_clip == 1.0


def test_overrides_beat_the_file_which_beats_the_defaults(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[optim]\nlr = 1e-3\nweight_decay = 0.0\n[train]\nprecision = "bf16"\n')
    cfg = load_config(path, ["--optim.lr", "3e-4", "--train.max_steps=7"])
    assert cfg.optim.lr == 3e-4  # override
    assert cfg.optim.weight_decay == 0.0 and cfg.train.precision == "bf16"  # file
    assert cfg.optim.eps == 1e-8  # default
    assert cfg.train.max_steps == 7


def test_values_are_parsed_as_toml_and_coerced_to_the_field_type():
    assert parse_overrides(["--a.b", "[1, 2]", "--a.c=true", "--a.d", "hello"]) == [
        ("a.b", [1, 2]),
        ("a.c", True),
        ("a.d", "hello"),
    ]
    cfg = load_config(None, ["--optim.lr", "1", "--schedule.warmup_tokens", "3e8"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.schedule.warmup_tokens == 300_000_000 and isinstance(cfg.schedule.warmup_tokens, int)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--optim.lrr", "1e-3"], r"unknown config key 'optim.lrr'.*did you mean optim.lr"),
        (["--optimizer.lr", "1e-3"], "unknown config key 'optimizer'"),
        (["--optim.lr", "fast"], "optim.lr must be float"),
        (["--train.precision", "fp8"], "train.precision must be one of"),
        (["--train.micro_batch_size", "0"], "must be positive"),
        (["--optim.betas", "[0.9]"], "two values"),
        (["optim.lr", "1"], "expected a --section.key override"),
        (["--optim.lr"], "has no value"),
    ],
)
def test_bad_config_input_is_refused_with_one_clear_line(overrides, message):
    with pytest.raises(OptError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--parallel.pp_schedule", "zigzag"], "pp_schedule must be one of 1f1b, interleaved_1f1b"),
        (["--parallel.activation_checkpoint", "some"], "activation_checkpoint must be one of"),
        (["--parallel.pp_schedule", "interleaved_1f1b"], "needs pp_stages_per_rank >= 2"),
        (["--parallel.pp_stages_per_rank", "2"], "pp_schedule=1f1b runs one stage per rank"),
        (["--parallel.pp_stages_per_rank", "0"], "pp_stages_per_rank must be at least 1"),
        (["--parallel.sequence_parallel", "true"], "sequence_parallel needs parallel.tp > 1"),
        (["--parallel.timeout_s", "0"], "timeout_s must be positive"),
        (["--parallel.tp", "two"], "parallel.tp must be int"),
    ],
)
def test_bad_parallel_settings_are_refused(overrides, message):
    with pytest.raises(OptError, match=message):
        load_config(None, overrides)


def test_good_parallel_settings_are_accepted():
    cfg = load_config(
        None,
        ["--parallel.pp", "4", "--parallel.pp_schedule", "interleaved_1f1b",
         "--parallel.pp_stages_per_rank", "3", "--parallel.tp", "2",
         "--parallel.sequence_parallel", "true", "--parallel.activation_checkpoint", "selective"],
    )  # fmt: skip
    par = cfg.parallel
    assert (par.pp, par.pp_stages_per_rank, par.tp, par.sequence_parallel) == (4, 3, 2, True)
    assert par.activation_checkpoint == "selective" and par.dp_shard == -1


def test_missing_and_malformed_files_are_refused(tmp_path):
    with pytest.raises(OptError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim\nlr = 1")
    with pytest.raises(OptError, match="not valid TOML"):
        load_config(bad)


def test_custom_shape_overrides_are_validated():
    cfg = load_config(None, ["--model.d_model", "96", "--model.n_heads", "4"])
    args = resolve_model_args(cfg)
    assert (args.d_model, args.ffn_dim, args.head_dim) == (96, 384, 24)
    with pytest.raises(OptError, match="exceeds opt-tiny's max_positions=512"):
        resolve_model_args(load_config(None, ["--model.name", "opt-tiny"]))
    with pytest.raises(OptError, match="does not divide"):
        resolve_model_args(load_config(None, ["--model.n_heads", "5"]))
    with pytest.raises(OptError, match="unknown model size"):
        resolve_model_args(load_config(None, ["--model.name", "opt-7b"]))


def test_resolved_toml_round_trips(tmp_path):
    cfg = load_config(None, ["--run.name", 'we"ird', "--optim.betas", "[0.8, 0.9]"])
    path = tmp_path / "resolved.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg
    assert load_config(None) == JobConfig()
