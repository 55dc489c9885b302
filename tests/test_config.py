"""Config loading: TOML, overrides, precedence, errors; every shipped config is valid."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Literal

import pytest

from opt import config
from opt.config import JobConfig, load_config, parse_overrides, to_toml
from opt.errors import OptError
from opt.finetune.mixture import load_mixture
from opt.job import gradient_accumulation_steps, max_steps, resolve_model_args
from opt.models.sizes import get_model_args

CONFIGS_DIR = Path(__file__).parents[1] / "configs"
CONFIGS = sorted(CONFIGS_DIR.glob("*.toml"))
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
    assert {p.stem for p in CONFIGS} == set(PEAK_LR) | {"demo", "demo-unstable", "finetune-demo"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_load_and_follow_the_paper(path):
    cfg = load_config(path)
    args = resolve_model_args(cfg)
    assert gradient_accumulation_steps(cfg) >= 1
    if path.stem == "finetune-demo":  # the demo's weights, on the example mixture
        assert cfg.checkpoint.init_from == "checkpoints/demo/step_00000200"
        assert load_mixture(cfg.finetune.mixture).num_examples > 0
        return
    # Validation on the held-out split beside data.path (and at every save, by the rule).
    assert cfg.validation.enabled and cfg.validation.path is None
    if path.stem.startswith("demo"):
        assert cfg.validation.every == cfg.metrics.log_every
        return
    # The same 10 global batches every 1000 steps: forward only, about 0.3% of the compute.
    assert cfg.validation.every == 1000
    assert cfg.validation.tokens == 10 * cfg.train.batch_tokens
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
        (["--validation.every", "0"], "validation.every must be positive"),
        (["--validation.tokens", "-5"], r"validation.tokens must be positive, got -5 \(leave"),
        (["--validation.evry", "5"], "did you mean validation.every"),
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


# ----- the typed tree: Optional fields, the override API, TOML, choices, cross-field rules -----
def _leaves():
    """(section, name, FieldInfo) of every key in the tree."""
    for section, info in JobConfig.model_fields.items():
        for name, field in info.annotation.model_fields.items():
            yield section, name, field


def _literal_choices(field) -> tuple:
    annotation = field.annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    return typing.get_args(annotation) if typing.get_origin(annotation) is Literal else ()


LITERAL_KEYS = [(f"{s}.{n}", _literal_choices(f)) for s, n, f in _leaves() if _literal_choices(f)]


def test_every_key_is_documented():
    undocumented = [f"{s}.{n}" for s, n, f in _leaves() if not (f.description or "").strip()]
    assert undocumented == []


def test_unset_means_none_and_is_derived_where_it_is_read():
    cfg = load_config(None)
    assert (cfg.model.dropout, cfg.model.n_layers, cfg.model.n_heads) == (None, None, None)
    assert (cfg.model.d_model, cfg.model.vocab_size) == (None, None)
    assert (cfg.data.path, cfg.data.builtin, cfg.data.tokenizer) == (None, None, None)
    assert (cfg.train.max_steps, cfg.checkpoint.init_from) == (None, None)
    assert (cfg.metrics.peak_tflops, cfg.supervisor.drill) == (None, None)
    assert (cfg.validation.path, cfg.validation.tokens) == (None, None)  # derived, all of it
    slurm = cfg.slurm
    assert [slurm.partition, slurm.account, slurm.qos, slurm.exclude, slurm.nodelist, slurm.mem,
            slurm.tasks_per_node, slurm.cpus_per_task] == [None] * 8  # fmt: skip
    assert resolve_model_args(cfg) == get_model_args("opt-125m")  # every dimension kept
    assert max_steps(cfg) == cfg.schedule.decay_tokens // cfg.train.batch_tokens
    assert max_steps(cfg.with_overrides({"train.max_steps": 7})) == 7
    dropout = cfg.with_overrides({"model.dropout": 0.0, "model.n_layers": 3})
    assert resolve_model_args(dropout) == get_model_args("opt-125m").replace(n_layers=3, dropout=0)


def test_reshaped_keeps_what_is_none():
    size = get_model_args("opt-350m")
    assert size.reshaped() == size
    assert size.reshaped(None, None, None, None) == size
    wide = size.reshaped(n_layers=2, d_model=2048)
    assert (wide.n_layers, wide.n_heads, wide.d_model, wide.ffn_dim) == (2, 16, 2048, 8192)
    assert wide.word_embed_dim == 512  # 350M's projected embeddings stay projected


def test_an_empty_string_unsets_an_optional_key(tmp_path):
    demo = load_config(CONFIGS_DIR / "demo.toml")
    assert demo.supervisor.drill == "spike@120x2" and demo.data.builtin == "pydoc"
    cfg = load_config(CONFIGS_DIR / "demo.toml", ["--supervisor.drill", '""', "--data.builtin="])
    assert cfg.supervisor.drill is None and cfg.data.builtin is None
    assert cfg.with_overrides({"slurm.partition": ""}).slurm.partition is None
    assert demo.with_overrides({"supervisor.drill": None}).supervisor.drill is None


def test_sentinels_of_old_are_refused_with_the_way_out():
    for key, value in [("model.n_layers", 0), ("model.dropout", -1), ("train.max_steps", 0),
                       ("metrics.peak_tflops", 0), ("slurm.cpus_per_task", 0)]:  # fmt: skip
        with pytest.raises(OptError, match=rf"^{key} must .*got {value} \(leave {key} out"):
            load_config(None, [f"--{key}", str(value)])


def test_with_overrides_returns_a_validated_copy():
    base = load_config(None)
    cfg = base.with_overrides({"optim.lr": 1, "schedule.warmup_tokens": 3e8, "slurm.mem": 0,
                               "parallel.tp": 2, "parallel.sequence_parallel": True})  # fmt: skip
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.schedule.warmup_tokens == 300_000_000 and isinstance(cfg.schedule.warmup_tokens, int)
    assert cfg.slurm.mem == "0" and cfg.parallel.sequence_parallel
    assert base == JobConfig() and base.optim.lr == 6e-4  # the original is untouched
    assert cfg.with_overrides({}) == cfg
    for values, message in [
        ({"optim.lrr": 1}, r"^unknown config key 'optim.lrr' \(did you mean optim.lr\?\)$"),
        ({"optim.lr": "1e-3"}, r"^config key optim.lr must be float, got '1e-3'$"),
        ({"train.micro_batch_size": True}, "config key train.micro_batch_size must be int"),
        ({"parallel.sequence_parallel": True}, "sequence_parallel needs parallel.tp > 1"),
        ({"lr": 1}, "expected section.key"),
        ({"optim.lr.x": 1}, "'lr' is not a section"),
    ]:
        with pytest.raises(OptError, match=message):
            base.with_overrides(values)


def test_values_sit_between_the_file_and_the_command_line(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[optim]\nlr = 1e-3\neps = 1e-6\n[train]\nprecision = "bf16"\n')
    cfg = load_config(path, ["--optim.lr", "3e-4"], values={"optim.lr": 2e-4, "optim.eps": 1e-7})
    assert cfg.optim.lr == 3e-4  # command line over values
    assert cfg.optim.eps == 1e-7  # values over the file
    assert cfg.train.precision == "bf16" and cfg.optim.weight_decay == 0.1  # file, default


def test_round_trip_leaves_unset_keys_out(tmp_path):
    cfg = load_config(
        None,
        ["--model.n_layers", "3", "--train.max_steps", "9", "--slurm.mem", "0",
         "--supervisor.drill", "nan@5x2!", "--run.name", 'a "b" \\c'],
    )  # fmt: skip
    text = to_toml(cfg)
    assert "n_layers = 3" in text and "max_steps = 9" in text and 'mem = "0"' in text
    for unset in ("n_heads", "dropout", "init_from", "peak_tflops", "partition", "tokenizer"):
        assert f"{unset} =" not in text
    path = tmp_path / "resolved.toml"
    path.write_text(text)
    again = load_config(path)
    assert again == cfg and again.model.n_heads is None and again.slurm.mem == "0"
    assert to_toml(again) == text


@pytest.mark.parametrize(("key", "choices"), LITERAL_KEYS, ids=[k for k, _ in LITERAL_KEYS])
def test_every_choice_refuses_what_it_does_not_list(key, choices):
    with pytest.raises(OptError) as refused:
        load_config(None, [f"--{key}", "bogus"])
    message = str(refused.value)
    assert message.startswith(f"{key} must be ") and message.endswith("got 'bogus'")
    assert all(choice in message for choice in choices)
    with pytest.raises(OptError, match=f"{key} must be"):
        load_config(None, [f"--{key}", "3"])  # a number is not a choice either


def test_the_choices_are_declared_once_and_exported():
    keys = dict(LITERAL_KEYS)
    assert keys["train.precision"] == config.PRECISIONS == ("fp32", "bf16", "fp16")
    assert keys["train.compile"] == config.COMPILE
    assert keys["train.attention"] == config.ATTENTION
    assert keys["train.cpu_bf16_compute"] == config.CPU_BF16_COMPUTE
    assert keys["parallel.pp_schedule"] == config.PP_SCHEDULES
    assert keys["parallel.activation_checkpoint"] == config.ACTIVATION_CHECKPOINT
    assert keys["data.builtin"] == config.BUILTIN_CORPORA
    assert set(keys) >= {"train.device", "slurm.signal"}
    assert "reset_optimizer" in config.LADDER_MOVES and config.DRILL_KINDS[0] == "spike"
    assert config.DRILL.match("scale_collapse@10x3!").groups() == ("scale_collapse", "10", "3", "!")
    for value in config.PRECISIONS:  # and each listed one is accepted
        assert load_config(None, ["--train.precision", value]).train.precision == value


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--supervisor.drill", "scale_collapse@10"], "needs train.precision=fp16"),
        (["--supervisor.drill", "spike@"], "supervisor.drill must be KIND@STEP"),
        (["--supervisor.ladder", "[]"], "supervisor.ladder must have at least one rung"),
        (["--supervisor.ladder", '["skip", "jump"]'], "rung 'jump': unknown move 'jump'"),
        (["--supervisor.ladder", '["reset_optimizer"]'], "reset_optimizer needs rollback"),
        (["--supervisor.lr_factor", "1.5"], r"lr_factor must be within \(0, 1\], got 1.5"),
        (["--schedule.min_lr_ratio", "-0.1"], r"min_lr_ratio must be within \[0, 1\]"),
        (["--slurm.gpus_per_node", "0"], "needs slurm.tasks_per_node"),
        (["--slurm.tasks_per_node", "4"], "tasks_per_node=4 but gpus_per_node=8"),
        (["--slurm.signal_delay_s", "60", "--slurm.time_minutes", "1"], "shorter than"),
        (
            ["--parallel.pp_schedule", "gpipe", "--parallel.pp_stages_per_rank", "2"],
            "pp_schedule=gpipe runs one stage per rank",
        ),
    ],
)
def test_cross_field_rules(overrides, message):
    with pytest.raises(OptError, match=message):
        load_config(None, overrides)


def test_cross_field_rules_accept_what_fits():
    cfg = load_config(
        None,
        ["--supervisor.drill", "scale_collapse@10", "--train.precision", "fp16",
         "--slurm.gpus_per_node", "0", "--slurm.tasks_per_node", "4",
         "--supervisor.ladder", '["rollback+skip_data", "stop"]'],
    )  # fmt: skip
    assert cfg.slurm.tasks_per_node == 4 and cfg.supervisor.ladder[0] == "rollback+skip_data"
    same = load_config(None, ["--slurm.gpus_per_node", "4", "--slurm.tasks_per_node", "4"])
    assert same.slurm.tasks_per_node == 4


def test_types_are_strict_beyond_the_toml_conversions(tmp_path):
    path = tmp_path / "c.toml"
    for line, message in [
        ('[optim]\nlr = "1e-3"', "optim.lr must be float, got '1e-3'"),
        ("[data]\nprefetch = 1", "data.prefetch must be bool, got 1"),
        ("[train]\nmax_steps = 2.5", "train.max_steps must be int, got 2.5"),
        ("[run]\nname = 1.5", "run.name must be str, got 1.5"),
        ("optim = 3", "config section optim must be a table, got 3"),
        ("[slurm]\nsbatch = 'x'", "slurm.sbatch must be list"),
    ]:
        path.write_text(line)
        with pytest.raises(OptError, match=message):
            load_config(path)


def test_sections_check_assignments_too():
    cfg = load_config(None)
    cfg.checkpoint.async_save = False  # the benchmarks flip switches like this
    with pytest.raises(ValueError, match="Input should be"):
        cfg.train.precision = "fp8"


def test_a_resolved_config_written_before_optional_fields_still_loads(tmp_path):
    """Run directories, Slurm job snapshots and checkpoints of runs still going hold configs
    resolved by the old writer, with 0 or -1 for "not set": a requeued job must start."""
    old = tmp_path / "config.toml"
    old.write_text(
        '[model]\nname = "opt-125m"\ndropout = -1.0\nn_layers = 0\nn_heads = 0\nd_model = 0\n'
        'vocab_size = 0\n[data]\npath = ""\nbuiltin = ""\ntokenizer = ""\n'
        '[train]\nmax_steps = 0\n[metrics]\npeak_tflops = 0.0\n[checkpoint]\ninit_from = ""\n'
        '[supervisor]\ndrill = ""\n[slurm]\ntasks_per_node = 0\ncpus_per_task = 0\n'
        'partition = ""\nmem = ""\n'
    )
    cfg = load_config(old)
    assert cfg == load_config(None, ["--model.name", "opt-125m"])
    # Typed anew on the command line, the same values are still refused, with the hint.
    with pytest.raises(OptError, match=r"leave model\.n_layers out"):
        load_config(None, ["--model.n_layers", "0"])
