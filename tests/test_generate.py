"""Generation: the KV cache against full forwards, greedy decoding against transformers'
``generate`` on our weights converted with our converter, left padding against each prompt
alone, sampling filters against transformers' and a hand-made distribution, and the CLI."""

from __future__ import annotations

import json
import os

# Nothing may come from the hub; set before transformers (and huggingface_hub) is imported.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from helpers import HF_VARIANTS, SMALL_HF, import_or_skip_group, run_cli, train_tiny_checkpoint

from opt.checkpoint import load_model, save_checkpoint
from opt.convert.hf import args_from_hf_config, to_hf
from opt.data.tokenizer import train_tokenizer
from opt.errors import OptError
from opt.eval.generate import (
    Sampling,
    generate,
    generate_ids,
    next_tokens,
    top_k_filter,
    top_p_filter,
)
from opt.models.model import KVCache, OPTModel, build_model

transformers = import_or_skip_group("transformers", "the generation parity tests")

SMALL, VARIANTS = SMALL_HF, HF_VARIANTS
# Prompts of different lengths (each starting with </s> = 2, as generate() starts them).
PROMPTS = [
    [2, 17, 301, 45, 9, 88, 120, 7, 64, 230, 11],
    [2, 5],
    [2, 400, 33, 71, 2, 19],
    [2, 250, 251, 252, 253, 254, 255, 256],
]


@pytest.fixture(scope="module", autouse=True)
def quiet_transformers():
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(verbosity)


def _our_model(variant: str = "pre_ln", seed: int = 3, vocab: int = 500) -> OPTModel:
    """A random model whose logits are far from uniform (OPT's init std 0.006 would leave
    them nearly tied, and greedy decoding would then hinge on rounding)."""
    config = {"model_type": "opt", **SMALL, **VARIANTS[variant], "vocab_size": vocab}
    args = args_from_hf_config(config)
    model = build_model(args, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module", params=list(VARIANTS))
def models(request, tmp_path_factory):
    """Ours, and transformers' OPTForCausalLM loaded from our checkpoint as to_hf exports it."""
    root = tmp_path_factory.mktemp(f"gen_{request.param}")
    ours = _our_model(request.param)
    save_checkpoint(root / "ckpt", model=ours, model_args=ours.args)
    to_hf(root / "ckpt", root / "hf")
    hf = transformers.OPTForCausalLM.from_pretrained(root / "hf", attn_implementation="sdpa")
    return ours, hf.eval()


def _left_padded(prompts: list[list[int]], pad: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(map(len, prompts))
    ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _hf_greedy(hf, prompts, max_new_tokens: int, eos: int) -> list[tuple[list[int], str]]:
    """transformers' greedy continuations, cut at the first ``eos`` as ours are."""
    ids, mask = _left_padded(prompts)
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=1,
            eos_token_id=eos,
        )
    results = []
    for row in out[:, ids.shape[1] :].tolist():
        if eos in row:
            results.append((row[: row.index(eos)], "eos"))
        else:
            results.append((row, "length"))
    return results


# --- (a) greedy decoding equals transformers' generate ----------------------------------------


def test_greedy_equals_transformers_generate(models):
    ours, hf = models
    expected = _hf_greedy(hf, PROMPTS, 20, eos=2)
    assert generate_ids(ours, PROMPTS, 20, eos=2) == expected
    # Rows that end early: make a token the first prompt's continuation reaches mid-way the
    # end-of-document token, for both. Every row then ends where transformers ends it.
    eos = expected[0][0][7]
    early = _hf_greedy(hf, PROMPTS, 20, eos=eos)
    assert any(finish == "eos" for _, finish in early)
    assert generate_ids(ours, PROMPTS, 20, eos=eos) == early


# --- (b) the cache: incremental logits equal full forwards ------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_steps_equal_full_forward(variant):
    model = _our_model(variant)
    tokens = torch.randint(4, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)  # the training path: no cache, one causal SDPA
        cache = KVCache.allocate(model, 2, 24)
        steps = [model(tokens[:, :5], cache=cache)]  # a prompt, then one token at a time
        steps += [model(tokens[:, t : t + 1], cache=cache) for t in range(5, 24)]
    assert cache.length == 24
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_left_padded_steps_equal_each_row_alone(variant):
    """Positions come from the mask: a padded row's logits are those of the row alone."""
    model = _our_model(variant)
    gen = torch.Generator().manual_seed(2)
    rows = [torch.randint(4, 500, (n,), generator=gen).tolist() for n in (12, 5, 8)]
    prompts, continuation = [r[:-3] for r in rows], torch.tensor([r[-3:] for r in rows])
    ids, mask = _left_padded(prompts)
    with torch.no_grad():
        cache = KVCache.allocate(model, 3, ids.shape[1] + 3)
        prefill = model(ids, cache=cache, padding_mask=mask.bool())
        steps = [model(continuation[:, t : t + 1], cache=cache) for t in range(3)]
        for i, row in enumerate(rows):
            alone = model(torch.tensor([row]))[0]  # (T, V)
            n = len(prompts[i])
            torch.testing.assert_close(prefill[i, -n:], alone[:n], atol=1e-5, rtol=1e-5)
            got = torch.stack([s[i, 0] for s in steps])
            torch.testing.assert_close(got, alone[n:], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(prefill).all()  # padding queries attend to themselves: no NaN


def test_padded_forward_equals_transformers(models):
    ours, hf = models
    ids, mask = _left_padded(PROMPTS)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, padding_mask=mask.bool())
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)


def test_cache_overflow_and_positions_are_refused():
    model = _our_model()
    cache = KVCache.allocate(model, 1, 4)
    with torch.no_grad(), pytest.raises(OptError, match="overflow a KV cache of 4"):
        model(torch.ones(1, 5, dtype=torch.long), cache=cache)
    with torch.no_grad(), pytest.raises(OptError, match="max_positions=64"):
        model(torch.ones(1, 65, dtype=torch.long), padding_mask=torch.ones(1, 65).bool())


# --- (c) a padded batch decodes as each prompt alone ------------------------------------------


def test_batch_gives_each_prompt_its_own_tokens(models):
    ours, _ = models
    batched = generate_ids(ours, PROMPTS, 16, eos=2)
    assert [generate_ids(ours, [p], 16, eos=2)[0] for p in PROMPTS] == batched


# --- (d) sampling ----------------------------------------------------------------------------


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = _our_model()
    sampling = Sampling(temperature=1.0, top_p=0.9, top_k=50)

    def sample(seed: int):
        gen = torch.Generator().manual_seed(seed)
        return generate_ids(model, PROMPTS, 12, eos=2, sampling=sampling, generator=gen)

    before = torch.get_rng_state()
    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is left alone
    greedy = generate_ids(model, PROMPTS, 12, eos=2)
    assert sample(7) != greedy
    one = Sampling(temperature=0.7, top_k=1)
    gen = torch.Generator().manual_seed(0)
    assert generate_ids(model, PROMPTS, 12, eos=2, sampling=one, generator=gen) == greedy


def test_top_p_keeps_the_smallest_set_that_reaches_p():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])  # ranked: 0.5, 0.3, 0.15, 0.05
    logits = probs.log()
    for p, kept in [(0.4, [1]), (0.7, [1, 3]), (0.9, [0, 1, 3]), (0.99, [0, 1, 2, 3])]:
        filtered = top_p_filter(logits, p)
        assert torch.isfinite(filtered).nonzero().flatten().tolist() == kept, p
        assert torch.equal(filtered[kept], logits[kept])  # kept logits are untouched
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    # The most likely token stays even when it alone exceeds p.
    assert torch.isfinite(top_p_filter(logits, 0.01)).nonzero().flatten().tolist() == [1]


@pytest.mark.parametrize(("top_k", "top_p"), [(0, 0.3), (0, 0.8), (5, 1.0), (40, 0.95)])
def test_filters_equal_transformers_warpers(top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = 3 * torch.randn(6, 500, generator=torch.Generator().manual_seed(top_k))
    expected = logits.clone()
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
    got = top_p_filter(top_k_filter(logits, top_k), top_p)
    assert torch.equal(torch.isfinite(got), torch.isfinite(expected))
    kept = torch.isfinite(got)
    assert torch.equal(got[kept], logits[kept])


def test_sampled_tokens_follow_the_filtered_distribution():
    """Draws stay inside the top-k/top-p set, and land on each kept token about as often as
    its renormalised probability says (10,000 draws: 4 standard errors of slack)."""
    probs = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05])
    logits = probs.log().expand(10_000, 5)
    gen = torch.Generator().manual_seed(0)
    drawn = next_tokens(logits, Sampling(temperature=1.0, top_k=4, top_p=0.8), gen)
    counts = torch.bincount(drawn, minlength=5).float() / 10_000
    # top-k drops 0.05; top-p then 0.1, as the three above it hold 0.85 / 0.95 = 0.89 >= 0.8.
    assert counts[3:].sum() == 0
    expected = probs[:3] / probs[:3].sum()
    slack = 4 * (expected * (1 - expected) / 10_000).sqrt()
    assert ((counts[:3] - expected).abs() <= slack).all(), counts


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"temperature": float("nan")}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k must be >= 0"),
    ],
)
def test_bad_sampling_settings_are_refused(settings, message):
    with pytest.raises(OptError, match=message):
        Sampling(**settings)


# --- text in, text out -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["the cat sat on the mat. ", "a dog ran in the park! ", "def f(x): return x + 1"]
    return train_tokenizer(texts * 20, vocab_size=300)


def _text_model(tokenizer) -> OPTModel:
    return _our_model(vocab=tokenizer.get_vocab_size())


def test_generate_text_stop_strings_and_batching(tokenizer):
    model = _text_model(tokenizer)
    prompts = ["the cat", "", "def f(x):"]
    plain = generate(model, tokenizer, prompts, 24)
    assert [g.finish for g in plain] == ["length"] * 3
    for g in plain:
        assert len(g.token_ids) == 24 and g.text == tokenizer.decode(g.token_ids)
    # Batch size does not change greedy output (each prompt alone, or all together).
    assert generate(model, tokenizer, prompts, 24, batch_size=1) == plain
    # The generated text is the model's continuation of </s> + prompt.
    ids = [2, *tokenizer.encode(prompts[0]).ids]
    assert generate_ids(model, [ids], 24, eos=2)[0] == (plain[0].token_ids, "length")

    # Two printable ASCII characters from the second half of the first continuation, as a
    # stop string: the continuation ends once it has them, and its text is cut before them.
    text = plain[0].text
    at = next(
        i
        for i in range(len(text) // 2, len(text) - 1)
        if all(c.isascii() and c.isprintable() for c in text[i : i + 2])
    )
    stop = text[at : at + 2]
    stopped = generate(model, tokenizer, prompts, 24, stop=[stop])
    assert stopped[0].finish == "stop" and stopped[0].text == text[: text.index(stop)]
    assert plain[0].token_ids[: len(stopped[0].token_ids)] == stopped[0].token_ids
    assert len(stopped[0].token_ids) < 24
    for before, after in zip(plain[1:], stopped[1:], strict=True):
        if stop in before.text:
            assert after.finish == "stop" and after.text == before.text[: before.text.find(stop)]
        else:
            assert after == before


def test_generate_seeded_sampling_reproduces(tokenizer):
    model = _text_model(tokenizer)
    prompts = ["the cat", "a dog", "def"]
    first = generate(model, tokenizer, prompts, 16, temperature=1.0, top_p=0.95, seed=11)
    again = generate(model, tokenizer, prompts, 16, temperature=1.0, top_p=0.95, seed=11)
    assert first == again
    assert generate(model, tokenizer, prompts, 16, temperature=1.0, seed=12) != first


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ({"prompts": []}, "no prompts"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"max_new_tokens": 64}, "more than this model's max_positions=64"),
    ],
)
def test_bad_generate_input_is_refused(tokenizer, call, message):
    kwargs = {"prompts": ["the cat"], "max_new_tokens": 4, **call}
    prompts, max_new_tokens = kwargs.pop("prompts"), kwargs.pop("max_new_tokens")
    with pytest.raises(OptError, match=message):
        generate(_text_model(tokenizer), tokenizer, prompts, max_new_tokens, **kwargs)


def test_training_mode_is_refused():
    with pytest.raises(OptError, match="eval mode"):
        generate_ids(_our_model().train(), PROMPTS, 4, eos=2)


# --- (e) the command line --------------------------------------------------------------------


def test_help():
    result = run_cli("generate", "--help")
    assert result.returncode == 0 and "--max-new-tokens" in result.stdout


@pytest.mark.slow
def test_cli_end_to_end_on_a_trained_checkpoint(tmp_path, pydoc_dataset):
    checkpoint = train_tiny_checkpoint(tmp_path, pydoc_dataset, "gen")

    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("import os\n\nclass A:\n")
    result = run_cli(
        "generate", str(checkpoint), "--prompt", "def main():", "--file", str(prompts_file),
        "--max-new-tokens", "8", "--jsonl",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["prompt"] for r in lines] == ["def main():", "import os", "class A:"]

    from opt.data.tokenizer import load_tokenizer

    model = load_model(checkpoint).eval()
    expected = generate(model, load_tokenizer(checkpoint), [r["prompt"] for r in lines], 8)
    assert [(r["text"], r["token_ids"], r["finish"]) for r in lines] == [
        (g.text, g.token_ids, g.finish) for g in expected
    ]
    plain = run_cli("generate", str(checkpoint), "--prompt", "def main():", "--max-new-tokens", "8")
    assert plain.returncode == 0 and plain.stdout == "def main():" + expected[0].text + "\n"

    sample = ["--prompt", "def", "--temperature", "1.0", "--top-k", "20", "--seed", "5"]
    sampled = [
        run_cli("generate", str(checkpoint), *sample, "--max-new-tokens", "8", "--jsonl").stdout
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1] and sampled[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt", "x", "--top-p", "0"], r"top_p must be in (0, 1]"),
        ([], "nothing to continue: give --prompt TEXT or --file F"),
        (["--file", "/nonexistent/prompts.txt"], "file not found"),
    ],
)
def test_cli_bad_input_gets_one_line(tmp_path, args, message):
    result = run_cli("generate", str(tmp_path / "no_checkpoint"), *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_cli_missing_checkpoint(tmp_path):
    result = run_cli("generate", str(tmp_path / "nope"), "--prompt", "x")
    assert result.returncode == 2 and "checkpoint not found" in result.stderr
