"""The input formats of `opt data`: JSON lines (plain, gzip, zstd), Parquet, saved `datasets`
and text files give the same documents and the same dataset; malformed records are skipped,
named and counted; readers stream."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from helpers import REPO

from opt.data.corpus import (
    BadRecords,
    builtin_documents,
    iter_documents,
    parse_limit,
    read_documents,
    resolve_inputs,
    total_bytes,
)
from opt.data.dataset import DatasetPaths, TokenDataset
from opt.data.prepare import save_tokenizer
from opt.data.tokenizer import train_tokenizer
from opt.errors import OptError

datasets.disable_progress_bars()

# Real text of many sizes, an empty document, non-ASCII text and a line break in a document.
DOCS = [
    *builtin_documents()[:14],
    "",
    "Héllo wörld — naïve café, 東京 🎉\nsecond line\r\nthird\u2028",
    'a "quoted" {json-looking} text',
]

FORMATS = ["txt", "jsonl", "json", "jsonl.gz", "json.gz", "jsonl.zst", "parquet", "saved"]


def json_lines(docs: list[str], key: str = "text") -> bytes:
    return b"".join(
        json.dumps({key: d, "meta": {"n": i}}).encode() + b"\n" for i, d in enumerate(docs)
    )


def write_input(fmt: str, directory: Path, docs: list[str] = DOCS) -> Path:
    """``docs`` in format ``fmt`` under ``directory``; the path to give as the input."""
    directory.mkdir(parents=True, exist_ok=True)
    if fmt == "txt":  # one document per file, read in sorted order
        for i, doc in enumerate(docs):
            (directory / f"{i:03d}.txt").write_bytes(doc.encode("utf-8"))
        return directory
    path = directory / f"corpus.{fmt}"
    data = json_lines(docs)
    if fmt in ("jsonl", "json"):
        path.write_bytes(data)
    elif fmt.endswith(".gz"):
        path.write_bytes(gzip.compress(data))
    elif fmt.endswith(".zst"):  # several frames, as the Pile's files have
        half = len(data) // 2
        path.write_bytes(
            b"".join(zstandard.ZstdCompressor().compress(p) for p in (data[:half], data[half:]))
        )
    elif fmt == "parquet":  # several row groups, and another column first
        table = pa.table({"id": list(range(len(docs))), "text": docs})
        pq.write_table(table, path, row_group_size=4)
    elif fmt == "saved":
        path = directory / "saved"
        dataset = datasets.Dataset.from_dict({"id": list(range(len(docs))), "text": docs})
        dataset.save_to_disk(str(path), num_shards=3)
    else:
        raise AssertionError(fmt)
    return path


def read_all(path: Path, **kwargs) -> tuple[list[str], BadRecords]:
    bad = BadRecords(warn=io.StringIO())
    return list(iter_documents(resolve_inputs([str(path)]), bad=bad, **kwargs)), bad


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_yields_the_same_documents(tmp_path: Path, fmt: str) -> None:
    docs, bad = read_all(write_input(fmt, tmp_path))
    assert docs == DOCS
    assert (bad.count, bad.records) == (0, len(DOCS))


def test_saved_dataset_rows_in_dataset_order_and_other_text_key(tmp_path: Path) -> None:
    dataset = datasets.Dataset.from_dict({"body": DOCS, "id": list(range(len(DOCS)))})
    shuffled = dataset.shuffle(seed=3)  # an indices mapping, which save_to_disk writes out
    shuffled.save_to_disk(str(tmp_path / "ds"), num_shards=2)
    docs, _ = read_all(tmp_path / "ds", text_key="body")
    assert docs == shuffled["body"] and docs != DOCS


def test_a_directory_expands_to_files_and_whole_saved_datasets(tmp_path: Path) -> None:
    write_input("saved", tmp_path / "b")  # tmp/b/saved: state.json there is no input
    write_input("jsonl.zst", tmp_path / "a")
    write_input("parquet", tmp_path / "c")
    (tmp_path / "c" / "notes.md").write_text("not an input")
    assert resolve_inputs([str(tmp_path)]) == [
        tmp_path / "a" / "corpus.jsonl.zst",
        tmp_path / "b" / "saved",
        tmp_path / "c" / "corpus.parquet",
    ]
    docs, _ = read_all(tmp_path)
    assert docs == DOCS * 3


def test_dataset_dict_and_bad_names_fail_up_front(tmp_path: Path) -> None:
    ds = datasets.Dataset.from_dict({"text": DOCS})
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(OptError, match=r"DatasetDict with splits train, test: .*dd/train"):
        resolve_inputs([str(tmp_path / "dd")])
    (tmp_path / "x.jsonl.bz2").write_bytes(b"")
    for bad, message in [("x.jsonl.bz2", "unsupported input"), ("nope.parquet", "not found")]:
        with pytest.raises(OptError, match=message):
            resolve_inputs([str(tmp_path / bad)])
    write_input("parquet", tmp_path)
    with pytest.raises(OptError, match=r"corpus\.parquet: no column 'body' \(columns: id, text\)"):
        read_all(tmp_path / "corpus.parquet", text_key="body")


def test_total_bytes_estimates_the_text(tmp_path: Path) -> None:
    plain = write_input("jsonl", tmp_path)
    size = plain.stat().st_size
    for fmt in ("jsonl.gz", "jsonl.zst"):  # under a MiB compressed: exact
        assert total_bytes(resolve_inputs([str(write_input(fmt, tmp_path))])) == size
    text = sum(len(d.encode("utf-8")) for d in DOCS)
    assert total_bytes([write_input("saved", tmp_path)]) == text  # the text buffers, exactly
    parquet = total_bytes([write_input("parquet", tmp_path)])  # pages: text, lengths, headers
    assert text < parquet < 1.2 * text

    # Larger than the sample: estimated from the first MiB, within a few percent.
    lines = json_lines([os.urandom(3000).hex() for _ in range(1500)])  # 9 MB, ~4.5 MB gzipped
    (tmp_path / "big.jsonl.gz").write_bytes(gzip.compress(lines, compresslevel=1))
    (tmp_path / "big.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=1).compress(lines))
    for name in ("big.jsonl.gz", "big.jsonl.zst"):
        estimate = total_bytes([tmp_path / name])
        assert abs(estimate - len(lines)) < 0.05 * len(lines), (name, estimate, len(lines))


# --- the CLI: byte-identical datasets --------------------------------------------------------


def opt_data(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "opt", "data", *map(str, argv)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    return save_tokenizer(train_tokenizer(builtin_documents(), vocab_size=400), path)


def prepare(inputs: list[Path], out: Path, tokenizer: Path, *flags: str):
    return opt_data(
        "prepare", *inputs, "--tokenizer", tokenizer, "--out", out, "--no-progress", *flags
    )


def test_cli_datasets_are_byte_identical_across_formats(
    tmp_path: Path, tokenizer_path: Path
) -> None:
    outputs = {}
    for fmt in FORMATS:
        src = write_input(fmt, tmp_path / "in" / fmt.replace(".", "_"))
        done = prepare([src], tmp_path / "out" / fmt, tokenizer_path)
        assert done.returncode == 0, (fmt, done.stderr)
        assert "warning" not in done.stderr and "skipped" not in done.stdout
        paths = DatasetPaths.of(tmp_path / "out" / fmt)
        outputs[fmt] = (paths.bin.read_bytes(), paths.idx.read_bytes())
        meta = json.loads(paths.meta.read_text())
        assert meta["source"]["bad_records"] == {"count": 0, "first": []}
    reference = outputs.pop("jsonl")
    assert TokenDataset(tmp_path / "out" / "jsonl").n_docs == len([d for d in DOCS if d])
    for fmt, files in outputs.items():
        assert files == reference, fmt


# --- malformed records ------------------------------------------------------------------------


def complete_lines(partial: bytes) -> list[str]:
    """The documents of the whole lines in ``partial`` decompressed JSON lines."""
    whole = partial[: partial.rfind(b"\n") + 1]
    return [json.loads(line)["text"] for line in whole.splitlines()]


def cut(data: bytes, decompressor) -> tuple[bytes, list[str]]:
    """``data`` less its last 60 bytes, and the documents still whole in what is left."""
    short = data[:-60]
    out, rest = b"", short
    while rest:
        d = decompressor()
        out += d.decompress(rest)
        if not d.eof:
            break
        rest = d.unused_data
    return short, complete_lines(out)


@pytest.fixture
def malformed(tmp_path: Path) -> tuple[Path, list[str], list[str]]:
    """A directory of inputs with bad records in every format: (directory, the good documents
    in reading order, the position of each bad record in that order)."""
    root = tmp_path / "in"
    root.mkdir()
    good: list[str] = []
    where: list[str] = []

    lines = [
        json.dumps({"text": "first good"}),
        "{oops",  # invalid JSON
        json.dumps({"body": "no text field"}),
        b'{"text": "caf\xe9 in latin-1"}',  # not UTF-8
        json.dumps({"text": None}),
        "[1, 2]",  # not an object
        '{"text": "half a pair \\ud800"}',  # a lone surrogate escape
        json.dumps({"text": 7}),
        "",  # blank: no record at all
        json.dumps({"text": "last good"}),
    ]
    raw = b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines)
    (root / "a_bad.jsonl").write_bytes(raw)
    good += ["first good", "last good"]
    where += [f"{root / 'a_bad.jsonl'}:{n}" for n in (2, 3, 4, 5, 6, 7, 8)]

    docs = [f"gzipped document {i} " * 20 for i in range(300)]
    short, whole = cut(gzip.compress(json_lines(docs)), lambda: zlib.decompressobj(wbits=31))
    (root / "b_cut.jsonl.gz").write_bytes(short)
    good += whole
    where.append(f"{root / 'b_cut.jsonl.gz'}:{len(whole) + 1}")

    docs = [f"zstd document {i} " * 20 for i in range(300)]
    data = json_lines(docs)
    frames = b"".join(
        zstandard.ZstdCompressor().compress(data[i : i + 4000]) for i in range(0, len(data), 4000)
    )
    short, whole = cut(frames, lambda: zstandard.ZstdDecompressor().decompressobj())
    assert 0 < len(whole) < len(docs)
    (root / "c_cut.jsonl.zst").write_bytes(short)
    good += whole
    where.append(f"{root / 'c_cut.jsonl.zst'}:{len(whole) + 1}")

    pq.write_table(
        pa.table({"text": ["p0", None, "p2", "p3", None]}), root / "d.parquet", row_group_size=2
    )
    good += ["p0", "p2", "p3"]
    where += [f"{root / 'd.parquet'}: row 1", f"{root / 'd.parquet'}: row 4"]

    ds = datasets.Dataset.from_dict({"text": ["s0", "s1", None, "s3", None]})
    ds.save_to_disk(str(root / "e_saved"), num_shards=2)  # rows 0-2 and 3-4
    good += ["s0", "s1", "s3"]
    where += [f"{root / 'e_saved' / 'data-00000-of-00002.arrow'}: row 2",
              f"{root / 'e_saved' / 'data-00001-of-00002.arrow'}: row 1"]  # fmt: skip

    (root / "f_latin1.txt").write_bytes("line one\nna\xefve\n".encode("latin-1"))
    where.append(f"{root / 'f_latin1.txt'}:2")
    (root / "g_fine.txt").write_text("a fine text file")
    good.append("a fine text file")

    pq.write_table(pa.table({"text": ["lost"] * 10}), root / "h_cut.parquet")
    data = (root / "h_cut.parquet").read_bytes()
    (root / "h_cut.parquet").write_bytes(data[: len(data) // 2])  # no footer: nothing to read
    where.append(f"{root / 'h_cut.parquet'}: row 0")

    ds = datasets.Dataset.from_dict({"text": ["i0", "i1", "i2", "i3"]})
    ds.save_to_disk(str(root / "i_saved"), num_shards=2)
    second = root / "i_saved" / "data-00001-of-00002.arrow"
    second.write_bytes(second.read_bytes()[:-40])  # its one batch cut short
    good += ["i0", "i1"]
    where.append(f"{second}: row 0")
    return root, good, where


def test_bad_records_are_skipped_named_and_counted(malformed) -> None:
    root, good, where = malformed
    warnings = io.StringIO()
    bad = BadRecords(warn=warnings)
    assert list(iter_documents(resolve_inputs([str(root)]), bad=bad)) == good
    assert bad.count == len(where) and bad.records == len(good) + len(where)
    lines = warnings.getvalue().splitlines()
    assert len(lines) == len(where)
    for line, position in zip(lines, where, strict=True):
        assert line.startswith(f"warning: skipped {position}: "), (line, position)
    reasons = "\n".join(lines[:7])
    for reason in ("invalid JSON", "no field 'text'", "not UTF-8", "null, not a string",
                   "found an array", "lone surrogate", "a number, not a string"):  # fmt: skip
        assert reason in reasons
    assert "cut short" in lines[7] and "cut short" in lines[8]
    assert "null 'text'" in lines[9]
    assert "unreadable Parquet" in lines[-2] and "unreadable Arrow" in lines[-1]


def test_cli_prepare_skips_bad_records_and_records_them(
    malformed, tmp_path: Path, tokenizer_path: Path
) -> None:
    root, good, where = malformed
    done = prepare([root], tmp_path / "out" / "ds", tokenizer_path, "--max-bad-records", "20")
    assert done.returncode == 0, done.stderr
    for position in where:
        assert f"warning: skipped {position}: " in done.stderr
    assert f"skipped {len(where)} bad records: {where[0]}: invalid JSON" in done.stdout
    meta = json.loads(DatasetPaths.of(tmp_path / "out" / "ds").meta.read_text())
    assert meta["source"]["bad_records"]["count"] == len(where)
    assert meta["source"]["bad_records"]["first"][0].startswith(f"{where[0]}: invalid JSON")

    # Every good document is in the dataset: the same bytes as the good ones alone.
    clean = write_input("jsonl", tmp_path / "clean", good)
    done = prepare([clean], tmp_path / "out" / "clean", tokenizer_path)
    assert done.returncode == 0, done.stderr
    for suffix in ("bin", "idx"):
        ours = (tmp_path / "out" / f"ds.{suffix}").read_bytes()
        assert ours == (tmp_path / "out" / f"clean.{suffix}").read_bytes()


@pytest.mark.parametrize("limit", ["3", "1%"])
def test_too_many_bad_records_fail_and_publish_nothing(
    malformed, tmp_path: Path, tokenizer_path: Path, limit: str
) -> None:
    root, _, where = malformed
    out = tmp_path / "out"
    done = prepare([root], out / "ds", tokenizer_path, "--max-bad-records", limit)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if not line.startswith("warning: ")]
    assert len(errors) == 1 and errors[0].startswith("error: "), done.stderr
    assert "max-bad-records" in errors[0]
    assert list(out.iterdir()) == []  # neither the dataset nor a temp file
    if limit == "3":  # a count stops at the 4th: the rest is not read
        assert done.stderr.count("warning: ") == 4

    done = opt_data("train-tokenizer", root, "--vocab-size", "300", "--out", out / "tok",
                    "--max-bad-records", limit)  # fmt: skip
    assert done.returncode != 0 and "max-bad-records" in done.stderr.splitlines()[-1]
    assert not (out / "tok" / "tokenizer.json").exists()

    done = opt_data("train-tokenizer", root, "--vocab-size", "300", "--out", out / "tok")
    assert done.returncode == 0, done.stderr
    assert f"skipped {len(where)} bad records" in done.stdout


def test_limits() -> None:
    assert parse_limit("0") == 0 and parse_limit("12") == 12
    assert parse_limit("0.001") == 0.001 and parse_limit("0.5%") == 0.005
    for text in ("-1", "1.5", "x", "100%"):
        with pytest.raises(OptError, match="bad-record limit"):
            parse_limit(text)
    bad = BadRecords(0.25, warn=io.StringIO())
    bad.records = 3
    bad.skip("f:1", "why")  # 1 of 4: at the limit, allowed
    bad.finish()
    bad.skip("f:2", "why")  # 2 of 5
    with pytest.raises(OptError, match=r"2 of 5 records were bad \(40.00%\)"):
        bad.finish()


def test_byte_order_mark_and_read_documents_default(tmp_path: Path, capsys) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json_lines(["one", "two"]) + b"{bad\n")
    assert list(read_documents(path)) == ["one", "two"]  # a fresh tally: warns, skips
    assert f"warning: skipped {path}:3: invalid JSON" in capsys.readouterr().err


# --- streaming -----------------------------------------------------------------------------


def test_readers_stream(tmp_path: Path) -> None:
    """Reading the first document of a large file allocates a small part of its size."""
    docs = [os.urandom(500).hex() for _ in range(16_000)]  # 16 MB of text that compresses 2:1
    data = json_lines(docs)
    files = {
        "jsonl": data,
        "jsonl.gz": gzip.compress(data, compresslevel=1),
        "jsonl.zst": zstandard.ZstdCompressor(level=1).compress(data),
    }
    for fmt, content in files.items():
        path = tmp_path / f"big.{fmt}"
        path.write_bytes(content)
        assert len(content) > 7_000_000
        tracemalloc.start()
        try:
            documents = iter_documents([path])
            assert next(documents) == docs[0]
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        documents.close()
        assert peak < len(content) / 4, (fmt, peak, len(content))

    # Columnar: Arrow's allocations are its own, not Python's; its pool counts them. A
    # Parquet file is read a row group at a time at least (here 250 KB of text each); with
    # pyarrow's defaults iter_batches buffered the whole 16 MB file before its first batch.
    write_input("saved", tmp_path, docs)
    pq.write_table(pa.table({"text": docs}), tmp_path / "big.parquet", row_group_size=250)
    for path in (tmp_path / "saved", tmp_path / "big.parquet"):
        before = pa.total_allocated_bytes()
        documents = iter_documents([path])
        assert next(documents) == docs[0]
        held = pa.total_allocated_bytes() - before
        documents.close()
        assert held < len(data) / 4, (path, held)
