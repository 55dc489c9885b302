"""Tests for opt.data: tokenizers, corpora, prepared datasets, sampling and the data CLI."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models

from opt.cli import data as data_cli
from opt.data import prepare
from opt.data.corpus import (
    builtin_documents,
    iter_documents,
    read_documents,
    resolve_inputs,
    total_bytes,
)
from opt.data.dataset import DatasetPaths, TokenDataset, token_dtype, valid_prefix
from opt.data.loader import BatchLoader
from opt.data.prepare import (
    BUILTIN_SPLIT_SEED,
    BUILTIN_VALID_FRACTION,
    ensure_builtin_dataset,
    held_out,
    prepare_dataset,
    save_tokenizer,
)
from opt.data.sampler import SampleStream
from opt.data.tokenizer import SPECIAL_TOKENS, eos_id, load_tokenizer, train_tokenizer
from opt.errors import OptError

REPO = Path(__file__).resolve().parents[1]
DOCS = ["def f(x):\n    return x + 1\n", "Héllo wörld, naïve café. </s> inside text", "a"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_tokenizer(builtin_documents("pydoc"), vocab_size=512)


@pytest.fixture(scope="module")
def dataset_prefix(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Path:
    prefix = tmp_path_factory.mktemp("ds") / "pydoc"
    prepare_dataset(builtin_documents("pydoc"), tokenizer, prefix, show_progress=False)
    return prefix


def expected_tokens(tokenizer: Tokenizer, docs: list[str]) -> list[int]:
    eos = eos_id(tokenizer)
    return [t for d in docs if d for t in [*tokenizer.encode(d, add_special_tokens=False).ids, eos]]


def leftover_temp_files(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


# --- tokenizer ---------------------------------------------------------------------------


def test_trained_special_token_ids_match_opt(tokenizer: Tokenizer) -> None:
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert eos_id(tokenizer) == 2
    assert tokenizer.get_vocab_size() == 512


def test_training_is_deterministic(tokenizer: Tokenizer) -> None:
    again = train_tokenizer(builtin_documents("pydoc"), vocab_size=512)
    assert again.to_str() == tokenizer.to_str()


@pytest.mark.parametrize("texts, vocab_size", [(["abc"], 100), ([], 512), (["", ""], 512)])
def test_training_rejects_bad_input(texts: list[str], vocab_size: int) -> None:
    with pytest.raises(OptError):
        train_tokenizer(texts, vocab_size)


def test_round_trip(tokenizer: Tokenizer) -> None:
    for doc in DOCS:
        ids = tokenizer.encode(doc, add_special_tokens=False).ids
        assert tokenizer.decode(ids, skip_special_tokens=False) == doc


def test_special_tokens_in_text_are_single_ids(tokenizer: Tokenizer) -> None:
    assert 2 in tokenizer.encode("a </s> b").ids


def test_load_from_json_file_and_directory(tmp_path: Path, tokenizer: Tokenizer) -> None:
    path = save_tokenizer(tokenizer, tmp_path / "tok" / "tokenizer.json")
    assert leftover_temp_files(path.parent) == []
    for source in (path, path.parent, str(path)):
        assert load_tokenizer(source).encode(DOCS[1]).ids == tokenizer.encode(DOCS[1]).ids


def test_load_from_gpt2_vocab_and_merges(tmp_path: Path, tokenizer: Tokenizer) -> None:
    tokenizer.model.save(str(tmp_path))  # writes vocab.json + merges.txt
    loaded = load_tokenizer(tmp_path)
    for doc in DOCS:
        ids = loaded.encode(doc, add_special_tokens=False).ids
        assert ids == tokenizer.encode(doc, add_special_tokens=False).ids
        assert loaded.decode(ids, skip_special_tokens=False) == doc
    assert eos_id(loaded) == 2


@pytest.mark.parametrize("layout", ["missing", "empty_dir", "bad_json", "bad_merges"])
def test_load_errors_name_the_path(tmp_path: Path, layout: str) -> None:
    target = tmp_path / "tok"
    if layout == "empty_dir":
        target.mkdir()
    elif layout == "bad_json":
        target = tmp_path / "tokenizer.json"
        target.write_text("{not json")
    elif layout == "bad_merges":
        target.mkdir()
        (target / "vocab.json").write_text("{bad")
        (target / "merges.txt").write_text("")
    with pytest.raises(OptError, match=re.escape(str(target))):
        load_tokenizer(target)


def test_eos_falls_back_to_gpt2_endoftext() -> None:
    gpt2 = Tokenizer(models.BPE(vocab={"a": 0, "<|endoftext|>": 1}, merges=[]))
    assert eos_id(gpt2) == 1
    with pytest.raises(OptError, match="end-of-document"):
        eos_id(Tokenizer(models.BPE(vocab={"a": 0}, merges=[])))


# --- corpus --------------------------------------------------------------------------------


def test_builtin_corpus_is_deterministic() -> None:
    from pydoc_data.topics import topics

    docs = builtin_documents()
    assert docs == builtin_documents("pydoc")
    assert docs == [topics[k] for k in sorted(topics)]
    with pytest.raises(OptError, match="unknown built-in corpus"):
        builtin_documents("wikipedia")


def test_read_txt_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one document\n\nstill the same one\n", encoding="utf-8")
    lines = [json.dumps({"body": d, "id": i}) for i, d in enumerate(DOCS)]
    (tmp_path / "b.jsonl").write_text("\n".join([lines[0], "", *lines[1:]]) + "\n")
    assert list(read_documents(tmp_path / "a.txt")) == ["one document\n\nstill the same one\n"]
    assert list(read_documents(tmp_path / "b.jsonl", text_key="body")) == DOCS


@pytest.mark.parametrize(
    "line, message",
    [("{oops", "invalid JSON"), ('{"body": 3}', "no field 'text'"), ("[1]", "JSON object")],
)
def test_bad_jsonl_line_names_file_and_line(
    tmp_path: Path, line: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n")
    # Skipped with a warning, the rest read (every format: tests/test_corpus_formats.py).
    assert list(read_documents(path)) == ["fine"]
    assert re.search(rf"c\.jsonl:2: .*{message}", capsys.readouterr().err)


def test_resolve_inputs(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("sub/b.txt", "a.jsonl", "skip.bin"):
        (tmp_path / name).write_text(json.dumps({"text": "x"}))
    assert resolve_inputs([str(tmp_path), "builtin:pydoc"]) == [
        tmp_path / "a.jsonl",
        tmp_path / "sub" / "b.txt",
        "builtin:pydoc",
    ]
    for bad, message in [
        (tmp_path / "nope.txt", "input not found"),
        (tmp_path / "skip.bin", "unsupported input"),
    ]:
        with pytest.raises(OptError, match=message):
            resolve_inputs([str(bad)])
    with pytest.raises(OptError, match="unknown built-in"):
        resolve_inputs(["builtin:nope"])


# --- prepare + dataset ----------------------------------------------------------------------


def test_prepare_jsonl_tokens_offsets_and_metadata(tmp_path: Path, tokenizer: Tokenizer) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in [*DOCS, ""]))
    sources = resolve_inputs([str(src)])
    meta = prepare_dataset(
        iter_documents(sources), tokenizer, tmp_path / "out", total_bytes(sources), False
    )

    expected = expected_tokens(tokenizer, DOCS)
    ds = TokenDataset(tmp_path / "out")
    assert ds.tokens.dtype == np.uint16 and ds.tokens.tolist() == expected
    assert (ds.n_tokens, ds.n_docs, ds.eos_id) == (len(expected), 3, 2)  # empty doc skipped
    offsets = ds.doc_offsets()
    assert offsets.dtype == np.int64 and len(offsets) == 4 and offsets[-1] == len(expected)
    assert all(ds.tokens[end - 1] == 2 for end in offsets[1:])  # each document ends with EOS
    sha = hashlib.sha256(DatasetPaths.of(tmp_path / "out").bin.read_bytes()).hexdigest()
    assert meta["sha256"] == sha and meta == ds.meta
    assert meta["format"] == "opt-tokens-v1" and meta["vocab_size"] == 512
    ds.verify()


def test_prepare_txt_files(tmp_path: Path, tokenizer: Tokenizer) -> None:
    for i, doc in enumerate(DOCS):
        (tmp_path / f"{i}.txt").write_text(doc, encoding="utf-8")
    sources = resolve_inputs([str(tmp_path / f"{i}.txt") for i in range(len(DOCS))])
    prepare_dataset(iter_documents(sources), tokenizer, tmp_path / "d.v1", show_progress=False)
    ds = TokenDataset(tmp_path / "d.v1")  # a prefix with a dot keeps it
    assert ds.tokens.tolist() == expected_tokens(tokenizer, DOCS)
    assert ds.n_docs == len(DOCS)


def test_metadata_is_published_last(
    tmp_path: Path, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    renamed: list[str] = []
    real_replace = os.replace

    def recording_replace(src: str, dst: str) -> None:
        renamed.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    prepare_dataset(DOCS, tokenizer, tmp_path / "ds", show_progress=False)
    assert sorted(renamed) == ["ds.bin", "ds.idx", "ds.json"] and renamed[-1] == "ds.json"
    assert leftover_temp_files(tmp_path) == []


def test_files_get_the_usual_permissions(tmp_path: Path, tokenizer: Tokenizer) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    prepare_dataset(DOCS, tokenizer, tmp_path / "ds", show_progress=False)
    for path in tmp_path.iterdir():  # not mkstemp's 0600: datasets are shared between users
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_prepare_keeps_previous_dataset(tmp_path: Path, tokenizer: Tokenizer) -> None:
    prepare_dataset(DOCS, tokenizer, tmp_path / "ds", show_progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def failing_documents():
        yield "some text"
        raise OptError("bad line")

    with pytest.raises(OptError, match="bad line"):
        prepare_dataset(failing_documents(), tokenizer, tmp_path / "ds", show_progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_empty_corpus_writes_nothing(tmp_path: Path, tokenizer: Tokenizer) -> None:
    with pytest.raises(OptError, match="empty corpus"):
        prepare_dataset(["", ""], tokenizer, tmp_path / "ds", show_progress=False)
    assert list(tmp_path.iterdir()) == []


# --- the held-out split -----------------------------------------------------------------------


def split_docs(n: int = 40) -> list[str]:
    """Documents of many sizes, with empty ones (skipped, and not numbered) among them."""
    docs = builtin_documents("pydoc")
    return [docs[i % len(docs)][: 50 + 97 * i] if i % 7 else "" for i in range(n)]


def test_held_out_is_a_seeded_choice_of_about_the_fraction() -> None:
    picks = [held_out(i, 0.1, seed=0) for i in range(20_000)]
    assert 0.09 < sum(picks) / len(picks) < 0.11
    assert picks == [held_out(i, 0.1, seed=0) for i in range(20_000)]  # deterministic
    assert picks != [held_out(i, 0.1, seed=1) for i in range(20_000)]  # seeded
    assert not any(held_out(i, 0.0) for i in range(1000))
    more = [held_out(i, 0.3, seed=0) for i in range(20_000)]
    assert all(m for p, m in zip(picks, more, strict=True) if p)  # a larger fraction adds


def test_a_split_holds_out_whole_documents(tmp_path: Path, tokenizer: Tokenizer) -> None:
    docs = split_docs()
    numbered = [d for d in docs if d]  # the numbers count the non-empty documents
    held = [held_out(i, 0.25, seed=3) for i in range(len(numbered))]
    assert 0 < sum(held) < len(numbered)
    meta = prepare_dataset(docs, tokenizer, tmp_path / "ds", show_progress=False,
                           valid_fraction=0.25, split_seed=3)  # fmt: skip
    train, valid = TokenDataset(tmp_path / "ds"), TokenDataset(tmp_path / "ds-valid")
    kept = [d for d, h in zip(numbered, held, strict=True) if not h]
    out = [d for d, h in zip(numbered, held, strict=True) if h]
    assert train.tokens.tolist() == expected_tokens(tokenizer, kept)
    assert valid.tokens.tolist() == expected_tokens(tokenizer, out)
    assert (train.n_docs, valid.n_docs) == (len(kept), len(out))
    for ds in (train, valid):  # offsets fall on document ends
        assert all(ds.tokens[end - 1] == eos_id(tokenizer) for end in ds.doc_offsets()[1:])
        ds.verify()
    assert meta == train.meta and meta["split"] == {
        "part": "train", "valid_fraction": 0.25, "seed": 3, "valid_docs": len(out),
        "valid_tokens": valid.n_tokens, "valid_sha256": valid.meta["sha256"],
    }  # fmt: skip
    assert valid.meta["split"] == {"part": "valid", "valid_fraction": 0.25, "seed": 3,
                                   "train_sha256": train.meta["sha256"]}  # fmt: skip
    assert leftover_temp_files(tmp_path) == []


@pytest.mark.parametrize(
    "variant", [{"word_cache": False}, {"word_cache": True}, {"word_cache": True, "workers": 2}]
)
def test_a_split_is_byte_identical_across_runs_and_worker_counts(
    tmp_path: Path, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch, variant: dict
) -> None:
    """Small worker batches, so that both workers get several and a held-out document
    falls inside some batches and at the edge of others."""
    monkeypatch.setattr(prepare, "_WORKER_BATCH_BYTES", 16 << 10)
    monkeypatch.setattr(prepare, "_BATCH_DOCS", 7)
    docs = split_docs(120)
    split = {"valid_fraction": 0.2, "split_seed": 5}
    prepare_dataset(docs, tokenizer, tmp_path / "a", show_progress=False, word_cache=False,
                    **split)  # fmt: skip
    prepare_dataset(docs, tokenizer, tmp_path / "b", show_progress=False, **variant, **split)
    for name in ("", "-valid"):
        for suffix in (".bin", ".idx", ".json"):
            a = (tmp_path / f"a{name}{suffix}").read_bytes()
            assert (tmp_path / f"b{name}{suffix}").read_bytes() == a, name + suffix


def test_the_two_datasets_are_published_together_markers_last(
    tmp_path: Path, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    renamed: list[str] = []
    real_replace = os.replace

    def recording_replace(src: str, dst: str) -> None:
        renamed.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    prepare_dataset(split_docs(), tokenizer, tmp_path / "ds", show_progress=False,
                    valid_fraction=0.3)  # fmt: skip
    assert sorted(renamed[:4]) == ["ds-valid.bin", "ds-valid.idx", "ds.bin", "ds.idx"]
    assert renamed[4:] == ["ds-valid.json", "ds.json"]  # the training set's marker last


def test_preparing_without_a_split_removes_the_old_held_out_set(
    tmp_path: Path, tokenizer: Tokenizer
) -> None:
    """An old PREFIX-valid may hold documents the new PREFIX trains on."""
    prepare_dataset(split_docs(), tokenizer, tmp_path / "ds", show_progress=False,
                    valid_fraction=0.3)  # fmt: skip
    assert TokenDataset(tmp_path / "ds-valid").n_docs > 0
    meta = prepare_dataset(split_docs(), tokenizer, tmp_path / "ds", show_progress=False)
    assert "split" not in meta
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.bin", "ds.idx", "ds.json"]


@pytest.mark.parametrize("fraction", [0.001, 0.999])
def test_a_split_that_leaves_a_side_empty_is_refused_and_writes_nothing(
    tmp_path: Path, tokenizer: Tokenizer, fraction: float
) -> None:
    with pytest.raises(OptError, match="both need at least one"):
        prepare_dataset(DOCS, tokenizer, tmp_path / "ds", show_progress=False,
                        valid_fraction=fraction)  # fmt: skip
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OptError, match=r"in \[0, 1\)"):
        prepare_dataset(DOCS, tokenizer, tmp_path / "ds", valid_fraction=1.0)


def test_token_dtype_widens_for_large_vocabularies() -> None:
    assert token_dtype(50272) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_missing_dataset_message(tmp_path: Path) -> None:
    expected = f"dataset not found: {tmp_path / 'nope'}.json (run `opt data prepare`)"
    with pytest.raises(OptError) as info:
        TokenDataset(tmp_path / "nope")
    assert str(info.value) == expected


def test_corrupt_bin_is_detected(tmp_path: Path, tokenizer: Tokenizer) -> None:
    prepare_dataset(DOCS, tokenizer, tmp_path / "ds", show_progress=False)
    paths = DatasetPaths.of(tmp_path / "ds")
    data = bytearray(paths.bin.read_bytes())
    paths.bin.write_bytes(data[:-2])  # truncated: one token short
    with pytest.raises(OptError, match="corrupt"):
        TokenDataset(tmp_path / "ds")
    data[0] ^= 0xFF  # same size, different content: only the hash can tell
    paths.bin.write_bytes(data)
    with pytest.raises(OptError, match="sha256"):
        TokenDataset(tmp_path / "ds").verify()
    paths.meta.write_text("{}")
    with pytest.raises(OptError, match="not an opt-tokens-v1 dataset"):
        TokenDataset(tmp_path / "ds")


def test_samples_are_shifted_windows(dataset_prefix: Path) -> None:
    ds = TokenDataset(dataset_prefix)
    seq_len = 16
    n = ds.num_samples(seq_len)
    assert n == (ds.n_tokens - 1) // seq_len
    last = ds.sample(n - 1, seq_len)
    assert last.dtype == np.int64 and len(last) == seq_len + 1
    assert last.tolist() == ds.tokens[(n - 1) * seq_len : n * seq_len + 1].tolist()
    assert ds.sample(1, seq_len)[0] == ds.sample(0, seq_len)[-1]  # windows share one token
    with pytest.raises(IndexError):
        ds.sample(n, seq_len)
    with pytest.raises(OptError, match="too few"):
        ds.num_samples(ds.n_tokens)


# --- sampler -----------------------------------------------------------------------------------


def test_stream_is_deterministic_and_seeded() -> None:
    assert SampleStream(100, 7).next_indices(250) == SampleStream(100, 7).next_indices(250)
    assert SampleStream(100, 7).next_indices(100) != SampleStream(100, 8).next_indices(100)
    expected = torch.randperm(100, generator=torch.Generator().manual_seed(7)).tolist()
    assert SampleStream(100, 7).next_indices(100) == expected


def test_every_epoch_is_a_permutation() -> None:
    stream = SampleStream(37, 0)
    seen = [stream.next_indices(n) for n in (5, 30, 13, 26)]  # crosses epoch boundaries
    flat = [i for chunk in seen for i in chunk]
    assert sorted(flat[:37]) == sorted(flat[37:]) == list(range(37))
    assert flat[:37] != flat[37:]  # each epoch reshuffles
    assert stream.pos == 74


def test_skip_ranges() -> None:
    reference = SampleStream(20, 3).next_indices(60)
    stream = SampleStream(20, 3)
    stream.skip(5, 9)
    stream.skip(8, 12)  # overlaps: merged into [5, 12)
    stream.skip(18, 25)  # spans an epoch boundary
    kept = [i for pos, i in enumerate(reference) if not (5 <= pos < 12 or 18 <= pos < 25)]
    assert stream.next_indices(len(kept)) == kept
    assert stream.pos == 60
    assert stream.state_dict()["skips"] == [[5, 12], [18, 25]]
    with pytest.raises(ValueError):
        stream.skip(4, 2)


def test_stream_state_round_trip_and_mismatch() -> None:
    stream = SampleStream(50, 1)
    stream.skip(10, 20)
    stream.next_indices(7)
    state = json.loads(json.dumps(stream.state_dict()))  # plain data, survives JSON
    resumed = SampleStream(50, 1)
    resumed.load_state_dict(state)
    assert resumed.next_indices(80) == stream.next_indices(80)
    for other in (SampleStream(51, 1), SampleStream(50, 2)):
        with pytest.raises(OptError, match="changed under a resume"):
            other.load_state_dict(state)


def make_loader(prefix: Path, seed: int = 0, mbs: int = 2, rank: int = 0, dp: int = 1):
    ds = TokenDataset(prefix)
    return BatchLoader(ds, SampleStream(ds.num_samples(32), seed), 32, mbs, rank, dp)


def test_batches_are_shifted_int64(dataset_prefix: Path) -> None:
    inputs, targets = make_loader(dataset_prefix).next_microbatches(3)[0]
    assert inputs.shape == targets.shape == (2, 32) and inputs.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


def test_resume_is_exact(dataset_prefix: Path) -> None:
    uninterrupted = make_loader(dataset_prefix, seed=5)
    [uninterrupted.next_microbatches(4) for _ in range(3)]
    state = uninterrupted.state_dict()
    expected = [uninterrupted.next_microbatches(4) for _ in range(3)]

    resumed = make_loader(dataset_prefix, seed=5)
    resumed.load_state_dict(state)
    for want, got in zip(expected, [resumed.next_microbatches(4) for _ in range(3)], strict=True):
        for (wi, wt), (gi, gt) in zip(want, got, strict=True):
            assert torch.equal(wi, gi) and torch.equal(wt, gt)


def test_resume_never_repeats_or_drops_a_sample(dataset_prefix: Path) -> None:
    loader = make_loader(dataset_prefix)
    n = loader.stream.num_samples
    seen = []
    for step in range(n // 8):
        if step == 5:  # simulate a restart mid-epoch
            state = loader.state_dict()
            loader = make_loader(dataset_prefix)
            loader.load_state_dict(state)
        seen += [row.tolist() for x, _ in loader.next_microbatches(4) for row in x]
    rest = loader.stream.next_samples(n - len(seen))
    ds = loader.datasets[0]
    seen += [ds.sample(i, 32)[:-1].tolist() for _, i in rest]
    all_samples = [ds.sample(i, 32)[:-1].tolist() for i in range(n)]
    assert sorted(seen) == sorted(all_samples)


def test_data_parallel_ranks_split_the_same_global_batch(dataset_prefix: Path) -> None:
    single = make_loader(dataset_prefix, mbs=2)
    ranks = [make_loader(dataset_prefix, mbs=2, rank=r, dp=2) for r in range(2)]
    for _ in range(3):
        whole = torch.cat([x for x, _ in single.next_microbatches(4)])  # 8 samples
        parts = torch.cat([x for loader in ranks for x, _ in loader.next_microbatches(2)])
        assert torch.equal(whole, parts)
    assert {loader.state_dict()["pos"] for loader in ranks} == {single.state_dict()["pos"]}


def test_loader_rejects_stream_for_other_dataset(dataset_prefix: Path) -> None:
    ds = TokenDataset(dataset_prefix)
    with pytest.raises(OptError, match="sample stream covers"):
        BatchLoader(ds, SampleStream(ds.num_samples(32) + 1, 0), 32, 2)


# --- built-in dataset ----------------------------------------------------------------------


def test_builtin_dataset_is_built_once_per_vocab_size(tmp_path: Path) -> None:
    start = time.perf_counter()
    prefix = ensure_builtin_dataset(tmp_path, vocab_size=1024)
    print(f"built-in pydoc dataset built in {time.perf_counter() - start:.2f}s")
    assert prefix == tmp_path / "train"
    ds, valid = TokenDataset(prefix), TokenDataset(valid_prefix(prefix))
    assert valid.prefix == tmp_path / "train-valid" and ds.vocab_size == valid.vocab_size == 1024
    docs = builtin_documents()
    held = [held_out(i, BUILTIN_VALID_FRACTION, BUILTIN_SPLIT_SEED) for i in range(len(docs))]
    assert (ds.n_docs, valid.n_docs) == (len(docs) - sum(held), sum(held))
    assert 0.02 < valid.n_tokens / (ds.n_tokens + valid.n_tokens) < 0.1  # a few percent
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.get_vocab_size() == 1024
    out = [d for d, h in zip(docs, held, strict=True) if h]
    assert valid.tokens.tolist() == expected_tokens(tokenizer, out)
    stamps = [DatasetPaths.of(p).meta.stat().st_mtime_ns for p in (prefix, valid.prefix)]

    assert ensure_builtin_dataset(tmp_path, vocab_size=1024) == prefix
    assert [DatasetPaths.of(p).meta.stat().st_mtime_ns for p in (prefix, valid.prefix)] == stamps

    ensure_builtin_dataset(tmp_path, vocab_size=600)
    assert TokenDataset(prefix).vocab_size == TokenDataset(valid.prefix).vocab_size == 600
    assert load_tokenizer(tmp_path).get_vocab_size() == 600
    assert leftover_temp_files(tmp_path) == []


def test_a_builtin_dataset_built_before_the_split_is_rebuilt_with_it(tmp_path: Path) -> None:
    prefix = ensure_builtin_dataset(tmp_path, vocab_size=512)
    DatasetPaths.of(valid_prefix(prefix)).meta.unlink()  # as an older opt left it
    meta = json.loads(DatasetPaths.of(prefix).meta.read_text())
    del meta["split"]
    DatasetPaths.of(prefix).meta.write_text(json.dumps(meta))
    ensure_builtin_dataset(tmp_path, vocab_size=512)
    assert TokenDataset(valid_prefix(prefix)).n_docs > 0
    assert TokenDataset(prefix).meta["split"]["valid_fraction"] == BUILTIN_VALID_FRACTION


# --- CLI -------------------------------------------------------------------------------------


def run_data_cli(*argv: str | Path) -> int:
    """Parse like the main CLI does (``register`` on its subparsers) and run the command."""
    parser = argparse.ArgumentParser(prog="opt")
    register_into = parser.add_subparsers(dest="command", required=True)
    data_cli.register(register_into)
    args = parser.parse_args(["data", *map(str, argv)])
    return args.func(args)


def test_cli_train_tokenizer_then_prepare(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert (
        run_data_cli("train-tokenizer", "builtin:pydoc", "--vocab-size", "400", "--out", tmp_path)
        == 0
    )
    assert load_tokenizer(tmp_path / "tokenizer.json").get_vocab_size() == 400
    assert "tokenizer.json" in capsys.readouterr().out

    argv = ["prepare", "builtin:pydoc", "--tokenizer", tmp_path, "--out", tmp_path / "ds"]
    assert run_data_cli(*argv, "--no-progress") == 0
    summary = capsys.readouterr().out
    ds = TokenDataset(tmp_path / "ds")
    assert f"{ds.n_tokens:,} tokens in {ds.n_docs:,} documents" in summary
    assert ds.meta["source"] == {"inputs": ["builtin:pydoc"], "tokenizer": str(tmp_path),
                                 "bad_records": {"count": 0, "first": []}}  # fmt: skip
    assert "held out" not in summary and "split" not in ds.meta

    assert run_data_cli(*argv, "--no-progress", "--valid-fraction", "0.1", "--split-seed", "2") == 0
    summary = capsys.readouterr().out
    ds, valid = TokenDataset(tmp_path / "ds"), TokenDataset(tmp_path / "ds-valid")
    assert ds.n_docs + valid.n_docs == len(builtin_documents())
    assert f"held out {valid.n_tokens:,} tokens in {valid.n_docs:,} documents" in summary
    assert str(DatasetPaths.of(tmp_path / "ds-valid").meta) in summary
    assert ds.meta["split"]["seed"] == 2 and valid.meta["source"] == ds.meta["source"]


def test_cli_errors_write_nothing(tmp_path: Path, tokenizer: Tokenizer) -> None:
    save_tokenizer(tokenizer, tmp_path / "tokenizer.json")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    strict = ("--max-bad-records", "0")  # without it, bad records are skipped and counted
    with pytest.raises(OptError, match=r"bad\.jsonl:2"):
        run_data_cli("prepare", bad, "--tokenizer", tmp_path, "--out", tmp_path / "ds", *strict)
    with pytest.raises(OptError, match=r"bad\.jsonl:2"):
        run_data_cli("train-tokenizer", bad, "--vocab-size", "300", "--out", tmp_path / "tok",
                     *strict)  # fmt: skip
    with pytest.raises(OptError, match="input not found"):
        run_data_cli(
            "prepare", tmp_path / "x.txt", "--tokenizer", tmp_path, "--out", tmp_path / "ds"
        )
    with pytest.raises(OptError, match="--workers must be at least 1, not 0"):
        run_data_cli("prepare", bad, "--tokenizer", tmp_path, "--out", tmp_path / "ds",
                     "--workers", "0")  # fmt: skip
    with pytest.raises(OptError, match=r"--valid-fraction must be in \[0, 1\), not 1.5"):
        run_data_cli("prepare", bad, "--tokenizer", tmp_path, "--out", tmp_path / "ds",
                     "--valid-fraction", "1.5")  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "tokenizer.json"]


@pytest.mark.parametrize("command", ["prepare", "train-tokenizer"])
def test_cli_help(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        run_data_cli(command, "--help")
    assert info.value.code == 0
    assert "builtin:pydoc" in capsys.readouterr().out


def test_cli_subprocess(tmp_path: Path, tokenizer: Tokenizer) -> None:
    """The real entry point: `python -m opt data ...`, exit codes and one-line errors."""

    def opt(*argv: str | Path) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "opt", "data", *map(str, argv)]
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)

    save_tokenizer(tokenizer, tmp_path / "tokenizer.json")  # train-tokenizer is tested in-process
    done = opt("prepare", "builtin:pydoc", "--tokenizer", tmp_path, "--out", tmp_path / "ds")
    assert done.returncode == 0, done.stderr
    assert f"tokens in {len(builtin_documents())} documents" in done.stdout
    assert TokenDataset(tmp_path / "ds").n_docs == len(builtin_documents())

    done = opt("prepare", tmp_path / "nope.txt", "--tokenizer", tmp_path, "--out", tmp_path / "x")
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: input not found: {tmp_path / 'nope.txt'}"


def test_an_unshuffled_stream_reads_the_samples_in_file_order_every_epoch():
    stream = SampleStream(5, seed=3, shuffle=False)
    assert stream.next_indices(12) == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    stream.skip(13, 15)
    assert stream.next_indices(4) == [2, 0, 1, 2]  # positions 12, 15, 16, 17
    resumed = SampleStream(5, seed=3, shuffle=False)
    resumed.load_state_dict(stream.state_dict())
    assert resumed.next_indices(3) == stream.next_indices(3)
    with pytest.raises(OptError, match="shuffle"):
        SampleStream(5, seed=3).load_state_dict(stream.state_dict())
