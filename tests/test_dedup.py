"""Deduplication across sources (opt/data/dedup.py, `opt data dedup`): exact and near
duplicates on documents these tests make, the true Jaccard computed here from the shingle
sets, the signatures against datasketch's own MinHash, and the outputs read back."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import zstandard
from datasketch import MinHash
from helpers import run_cli

from opt.data.dedup import (
    REMOVED,
    REPORT_JSON,
    REPORT_MD,
    DedupSettings,
    dedup_sources,
    parse_sources,
)
from opt.data.minhash import (
    NearIndex,
    SignatureMaker,
    _Sketch,
    shingle_hash32,
    shingles_of,
)
from opt.errors import OptError

NGRAM = 5
VOCAB = [f"w{i}" for i in range(20000)]


def words(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(VOCAB) for _ in range(n)]


def true_jaccard(a: str, b: str, n: int = NGRAM) -> float:
    """Exactly, from the shingle sets (the documents here are lowercase ASCII, space-separated)."""

    def shingles(text: str) -> set[tuple[str, ...]]:
        w = text.split()
        return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}

    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def edit(text: str, positions: list[int], word: str = "changed") -> str:
    w = text.split()
    for p in positions:
        w[p] = f"{word}{p}"
    return " ".join(w)


@pytest.fixture
def corpus(tmp_path: Path) -> dict:
    """Two sources: cc (a file and a directory) and books (one file), with an exact duplicate
    within cc, one across sources, a near duplicate across (one word changed in 1000) and a
    document at Jaccard about 0.8 with the original (kept at 0.95, removed at 0.7)."""
    rng = random.Random(21)
    original = " ".join(words(rng, 1000))
    near = edit(original, [500])
    far = edit(original, list(range(20, 1000, 50)))  # 20 words, each killing 5 shingles
    docs = {
        "cc": [
            original,
            " ".join(words(rng, 300)),
            "a short one",
            original,
            " ".join(words(rng, 50)),
        ],
        "books": [" ".join(words(rng, 400)), "a short one", near, far, " ".join(words(rng, 5))],
    }
    (tmp_path / "cc-more").mkdir()
    write_jsonl(tmp_path / "cc.jsonl", docs["cc"][:3])
    write_jsonl(tmp_path / "cc-more" / "part.jsonl", docs["cc"][3:])
    write_jsonl(tmp_path / "books.jsonl", docs["books"])
    inputs = {
        "cc": [str(tmp_path / "cc.jsonl"), str(tmp_path / "cc-more")],
        "books": [str(tmp_path / "books.jsonl")],
    }
    return {"docs": docs, "inputs": inputs, "original": original, "near": near, "far": far}


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def read_zst(path: Path) -> list[dict]:
    with path.open("rb") as f:
        data = zstandard.ZstdDecompressor().stream_reader(f).read()
    return [json.loads(line) for line in data.decode().splitlines()]


def texts_of(path: Path) -> list[str]:
    return [r["text"] for r in read_zst(path)]


def test_the_fixture_has_what_it_claims(corpus: dict) -> None:
    assert true_jaccard(corpus["original"], corpus["near"]) >= 0.98  # (991/1001)
    assert 0.75 < true_jaccard(corpus["original"], corpus["far"]) < 0.85


@pytest.mark.parametrize("ngram", [1, 3, 5])
def test_signatures_equal_datasketch(ngram: int) -> None:
    """Ours for a batch at once, datasketch's MinHash fed the same shingles one document at a
    time with our shingle hash: equal, slot for slot (empty, short, Unicode, odd spacing)."""
    rng = random.Random(ngram)
    vocab = ["Alpha", "beta", "ΓΆΜΜΑ", "dé", "x", "ÄBC", "quick", "FOX", "a\x85b", "tab\u00a0nbsp"]
    spaces = [" ", "\n", "\t  ", "\x0b", "\r\n", " \x0c", "   "]
    texts = ["", "   \n", "one", "Two words", "A B C D E F G"]
    for n in [2, 4, 5, 6, 40, 700]:
        texts.append("".join(rng.choice(vocab) + rng.choice(spaces) for _ in range(n)))
    maker = SignatureMaker(num_perm=64, ngram=ngram, seed=7, chunk=50)  # chunks cut documents
    encoded = [t.encode() for t in texts]
    hashes, offsets = maker.shingle_hashes(encoded)
    signatures = maker.signatures(encoded)
    for i, text in enumerate(texts):
        shingles = shingles_of(text, ngram)
        assert hashes[offsets[i] : offsets[i + 1]].tolist() == [shingle_hash32(s) for s in shingles]
        peer = MinHash(num_perm=64, seed=7, hashfunc=shingle_hash32)
        peer.update_batch(shingles)
        assert np.array_equal(signatures[i], peer.hashvalues), repr(text)
    assert shingles_of("Ab  cD\té", 2) == [(b"ab", b"cd"), (b"cd", "é".encode())]
    assert shingles_of("one two", 5) == [(b"one", b"two")] and shingles_of(" \n", 5) == []


def test_dedup_removes_exact_and_near_duplicates(corpus: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = dedup_sources(list(corpus["inputs"].items()), out)
    cc, books = corpus["docs"]["cc"], corpus["docs"]["books"]
    # cc keeps all but its second copy of the original; books loses "a short one" (exact,
    # across) and the near copy; `far` (Jaccard ~0.8) stays.
    assert texts_of(out / "cc.jsonl.zst") == [cc[0], cc[1], cc[2], cc[4]]
    assert texts_of(out / "books.jsonl.zst") == [books[0], books[3], books[4]]

    counts = {s.name: s for s in report.sources}
    assert [s.name for s in report.sources] == ["cc", "books"]
    c, b = counts["cc"], counts["books"]
    assert (c.documents, c.exact_within, c.exact_across, c.near_within, c.near_across, c.kept) == (
        5, 1, 0, 0, 0, 4)  # fmt: skip
    assert (b.documents, b.exact_within, b.exact_across, b.near_within, b.near_across, b.kept) == (
        5, 0, 1, 0, 1, 3)  # fmt: skip
    assert c.bytes_in == sum(len(t.encode()) for t in cc)
    assert b.bytes_kept == sum(len(books[i].encode()) for i in (0, 3, 4))

    removed = read_zst(out / REMOVED)
    assert [(r["source"], r["number"], r["kind"], r["duplicate_of"]) for r in removed] == [
        ("cc", 3, "exact", {"source": "cc", "number": 0}),
        ("books", 1, "exact", {"source": "cc", "number": 2}),
        ("books", 2, "near", {"source": "cc", "number": 0}),
    ]
    assert removed[0]["input"].endswith("part.jsonl") and removed[0]["input_number"] == 0
    assert removed[2]["text"] == corpus["near"] and removed[2]["jaccard"] >= 0.95
    assert [r["within"] for r in removed] == [True, False, False]

    on_disk = json.loads((out / REPORT_JSON).read_text())
    assert on_disk["total"]["documents"] == 10 and on_disk["total"]["kept"] == 7
    assert on_disk["sources"][1]["near_across"] == 1 and on_disk["settings"]["threshold"] == 0.95
    assert on_disk["lsh"]["candidates"] >= 1
    assert (out / REPORT_MD).read_text() == report.markdown()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["cc.jsonl.zst", "books.jsonl.zst", REMOVED, REPORT_JSON, REPORT_MD]
    )


def test_threshold_changes_the_outcome(corpus: dict, tmp_path: Path) -> None:
    """At 0.7 the document at true Jaccard ~0.8 goes too, as a near duplicate of the original;
    at 0.995 the near copy (true Jaccard 0.99) stays."""
    loose = dedup_sources(list(corpus["inputs"].items()), tmp_path / "loose", DedupSettings(0.7))
    assert [s.near_across for s in loose.sources] == [0, 2]
    assert corpus["far"] not in texts_of(tmp_path / "loose" / "books.jsonl.zst")
    far = [r for r in read_zst(tmp_path / "loose" / REMOVED) if r["text"] == corpus["far"]]
    assert far[0]["duplicate_of"] == {"source": "cc", "number": 0}
    assert 0.7 <= far[0]["jaccard"] < 0.95

    strict = dedup_sources(
        list(corpus["inputs"].items()), tmp_path / "strict", DedupSettings(0.995)
    )
    assert [s.near_across for s in strict.sources] == [0, 0]
    assert corpus["near"] in texts_of(tmp_path / "strict" / "books.jsonl.zst")


def test_the_first_named_source_keeps_its_copy(corpus: dict, tmp_path: Path) -> None:
    """books first: the shared short document and the original's near copy stay in books, and
    cc loses the original (near) and "a short one" (exact) instead."""
    swapped = [("books", corpus["inputs"]["books"]), ("cc", corpus["inputs"]["cc"])]
    report = dedup_sources(swapped, tmp_path / "out")
    cc = corpus["docs"]["cc"]
    assert texts_of(tmp_path / "out" / "books.jsonl.zst") == corpus["docs"]["books"]
    assert texts_of(tmp_path / "out" / "cc.jsonl.zst") == [cc[1], cc[4]]
    c = report.sources[1]
    # cc's second copy of the original repeats the first copy's verdict: a near duplicate of
    # books' near copy (the kept one), not an exact duplicate of a removed document
    assert (c.exact_within, c.exact_across, c.near_within, c.near_across) == (0, 1, 0, 2)
    removed = read_zst(tmp_path / "out" / REMOVED)
    assert [(r["source"], r["number"], r["kind"], r["duplicate_of"]) for r in removed] == [
        ("cc", 0, "near", {"source": "books", "number": 2}),
        ("cc", 2, "exact", {"source": "books", "number": 1}),
        ("cc", 3, "near", {"source": "books", "number": 2}),
    ]
    assert removed[0]["jaccard"] == removed[2]["jaccard"] >= 0.95


def test_worker_processes_change_nothing(corpus: dict, tmp_path: Path) -> None:
    """Signatures in two spawned processes, with batches small enough that several are in
    flight: the same files, byte for byte, as one process."""
    specs = list(corpus["inputs"].items())
    dedup_sources(specs, tmp_path / "one", workers=1, batch_docs=2)
    dedup_sources(specs, tmp_path / "two", workers=2, batch_docs=2)
    assert listing(tmp_path / "one") == listing(tmp_path / "two")


def test_an_lsh_candidate_below_the_threshold_is_not_a_duplicate() -> None:
    """A signature sharing one whole band with a kept one is an LSH candidate, but its
    estimated Jaccard (that band's share of the slots) is far below 0.95: not a match."""
    index = NearIndex(0.95, 128)
    rng = np.random.default_rng(0)
    kept = rng.integers(0, 2**32, 128, dtype=np.uint64).astype(np.uint32)
    index.add(kept)
    other = rng.integers(0, 2**32, 128, dtype=np.uint64).astype(np.uint32)
    other[: index.rows] = kept[: index.rows]  # the first band equal
    assert index.lsh.query(_Sketch(other)) == [0]
    assert index.match(other) is None
    assert (index.candidates, index.rejected) == (1, 1)
    assert index.match(kept.copy()) == (0, 1.0)


def test_a_near_duplicate_within_a_source(tmp_path: Path) -> None:
    rng = random.Random(5)
    original, other = " ".join(words(rng, 2000)), " ".join(words(rng, 2000))
    copy = edit(original, [1000])
    assert true_jaccard(original, copy) >= 0.99
    write_jsonl(tmp_path / "wiki.jsonl", [original, other, copy])
    report = dedup_sources([("wiki", [str(tmp_path / "wiki.jsonl")])], tmp_path / "out")
    assert (report.sources[0].near_within, report.sources[0].kept) == (1, 2)
    assert texts_of(tmp_path / "out" / "wiki.jsonl.zst") == [original, other]
    assert "| wiki " in (tmp_path / "out" / REPORT_MD).read_text()


def test_parse_sources() -> None:
    assert parse_sources(["cc=a", "books=b", "cc=c=d"]) == [("cc", ["a", "c=d"]), ("books", ["b"])]
    for bad in (["a.jsonl"], ["=a"], ["cc="], ["removed=a"], ["-x=a"], ["a b=c"]):
        with pytest.raises(OptError):
            parse_sources(bad)


def test_cli_end_to_end(corpus: dict, tmp_path: Path) -> None:
    out = tmp_path / "dedup"
    args = [f"{name}={i}" for name, inputs in corpus["inputs"].items() for i in inputs]
    result = run_cli("data", "dedup", *args, "--out", str(out), "--threshold", "0.95", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "| total " in result.stdout and "kept 7 of 10 documents" in result.stdout
    cc, books = corpus["docs"]["cc"], corpus["docs"]["books"]
    assert texts_of(out / "cc.jsonl.zst") == [cc[0], cc[1], cc[2], cc[4]]
    assert texts_of(out / "books.jsonl.zst") == [books[0], books[3], books[4]]
    assert json.loads((out / REPORT_JSON).read_text())["total"]["kept"] == 7
    assert (out / REPORT_MD).read_text() in result.stdout


def listing(path: Path) -> list[tuple[str, bytes]]:
    return sorted((p.name, p.read_bytes()) for p in path.iterdir())


def test_a_failing_run_publishes_nothing(corpus: dict, tmp_path: Path) -> None:
    """An empty source is found only after cc's output is being written: the run stops with one
    line, a new --out is not left behind, and an old one keeps its files, no temp file added."""
    (tmp_path / "empty.jsonl").write_text("")
    args = ["data", "dedup", *(f"cc={i}" for i in corpus["inputs"]["cc"])]
    args.append(f"books={tmp_path / 'empty.jsonl'}")
    fresh = tmp_path / "fresh"
    result = run_cli(*args, "--out", str(fresh), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: source 'books' has no documents (inputs: {tmp_path / 'empty.jsonl'})"
    ]
    assert not fresh.exists()

    old = tmp_path / "old"
    ok = run_cli("data", "dedup", *(f"cc={i}" for i in corpus["inputs"]["cc"]), "--out", str(old))
    assert ok.returncode == 0, ok.stderr
    before = listing(old)
    assert run_cli(*args, "--out", str(old), timeout=120).returncode == 2
    assert listing(old) == before

    missing = run_cli("data", "dedup", "cc=nowhere.jsonl", "--out", str(fresh))
    assert missing.returncode == 2 and "input not found: nowhere.jsonl" in missing.stderr
    for bad in (["cc"], ["cc=x", "--threshold", "1.5"], ["cc=x", "--num-perm", "1"]):
        result = run_cli("data", "dedup", *bad, "--out", str(fresh))
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, bad
    assert not fresh.exists()


def test_bad_records_are_skipped_counted_and_limited(tmp_path: Path) -> None:
    good = ["alpha beta gamma delta epsilon zeta", "one two three four five six seven"]
    src = tmp_path / "src.jsonl"
    src.write_text(
        json.dumps({"text": good[0]}) + "\n{not json\n" + json.dumps({"text": good[1]}) + "\n"
    )
    out = tmp_path / "out"
    result = run_cli("data", "dedup", f"web={src}", "--out", str(out), timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"{src}:2" in result.stderr and "skipped 1 bad record" in result.stdout
    assert texts_of(out / "web.jsonl.zst") == good
    report = json.loads((out / REPORT_JSON).read_text())
    assert report["bad_records"]["count"] == 1 and f"{src}:2" in report["bad_records"]["first"][0]
    strict = tmp_path / "strict"
    result = run_cli("data", "dedup", f"web={src}", "--out", str(strict), "--max-bad-records", "0")
    assert result.returncode != 0 and result.stderr.strip().splitlines()[-1].startswith("error:")
    assert not strict.exists()
