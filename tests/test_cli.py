"""The `opt` command as a user runs it: help, configs, train/resume, score, and bad input."""

from __future__ import annotations

import json

import pytest
from helpers import TINY_OVERRIDES, run_cli, toml_value

from opt.models.model import count_parameters
from opt.models.sizes import MODEL_SIZES


def _train_args(tmp_path, dataset, **extra) -> list[str]:
    values = {
        **TINY_OVERRIDES,
        "data.path": str(dataset),
        "run.dir": str(tmp_path / "runs"),
        "checkpoint.dir": str(tmp_path / "checkpoints"),
        "logbook.dir": str(tmp_path / "logbook"),
        "run.name": "cli",
        **{k.replace("__", "."): v for k, v in extra.items()},
    }
    args = ["train", "configs/demo.toml"]
    for key, value in values.items():
        args += [f"--{key}", toml_value(value)]
    return args


@pytest.mark.parametrize("command", [[], ["configs"], ["data"], ["train"], ["convert"], ["score"]])
def test_help_everywhere(command):
    result = run_cli(*command, "--help")
    assert result.returncode == 0 and "usage: opt" in result.stdout


@pytest.mark.slow
def test_configs_prints_exact_counts_of_every_size():
    result = run_cli("configs")
    assert result.returncode == 0
    for name, args in MODEL_SIZES.items():
        line = next(ln for ln in result.stdout.splitlines() if ln.startswith(name + " "))
        assert f"{count_parameters(args):,}" in line
    assert "174,604,468,224" in result.stdout
    rows = json.loads(run_cli("configs", "--json").stdout)
    assert {r["name"]: r["params"] for r in rows}["opt-350m"] == 331_196_416


@pytest.mark.slow
def test_train_resume_and_score_end_to_end(tmp_path, pydoc_dataset):
    first = run_cli(*_train_args(tmp_path, pydoc_dataset, train__max_steps=3, checkpoint__every=3))
    assert first.returncode == 0, first.stderr
    assert "step       3 | loss" in first.stdout and "MFU" in first.stdout
    second = run_cli(*_train_args(tmp_path, pydoc_dataset), "--resume", "auto", "--max-steps", "5")
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout and "step_00000003" in second.stdout
    assert "step       4 | loss" in second.stdout and "step       3 | loss" not in second.stdout
    assert "step       3 | val_loss" in second.stdout  # evaluated again at the resume
    checkpoint = tmp_path / "checkpoints" / "cli" / "step_00000005"
    assert checkpoint.is_dir()

    scored = run_cli("score", str(checkpoint), "--text", "def main():\n    return None")
    assert scored.returncode == 0, scored.stderr
    report = json.loads(scored.stdout)
    assert report["n_tokens"] == len(report["losses"]) == len(report["tokens"]) > 3
    assert report["mean_loss"] == pytest.approx(sum(report["losses"]) / report["n_tokens"])
    assert "".join(report["tokens"]) == "def main():\n    return None"

    text_file = tmp_path / "t.txt"
    text_file.write_text("def main():\n    return None")
    from_file = json.loads(run_cli("score", str(checkpoint), "--file", str(text_file)).stdout)
    assert from_file["losses"] == report["losses"]


def _assert_clean_failure(result, message: str, tmp_path) -> None:
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "runs").exists()  # nothing written
    assert not list((tmp_path / "checkpoints").glob("cli/step_*"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"model.name": "opt-7b"}, "unknown model size 'opt-7b'"),
        ({"model.n_heads": 5}, "n_heads=5 does not divide d_model=64"),
        ({"data.path": "/nonexistent/corpus/train", "data.builtin": ""}, "dataset not found"),
        ({"optim.lrr": 1e-3}, "unknown config key 'optim.lrr'"),
        ({"train.precision": "fp8"}, "train.precision must be one of"),
    ],
)
def test_bad_training_input_gets_one_line_and_writes_nothing(
    tmp_path, pydoc_dataset, extra, message
):
    result = run_cli(*_train_args(tmp_path, pydoc_dataset, **extra))
    _assert_clean_failure(result, message, tmp_path)


@pytest.mark.slow
def test_missing_config_file_and_corrupt_checkpoint(tmp_path, pydoc_dataset):
    result = run_cli("train", str(tmp_path / "nope.toml"))
    assert result.returncode == 2 and "config file not found" in result.stderr

    # Without the supervised run's step-0 checkpoint, the corrupt one is the only one.
    no_initial = {"checkpoint__initial": False}
    first = run_cli(*_train_args(tmp_path, pydoc_dataset, train__max_steps=1, checkpoint__every=1,
                                 **no_initial))  # fmt: skip
    assert first.returncode == 0, first.stderr
    checkpoint = tmp_path / "checkpoints" / "cli" / "step_00000001"
    shard = next(checkpoint.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    resumed = run_cli(*_train_args(tmp_path, pydoc_dataset, train__max_steps=2, **no_initial))
    assert resumed.returncode == 2
    assert resumed.stderr.strip().startswith("error: no complete checkpoint")
    assert "fails its checksum" in resumed.stderr and resumed.stderr.count("\n") == 1
    assert not (checkpoint.parent / "step_00000002").exists()
    set_aside = checkpoint.with_name(checkpoint.name + ".corrupt")  # kept, never resumed
    scored = run_cli("score", str(set_aside), "--text", "x")
    assert scored.returncode == 2 and "fails its checksum" in scored.stderr
    missing = run_cli("score", str(tmp_path / "nope"), "--text", "x")
    assert missing.returncode == 2 and "checkpoint not found" in missing.stderr
