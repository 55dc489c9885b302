"""The word-cache encoder must give exactly the ids that `tokenizers` gives, on any text."""

from __future__ import annotations

import random
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, normalizers, pre_tokenizers

from opt.data import fast_encode, prepare
from opt.data.corpus import builtin_documents
from opt.data.fast_encode import CachedByteLevelEncoder, fast_encoder
from opt.data.prepare import prepare_dataset
from opt.data.tokenizer import load_tokenizer, train_tokenizer
from opt.errors import OptError

# Characters that exercise every rule of GPT-2's split: blanks and other whitespace in runs,
# apostrophes and the contraction letters, letters, digits and punctuation from several
# scripts, combining marks, an emoji, special tokens, and the encoder's own two separators.
TRICKY = [
    *" '  ''\n\n\t\r\xa0\u3000\u2028\x1c\x85\x0b",
    *"stmdrevlSTMDREVLxyz019!.,-_",
    *"é漢٣²Ⅻ😀\u200b\u0301ß",
    *["</s>", "<s>", "\x00", "\x01", "'s", "'re", "'ll", "'ve", " 'd"],
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_tokenizer(builtin_documents("pydoc"), vocab_size=2048)


def theirs(tokenizer: Tokenizer, docs: list[str]) -> list[list[int]]:
    return [e.ids for e in tokenizer.encode_batch_fast(docs, add_special_tokens=False)]


def ours(encoder: CachedByteLevelEncoder, docs: list[str]) -> list[list[int]]:
    return [ids.tolist() for ids in encoder.encode_batch(docs)]


def random_docs(rng: random.Random, n_docs: int, max_len: int) -> list[str]:
    return ["".join(rng.choices(TRICKY, k=rng.randint(1, max_len))) for _ in range(n_docs)]


def test_pydoc_ids_are_identical(tokenizer: Tokenizer) -> None:
    docs = builtin_documents("pydoc")
    encoder = fast_encoder(tokenizer)
    assert ours(encoder, docs) == theirs(tokenizer, docs)
    assert ours(encoder, docs[::-1]) == theirs(tokenizer, docs[::-1])  # from a warm cache


@pytest.mark.parametrize("seed", range(4))
def test_random_tricky_text_ids_are_identical(tokenizer: Tokenizer, seed: int) -> None:
    rng = random.Random(seed)
    encoder = fast_encoder(tokenizer)
    for _ in range(50):
        docs = random_docs(rng, rng.randint(1, 12), max_len=80)
        assert ours(encoder, docs) == theirs(tokenizer, docs), docs


@pytest.mark.slow
def test_every_basic_plane_character_in_context(tokenizer: Tokenizer) -> None:
    """Each character of the BMP after and before letters, digits, marks and blanks."""
    chars = [chr(c) for c in range(0x10000) if not 0xD800 <= c <= 0xDFFF]
    docs = ["".join(f"x{c}1{c}!{c} {c}'{c}s\n" for c in chars[i : i + 512])
            for i in range(0, len(chars), 512)]  # fmt: skip
    encoder = fast_encoder(tokenizer)
    assert ours(encoder, docs) == theirs(tokenizer, docs)
    # The class table, from this Python's Unicode data, is right for nearly every assigned
    # character; the few it misses (assigned in a newer Unicode, say) went to `tokenizers`.
    assigned = np.array([unicodedata.category(c) != "Cn" for c in chars])
    codes = np.array([ord(c) for c in chars])
    disagree = encoder._disagree[codes]
    assert disagree[assigned].mean() < 0.005


def test_fallback_documents_keep_their_place(tokenizer: Tokenizer) -> None:
    encoder = fast_encoder(tokenizer)
    docs = ["plain text", "with </s> a special", "nul \x00 inside", "more plain", "\x01"]
    assert ours(encoder, docs) == theirs(tokenizer, docs)


def test_a_full_cache_starts_afresh(tokenizer: Tokenizer, monkeypatch) -> None:
    monkeypatch.setattr(fast_encode, "_MAX_CACHED_WORDS", 50)
    monkeypatch.setattr(fast_encode, "_CHUNK_CHARS", 2000)
    encoder = fast_encoder(tokenizer)
    docs = builtin_documents("pydoc")[:10]
    assert ours(encoder, docs) == theirs(tokenizer, docs)
    assert ours(encoder, docs) == theirs(tokenizer, docs)
    assert encoder._words._length.size <= 50 + 2000  # bounded by the limit plus one chunk


def test_gpt2_vocab_and_merges_files(tmp_path: Path, tokenizer: Tokenizer) -> None:
    tokenizer.model.save(str(tmp_path))  # vocab.json + merges.txt, as GPT-2 ships them
    gpt2 = load_tokenizer(tmp_path)
    docs = random_docs(random.Random(7), 40, max_len=60) + builtin_documents("pydoc")[:5]
    assert ours(fast_encoder(gpt2), docs) == theirs(gpt2, docs)


def test_a_split_that_drifted_is_refused(tokenizer: Tokenizer, monkeypatch) -> None:
    """Were the pattern to change (here: our copy forgets the 's contraction), the check at
    construction sees it and the tokenizer is used alone."""
    monkeypatch.setattr(fast_encode, "_SHORT_CONTRACTIONS", np.array([ord("t")], np.uint32))
    assert fast_encoder(tokenizer) is None


def test_other_pipelines_are_not_mirrored(tokenizer: Tokenizer) -> None:
    lowercase = Tokenizer.from_str(tokenizer.to_str())
    lowercase.normalizer = normalizers.Lowercase()
    prefix_space = Tokenizer.from_str(tokenizer.to_str())
    prefix_space.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    whitespace = Tokenizer.from_str(tokenizer.to_str())
    whitespace.pre_tokenizer = pre_tokenizers.Whitespace()
    for other in (lowercase, prefix_space, whitespace):
        assert fast_encoder(other) is None


@pytest.mark.parametrize(
    "variant", [{"word_cache": False}, {"word_cache": True}, {"word_cache": True, "workers": 2}]
)
def test_prepare_writes_the_same_files_every_way(
    tmp_path: Path, tokenizer: Tokenizer, monkeypatch, variant: dict
) -> None:
    """With or without the word cache, in one process or in two worker processes (small
    batches, so that both workers get several and the order of their results matters)."""
    monkeypatch.setattr(prepare, "_WORKER_BATCH_BYTES", 64 << 10)
    docs = builtin_documents("pydoc") + random_docs(random.Random(3), 200, max_len=200)
    expected_prefix = tmp_path / "expected"
    prepare_dataset(docs, tokenizer, expected_prefix, show_progress=False, word_cache=False)
    prefix = tmp_path / "ds"
    prepare_dataset(docs, tokenizer, prefix, show_progress=False, **variant)
    for suffix in (".bin", ".idx", ".json"):
        expected = expected_prefix.with_suffix(suffix).read_bytes()
        assert prefix.with_suffix(suffix).read_bytes() == expected, suffix


@pytest.mark.parametrize("workers", [1, 2])
def test_invalid_unicode_is_a_clear_error(tmp_path: Path, tokenizer: Tokenizer, workers) -> None:
    """A lone surrogate (what a JSON "\\ud800" escape decodes to) names its document, and
    leaves no dataset behind."""
    docs = ["fine", "broken \ud800 text", "fine again"]
    with pytest.raises(OptError, match=r"document 2 is not valid Unicode .*'broken \\ud800'"):
        prepare_dataset(docs, tokenizer, tmp_path / "ds", show_progress=False, workers=workers)
    assert list(tmp_path.iterdir()) == []
