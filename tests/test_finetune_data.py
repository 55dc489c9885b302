"""The fine-tuning data (opt/finetune): the mixture file and its refusals (leaks included),
the capped, examples-proportional stream with a template drawn per example, tokens that
put the loss on the target only as `opt eval` joins them, packing, and the stream's
contract with the trainer and the supervisor: exact resume, skips, data-parallel slices.

The datasets in tests/data/finetune are made up by the project (see its README)."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from collections import Counter
from pathlib import Path

import pytest
import tomli_w
import torch
from helpers import REPO

from opt.data.tokenizer import train_tokenizer
from opt.errors import OptError
from opt.eval.prompts import TEMPLATES_DIR, load_template_file
from opt.eval.runner import EvalSpec, build_requests, prepare
from opt.eval.tasks import get_task
from opt.finetune.mixture import T0_CLUSTERS, applies, known_task, load_mixture
from opt.finetune.stream import (
    IGNORE_INDEX,
    PAD_ID,
    FinetuneLoader,
    PromptedStream,
    build_batch,
    next_batch,
    read_rows,
    survey,
)
from opt.supervisor.rollback import step_samples

FIXTURES = REPO / "tests" / "data" / "finetune"
EVAL_DATA = REPO / "tests" / "data" / "eval"
EOS = 2


@pytest.fixture(scope="module")
def tokenizer():
    texts = [p.read_text() for p in sorted(FIXTURES.rglob("*")) if p.is_file()]
    texts += [p.read_text() for p in sorted(EVAL_DATA.rglob("*.jsonl"))]
    return train_tokenizer(texts, 600)


@pytest.fixture(scope="module")
def mixture():
    return load_mixture(FIXTURES / "mixture.toml")


def write_mixture(folder: Path, datasets: list[dict], **top) -> Path:
    """A mixture file in ``folder`` naming the fixture datasets by absolute path unless
    an entry says otherwise."""
    path = folder / "mixture.toml"
    path.write_text(tomli_w.dumps({**top, "dataset": datasets}))
    return path


def fixture_entry(name: str, **changes) -> dict:
    clusters = {"sentiment": "sentiment", "paraphrase": "paraphrase", "capitals": "closed_book_qa"}
    entry = {
        "name": name,
        "data": str(FIXTURES / name / "train.jsonl"),
        "templates": str(FIXTURES / name / "templates.yaml"),
        "cluster": clusters[name],
    }
    return {**entry, **changes}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- the mixture file --------------------------------------------------------------------


def test_the_example_mixture(mixture):
    assert [d.name for d in mixture.datasets] == ["sentiment", "paraphrase", "capitals"]
    # "all": the original-task templates only ("write a review" and "rewrite" are not).
    assert [t.name for t in mixture.datasets[0].templates] == [
        "positive or negative", "did the reviewer like it", "recommend the film", "in one word",
    ]  # fmt: skip
    assert [len(d.templates) for d in mixture.datasets] == [4, 3, 3]
    assert [len(d.examples) for d in mixture.datasets] == [24, 24, 20]
    assert mixture.num_examples == 68
    assert (mixture.seed, mixture.cap) == (0, 500_000)
    # Each dataset keeps its rows in a seeded order; the rows point at the file's lines.
    sentiment = mixture.datasets[0]
    lines = (FIXTURES / "sentiment" / "train.jsonl").read_text().splitlines()
    assert sorted(sentiment.rows) == list(range(24))
    assert list(sentiment.rows) != sorted(sentiment.rows)
    assert all(
        json.loads(lines[r]) == ex for r, ex in zip(sentiment.rows, sentiment.examples, strict=True)
    )
    assert mixture.summary()[2] == "capitals (closed_book_qa): 20 of 20 examples, 3 templates"


def test_named_prompts_relative_paths_and_a_directory_split(tmp_path):
    shutil.copytree(FIXTURES / "paraphrase", tmp_path / "pp")
    (tmp_path / "pp" / "train.jsonl").rename(tmp_path / "pp" / "dev.jsonl")
    path = write_mixture(tmp_path, [{"name": "pp", "data": "pp", "split": "dev",
                                     "templates": "pp/templates.yaml", "cluster": "paraphrase",
                                     "prompts": ["rewrite", "same meaning"]}])  # fmt: skip
    (dataset,) = load_mixture(path).datasets
    assert [t.name for t in dataset.templates] == ["rewrite", "same meaning"]
    # "rewrite" applies to paraphrase pairs only, "same meaning" to all: nothing dropped.
    assert len(dataset.examples) == 24 and dataset.unrenderable == 0


def test_a_saved_hugging_face_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(x) for x in (FIXTURES / "capitals" / "train.jsonl").read_text().splitlines()]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(
        str(tmp_path / "caps")
    )
    path = write_mixture(tmp_path, [fixture_entry("capitals", data=str(tmp_path / "caps"))])
    (dataset,) = load_mixture(path).datasets
    assert sorted(dataset.examples, key=lambda r: r["idx"]) == rows


def _refusal_cases(tmp: Path) -> dict[str, tuple[str, str]]:
    """what -> (mixture text, message): every problem a mixture can have."""
    unlabelled = write_jsonl(tmp / "nolabel" / "train.jsonl", [{"country": "Peru"}] * 3)
    no_original = tmp / "tpl" / "templates.yaml"
    no_original.parent.mkdir()
    no_original.write_text((FIXTURES / "capitals" / "templates.yaml").read_text().replace(
        "original_task: true", "original_task: false"))  # fmt: skip
    ok = fixture_entry("capitals")

    def toml(*datasets, **top):
        return tomli_w.dumps({**top, "dataset": list(datasets)})

    cases = [
        ("unknown top key", toml(ok, caps=3), "unknown key 'caps'"),
        ("unknown dataset key", toml({**ok, "weight": 2}), "dataset 'capitals': unknown key 'weight'"),
        ("missing key", toml({k: v for k, v in ok.items() if k != "templates"}),
         "dataset 'capitals': missing key 'templates'"),
        ("no name", toml({k: v for k, v in ok.items() if k != "name"}),
         r"\[\[dataset\]\] 1: missing key 'name'"),
        ("missing data", toml({**ok, "data": str(tmp / "nope.jsonl")}), "data not found: .*nope.jsonl"),
        ("missing templates", toml({**ok, "templates": str(tmp / "t.yaml")}),
         "templates file not found: .*t.yaml"),
        ("duplicate name", toml(ok, ok), "dataset 'capitals': a second dataset of that name"),
        ("unknown template", toml({**ok, "prompts": ["what is the capital", "capital?"]}),
         "dataset 'capitals': unknown template 'capital\\?'; this task has 'what is the capital'"),
        ("template twice", toml({**ok, "prompts": ["government sits in"] * 2}),
         "a template is named twice"),
        ("no original-task template", toml({**ok, "templates": str(no_original)}),
         "no original-task template for prompts = \"all\""),
        ("nothing renders", toml({**ok, "data": str(unlabelled)}),
         "dataset 'capitals': none of its 3 examples renders under its 3 templates"),
        ("cap 0", toml(ok, cap=0), "cap must be at least 1, not 0"),
        ("cap not an integer", toml(ok, cap=True), "cap must be an integer"),
        ("split of a file", toml({**ok, "split": "train"}), "is one JSONL file, so it is one split"),
        ("no datasets", "seed = 1\n", r"no \[\[dataset\]\] entries"),
        ("not TOML", "seed = \n", "not TOML"),
        ("bad prompts", toml({**ok, "prompts": 3}), "prompts must be \"all\" or a list"),
        ("bad held-out list", toml(ok, held_out_clusters="nli"), "held_out_clusters must be a list"),
    ]  # fmt: skip
    return {what: (text, message) for what, text, message in cases}


REFUSALS = [
    "unknown top key", "unknown dataset key", "missing key", "no name", "missing data",
    "missing templates", "duplicate name", "unknown template", "template twice",
    "no original-task template", "nothing renders", "cap 0", "cap not an integer",
    "split of a file", "no datasets", "not TOML", "bad prompts", "bad held-out list",
]  # fmt: skip


@pytest.mark.parametrize("what", REFUSALS)
def test_every_problem_is_one_line_naming_the_file(tmp_path, what):
    cases = _refusal_cases(tmp_path)
    assert sorted(cases) == sorted(REFUSALS)
    text, message = cases[what]
    path = tmp_path / "mixture.toml"
    path.write_text(text)
    with pytest.raises(OptError, match=message) as err:
        load_mixture(path)
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(f"{path}: ")


def test_a_missing_mixture_file(tmp_path):
    with pytest.raises(OptError, match=r"mixture file not found: .*none.toml"):
        load_mixture(tmp_path / "none.toml")


# --- leaks -------------------------------------------------------------------------------


def test_a_held_out_cluster_is_refused(tmp_path):
    path = write_mixture(
        tmp_path, [fixture_entry("capitals"), fixture_entry("paraphrase", cluster="nli")]
    )
    with pytest.raises(OptError, match="dataset 'paraphrase': cluster 'nli' is held out") as err:
        load_mixture(path)
    assert "\n" not in str(err.value)
    # Clusters compare without case; T0's four are the default list.
    path = write_mixture(tmp_path, [fixture_entry("paraphrase", cluster="Word_Sense")])
    with pytest.raises(OptError, match="cluster 'Word_Sense' is held out"):
        load_mixture(path)


def _rte_entry(**changes) -> dict:
    return {"name": "rte", "data": str(EVAL_DATA / "rte" / "train.jsonl"),
            "templates": str(TEMPLATES_DIR / "super_glue" / "rte" / "templates.yaml"),
            "cluster": "nli"} | changes  # fmt: skip


def test_a_known_held_out_task_under_its_own_cluster_is_refused(tmp_path):
    path = write_mixture(tmp_path, [_rte_entry()])
    with pytest.raises(OptError, match="dataset 'rte': cluster 'nli' is held out"):
        load_mixture(path)


@pytest.mark.parametrize(
    "how",
    ["name", "templates header", "templates folder", "data folder"],
)
def test_a_mislabelled_known_task_is_refused(tmp_path, how):
    """A held-out task cannot be let in by calling it something else: it is recognised by
    its name, its templates file's header, or the folders of its templates or data."""
    tpl = tmp_path / "made" / "up" / "templates.yaml"
    tpl.parent.mkdir(parents=True)
    copa = (TEMPLATES_DIR / "super_glue" / "copa" / "templates.yaml").read_text()
    data = EVAL_DATA / "copa" / "train.jsonl"
    plain = tmp_path / "plain" / "train.jsonl"
    shutil.copy(data, write_jsonl(plain, []))
    if how == "name":
        tpl.write_text(copa.replace("dataset: super_glue\nsubset: copa\n", ""))
        entry = {"name": "COPA", "data": str(plain), "templates": str(tpl)}
        found = "its name 'COPA'"
    elif how == "templates header":
        tpl.write_text(copa)
        entry = {"name": "causes", "data": str(plain), "templates": str(tpl)}
        found = "its templates file's header 'super_glue/copa'"
    elif how == "templates folder":
        tpl = tmp_path / "super_glue" / "copa" / "templates.yaml"
        tpl.parent.mkdir(parents=True)
        tpl.write_text(copa.replace("dataset: super_glue\nsubset: copa\n", ""))
        entry = {"name": "causes", "data": str(plain), "templates": str(tpl)}
        found = "the folder 'copa' in .*templates.yaml"
    else:
        tpl.write_text(copa.replace("dataset: super_glue\nsubset: copa\n", ""))
        entry = {"name": "causes", "data": str(data), "templates": str(tpl)}
        found = "the folder 'copa' in .*train.jsonl"
    assert "subset: copa" in copa
    path = write_mixture(tmp_path, [{**entry, "cluster": "cause_effect"}], held_out_clusters=[])
    with pytest.raises(OptError, match=f"this is copa \\(by {found}.*\\), which T0 puts in cluster "
                       "'sentence_completion', but it is declared 'cause_effect'"):  # fmt: skip
        load_mixture(path)


def test_a_held_out_task_is_allowed_only_where_its_cluster_is_not_held_out(tmp_path):
    path = write_mixture(tmp_path, [_rte_entry()], held_out_clusters=["coreference"])
    (rte,) = load_mixture(path).datasets
    assert len(rte.examples) == 8 and len(rte.templates) == 10


def test_known_task_spellings():
    assert set(T0_CLUSTERS) >= {"rte", "cb", "copa", "wic", "wsc"}
    spelled = {"super_glue/wsc.fixed": "wsc", "wsc.fixed": "wsc", "glue/rte": "rte",
               "anli_r2": "anli", "winogrande/winogrande_xl": "winogrande",
               "story_cloze/2016": "story_cloze", "HellaSwag": "hellaswag"}  # fmt: skip
    for name, task in spelled.items():
        assert known_task(name)[0] == task, name
    for name in ("paraphrase", "glue/mrpc", "rte_like", "super_glue/boolq", "cbt"):
        assert known_task(name) is None, name
    assert known_task("x", ("super_glue", "wic"))[0] == "wic"
    assert known_task("x", ("winogrande", "winogrande_debiased"))[0] == "winogrande"


# --- the cap and the order ---------------------------------------------------------------


def test_the_cap_keeps_the_first_renderable_examples_in_a_seeded_order(tmp_path):
    # Every third row is unlabelled, and no template applies to it.
    rows = [{"country": f"C{i}"} | ({} if i % 3 == 0 else {"capital": f"K{i}"}) for i in range(30)]
    data = write_jsonl(tmp_path / "caps.jsonl", rows)
    kept = {}
    for seed in (0, 1):
        path = write_mixture(
            tmp_path, [fixture_entry("capitals", data=str(data))], cap=7, seed=seed
        )
        (d,) = load_mixture(path).datasets
        assert len(d.examples) == 7 and len(set(d.rows)) == 7
        assert all(r % 3 for r in d.rows)
        kept[seed] = d.rows
    assert kept[0] != kept[1]
    # The same seed keeps the same rows, whatever else the mixture holds.
    path = write_mixture(
        tmp_path, [fixture_entry("sentiment"), fixture_entry("capitals", data=str(data))], cap=7
    )
    assert load_mixture(path).datasets[1].rows == kept[0]
    # Without a cap the unrenderable rows are all counted as dropped.
    path = write_mixture(tmp_path, [fixture_entry("capitals", data=str(data))])
    (d,) = load_mixture(path).datasets
    assert (len(d.examples), d.unrenderable, d.total) == (20, 10, 30)


def test_each_epoch_holds_every_kept_example_once(tmp_path, tokenizer):
    path = write_mixture(
        tmp_path, [fixture_entry(n) for n in ("sentiment", "paraphrase", "capitals")], cap=10
    )
    mixture = load_mixture(path)
    stream = PromptedStream(mixture, tokenizer, seq_len=128)
    assert mixture.num_examples == 30  # examples-proportional, each capped at 10
    epochs = [[stream.next_example() for _ in range(30)] for _ in range(3)]
    expected = Counter((d.name, r) for d in mixture.datasets for r in d.rows)
    for epoch in epochs:
        assert Counter((e.dataset, e.row) for e in epoch) == expected
    assert [(e.dataset, e.row) for e in epochs[0]] != [(e.dataset, e.row) for e in epochs[1]]
    assert [e.position for e in epochs[2]] == list(range(60, 90))


# --- templates per example ---------------------------------------------------------------


def test_the_template_is_a_function_of_the_position(mixture, tokenizer):
    one, two = PromptedStream(mixture, tokenizer, 128), PromptedStream(mixture, tokenizer, 128)
    read = [one.next_example() for _ in range(200)]
    assert read == [two.example_at(p) for p in range(199, -1, -1)][::-1]
    # Another seed: other orders, other templates.
    other = PromptedStream(mixture, tokenizer, 128, seed=5)
    assert [other.next_example().template for _ in range(200)] != [e.template for e in read]


def test_templates_are_drawn_uniformly_among_those_that_apply(mixture, tokenizer):
    """Over 30 epochs each template's count is within 4 standard deviations of what a
    uniform draw among the templates that apply to each example gives. ("recommend the
    film" applies to movie reviews only; falling through to the next template in file order
    instead would give "in one word" half the product reviews, ~6 deviations too many.)"""
    stream = PromptedStream(mixture, tokenizer, 128)
    draws = [stream.next_example() for _ in range(30 * mixture.num_examples)]
    by_name = {d.name: d for d in mixture.datasets}
    for dataset in mixture.datasets:
        mine = [e for e in draws if e.dataset == dataset.name]
        seen = Counter(e.template for e in mine)
        assert set(seen) == {t.name for t in dataset.templates}
        expected = Counter()
        variance = Counter()
        for e in mine:
            example = dataset.examples[dataset.rows.index(e.row)]
            fitting = [t.name for t in by_name[e.dataset].templates if applies(t, example)]
            assert e.template in fitting
            for name in fitting:
                p = 1 / len(fitting)
                expected[name] += p
                variance[name] += p * (1 - p)
        for name, count in seen.items():
            assert abs(count - expected[name]) < 4 * math.sqrt(variance[name]), (
                name,
                count,
                expected[name],
            )
    # Movie-only template never on a product review.
    sentiment = by_name["sentiment"]
    for e in draws:
        if e.template == "recommend the film":
            assert sentiment.examples[sentiment.rows.index(e.row)]["domain"] == "movie"


# --- tokens ------------------------------------------------------------------------------


def test_tokens_are_the_ones_opt_eval_scores(tmp_path, tokenizer):
    """An RTE example as training sees it equals opt eval's request for the same example and
    template: </s>, the input's tokens, the gold choice after a space; then </s>."""
    path = write_mixture(tmp_path, [_rte_entry()], held_out_clusters=[])
    mixture = load_mixture(path)
    stream = PromptedStream(mixture, tokenizer, seq_len=256)
    spec = EvalSpec(tasks=(get_task("rte"),), data_dir=EVAL_DATA, split="train")
    (prep,) = prepare(spec)
    requests = {
        (prep.templates[t].name, i): (r, req)
        for t, i, r, req in build_requests(prep, spec, tokenizer)
    }
    for _ in range(16):
        ex = stream.next_example()
        rendered, request = requests[(ex.template, ex.row)]
        gold = request.continuations[rendered.gold]
        assert ex.ids == (EOS, *request.context, *gold, EOS)
        assert ex.context == 1 + len(request.context)
        assert ex.loss_tokens == len(gold) + 1 and ex.truncated == 0


def test_a_long_input_is_cut_from_the_left_and_a_long_target_refused(tmp_path, tokenizer):
    long_text = " ".join(["the ferry leaves the harbour at six every evening"] * 12)
    rows = [
        {"country": long_text, "capital": "Lisbon"},
        {"country": "Chile", "capital": "Santiago"},
    ]
    path = write_mixture(tmp_path, [fixture_entry("capitals", data=str(write_jsonl(tmp_path / "c.jsonl", rows)),
                                                  prompts=["country and capital"])])  # fmt: skip
    mixture = load_mixture(path)
    full = tokenizer.encode(f"Country: {long_text}\nCapital city:").ids
    answer = tokenizer.encode(" Lisbon").ids
    seq_len = 40
    stream = PromptedStream(mixture, tokenizer, seq_len)
    first, second = stream.next_example(), stream.next_example()
    long, short = (first, second) if first.row == 0 else (second, first)
    assert len(full) + len(answer) + 1 > seq_len  # the example would not fit whole
    assert long.length == seq_len
    assert long.ids == (EOS, *full[long.truncated :], *answer, EOS)
    assert long.truncated == len(full) + len(answer) + 1 - seq_len
    assert short.truncated == 0
    stream = PromptedStream(mixture, tokenizer, seq_len)
    batch = next_batch(stream, 2, packing=False)
    assert (batch.step_examples, batch.step_truncated) == (2, 1)
    # The survey before a run finds the same, for every template that applies.
    assert survey(mixture, tokenizer, seq_len) == {
        "capitals": {"renderings": 2, "truncated": 1, "longest": len(full) + len(answer) + 1}
    }
    # A target that alone takes more than the row cannot be trained on: refused, named.
    rows = [{"country": "Chile", "capital": long_text}]
    path = write_mixture(
        tmp_path, [fixture_entry("capitals", data=str(write_jsonl(tmp_path / "c.jsonl", rows)))]
    )
    stream = PromptedStream(load_mixture(path), tokenizer, seq_len)
    with pytest.raises(OptError, match="dataset 'capitals' row 1, template 'what is the capital'"):
        survey(stream.mixture, tokenizer, seq_len)  # up front, naming the first template
    with pytest.raises(OptError, match=r"dataset 'capitals' row 1, template '.*': the target and "
                       rf"closing </s> take \d+ tokens, more than seq_len={seq_len}"):  # fmt: skip
        stream.next_example()


# --- packing -----------------------------------------------------------------------------


def check_rows(batch, examples, seq_len, tokenizer, mixture):
    """The packing invariants, derived from the tensors alone and from the rendered text."""
    assert (
        batch.tokens.shape
        == batch.targets.shape
        == batch.positions.shape
        == (len(examples), seq_len)
    )
    assert all(
        t.dtype == torch.int64
        for t in (batch.tokens, batch.targets, batch.positions, batch.segments)
    )
    templates = {(d.name, t.name): t for d in mixture.datasets for t in d.templates}
    rows_of = {d.name: d for d in mixture.datasets}
    loss_tokens = 0
    for r, row in enumerate(examples):
        seg, pos, tok, tgt = (
            x[r].tolist() for x in (batch.segments, batch.positions, batch.tokens, batch.targets)
        )
        used = sum(e.length for e in row)
        assert used <= seq_len
        # Segments 1..k in order, then padding (segment 0, pad id, position 0, no target).
        assert seg == [k for k, e in enumerate(row, 1) for _ in range(e.length)] + [0] * (
            seq_len - used
        )
        assert tok[used:] == [PAD_ID] * (seq_len - used) and set(tgt[used:]) <= {IGNORE_INDEX}
        assert pos == [i for e in row for i in range(e.length)] + [0] * (seq_len - used)
        at = 0
        for e in row:
            n = e.length
            assert tok[at] == EOS and pos[at] == 0  # each example starts with its </s>
            # Inside an example a target is the next input token; its last slot predicts the
            # closing </s>, never the next example's first token.
            for i in range(at, at + n - 1):
                assert tgt[i] in (IGNORE_INDEX, tok[i + 1])
            assert tgt[at + n - 1] == EOS
            # The targets are exactly " " + the rendered target, then </s>.
            dataset = rows_of[e.dataset]
            example = dataset.examples[dataset.rows.index(e.row)]
            _, target = templates[(e.dataset, e.template)].apply(example)
            answer = [*tokenizer.encode(" " + target).ids, EOS]
            scored = [t for t in tgt[at : at + n] if t != IGNORE_INDEX]
            assert scored == answer
            assert tgt[at : at + n] == [IGNORE_INDEX] * (n - len(answer)) + answer
            loss_tokens += len(answer)
            at += n
    assert batch.loss_tokens == int((batch.targets != IGNORE_INDEX).sum()) == loss_tokens


@pytest.mark.parametrize("packing", [True, False])
def test_packing_invariants(mixture, tokenizer, packing):
    seq_len = 96
    stream = PromptedStream(mixture, tokenizer, seq_len)
    for _ in range(4):  # across an epoch boundary (68 examples)
        start = stream.pos
        examples = read_rows(stream, 8, packing)
        flat = [e for row in examples for e in row]
        # Whole examples in stream order; the next step starts where this one stopped.
        assert [e.position for e in flat] == list(range(start, stream.pos))
        if packing:  # next-fit: a row is closed only for an example that does not fit it
            for row, following in itertools.pairwise(examples):
                assert sum(e.length for e in row) + following[0].length > seq_len
        else:
            assert all(len(row) == 1 for row in examples)
        check_rows(build_batch(examples, seq_len), examples, seq_len, tokenizer, mixture)
    packed = PromptedStream(mixture, tokenizer, seq_len)
    read_rows(packed, 8, True)
    assert packed.pos > 8  # packing puts several examples in a row


# --- resume, skip, data parallel ---------------------------------------------------------


def _equal(a, b) -> bool:
    tensors = ("tokens", "targets", "positions", "segments")
    counts = ("loss_tokens", "step_loss_tokens", "step_examples", "step_truncated")
    return all(torch.equal(getattr(a, t), getattr(b, t)) for t in tensors) and all(
        getattr(a, c) == getattr(b, c) for c in counts
    )


@pytest.mark.parametrize("packing", [True, False])
def test_a_resumed_stream_yields_what_the_uninterrupted_one_does(tokenizer, packing):
    def loader():
        mixture = load_mixture(FIXTURES / "mixture.toml")  # read again, as a restart does
        return FinetuneLoader(
            PromptedStream(mixture, tokenizer, 80), micro_batch_size=2, packing=packing
        )

    straight = loader()
    steps = [straight.next_microbatches(2) for _ in range(12)]  # several epochs
    stopped = loader()
    for _ in range(5):
        stopped.next_microbatches(2)
    stopped.stream.skip(stopped.stream.pos + 3, stopped.stream.pos + 9)
    state = json.loads(json.dumps(stopped.state_dict()))  # plain data, any checkpoint holds it
    straight = loader()
    for _ in range(5):
        straight.next_microbatches(2)
    straight.stream.skip(straight.stream.pos + 3, straight.stream.pos + 9)
    expected = [straight.next_microbatches(2) for _ in range(7)]
    resumed = loader()
    resumed.load_state_dict(state)
    got = [resumed.next_microbatches(2) for _ in range(7)]
    assert all(
        _equal(a, b) for x, y in zip(expected, got, strict=True) for a, b in zip(x, y, strict=True)
    )
    assert resumed.state_dict() == straight.state_dict()
    # Without the skip the stream would have read other examples.
    assert not all(
        _equal(a, b) for x, y in zip(steps[5:], got, strict=True) for a, b in zip(x, y, strict=True)
    )


def test_a_state_from_another_mixture_is_refused(tmp_path, mixture, tokenizer):
    state = PromptedStream(mixture, tokenizer, 64).state_dict()
    path = write_mixture(
        tmp_path, [fixture_entry(n) for n in ("sentiment", "paraphrase", "capitals")], cap=23
    )
    other = PromptedStream(load_mixture(path), tokenizer, 64)
    with pytest.raises(
        OptError, match=r"data state was saved for mixture .*changed under a resume"
    ):
        other.load_state_dict(state)


def test_skipped_positions_are_never_read(mixture, tokenizer):
    plain, skipping = PromptedStream(mixture, tokenizer, 64), PromptedStream(mixture, tokenizer, 64)
    skipping.skip(10, 25)
    skipping.skip(60, 75)  # across the epoch boundary at 68
    a = [plain.next_example() for _ in range(150)]
    b = [skipping.next_example() for _ in range(120)]
    assert b == [e for e in a if not (10 <= e.position < 25 or 60 <= e.position < 75)]


@pytest.mark.parametrize("packing", [True, False])
def test_step_positions_are_what_the_steps_read(mixture, tokenizer, packing):
    loader = FinetuneLoader(
        PromptedStream(mixture, tokenizer, 72), micro_batch_size=2, packing=packing
    )
    loader.stream.skip(30, 34)
    for _ in range(2):
        loader.next_microbatches(2)
    pos = loader.state_dict()["pos"]
    start, end = loader.step_positions(pos, 2, 4, 6, grad_accum=2)
    assert loader.state_dict()["pos"] == pos  # found on a copy
    # What steps 3..6 read, one by one, from a copy of the stream.
    reader = loader.stream.copy()
    steps = []
    for _ in range(4):
        positions = [e.position for row in read_rows(reader, 4, packing) for e in row]
        steps.append((positions, reader.pos))
    # Steps 4..6 read from the first position step 4 reads to where step 6 leaves the stream.
    assert (start, end) == (steps[1][0][0], steps[3][1])
    assert {p for positions, _ in steps[1:] for p in positions} == set(range(start, end)) - set(
        range(30, 34)
    )
    if not packing:  # a fixed number of positions a step: the supervisor's own arithmetic
        skips = loader.stream.state_dict()["skips"]
        assert (start, end) == step_samples(pos, 2, 4, 6, loader.samples_per_step(2), skips)
    else:
        with pytest.raises(OptError, match="use step_positions"):
            loader.samples_per_step(2)
    # Skipped, none of them is read again.
    loader.stream.skip(start, end)
    read = [
        e.position for _ in range(6) for row in read_rows(loader.stream, 4, packing) for e in row
    ]
    assert not [p for p in read if start <= p < end]


@pytest.mark.parametrize("packing", [True, False])
def test_data_parallel_slices_make_the_single_process_batch(mixture, tokenizer, packing):
    whole_stream = PromptedStream(mixture, tokenizer, 64)
    wholes = [next_batch(whole_stream, 8, packing=packing) for _ in range(3)]
    for world in (2, 4):
        streams = [PromptedStream(mixture, tokenizer, 64) for _ in range(world)]
        for whole in wholes:
            parts = [next_batch(s, 8, rank, world, packing) for rank, s in enumerate(streams)]
            glued = {
                f: torch.cat([getattr(p, f) for p in parts])
                for f in ("tokens", "targets", "positions", "segments")
            }
            assert all(torch.equal(glued[f], getattr(whole, f)) for f in glued)
            assert (
                sum(p.loss_tokens for p in parts) == whole.loss_tokens == parts[0].step_loss_tokens
            )
            assert len({s.pos for s in streams}) == 1  # every rank stands at the same position
    # The loader: dp=2 x mbs=2 x ga=2 against one process with mbs=4 x ga=2: same rows.
    one = FinetuneLoader(
        PromptedStream(mixture, tokenizer, 64), micro_batch_size=4, packing=packing
    )
    ranks = [
        FinetuneLoader(PromptedStream(mixture, tokenizer, 64), 2, r, 2, packing) for r in range(2)
    ]
    for _ in range(3):
        single = one.next_microbatches(2)
        split = [loader.next_microbatches(2) for loader in ranks]
        # One process's micro-batch m holds rows 4m..4m+3; rank r's micro-batch m holds
        # global rows 4r + 2m .. 4r + 2m + 1.
        rows_single = torch.cat([b.tokens for b in single])
        rows_split = torch.cat([b.tokens for r in split for b in r])
        assert torch.equal(rows_single, rows_split)
        assert single[0].step_loss_tokens == split[1][0].step_loss_tokens
        assert sum(b.loss_tokens for b in single) == single[0].step_loss_tokens


def test_the_template_headers_the_leak_check_reads():
    dataset, subset, templates = load_template_file(
        TEMPLATES_DIR / "super_glue" / "wsc.fixed" / "templates.yaml"
    )
    assert (dataset, subset, len(templates)) == ("super_glue", "wsc.fixed", 10)
    assert load_template_file(FIXTURES / "sentiment" / "templates.yaml")[:2] == ("sentiment", None)
