"""The lm-evaluation-harness backend (opt/eval/lm_eval_backend.py): on a small random model
converted to Hugging Face format, our per-request log-likelihoods (and rolling document
log-likelihoods, and greedy generations) equal lm-eval's own HF backend's, and the command
line runs a local task end to end. Everything is offline: the
tokenizer is trained here, the requests and the task file are made here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# Nothing may come from the hub; set before transformers, datasets or lm_eval is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest
import torch
from helpers import REPO, import_or_skip_group, skip_group

try:
    import lm_eval  # noqa: F401
except ImportError as err:
    skip_group(
        "lm-eval backend tests",
        f"lm_eval is not importable ({err}); it is in the [dev] extra",
        True,
    )
transformers = import_or_skip_group("transformers", "the lm-eval backend tests")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from opt.checkpoint import save_checkpoint  # noqa: E402
from opt.convert.hf import args_from_hf_config, to_hf  # noqa: E402
from opt.data.tokenizer import train_tokenizer  # noqa: E402
from opt.eval.lm_eval_backend import OptLM, rolling_windows  # noqa: E402
from opt.models.model import build_model  # noqa: E402

MAX_POSITIONS = 64  # short, so that long requests are truncated and documents span windows
CONFIG = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "ffn_dim": 128,
    "vocab_size": 512,
    "max_position_embeddings": MAX_POSITIONS,
}
WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "while",
    "rain",
    "fell",
    "over",
    "quiet",
    "hills",
    "and",
    "rivers",
    "ran",
    "to",
    "the",
    "sea",
    "every",
    "morning",
    "bakers",
    "sold",
    "warm",
    "bread",
    "to",
    "people",
    "who",
    "walked",
    "past",
    "the",
    "old",
    "church",
]


def _text(seed: int, n_words: int) -> str:
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(WORDS), (n_words,), generator=gen).tolist()
    return " ".join(WORDS[i] for i in picks)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """(our checkpoint, the same weights as a transformers directory: ``to_hf`` gives it an
    OPT-style tokenizer that starts every text with ``</s>``, as facebook/opt's does)."""
    root = tmp_path_factory.mktemp("lm_eval")
    tokenizer = train_tokenizer([_text(s, 60) for s in range(40)], vocab_size=400)
    args = args_from_hf_config({"model_type": "opt", **CONFIG})
    torch.manual_seed(0)
    model = build_model(args)
    with torch.no_grad():  # non-trivial biases and LayerNorm affines
        gen = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    ckpt, hf = root / "ckpt", root / "hf"
    save_checkpoint(
        ckpt,
        model=model,
        model_args=args,
        extra_files={"tokenizer.json": tokenizer.to_str().encode()},
    )
    to_hf(ckpt, hf)  # with an OPT-style tokenizer: </s> first, as facebook/opt's
    return ckpt, hf


@pytest.fixture(scope="module")
def ours(dirs):
    return OptLM(checkpoint=str(dirs[0]), batch_size=3)


def _hf(hf_dir, **kwargs):
    transformers.logging.set_verbosity_error()
    return get_model("hf")(
        pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=3, **kwargs
    )


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def _loglikelihood_args() -> list[tuple[str, str]]:
    out = []
    for s in range(6):
        context = _text(100 + s, 5 + 3 * s)
        out += [(context, " " + _text(200 + s, 1 + s % 3)), (context, " " + _text(300 + s, 2))]
    out.append((_text(7, 4) + " ", "bread"))  # the trailing space moves to the continuation
    out.append((_text(8, 90), " warm bread"))  # longer than the model: cut from the left
    out.append((_text(9, 3), "s and hills"))  # a continuation that merges with the context
    return out


def test_loglikelihood_equals_lm_eval_hf_backend(dirs, ours):
    requests = [*_loglikelihood_args(), _greedy_pair(ours)]
    mine = ours.loglikelihood(_requests("loglikelihood", requests))
    theirs = _hf(dirs[1]).loglikelihood(_requests("loglikelihood", requests))
    assert len(mine) == len(theirs) == len(requests)
    torch.testing.assert_close(
        torch.tensor([m[0] for m in mine], dtype=torch.float64),
        torch.tensor([t[0] for t in theirs], dtype=torch.float64),
        rtol=1e-5,
        atol=1e-4,
    )
    assert [m[1] for m in mine] == [t[1] for t in theirs]
    assert mine[-1][1] is True  # the greedy pair
    assert all(m[0] < 0 for m in mine)


def _greedy_pair(ours) -> tuple[str, str]:
    """A context and the model's most likely next token as text (the first context whose
    argmax token survives decoding and re-encoding after it)."""
    for seed in range(11, 60):
        context = _text(seed, 6)
        ids = [ours.eos, *ours.tok_encode(context)]
        with torch.no_grad():
            top = int(ours.model(torch.tensor([ids]))[0, -1].argmax())
        continuation = ours.tokenizer.decode([top])
        if ours.encode_pair(context, continuation)[1] == [top]:
            return context, continuation
    raise AssertionError("no context's argmax token round-trips through the tokenizer")


def test_is_greedy_true_for_the_models_own_next_token(ours):
    context, continuation = _greedy_pair(ours)
    [(score, greedy)] = ours.loglikelihood(_requests("loglikelihood", [(context, continuation)]))
    assert greedy is True and score < 0


def test_loglikelihood_rolling_equals_lm_eval_hf_backend(dirs, ours):
    # Documents from shorter than one window to three windows of MAX_POSITIONS tokens.
    docs = [(_text(400 + s, n),) for s, n in enumerate((3, 20, 40, 90, 130))]
    lengths = [len(ours.tok_encode(d[0])) for d in docs]
    assert min(lengths) < MAX_POSITIONS and max(lengths) > 2 * MAX_POSITIONS
    mine = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", docs))
    # The HF backend puts the prefix token before the tokenizer's output, so its tokenizer
    # must not add a second </s> here (with it, the document would start "</s></s>").
    hf = _hf(dirs[1], add_bos_token=False, max_length=MAX_POSITIONS)
    theirs = hf.loglikelihood_rolling(_requests("loglikelihood_rolling", docs))
    torch.testing.assert_close(
        torch.tensor(mine, dtype=torch.float64),
        torch.tensor(theirs, dtype=torch.float64),
        rtol=1e-5,
        atol=1e-4,
    )


def test_empty_context_scores_the_text_after_the_document_prefix(ours):
    text = _text(12, 10)
    [(score, _)] = ours.loglikelihood(_requests("loglikelihood", [("", text)]))
    [rolling] = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    assert score == pytest.approx(rolling, rel=1e-6)


def test_rolling_windows_predict_each_token_once_with_most_context():
    tokens = list(range(10, 20))  # lm-eval's docstring example, prefix 0, 4 positions
    windows = rolling_windows(tokens, prefix=0, max_length=4)
    assert windows == [
        ([0], [10, 11, 12, 13]),
        ([13], [14, 15, 16, 17]),
        ([15, 16, 17], [18, 19]),
    ]
    for context, block in windows:
        assert len(context) + len(block) - 1 <= 4  # the model's inputs
    assert [t for _, block in windows for t in block] == tokens
    assert rolling_windows([], prefix=0, max_length=4) == []


def test_command_line_runs_a_local_task(dirs, tmp_path):
    """`python -m opt.eval.lm_eval_backend` is lm-eval's command line with opt registered:
    a multiple-choice task read from a local JSONL through --include_path."""
    rows = [
        {"question": _text(500 + i, 8), "choices": [" bread", " rain", " hills"], "label": i % 3}
        for i in range(6)
    ]
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "toy.yaml").write_text(
        "task: opt_toy_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "target_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "opt.eval.lm_eval_backend",
            "--model",
            "opt",
            "--model_args",
            f"checkpoint={dirs[0]}",
            "--tasks",
            "opt_toy_mc",
            "--include_path",
            str(tasks),
            "--batch_size",
            "4",
            "--output_path",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    [results] = list(out.rglob("results*.json"))
    acc = json.loads(results.read_text())["results"]["opt_toy_mc"]
    assert 0 <= acc["acc,none"] <= 1 and 0 <= acc["acc_norm,none"] <= 1


def test_generate_until_equals_lm_eval_hf_backend(dirs, ours):
    """Greedy continuations, cut at the ``until`` strings or after ``max_gen_toks`` tokens,
    as lm-eval's HF backend (transformers' generate) produces them on the same weights."""
    gen_kwargs = [
        {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False},
        {"until": ["#", " hills"], "max_gen_toks": 20},
    ]
    args = [(_text(600 + s, 4 + 3 * s), gen_kwargs[s % 2]) for s in range(6)]
    # Contexts longer than the positions left for generation: both cut them from the left.
    args += [(_text(700 + s, 55 + 10 * s), gen_kwargs[s % 2]) for s in range(2)]
    mine = ours.generate_until(_requests("generate_until", args))
    theirs = _hf(dirs[1], max_length=MAX_POSITIONS).generate_until(
        _requests("generate_until", [(c, dict(k)) for c, k in args])
    )
    assert mine == theirs
    assert all("#" not in m and " hills" not in m for m in mine[1::2])
    # The random model's continuations do contain the stop strings: the cuts are tested.
    full = ours.generate_until(
        _requests("generate_until", [(c, {"max_gen_toks": 20}) for c, _ in args[1::2]])
    )
    assert sum(len(f) > len(m) for f, m in zip(full, mine[1::2], strict=True)) >= 2
