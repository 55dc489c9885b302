"""`opt eval`: PromptSource templates rendered as PromptSource renders them, tasks read from
local files, rank-classification scores equal to a direct computation with the model,
seeded few-shot selection, the bootstrap, and the command end to end on a trained
checkpoint. The example files in tests/data/eval are made up for these tests."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import REPO, run_cli, torchrun, train_tiny_checkpoint

from opt.errors import OptError
from opt.eval.prompts import load_templates, select_templates
from opt.eval.runner import EvalSpec, evaluate, fewshot_demos
from opt.eval.scoring import Request, Scorer, predictions
from opt.eval.stats import bootstrap_ci, spread
from opt.eval.tasks import TASKS, get_task, load_examples, parse_tasks
from opt.models.model import build_model
from opt.models.sizes import ModelArgs

DATA = REPO / "tests" / "data" / "eval"
# Original-task templates per task in the shipped PromptSource files (all of them are).
TEMPLATE_COUNTS = {"rte": 10, "cb": 15, "copa": 12, "wic": 10, "wsc": 10}


def _template(task: str, name: str):
    return next(t for t in get_task(task).templates() if t.name == name)


def _example(task: str, index: int, split: str = "validation") -> dict:
    return load_examples(get_task(task), DATA, split)[index]


# --- templates ---------------------------------------------------------------------------


@pytest.mark.parametrize("task", list(TASKS))
def test_every_shipped_template_renders_every_example_with_its_label(task):
    templates = select_templates(get_task(task).templates(), "all")
    assert len(templates) == TEMPLATE_COUNTS[task]
    examples = load_examples(get_task(task), DATA, "validation")
    rendered = 0
    for template in templates:
        for example in examples:
            r = template.render(example)
            if r is None:  # only COPA's templates written for one question type
                assert task == "copa"
                continue
            rendered += 1
            assert r.input and "|||" not in r.input and "{{" not in r.input
            assert r.gold == example["label"]  # label i is answer_choices[i]
    assert rendered == len(templates) * len(examples) - (24 if task == "copa" else 0)


def test_rte_template_text_as_read_from_the_yaml():
    # '{{premise}} Using only the above description and what you know about the world,
    #  is "{{hypothesis}}" definitely correct? Yes or no? ||| {{ answer_choices[label] }}'
    r = _template("rte", "MNLI crowdsource").render(_example("rte", 1))
    assert r.input == (
        "Marta swam across the lake before breakfast. Using only the above description and "
        'what you know about the world, is "Marta stayed in bed all morning." definitely '
        "correct? Yes or no?"
    )
    assert r.target == "No" and r.choices == ("Yes", "No") and r.gold == 1
    # 'Suppose {{premise}} Can we infer that "{{hypothesis}}"? Yes or no?'
    r = _template("rte", "can we infer").render(_example("rte", 0))
    assert r.input == (
        "Suppose The bakery on Elm Street opened in 1998 and still sells rye bread every "
        'morning. Can we infer that "The bakery sells rye bread."? Yes or no?'
    )
    assert r.target == "Yes"


def test_copa_conditional_template_and_choices_from_the_example():
    template = _template("copa", "…What could happen next, C1 or C2?")
    effect, cause = _example("copa", 0), _example("copa", 1)
    r = template.render(effect)
    assert r.input == (
        'The glass fell off the table. What could happen next, "It shattered on the floor." '
        'or "It floated in the air."?'
    )
    assert r.choices == ("It shattered on the floor.", "It floated in the air.")
    assert r.target == "It shattered on the floor."
    assert template.apply(cause) == [""] and template.render(cause) is None


def test_wsc_and_wic_templates_with_jinja_expressions():
    # "{{ text }} \n\nIn other words, {{ text.split(" ")[span2_index:] | join(" ")
    #  | replace(span2_text, span1_text) }} True or false? ||| ..."
    r = _template("wsc", "in other words").render(_example("wsc", 0))
    assert r.input == (
        "The sofa did not fit in the van because it was too long. \n\n"
        "In other words, sofa was too long. True or false?"
    )
    assert r.target == "True" and r.choices == ("False", "True")
    r = _template("wsc", "does the pronoun refer to").render(_example("wsc", 2))
    assert r.input.endswith(
        ' In the previous sentence, does the pronoun "he" refer to Leo? Yes or no?'
    )
    r = _template("wic", "question-context-meaning").render(_example("wic", 0))
    assert r.input == (
        'Does the word "bank" have the same meaning in these two sentences?\n'
        "She sat on the bank of the river.\nHe opened an account at the bank."
    )
    assert r.target == "No"


def test_pipes_in_examples_are_kept_and_long_values_truncated_as_promptsource_does():
    template = _template("rte", "can we infer")
    r = template.render({"premise": "a ||| b", "hypothesis": "c", "label": 0})
    assert r.input == 'Suppose a ||| b Can we infer that "c"? Yes or no?'
    words = " ".join(["word"] * 600)  # 2999 characters: jinja's truncate(2048) cuts it
    r = template.render({"premise": words, "hypothesis": "c", "label": 0})
    kept = r.input[len("Suppose ") : r.input.index(" Can we infer")]
    assert kept.endswith("...") and len(kept) <= 2048 and kept[:-3] == words[: len(kept) - 3]


def test_template_selection_and_bad_names():
    templates = get_task("cb").templates()
    chosen = select_templates(templates, "GPT-3 style,can we infer")
    assert [t.name for t in chosen] == ["GPT-3 style", "can we infer"]
    with pytest.raises(OptError, match="unknown template 'nope'"):
        select_templates(templates, "nope")
    with pytest.raises(OptError, match="no PromptSource templates"):
        load_templates("super_glue", "boolq")


# --- data --------------------------------------------------------------------------------


def test_superglue_site_files_are_mapped_to_the_hugging_face_form(tmp_path):
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE" / "val.jsonl").write_text(
        '{"premise": "p", "hypothesis": "h", "label": "not_entailment", "idx": 0}\n'
        '{"premise": "p", "hypothesis": "h", "label": "entailment", "idx": 1}\n'
    )
    assert [e["label"] for e in load_examples(get_task("rte"), tmp_path, "validation")] == [1, 0]
    (tmp_path / "WSC").mkdir()
    row = {
        "text": "A b it c.",
        "target": {"span1_index": 0, "span1_text": "A", "span2_index": 2, "span2_text": "it"},
        "label": True,
        "idx": 0,
    }
    (tmp_path / "WSC" / "test.jsonl").write_text(json.dumps(row) + "\n")
    (example,) = load_examples(get_task("wsc"), tmp_path, "test")
    assert example["span2_index"] == 2 and example["label"] == 1
    (tmp_path / "cb").mkdir()
    (tmp_path / "cb" / "validation.jsonl").write_text('{"premise": "p", "hypothesis": "h"}\n')
    # No label (a test split): loaded as -1, and no template gives it a target.
    (unlabelled,) = load_examples(get_task("cb"), tmp_path, "validation")
    assert unlabelled["label"] == -1
    assert all(t.render(unlabelled) is None for t in get_task("cb").templates())


@pytest.mark.parametrize(
    ("setup", "task", "message"),
    [
        (None, "rte", "no data for task 'rte'"),
        ({"rte/validation.jsonl": '{"premise": "p"}\n'}, "rte", "needs field 'hypothesis'"),
        ({"rte/validation.jsonl": "{not json\n"}, "rte", "not JSON"),
        ({"cb/validation.jsonl": '{"premise": "p", "hypothesis": "h", "label": "yes"}\n'}, "cb",
         "label 'yes' is not one of"),
        ({"rte/train.jsonl": "{}\n"}, "rte", "no 'validation' split for task 'rte'"),
    ],
)  # fmt: skip
def test_bad_data_is_named(tmp_path, setup, task, message):
    for name, text in (setup or {}).items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    with pytest.raises(OptError, match=message):
        load_examples(get_task(task), tmp_path, "validation")


def test_saved_hugging_face_dataset(tmp_path):
    rows = [json.loads(x) for x in (DATA / "rte" / "validation.jsonl").read_text().splitlines()]
    try:
        import datasets
    except ImportError:
        # What save_to_disk writes first; without the package it cannot be read at all.
        (tmp_path / "rte").mkdir()
        (tmp_path / "rte" / "dataset_dict.json").write_text('{"splits": ["validation"]}')
        with pytest.raises(OptError, match="needs the `datasets` package"):
            load_examples(get_task("rte"), tmp_path, "validation")
        return
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)}).save_to_disk(
        str(tmp_path / "rte")
    )
    assert load_examples(get_task("rte"), tmp_path, "validation") == rows


def test_unknown_task():
    assert [t.name for t in parse_tasks("rte, wsc")] == ["rte", "wsc"]
    with pytest.raises(OptError, match="unknown task 'boolq'; known tasks: rte, cb, copa"):
        parse_tasks("rte,boolq")


# --- scoring -----------------------------------------------------------------------------


def _random_model(**shape) -> torch.nn.Module:
    args = ModelArgs(n_layers=2, n_heads=2, d_model=32, vocab_size=97, max_positions=48,
                     init_std=0.3, **shape)  # fmt: skip
    return build_model(args, seed=3).eval()


def _direct(model, prefix: int, req: Request) -> list[float]:
    """Each choice on its own: one unpadded forward of the whole sequence (cut from the
    left to the model's positions), the log-probabilities of the choice's tokens summed."""
    out = []
    for cont in req.continuations:
        seq = [prefix, *req.context, *cont]
        inputs = seq[:-1][-model.args.max_positions :]
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([inputs]))[0].float(), dim=-1)
        n = len(cont)
        out.append(sum(logp[len(inputs) - n + t, cont[t]].item() for t in range(n)))
    return out


@pytest.mark.parametrize("shape", [{}, {"pre_norm": False, "word_embed_dim": 16}])
def test_scores_equal_a_direct_computation_per_choice(shape):
    model = _random_model(**shape)
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return tuple(torch.randint(4, 97, (n,), generator=g).tolist())

    requests = [
        Request(ids(7), (ids(1), ids(1), ids(1))),  # Yes / No / Maybe: one shared row
        Request(ids(12), (ids(3), ids(1), ids(5))),  # mixed lengths
        Request(ids(2), (ids(4), ids(4))),
        Request((), (ids(2), ids(1))),  # an empty context: the </s> prefix predicts
        Request(ids(60), (ids(2), ids(3))),  # longer than 48 positions: cut from the left
    ]
    first = requests[1].continuations[0]
    requests.append(Request(ids(9), (first[:1], first)))  # one choice a prefix of another
    for batch_size in (1, 3, 16):
        scorer = Scorer(model, prefix_id=2, batch_size=batch_size)
        got = scorer.loglikelihoods(requests)
        for req, scores in zip(requests, got, strict=True):
            assert scores == pytest.approx(_direct(model, 2, req), abs=1e-5)
        assert scorer.truncated == 2  # both rows of the long request


def test_predictions_as_lm_eval_defines_acc_and_acc_norm():
    # acc: the largest sum; acc_norm: the largest sum per character of the choice.
    assert predictions([-4.0, -6.0], ["ab", "abcdef"]) == (0, 1)
    assert predictions([-3.0, -3.0, -9.0], ["x", "y", "zzz"]) == (0, 0)  # ties: first


def test_batch_size_does_not_change_the_results():
    from opt.data.tokenizer import train_tokenizer

    texts = [p.read_text() for p in sorted(DATA.glob("*/*.jsonl"))]
    tokenizer = train_tokenizer(texts, 300)
    args = ModelArgs(n_layers=2, n_heads=2, d_model=32, vocab_size=300, max_positions=512,
                     init_std=0.3)  # fmt: skip
    model = build_model(args, seed=1).eval()
    results = []
    for batch_size in (1, 8):
        spec = EvalSpec(tasks=(get_task("cb"), get_task("copa")), data_dir=DATA, shots=1,
                        limit=5, batch_size=batch_size)  # fmt: skip
        results.append(evaluate(model, tokenizer, 2, spec))
    assert results[0] == results[1]
    assert results[0]["tasks"]["copa"]["prompts"][1]["n"] == 3  # effect questions in the 5


def test_a_users_task_is_its_templates_file_and_its_data_as_they_are():
    """``NAME=TEMPLATES.yaml``: the templates render the examples' own fields (nothing is
    mapped), the data come from DATA/NAME/<split>.jsonl, chance from the choices."""
    from opt.data.tokenizer import train_tokenizer

    root = REPO / "tests" / "data" / "finetune"
    [task] = parse_tasks(f"sentiment={root / 'sentiment' / 'templates.yaml'}")
    originals = [t.name for t in task.templates() if t.original_task]
    tokenizer = train_tokenizer([(root / "sentiment" / "train.jsonl").read_text()], 300)
    args = ModelArgs(n_layers=2, n_heads=2, d_model=32, vocab_size=300, max_positions=256,
                     init_std=0.3)  # fmt: skip
    model = build_model(args, seed=1).eval()
    spec = EvalSpec(tasks=(task,), data_dir=root, split="train", limit=8)
    result = evaluate(model, tokenizer, 2, spec)["tasks"]["sentiment"]
    assert [p["name"] for p in result["prompts"]] == originals and len(originals) >= 3
    assert result["chance"] == 0.5 and result["n_choices"] is None
    assert all(p["n"] > 0 for p in result["prompts"]) and result["acc"]["median"] is not None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mine=/nonexistent/templates.yaml", "templates file not found"),
        ("rte=tests/data/finetune/sentiment/templates.yaml", "is a known task's"),
        ("rte,cb,rte", "a task is named twice"),
        ("my task=x.yaml", "use letters, digits and underscores"),
    ],
)
def test_bad_user_tasks_are_named(spec, message):
    with pytest.raises(OptError, match=message):
        parse_tasks(spec)


# --- few-shot and statistics -------------------------------------------------------------


def test_fewshot_selection_is_seeded_and_never_the_scored_example():
    examples = load_examples(get_task("rte"), DATA, "validation")
    template = _template("rte", "can we infer")
    inputs = {template.render(e).input: i for i, e in enumerate(examples)}
    picks = {}
    for seed in (0, 1):
        for i, example in enumerate(examples):
            demos = fewshot_demos(template, example, i, examples, True, 4, seed, "rte")
            chosen = [inputs[d.input] for d in demos]
            assert len(set(chosen)) == 4 and i not in chosen
            again = fewshot_demos(template, example, i, examples, True, 4, seed, "rte")
            assert again == demos
            picks[seed, i] = chosen
    assert any(picks[0, i] != picks[1, i] for i in range(len(examples)))
    # From another split, an example equal to the scored one is skipped too.
    with pytest.raises(OptError, match="only 11 labelled examples render"):
        fewshot_demos(template, examples[0], 99, examples, False, 12, 0, "rte")


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_more_examples():
    small = [1, 0, 1, 1, 0] * 4  # 20 examples, accuracy 0.6
    large = small * 50  # 1000 examples, the same accuracy
    lo_s, hi_s = bootstrap_ci(small, seed=0)
    lo_l, hi_l = bootstrap_ci(large, seed=0)
    assert lo_s < 0.6 < hi_s and lo_l < 0.6 < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 3  # ~ 1/sqrt(50) as wide
    assert bootstrap_ci(small, seed=0) == (lo_s, hi_s)
    assert spread([0.5, 0.6, 0.7, 0.8]) == pytest.approx(
        {"median": 0.65, "q25": 0.575, "q75": 0.725, "iqr": 0.15, "min": 0.5, "max": 0.8}
    )


# --- the command -------------------------------------------------------------------------


def _train_tiny(tmp_path: Path, dataset: Path) -> Path:
    return train_tiny_checkpoint(tmp_path, dataset, "evaltiny")


@pytest.mark.slow
def test_opt_eval_end_to_end_on_a_trained_checkpoint(tmp_path, pydoc_dataset):
    checkpoint = _train_tiny(tmp_path, pydoc_dataset)
    out = tmp_path / "eval"
    result = run_cli("eval", str(checkpoint), "--tasks", "rte,cb,copa,wic,wsc", "--data",
                     str(DATA), "--shots", "1", "--limit", "6", "--out", str(out),
                     "--log-samples")  # fmt: skip
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["shots"] == 1 and results["checkpoint"] == str(checkpoint)
    for task, count in TEMPLATE_COUNTS.items():
        entry = results["tasks"][task]
        assert len(entry["prompts"]) == count and entry["n_examples"] == 6
        for p in entry["prompts"]:
            assert p["n"] == (3 if task == "copa" and p["name"].startswith("…") else 6)
            assert p["acc_ci"][0] <= p["acc"] <= p["acc_ci"][1]
        accs = [p["acc"] for p in entry["prompts"]]
        assert entry["acc"]["min"] == min(accs) and entry["acc"]["max"] == max(accs)
    table = (out / "results.md").read_text()
    assert "| task | prompts | examples | median acc |" in table and "## wsc" in table
    assert "| rte | 10 | 6 |" in result.stdout  # the summary table printed too
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Two ranks, each scoring every other request, gather the same numbers.
    out2 = tmp_path / "eval-2ranks"
    two = torchrun(2, "-m", "opt", "eval", str(checkpoint), "--tasks", "rte,cb,copa,wic,wsc",
                   "--data", str(DATA), "--shots", "1", "--limit", "6", "--out", str(out2),
                   "--timeout", "300", timeout=600)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((out2 / "results.json").read_text()) == results
    assert two.stdout.count("| rte | 10 | 6 |") == 1  # rank 0 alone prints and writes

    # Four ranks: two data-parallel groups of two tensor-parallel ranks, the model split as
    # training splits it. The reductions over the split add in another order than one
    # process does, so the log-likelihoods agree to fp32 rounding, not bitwise.
    out4 = tmp_path / "eval-dp2-tp2"
    four = torchrun(4, "-m", "opt", "eval", str(checkpoint), "--tasks", "rte,cb,copa,wic,wsc",
                    "--data", str(DATA), "--shots", "1", "--limit", "6", "--out", str(out4),
                    "--tp", "2", "--log-samples", "--timeout", "300", timeout=600)  # fmt: skip
    assert four.returncode == 0, four.stderr[-3000:]
    split = json.loads((out4 / "results.json").read_text())
    assert split["tp"] == 2 and split["tasks"].keys() == results["tasks"].keys()
    one = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    tp2 = [json.loads(line) for line in (out4 / "samples.jsonl").read_text().splitlines()]
    assert len(one) == len(tp2) == sum(p["n"] for t in results["tasks"].values()
                                       for p in t["prompts"])  # fmt: skip
    for a, b in zip(one, tp2, strict=True):
        assert (a["task"], a["prompt"], a["example"]) == (b["task"], b["prompt"], b["example"])
        assert b["loglikelihoods"] == pytest.approx(a["loglikelihoods"], rel=1e-5, abs=1e-5)
        if min_gap(a["loglikelihoods"]) > 1e-4:  # no near-tie that rounding could flip
            assert b["pred"] == a["pred"]


def min_gap(values: list[float]) -> float:
    """The smallest difference between two of ``values``."""
    ordered = sorted(values)
    return min(b - a for a, b in itertools.pairwise(ordered))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tasks", "rte,boolq"], "unknown task 'boolq'"),
        (["--tasks", "rte", "--prompts", "nope"], "unknown template 'nope'"),
        (["--tasks", "rte", "--data", "/nonexistent/eval"], "data directory not found"),
        (["--tasks", "rte", "--split", "test"], "no 'test' split for task 'rte'"),
        (["--tasks", "rte", "--shots", "-1"], "--shots must be 0 or more"),
        (["--tasks", "rte", "--tp", "2"], "--tp 2 must divide the number of processes (1)"),
    ],
)
def test_bad_eval_input_gets_one_line_and_exit_2(tmp_path, args, message):
    full = ["eval", str(tmp_path / "no-checkpoint"), "--data", str(DATA), "--out",
            str(tmp_path / "out"), *args]  # fmt: skip
    result = run_cli(*full)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint_is_named(tmp_path):
    result = run_cli("eval", str(tmp_path / "nope"), "--tasks", "rte", "--data", str(DATA),
                     "--out", str(tmp_path / "out"))  # fmt: skip
    assert result.returncode == 2 and "checkpoint not found" in result.stderr
