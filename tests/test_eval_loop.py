"""Downstream evals in the training loop (``[downstream]``): the event in the logbook, the
scalars in TensorBoard, status.json, the same numbers `opt eval` gives the checkpoint, and
training untouched (bitwise the same losses as without), and bad config refused at start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import REPO, TINY_OVERRIDES, run_cli, toml_value

from opt.config import load_config
from opt.errors import OptError
from opt.run.logbook.describe import describe
from opt.run.logbook.events import DownstreamEval, TaskAccuracy
from opt.run.logbook.store import read_events

DATA = REPO / "tests" / "data" / "eval"
TASKS = ["rte", "cb"]


def _args(tmp_path: Path, dataset: Path, name: str, **extra) -> list[str]:
    values = {
        **TINY_OVERRIDES,
        "model.dropout": 0.1,  # dropout draws from the RNG: an eval must leave it alone
        "metrics.tensorboard": True,
        "data.path": str(dataset),
        "run.dir": str(tmp_path / "runs"),
        "checkpoint.dir": str(tmp_path / "checkpoints"),
        "logbook.dir": str(tmp_path / "logbook"),
        "run.name": name,
        "train.max_steps": 6,
        "checkpoint.every": 4,
        "validation.every": 3,
        **extra,
    }
    args = ["train", "configs/demo.toml"]
    for key, value in values.items():
        args += [f"--{key}", toml_value(value)]
    return args


def _training_record(run_dir: Path) -> dict[int, tuple]:
    """Every logged step's loss, gradient norm, LR and activation RMS, and every held-out
    loss, from metrics.jsonl (not throughput: that is wall-clock)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = (r["loss"], r["grad_norm"], r["lr"], r["activation_rms"])
        else:
            out[("val", r["step"])] = r["val_loss"]
    return out


@pytest.mark.slow
def test_downstream_evals_in_the_loop(tmp_path, pydoc_dataset):
    downstream = {
        "downstream.tasks": TASKS,
        "downstream.data": str(DATA),
        "downstream.every_steps": 3,
        "downstream.limit": 5,
    }
    on = run_cli(*_args(tmp_path, pydoc_dataset, "with", **downstream), timeout=400)
    assert on.returncode == 0, on.stderr[-3000:]
    off = run_cli(*_args(tmp_path, pydoc_dataset, "without"), timeout=400)
    assert off.returncode == 0, off.stderr[-3000:]

    # Training is untouched: the same losses, bit for bit (dropout on).
    with_run, without_run = tmp_path / "runs" / "with", tmp_path / "runs" / "without"
    record = _training_record(with_run)
    assert sorted(k for k in record if isinstance(k, int)) == list(range(1, 7))
    assert record == _training_record(without_run)

    # Every 3 steps and after the step-4 checkpoint: steps 3, 4 and 6 (6 is both).
    events = [e for e in read_events(tmp_path / "logbook" / "with" / "events.jsonl")
              if isinstance(e, DownstreamEval)]  # fmt: skip
    assert [e.step for e in events] == [3, 4, 6]
    for e in events:
        assert list(e.tasks) == TASKS and e.split == "validation" and e.shots == 0
        for t in e.tasks.values():
            assert t.examples == 5 and t.prompts > 1
            assert 0 <= t.min <= t.median <= t.max <= 1 and 0 <= t.iqr <= t.max - t.min
    without = read_events(tmp_path / "logbook" / "without" / "events.jsonl")
    assert not any(isinstance(e, DownstreamEval) for e in without)
    assert (
        "downstream accuracy (validation, 0-shot"
        in (tmp_path / "logbook" / "with" / "LOGBOOK.md").read_text()
    )
    assert "downstream median acc | rte" in on.stdout

    # The numbers are those `opt eval` gives the step-4 checkpoint: the current weights, in
    # eval mode.
    out = tmp_path / "eval"
    result = run_cli("eval", str(tmp_path / "checkpoints" / "with" / "step_00000004"),
                     "--tasks", ",".join(TASKS), "--data", str(DATA), "--limit", "5",
                     "--out", str(out), timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    offline = json.loads((out / "results.json").read_text())["tasks"]
    at4 = events[1]
    for name in TASKS:
        acc = offline[name]["acc"]
        assert (at4.tasks[name].median, at4.tasks[name].iqr) == (acc["median"], acc["iqr"])
        assert (at4.tasks[name].min, at4.tasks[name].max) == (acc["min"], acc["max"])

    # TensorBoard: the four statistics per task at each evaluation.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(with_run / "tensorboard"))
    acc.Reload()
    for name in TASKS:
        for stat in ("median", "iqr", "min", "max"):
            scalars = acc.Scalars(f"downstream/{name}/{stat}_acc")
            assert [s.step for s in scalars] == [3, 4, 6]
            want = [getattr(e.tasks[name], stat) for e in events]
            assert [s.value for s in scalars] == pytest.approx(want, abs=1e-6)  # float32

    # status.json: the last evaluation.
    status = json.loads((with_run / "status.json").read_text())
    assert status["downstream"]["step"] == 6
    assert status["downstream"]["tasks"] == {
        name: events[-1].tasks[name].model_dump() for name in TASKS
    }
    assert "downstream" not in json.loads((without_run / "status.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"downstream.tasks": ["rte", "boolq"], "downstream.data": str(DATA)},
         "downstream.tasks: unknown task 'boolq'"),
        ({"downstream.tasks": ["rte"], "downstream.data": "/nonexistent/eval"},
         "downstream.data: no such folder: /nonexistent/eval"),
        ({"downstream.tasks": ["rte"], "downstream.data": str(DATA), "downstream.split": "test"},
         "downstream: no 'test' split for task 'rte'"),
        ({"downstream.tasks": ["rte"]}, "downstream.tasks needs downstream.data"),
    ],
)  # fmt: skip
def test_bad_downstream_config_is_one_line_and_exit_2(tmp_path, pydoc_dataset, extra, message):
    result = run_cli(*_args(tmp_path, pydoc_dataset, "bad", **extra), timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "runs" / "bad").exists()  # refused before anything started


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"downstream.tasks": ["rte", "rte"], "downstream.data": "d"}, "names a task twice"),
        ({"downstream.tasks": ["rte"], "downstream.data": "d", "downstream.every_steps": 0,
          "downstream.at_checkpoints": False}, "never evaluated"),
        ({"downstream.tasks": ["rte", "cb"], "downstream.data": "d",
          "downstream.prompts": "GPT-3 style"}, "templates of one task"),
        ({"downstream.every_steps": -1}, "downstream.every_steps"),
        ({"downstream.limit": 0}, "downstream.limit"),
    ],
)  # fmt: skip
def test_downstream_config_is_checked(values, message):
    with pytest.raises(OptError, match=message):
        load_config(None, values=values)


def test_pipeline_and_sequence_parallel_layouts_are_refused_and_user_tasks_accepted(tmp_path):
    from opt.train.downstream import plan_downstream

    cfg = load_config(None, values={"downstream.tasks": ["rte"], "downstream.data": str(DATA)})
    for tp, pp, sp in [(1, 2, False), (2, 1, True)]:
        with pytest.raises(OptError, match="not supported with pipeline or sequence"):
            plan_downstream(cfg.downstream, tp, pp, sp)
    assert plan_downstream(cfg.downstream, 2, 1, False) is not None  # tensor parallel is fine
    templates = REPO / "tests" / "data" / "finetune" / "sentiment" / "templates.yaml"
    mine = load_config(None, values={"downstream.tasks": [f"sentiment={templates}"],
                                     "downstream.data": str(REPO / "tests" / "data" / "finetune"),
                                     "downstream.split": "train"})  # fmt: skip
    plan = plan_downstream(mine.downstream, 1, 1)
    assert [t.name for t in plan.spec.tasks] == ["sentiment"]


def test_the_event_reads_in_the_logbook():
    e = DownstreamEval(
        step=40, split="validation", shots=0, seconds=1.5,
        tasks={"rte": TaskAccuracy(median=0.5, iqr=0.1, min=0.4, max=0.7, prompts=10,
                                   examples=64)},
    )  # fmt: skip
    assert describe(e) == (
        "downstream accuracy (validation, 0-shot, median over prompts): rte 50.0% "
        "(IQR 10.0%, 40.0%-70.0%, 10 prompts x 64 examples)"
    )


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["dp2", "tp2"])
def test_two_ranks_score_the_examples_as_one_process(tmp_path, pydoc_dataset, layout):
    """FSDP over two ranks: each scores half the requests on gathered parameters; two
    tensor-parallel ranks: both score every request on their halves of the model, the
    logits gathered over the vocabulary at the scored positions. The numbers are those one
    process gets from the checkpoint with `opt eval`, and the training losses are bitwise
    those of the same run without downstream evals."""
    split = {"parallel.tp": 2} if layout == "tp2" else {}
    args = _args(tmp_path, pydoc_dataset, layout, **{
        "downstream.tasks": TASKS, "downstream.data": str(DATA), "downstream.limit": 5,
        "train.max_steps": 4, "parallel.timeout_s": 120.0, **split,
    })[2:]  # fmt: skip
    result = run_cli("launch", "local", "--nproc", "2", "configs/demo.toml", *args, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    plain = _args(tmp_path, pydoc_dataset, f"{layout}-plain", **{
        "train.max_steps": 4, "parallel.timeout_s": 120.0, **split,
    })[2:]  # fmt: skip
    result = run_cli("launch", "local", "--nproc", "2", "configs/demo.toml", *plain, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = tmp_path / "runs"
    assert _training_record(runs / layout) == _training_record(runs / f"{layout}-plain")
    events = [e for e in read_events(tmp_path / "logbook" / layout / "events.jsonl")
              if isinstance(e, DownstreamEval)]  # fmt: skip
    assert [e.step for e in events] == [4]  # the checkpoint only (every_steps = 0)
    out = tmp_path / "eval"
    one = run_cli("eval", str(tmp_path / "checkpoints" / layout / "step_00000004"),
                  "--tasks", ",".join(TASKS), "--data", str(DATA), "--limit", "5",
                  "--out", str(out), timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    offline = json.loads((out / "results.json").read_text())["tasks"]
    for name in TASKS:
        acc, got = offline[name]["acc"], events[0].tasks[name]
        assert (got.median, got.iqr, got.min, got.max) == (
            acc["median"],
            acc["iqr"],
            acc["min"],
            acc["max"],
        )
