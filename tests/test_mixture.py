"""Weighted mixtures of prepared datasets (``[[data.sources]]``): exact proportions, one
dataset's order unchanged, resume/skip semantics, per-source validation and epochs.

The proportions are checked by counting what the stream actually yields, never through
the formula that makes it; the end-to-end runs go through `opt data prepare` and
`opt train` in new processes, as users run them.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import pytest
from helpers import REPO, TINY_OVERRIDES, metrics_losses, run_cli

from opt.config import load_config, to_toml
from opt.data.blend import MAX_PERIOD, BlendedStream, BlendSource, integer_weights
from opt.data.dataset import TokenDataset
from opt.data.sampler import SampleStream
from opt.errors import OptError


def drawn_counts(stream: BlendedStream, n: int) -> list[list[int]]:
    """After each of ``n`` draws, how many each source has had (counted, not computed)."""
    counts, out = [0] * len(stream.sources), []
    for source, _ in stream.next_samples(n):
        counts[source] += 1
        out.append(list(counts))
    return out


@pytest.mark.parametrize(
    "weights", [(0.5, 0.3, 0.2), (3e9, 1e9), (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0), (0.9, 0.07, 0.03)]
)
def test_every_prefix_of_the_stream_is_within_one_sample_of_the_weights(weights) -> None:
    sources = [BlendSource(f"s{i}", 50 + 7 * i, w) for i, w in enumerate(weights)]
    stream = BlendedStream(sources, seed=0)
    total = sum(Fraction(repr(w)) for w in weights)
    shares = [Fraction(repr(w)) / total for w in weights]
    for p, counts in enumerate(drawn_counts(stream, 3000), start=1):
        for count, share in zip(counts, shares, strict=True):
            assert abs(count - share * p) < 1, (p, counts)
    period = stream.blend.period  # at the end of every period the counts are exact
    exact = drawn_counts(BlendedStream(sources, seed=0), 3 * period)[3 * period - 1]
    assert exact == [int(3 * period * s) for s in shares]


def test_weights_without_a_short_exact_period_are_rounded_to_a_fine_grid() -> None:
    weights = [1 / 3, 1 / 7, 0.5]  # floats whose exact ratios need a huge period
    ints = integer_weights(weights)
    assert sum(ints) == MAX_PERIOD
    for w, n in zip(weights, ints, strict=True):
        assert abs(n / MAX_PERIOD - w / sum(weights)) <= 1 / MAX_PERIOD
    assert integer_weights([0.7, 0.3]) == [7, 3]
    assert integer_weights([2.0, 6.0]) == [1, 3]
    with pytest.raises(OptError, match="positive and finite"):
        integer_weights([1.0, 0.0])


def test_one_unnamed_source_is_the_single_dataset_stream(tmp_path: Path) -> None:
    lone = BlendedStream([BlendSource(None, 37)], seed=5)
    reference = SampleStream(37, seed=5)
    for stream in (lone, reference):
        stream.skip(10, 20)
        stream.skip(60, 61)
    got = [i for _, i in lone.next_samples(100)]
    assert got == reference.next_indices(100)
    assert lone.state_dict() == reference.state_dict()  # old checkpoints read alike


def test_resume_and_skips_never_shift_what_other_positions_read() -> None:
    sources = [BlendSource("a", 23, 0.6), BlendSource("b", 11, 0.4)]
    whole = BlendedStream(sources, seed=3).next_samples(200)
    first = BlendedStream(sources, seed=3)
    part = first.next_samples(77)
    resumed = BlendedStream(sources, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert part + resumed.next_samples(123) == whole
    skipping = BlendedStream(sources, seed=3)
    skipping.skip(40, 90)
    assert skipping.next_samples(150) == whole[:40] + whole[90:200]
    assert skipping.consumed() == BlendedStream(sources, seed=3).blend.consumed(200)


def test_each_source_keeps_its_own_order_whatever_the_mixture() -> None:
    a, b = BlendSource("a", 40, 1.0), BlendSource("b", 30, 1.0)

    def order_of(stream: BlendedStream, name: str, n: int) -> list[int]:
        index = stream.names.index(name)
        return [i for s, i in stream.next_samples(n) if s == index]

    assert order_of(BlendedStream([a, b], 0), "a", 100) == order_of(
        BlendedStream([b, a], 0), "a", 100
    )
    heavy = BlendedStream([BlendSource("a", 40, 9.0), b], 0)
    assert order_of(heavy, "a", 150)[:50] == order_of(BlendedStream([a, b], 0), "a", 100)[:50]


def test_a_state_for_another_mixture_is_refused() -> None:
    saved = BlendedStream([BlendSource("a", 23, 0.6), BlendSource("b", 11, 0.4)], 3)
    for other in (
        [BlendSource("a", 23, 0.5), BlendSource("b", 11, 0.5)],  # weights
        [BlendSource("a", 23, 0.6), BlendSource("c", 11, 0.4)],  # a source
        [BlendSource("a", 24, 0.6), BlendSource("b", 11, 0.4)],  # a size
    ):
        with pytest.raises(OptError, match="mixture changed under a resume"):
            BlendedStream(other, 3).load_state_dict(saved.state_dict())


def test_epochs_count_every_draw_of_each_source() -> None:
    stream = BlendedStream([BlendSource("big", 100, 0.5), BlendSource("small", 10, 0.5)], 0)
    stream.skip(0, 20)
    stream.next_samples(20)  # 40 positions: 20 per source, skipped ones included
    assert stream.epochs() == {"big": 0.2, "small": 2.0}


def test_config_refuses_mixed_or_ambiguous_sources() -> None:
    def sources(*items: dict) -> None:
        load_config(None, values={"data.sources": list(items)})

    sources({"path": "x/a", "weight": 1.0}, {"path": "y/b", "weight": 2.0})
    with pytest.raises(OptError, match="weight or tokens"):
        sources({"path": "x/a", "weight": 1.0, "tokens": 10})
    with pytest.raises(OptError, match="every one tokens"):
        sources({"path": "x/a", "weight": 1.0}, {"path": "y/b", "tokens": 10})
    with pytest.raises(OptError, match="distinct names"):
        sources({"path": "x/a", "weight": 1.0}, {"path": "y/a", "weight": 1.0})
    named = load_config(None, values={"data.sources": [
        {"path": "data/cc/train", "weight": 1.0}, {"path": "data/books", "weight": 1.0}]})  # fmt: skip
    assert [s.label for s in named.data.sources] == ["cc", "books"]
    with pytest.raises(OptError, match=r"replaces data\.path"):
        load_config(None, values={"data.path": "p", "data.sources": [{"path": "a", "weight": 1}]})


# ----- end to end: prepared sources, `opt train` in new processes ---------------------------
@pytest.fixture(scope="module")
def three_sources(tmp_path_factory, pydoc_dataset: Path) -> dict[str, Path]:
    """The pydoc corpus cut into three sources of different sizes, each prepared through
    the CLI with a held-out split, except "code", which has none."""
    from opt.data.corpus import builtin_documents

    root = tmp_path_factory.mktemp("sources")
    docs = builtin_documents()
    by_size = sorted(range(len(docs)), key=lambda i: len(docs[i]))
    small, rest = by_size[:3], sorted(by_size[3:])  # "code": some 200 tokens
    cuts = {"prose": [docs[i] for i in rest[0::2]], "reference": [docs[i] for i in rest[1::4]],
            "code": [docs[i] for i in sorted(small)]}  # fmt: skip
    prefixes = {}
    for name, part in cuts.items():
        jsonl = root / f"{name}.jsonl"
        jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
        prefix = root / name / "train"
        split = [] if name == "code" else ["--valid-fraction", "0.25", "--split-seed", "2"]
        done = run_cli("data", "prepare", str(jsonl), "--tokenizer",
                       str(pydoc_dataset.parent / "tokenizer.json"), "--out", str(prefix),
                       "--no-progress", *split)  # fmt: skip
        assert done.returncode == 0, done.stderr
        prefixes[name] = prefix
    return prefixes


WEIGHTS = {"prose": 0.5, "reference": 0.3, "code": 0.2}


def mixture_config(tmp_path: Path, sources: dict[str, Path], run: str) -> Path:
    values = {
        **TINY_OVERRIDES,
        "data.sources": [
            {"path": str(p), "name": n, "weight": WEIGHTS[n]} for n, p in sources.items()
        ],
        "model.dropout": 0.1,
        "metrics.tensorboard": True,
        "metrics.peak_tflops": 1.0,
        "validation.tokens": 256,
        "validation.every": 4,
        "checkpoint.every": 4,
        "run.name": run,
        "run.dir": str(tmp_path / "runs"),
        "checkpoint.dir": str(tmp_path / "checkpoints"),
        "logbook.dir": str(tmp_path / "logbook"),
    }
    path = tmp_path / f"{run}.toml"
    path.write_text(to_toml(load_config(None, values=values)))
    return path


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_mixture_trains_resumes_exactly_and_reports_each_source(
    tmp_path: Path, three_sources: dict[str, Path]
) -> None:
    straight = mixture_config(tmp_path, three_sources, "straight")
    done = run_cli("train", str(straight), "--max-steps", "12", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "data: 3 sources by share of the samples: prose 50.00%" in done.stdout
    assert "none for code" in done.stdout  # the source without a held-out set is named

    resumed = mixture_config(tmp_path, three_sources, "resumed")
    for steps in ("6", "12"):  # a stop at step 6, then a new process from its checkpoint
        done = run_cli("train", str(resumed), "--max-steps", steps, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout
    runs = tmp_path / "runs"
    assert metrics_losses(runs / "resumed") == metrics_losses(runs / "straight")
    assert sorted(metrics_losses(runs / "straight")) == list(range(1, 13))

    # Per-source validation: each source's own loss, and the run's is their weighted mean.
    evaluations = [r for r in records(runs / "straight") if "val_loss" in r]
    assert [r["step"] for r in evaluations] == [0, 4, 8, 12]
    for r in evaluations:
        losses = r["val_sources"]
        assert set(losses) == {"prose", "reference"}
        weighted = (0.5 * losses["prose"] + 0.3 * losses["reference"]) / 0.8
        assert math.isclose(r["val_loss"], weighted, rel_tol=1e-12)
    assert evaluations[-1]["val_sources"]["prose"] != evaluations[-1]["val_sources"]["reference"]
    again = {r["step"]: r["val_sources"] for r in records(runs / "resumed") if "val_loss" in r}
    # (the resumed run evaluates at its stop too, at step 6)
    assert {s: again[s] for s in (0, 4, 8, 12)} == {
        r["step"]: r["val_sources"] for r in evaluations
    }

    # Epochs per source: in metrics.jsonl and TensorBoard, and each whole epoch in the logbook.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    epochs = {r["step"]: r["epochs"] for r in records(runs / "straight") if "epochs" in r}
    board = EventAccumulator(str(runs / "straight" / "tensorboard"))
    board.Reload()
    for name in WEIGHTS:
        series = {e.step: e.value for e in board.Scalars(f"data/epochs/{name}")}
        assert series == pytest.approx({s: e[name] for s, e in epochs.items()}, rel=1e-6)
    assert {"valid/prose/loss", "valid/reference/loss"} <= set(board.Tags()["scalars"])
    events = [json.loads(line) for line in (tmp_path / "logbook" / "straight" / "events.jsonl")
              .read_text().splitlines()]  # fmt: skip
    logged = [(e["source"], e["epochs"], e["step"]) for e in events if e["kind"] == "data_epoch"]
    expected = []
    previous = dict.fromkeys(WEIGHTS, 0.0)
    for step in sorted(epochs):
        for name in WEIGHTS:
            for whole in range(math.floor(previous[name]) + 1, math.floor(epochs[step][name]) + 1):
                expected.append((name, whole, step))
            previous[name] = epochs[step][name]
    assert epochs[12]["code"] > 1 and sorted(logged) == sorted(expected)
    # The smallest source, drawn 20% of the time, goes round fastest of the three.
    assert max(epochs[12], key=epochs[12].get) == "code"


def test_bad_mixtures_fail_with_one_line(tmp_path: Path, three_sources: dict[str, Path]) -> None:
    config = mixture_config(tmp_path, {**three_sources, "code": tmp_path / "missing"}, "bad")
    done = run_cli("train", str(config), "--max-steps", "1")
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith("error: dataset not found")
    assert not (tmp_path / "runs" / "bad").exists()
    assert REPO.is_dir()


@pytest.mark.slow
def test_a_mixture_resumes_exactly_across_a_rollback_that_skips_data(
    tmp_path: Path, three_sources: dict[str, Path]
) -> None:
    """A spike drill at step 12: the supervisor rolls back and skips the samples of the
    steps around it, in every source. A stop after it and a resume in a new process give
    the same losses as the run that never stopped."""
    drill = ["--supervisor.drill", "spike@12", "--supervisor.ladder",
             '["rollback+lower_lr_clip+skip_data"]', "--supervisor.skip_data_steps", "2",
             "--supervisor.skip_data_ahead", "2", "--supervisor.healthy_margin", "2",
             "--model.dropout", "0.0"]  # fmt: skip
    for run, stops in (("straight", ["20"]), ("stopped", ["16", "20"])):
        config = mixture_config(tmp_path, three_sources, run)
        for steps in stops:
            done = run_cli("train", str(config), "--max-steps", steps, *drill, timeout=300)
            assert done.returncode == 0, done.stderr[-3000:]
    runs = tmp_path / "runs"
    assert metrics_losses(runs / "stopped") == metrics_losses(runs / "straight")
    events = [json.loads(line) for line in (tmp_path / "logbook" / "straight" / "events.jsonl")
              .read_text().splitlines()]  # fmt: skip
    (rollback,) = [e for e in events if e["kind"] == "intervention"]
    start, end = rollback["skipped_data"]
    assert (start, end) == (10 * 8, 14 * 8)  # steps 11-12 (up to the spike) and 13-14 after
    # Every position read or skipped is a draw: 20 steps read 160, 32 were skipped.
    last = [r for r in records(runs / "straight") if r.get("step") == 20 and "epochs" in r][-1]
    for name, weight in WEIGHTS.items():
        samples = TokenDataset(three_sources[name]).num_samples(32)
        assert abs(last["epochs"][name] * samples - 192 * weight) < 1, name


def test_token_counts_set_the_shares_and_are_compared_with_the_run(
    three_sources: dict[str, Path],
) -> None:
    from opt.job import check_job
    from opt.train.data_setup import build_loader, mixture_lines

    counts = {"prose": 2560, "reference": 1536, "code": 1024}  # 5:3:2, 5120 tokens in all
    cfg = load_config(None, values={
        **TINY_OVERRIDES, "train.max_steps": 20,
        "data.sources": [{"path": str(three_sources[n]), "name": n, "tokens": t}
                         for n, t in counts.items()],
    })  # fmt: skip
    job = check_job(cfg, 1)
    loader, _ = build_loader(cfg, job.model_args)
    assert loader.stream.shares == [0.5, 0.3, 0.2]
    (line,) = mixture_lines(cfg, loader, 0, 20, job.grad_accum)  # 20 steps x 256 = 5120
    assert line.startswith("data: 3 sources by share of the samples: prose 50.00%")
    longer = mixture_lines(cfg, loader, 0, 40, job.grad_accum)
    assert longer[1].endswith(
        "each source gives 2x the tokens it names (the counts set the shares)"
    )
