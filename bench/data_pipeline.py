"""The data pipeline's cost: how long a training step waits for data, and tokenization speed.

    python bench/data_pipeline.py                        # both parts, default sizes
    python bench/data_pipeline.py --quick                # smoke run: few steps, a 10 MB corpus
    python bench/data_pipeline.py --write BENCHMARKS.md
    python bench/data_pipeline.py --skip-tokenize        # only the data wait

1. Data wait. Two trainers of one config, one with ``data.prefetch`` on (the default: the
   next step's batches are built in a background thread, ``PrefetchingLoader``) and one
   with it off (the peer), step alternately so noise hits both alike. Each trainer's
   ``loader.next_microbatches`` is timed inside ``train_step``: that is the time the step
   waits for data. Two configs: the opt-125m shape (cut to a few layers) at seq 512, and
   configs/demo.toml (opt-tiny, seq 128, 16 sequences a step in 2 micro-batches).
2. Tokenization. ``python -m opt data prepare CORPUS.jsonl --tokenizer TOKENIZER --out
   PREFIX`` (the whole command, process start included) on fresh text: at least 100 MB of
   distinct documents, no document twice, from the text files on this machine
   (``build_fresh_corpus``: the Python standard library, the installed packages,
   /usr/share/doc and the man pages, deduplicated by content hash, built once under
   $TMPDIR/opt-bench-corpus and reused), with the tokenizer the demo trains (vocabulary
   8192). MB of document text per second, divided by the cores this process may run on;
   the default (word cache, one worker process per core) against ``--workers 1``,
   ``--no-word-cache`` (``tokenizers`` alone) and ``--shards 2 --launch local``; and tokens
   per second per core against the peer, ``tokenizers``' ``encode_batch_fast`` run in this
   process on the documents already in memory (no file I/O, its thread pool on every core).
   The word cache's hit rate on the corpus is measured by running it once, in one process,
   with its lookups counted.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from tokenizers import Tokenizer

from opt.cli.data import _PARALLEL_MIN_BYTES as PARALLEL_MIN_BYTES
from opt.config import load_config
from opt.data.fast_encode import _DOC_END_CHAR as DOC_END_CHAR
from opt.data.fast_encode import fast_encoder
from opt.data.prepare import ensure_builtin_dataset
from opt.models.sizes import get_model_args
from opt.train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from report import command_line, machine_info, write_section

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.toml"
WAIT_TITLE = "## Data pipeline: time a step waits for data (CPU)"
TOKENIZE_TITLE = "## Data pipeline: tokenization throughput of `opt data prepare` (CPU)"
QUICK = {"layers": 1, "steps": 4, "warmup": 1, "corpus_mb": 10.0, "runs": 2}
DEFAULTS = {"layers": 2, "steps": 20, "warmup": 3, "corpus_mb": 100.0, "runs": 5}
MIN_RUNS = 3
MB = 1e6
WAIT_TARGET = 0.01
TOKENIZE_TARGET = 5.0  # MB/s per core
DEMO_VOCAB = get_model_args("opt-tiny").vocab_size


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# ----- 1. data wait --------------------------------------------------------------------------
class TimedLoader:
    """The trainer's loader (prefetching or not) with each ``next_microbatches`` timed."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self.waits: list[float] = []

    def __getattr__(self, name: str):
        return getattr(self.__dict__["loader"], name)

    def next_microbatches(self, grad_accum: int):
        start = time.perf_counter()
        batches = self.loader.next_microbatches(grad_accum)
        self.waits.append(time.perf_counter() - start)
        return batches


@dataclass
class Side:
    prefetch: bool
    steps: list[float] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)
    wait_s: float | None = None  # PrefetchingLoader's own total, for a cross-check

    @property
    def step(self) -> float:
        return statistics.median(self.steps)

    @property
    def wait(self) -> float:
        return statistics.median(self.waits)

    @property
    def share(self) -> float:
        """Median wait as a share of the median step."""
        return self.wait / self.step

    @property
    def mean_share(self) -> float:
        """All waiting over all step time: what the run loses in total."""
        return sum(self.waits) / sum(self.steps)


@dataclass
class WaitResult:
    name: str
    description: str
    sides: list[Side]


def wait_configs(args: argparse.Namespace, tmp: Path) -> list[tuple[str, Path | None, list[str]]]:
    common = {
        "run.dir": str(tmp / "runs"),
        "checkpoint.dir": str(tmp / "checkpoints"),
        "checkpoint.resume": "none",
        "logbook.dir": str(tmp / "logbook"),
        "metrics.tensorboard": False,
        "metrics.peak_tflops": 1.0,
        "train.device": "cpu",
    }
    big = ensure_builtin_dataset(
        tmp / "pydoc-opt", vocab_size=get_model_args("opt-125m").vocab_size
    )
    opt125 = {
        **common,
        "run.name": "bench-data-125m",
        "model.name": "opt-125m",
        "model.n_layers": args.layers,
        "data.path": str(big),
        "data.seq_len": 512,
        "train.micro_batch_size": 1,
        "train.batch_tokens": 512,
    }
    # The demo as configured, its built-in data built under the temporary directory.
    demo = {**common, "run.name": "bench-data-demo", "data.path": str(tmp / "pydoc" / "train")}
    return [
        ("opt-125m", None, _overrides(opt125)),
        ("demo", DEMO_CONFIG, _overrides(demo)),
    ]


def _overrides(values: dict) -> list[str]:
    return [f"--{k}={json.dumps(v)}" for k, v in values.items()]


def measure_wait(
    name: str, config: Path | None, overrides: list[str], args: argparse.Namespace
) -> WaitResult:
    trainers, sides = [], []
    for prefetch in (True, False):
        cfg = load_config(config, [*overrides, f"--data.prefetch={json.dumps(prefetch)}"])
        trainer = Trainer(cfg)
        trainer.loader = TimedLoader(trainer.loader)
        trainers.append(trainer)
        sides.append(Side(prefetch))
    cfg, m = trainers[0].cfg, trainers[0].model_args
    description = (
        f"{cfg.model.name} shape, {m.n_layers} layer{'s' * (m.n_layers != 1)}, seq "
        f"{cfg.data.seq_len}, {cfg.train.batch_tokens // cfg.data.seq_len} sequence"
        f"{'s' * (cfg.train.batch_tokens != cfg.data.seq_len)} a step in {trainers[0].grad_accum} "
        f"micro-batch{'es' * (trainers[0].grad_accum != 1)}"
    )
    for i in range(args.warmup + args.steps):
        for trainer, side in zip(trainers, sides, strict=True):
            start = time.perf_counter()
            trainer.train_step()
            elapsed = time.perf_counter() - start
            if i >= args.warmup:
                side.steps.append(elapsed)
                side.waits.append(trainer.loader.waits[-1])
    for trainer, side in zip(trainers, sides, strict=True):
        inner = trainer.loader.loader
        if hasattr(inner, "wait_s"):  # its total covers the warmup steps too
            side.wait_s = inner.wait_s / len(trainer.loader.waits)
            inner.close()
        print(
            f"[wait] {name} prefetch {'on ' if side.prefetch else 'off'}: step {side.step:.4f} s, "
            f"wait median {side.wait * 1e3:.3f} ms ({side.share:.3%}), mean "
            f"{sum(side.waits) / len(side.waits) * 1e3:.3f} ms ({side.mean_share:.3%})"
            + (
                f"; PrefetchingLoader.wait_s {side.wait_s * 1e3:.3f} ms/step" if side.wait_s else ""
            ),
            flush=True,
        )
    return WaitResult(name, description, sides)


# ----- 2. tokenization -----------------------------------------------------------------------
# Where the fresh corpus comes from: distinct real text on this machine.
# (name, root, the suffixes taken, each also as .gz, or None: every file that is text;
# directory names not entered)
_STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS_SOURCES = (
    ("Python standard library", _STDLIB, (".py", ".rst", ".txt"), ("site-packages",)),
    ("base interpreter's site-packages", _STDLIB / "site-packages",
     (".py", ".pyi", ".rst", ".txt", ".md", ".html"), ()),
    ("this environment's site-packages", Path(sysconfig.get_paths()["purelib"]),
     (".py", ".pyi", ".rst", ".txt", ".md", ".html"), ()),
    ("/usr/share/doc", Path("/usr/share/doc"), None, ()),  # READMEs, changelogs, manuals
    ("/usr/share/man", Path("/usr/share/man"), None, ()),  # man pages' troff source
)  # fmt: skip
# The main corpus takes every source; the second, for comparison, leaves out the Python
# packages (most of them source code).
CORPUS_KINDS = {"mixed": CORPUS_SOURCES, "doc and man": CORPUS_SOURCES[3:]}
CORPUS_VERSION = 2  # bump when the recipe below changes: the cached corpus is rebuilt
MAX_DOC_BYTES = 1 << 20  # larger files are generated data (tables, dumps), not text
CORPUS_DIR = Path(tempfile.gettempdir()) / "opt-bench-corpus"

# What is timed, in this order within each run: the label of its row, and its flags.
TOKENIZE_ROWS = {
    "prepare": "`opt data prepare` (the default: word cache, {workers})",
    "prepare_1": "`opt data prepare --workers 1` (word cache, one process)",
    "prepare_shards2": "`opt data prepare --shards 2 --launch local` (2 shard processes of "
    "1 worker each, then the merge; the corpus cut in 2 files)",
    "prepare_nocache": "`opt data prepare --no-word-cache` (`tokenizers` alone, whole command)",
    "encode_fast": "peer: `tokenizers`' `encode_batch_fast` in-process (documents in memory, "
    "no file I/O, its thread pool on every core)",
}
PREPARE_FLAGS = {"prepare": [], "prepare_1": ["--workers", "1"],
                 "prepare_shards2": ["--shards", "2", "--launch", "local"],
                 "prepare_nocache": ["--no-word-cache"]}  # fmt: skip


@dataclass
class Corpus:
    """A built corpus: the JSON-lines file and what went into it."""

    path: Path
    text_bytes: int  # UTF-8 bytes of document text
    n_docs: int
    sha256: str  # of the JSON-lines file
    sources: dict[str, dict[str, int]]  # name -> files, distinct documents, taken (docs, bytes)
    candidates: int  # distinct documents found before the draw
    candidate_bytes: int
    duplicates: int  # files dropped because an earlier file had the same content
    skipped: int  # files not UTF-8, holding NUL, empty or over MAX_DOC_BYTES

    @property
    def file_bytes(self) -> int:
        return self.path.stat().st_size


def _source_files(
    root: Path, suffixes: tuple[str, ...] | None, skip_dirs: tuple[str, ...]
) -> Iterator[Path]:
    """Regular files under ``root`` (no symlinks) whose name ends in one of ``suffixes``
    (or in one of them and .gz), or all of them if None; in sorted order, not entering
    directories named in ``skip_dirs``."""
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skip_dirs)
        for name in sorted(files):
            path = Path(directory, name)
            stem = name[:-3] if name.endswith(".gz") else name
            wanted = suffixes is None or Path(stem).suffix in suffixes
            if wanted and not path.is_symlink() and path.is_file():
                yield path


def _read_text(path: Path) -> str | None:
    """The file as text (decompressed if .gz), or None if it is not a text document."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read(MAX_DOC_BYTES + 1)
        if len(data) > MAX_DOC_BYTES or b"\0" in data:
            return None
        text = data.decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError):
        return None
    return text if text.strip() else None


def build_fresh_corpus(path: Path, target_mb: float, sources=CORPUS_SOURCES) -> Corpus:
    """Real text from this machine, no document twice, at least ``target_mb`` MB of it.

    Every file of ``sources`` (``CORPUS_SOURCES``) in sorted order (decompressed if it is
    .gz), kept if it is UTF-8, holds no NUL and is at most ``MAX_DOC_BYTES``; a file whose
    content (sha256 of its text) an earlier file had is dropped. The distinct documents are
    ordered by that hash, which mixes the sources, and taken in that order until
    ``target_mb`` MB of text. The same files on disk give the same corpus (the section
    records its sha256), and a package installed since adds or removes only its own files'
    documents, instead of reshuffling the rest.
    """
    seen: set[bytes] = set()
    found: list[tuple[bytes, str, str]] = []  # (sha256, source, text)
    stats_of: dict[str, dict[str, int]] = {}
    duplicates = skipped = 0
    for name, root, suffixes, skip_dirs in sources:
        stats = stats_of[name] = {"files": 0, "distinct": 0, "taken": 0, "taken_bytes": 0}
        for file in _source_files(root, suffixes, skip_dirs):
            stats["files"] += 1
            text = _read_text(file)
            if text is None:
                skipped += 1
                continue
            digest = hashlib.sha256(text.encode("utf-8")).digest()
            if digest in seen:
                duplicates += 1
                continue
            seen.add(digest)
            stats["distinct"] += 1
            found.append((digest, name, text))
    found.sort()  # by content hash: mixed sources, and a new file moves no other document
    candidate_bytes = sum(len(text.encode("utf-8")) for _, _, text in found)
    if candidate_bytes < target_mb * MB:
        raise SystemExit(
            f"only {candidate_bytes / MB:.1f} MB of distinct text on this machine, "
            f"fewer than --corpus-mb {target_mb}"
        )
    text_bytes = n_docs = 0
    digest = hashlib.sha256()
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8") as f:
        for _, name, text in found:
            if text_bytes >= target_mb * MB:
                break
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            digest.update(line.encode("utf-8"))
            size = len(text.encode("utf-8"))
            text_bytes += size
            n_docs += 1
            stats_of[name]["taken"] += 1
            stats_of[name]["taken_bytes"] += size
    os.replace(partial, path)
    return Corpus(path, text_bytes, n_docs, digest.hexdigest(), stats_of, len(found),
                  candidate_bytes, duplicates, skipped)  # fmt: skip


def fresh_corpus(target_mb: float, directory: Path, kind: str = "mixed") -> Corpus:
    """The corpus ``build_fresh_corpus`` makes from ``CORPUS_KINDS[kind]``, built once under
    ``directory`` and reused while its recipe (``CORPUS_VERSION``, size, kind) is the same."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"fresh-v{CORPUS_VERSION}-{target_mb:g}MB" + ("" if kind == "mixed" else "-doc-man")
    path, record = directory / f"{stem}.jsonl", directory / f"{stem}.json"
    if path.is_file() and record.is_file():
        fields = json.loads(record.read_text())
        return Corpus(path=path, **fields)
    corpus = build_fresh_corpus(path, target_mb, CORPUS_KINDS[kind])
    fields = {k: v for k, v in vars(corpus).items() if k != "path"}
    record.write_text(json.dumps(fields, indent=1))
    return corpus


@dataclass
class WordStats:
    """The word cache on the corpus, in one process (as ``--workers 1`` runs it)."""

    words: int  # words looked up in the cache (GPT-2's split)
    distinct: int  # distinct words among them
    misses: int  # words the cache handed to `tokenizers` (not seen before, or after a reset)
    whole_docs: int  # documents `tokenizers` encoded whole (a character the stream refuses)

    @property
    def hit_rate(self) -> float:
        return 1 - self.misses / self.words


def word_cache_stats(docs: list[str], tokenizer: Tokenizer) -> WordStats:
    """Run the word cache over ``docs`` once, counting what it looks up and what it misses.

    Counted by wrapping the encoder's word table's ``lookup`` (every word of a stream, and
    the ``encode`` it calls for the words it has not seen) and the encoder's call to
    `tokenizers` (which also takes whole documents the stream refuses)."""
    encoder = fast_encoder(tokenizer)
    if encoder is None:
        raise SystemExit("the word cache does not apply to this tokenizer")
    counts = {"words": 0, "misses": 0, "to_tokenizers": 0}
    distinct: set[str] = set()
    table, encode_whole = encoder._words, encoder._encode_whole
    lookup = table.lookup

    def counting_lookup(words: list[str], encode):
        ends = words.count(DOC_END_CHAR)  # the end-of-document marker is not a word
        counts["words"] += len(words) - ends
        distinct.update(words)

        def counting_encode(new: list[str]):
            counts["misses"] += len(new)
            return encode(new)

        return lookup(words, counting_encode)

    def counting_whole(texts: list[str]):
        counts["to_tokenizers"] += len(texts)
        return encode_whole(texts)

    table.lookup, encoder._encode_whole = counting_lookup, counting_whole
    encoder.encode_batch(docs)
    distinct.discard(DOC_END_CHAR)
    whole = counts["to_tokenizers"] - counts["misses"]
    return WordStats(counts["words"], len(distinct), counts["misses"], whole)


@dataclass
class TokenizeResult:
    kind: str  # of CORPUS_KINDS
    corpus: Corpus
    n_tokens: int  # ids and one EOS per document, as the dataset holds them
    times: dict[str, list[float]]  # wall seconds per run, and "<name>_cpu": CPU seconds
    words: WordStats
    cores: int
    digests: dict[str, str]  # sha256 of PREFIX.bin and PREFIX.idx, the same for every row

    @property
    def workers(self) -> str:
        """What the default command ran with: every usable core, unless the input is small."""
        n = self.cores if self.corpus.file_bytes >= PARALLEL_MIN_BYTES else 1
        return f"{n} worker process{'es' * (n != 1)}"

    def mb_s(self, name: str, cpu: bool = False) -> float:
        return (
            self.corpus.text_bytes
            / MB
            / statistics.median(self.times[f"{name}_cpu" if cpu else name])
        )

    def tokens_s(self, name: str, cpu: bool = False) -> float:
        """Tokens (EOS included) per second of wall time, or per CPU-second."""
        return self.n_tokens / statistics.median(self.times[f"{name}_cpu" if cpu else name])


def prepare_command(corpus: Path, tokenizer: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "opt", "data", "prepare", str(corpus), "--tokenizer",
            str(tokenizer), "--out", str(out), "--no-progress"]  # fmt: skip


def _output_digests(prefix: Path) -> dict[str, str]:
    return {
        suffix: hashlib.sha256(prefix.with_suffix(suffix).read_bytes()).hexdigest()
        for suffix in (".bin", ".idx")
    }


# The rows timed on each kind of corpus: all of them on the main one, the default and the
# peers on the other.
ROWS_OF_KIND = {
    "mixed": tuple(TOKENIZE_ROWS),
    "doc and man": ("prepare", "prepare_nocache", "encode_fast"),
}


def split_corpus(corpus: Path, directory: Path) -> Path:
    """The corpus cut at the line nearest its middle byte into two JSON-lines files (the same
    documents in the same order) under ``directory``, for the sharded row."""
    data = corpus.read_bytes()
    cut = data.index(b"\n", len(data) // 2) + 1
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "part-0.jsonl").write_bytes(data[:cut])
    (directory / "part-1.jsonl").write_bytes(data[cut:])
    return directory


def encode_in_process(corpus: Path, tokenizer_path: Path, check: Path | None, eos: int) -> dict:
    """The peer, bench/tokenizers_peer.py, in a process of its own; its timing and tokens."""
    command = [sys.executable, str(Path(__file__).with_name("tokenizers_peer.py")),
               str(corpus), str(tokenizer_path)]  # fmt: skip
    if check is not None:
        command += ["--check", str(check), "--eos", str(eos)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the tokenizers peer failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout)


def measure_tokenize(args: argparse.Namespace, tmp: Path) -> list[TokenizeResult]:
    # The demo's tokenizer: what `data.builtin = "pydoc"` trains for opt-tiny's vocabulary.
    tokenizer_path = ensure_builtin_dataset(tmp / "pydoc", vocab_size=DEMO_VOCAB).parent
    tokenizer_path = tokenizer_path / "tokenizer.json"
    results = []
    for kind in CORPUS_KINDS:
        corpus = fresh_corpus(args.corpus_mb, args.corpus_dir, kind)
        print(
            f"[tokenize] {kind} corpus {corpus.path}: {corpus.n_docs} documents, "
            f"{corpus.text_bytes / MB:.1f} MB of text, sha256 {corpus.sha256[:16]}",
            flush=True,
        )
        docs = [json.loads(line)["text"] for line in corpus.path.open(encoding="utf-8")]
        docs = [d for d in docs if d]  # what prepare tokenizes
        words = word_cache_stats(docs, Tokenizer.from_file(str(tokenizer_path)))
        print(
            f"[tokenize] {kind}: {words.words:,} words, {words.distinct:,} distinct "
            f"({words.distinct / words.words:.2%}); word cache hit rate {words.hit_rate:.2%}",
            flush=True,
        )
        times = {f"{n}{cpu}": [] for n in ROWS_OF_KIND[kind] for cpu in ("", "_cpu")}
        results.append(TokenizeResult(kind, corpus, 0, times, words, _cores(), {}))
        del docs
    split = split_corpus(results[0].corpus.path, tmp / "split")
    eos = json.loads((tmp / "pydoc" / "train.json").read_text())["eos_id"]
    for run in range(args.runs):  # alternating, so noise from other processes hits all rows
        for r in results:
            digests = {}
            for name in ROWS_OF_KIND[r.kind]:
                if name == "encode_fast":
                    if run == 0:  # untimed: the peer's ids are the dataset's tokens
                        encode_in_process(
                            r.corpus.path, tokenizer_path, tmp / "prepare" / "corpus", eos
                        )
                    peer = encode_in_process(r.corpus.path, tokenizer_path, None, eos)
                    if peer["n_tokens"] != r.n_tokens:
                        raise SystemExit(
                            f"encode_batch_fast: {peer['n_tokens']} tokens, not {r.n_tokens}"
                        )
                    r.times[name].append(peer["wall"])
                    r.times[name + "_cpu"].append(peer["cpu"])
                    continue
                out = tmp / name / "corpus"
                shutil.rmtree(out.parent, ignore_errors=True)  # the shards too: all redone
                path = split if name == "prepare_shards2" else r.corpus.path
                command = [*prepare_command(path, tokenizer_path, out), *PREPARE_FLAGS[name]]
                with _timed(r.times, name):
                    done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"opt data prepare failed: {done.stderr.strip()[-500:]}")
                digests[name] = _output_digests(out)
                r.n_tokens = json.loads(out.with_suffix(".json").read_text())["n_tokens"]
            if len({json.dumps(d, sort_keys=True) for d in digests.values()}) != 1:
                raise SystemExit(f"opt data prepare wrote different files: {digests}")
            r.digests = digests["prepare"]
            timings = [
                f"{n} {r.times[n][-1]:.2f} s ({r.times[n + '_cpu'][-1]:.2f} CPU s)"
                for n in ROWS_OF_KIND[r.kind]
            ]
            print(f"[tokenize] run {run + 1}, {r.kind}: " + ", ".join(timings), flush=True)
    return results


@contextlib.contextmanager
def _timed(times: dict[str, list[float]], name: str):
    """Append the wall and CPU seconds of the block: every thread of this process and of
    the child processes it ran (and their own children: the workers), user and system."""
    wall, cpu = time.perf_counter(), _cpu_seconds()
    yield
    times[name].append(time.perf_counter() - wall)
    times[f"{name}_cpu"].append(_cpu_seconds() - cpu)


def _cpu_seconds() -> float:
    own, children = (
        resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


# ----- reporting -----------------------------------------------------------------------------
def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _header(command: str, load: tuple) -> list[str]:
    info = machine_info(torch.get_num_threads())
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    loads = [" ".join(f"{x:.2f}" for x in values) for values in load]
    return [
        f"- Date: {date}",
        f"- Machine: {info['cpu']}; {info['software']}; {info['threads']} torch threads; load "
        f"average {loads[0]} at start, {loads[1]} at the end (the machine is shared)",
        f"- Command: `{command}`",
    ]


def wait_body(args, results: list[WaitResult], command: str, load: tuple) -> str:
    rows = [
        "| config | prefetch | median step | median wait | wait / step | mean wait / step "
        "| max wait | target < 1% |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for side in r.sides:
            target = _met(side.share < WAIT_TARGET) if side.prefetch else "(peer)"
            rows.append(
                f"| {r.name} | {'on' if side.prefetch else 'off'} | {side.step * 1e3:.1f} ms | "
                f"{side.wait * 1e3:.3f} ms | {side.share:.3%} | {side.mean_share:.3%} | "
                f"{max(side.waits) * 1e3:.3f} ms | {target} |"
            )
    described = "; ".join(f"{r.name}: {r.description}" for r in results)
    cross = [
        f"{r.name} {side.wait_s * 1e3:.3f} ms"
        for r in results
        for side in r.sides
        if side.wait_s is not None
    ]
    return "\n".join(
        [
            *_header(command, load),
            f"- Configs: {described}; fp32, the configs' other defaults",
            "",
            *rows,
            "",
            f"Medians of {args.steps} steps per trainer after {args.warmup} warmup, the two "
            "trainers of a config (prefetch on, prefetch off = the peer) stepping alternately "
            "in one process. The wait is the `loader.next_microbatches` call inside "
            "`Trainer.train_step()`, timed by a wrapper around the trainer's loader: with "
            "prefetch it takes the batches built in the background during the previous step "
            "and starts the next read-ahead; without, it reads and stacks the samples itself. "
            "wait / step = median wait / median step; mean wait / step = all waiting / all "
            "step time. Cross-check, `PrefetchingLoader.wait_s` per step (warmup included): "
            f"{', '.join(cross)}.",
        ]
    )


def _tokenize_table(r: TokenizeResult) -> list[str]:
    rows = [
        "| | median time | tokens/s per core | tokens per CPU-second | MB/s | MB/s per core | "
        "MB per CPU-second | target >= 5 MB/s per core |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ROWS_OF_KIND[r.kind]:
        per_core = r.mb_s(name) / r.cores
        target = _met(per_core >= TOKENIZE_TARGET) if name == "prepare" else ""
        rows.append(
            f"| {TOKENIZE_ROWS[name].format(workers=r.workers)} | "
            f"{statistics.median(r.times[name]):.3f} s | "
            f"{r.tokens_s(name) / r.cores / 1e6:.2f} M | {r.tokens_s(name, cpu=True) / 1e6:.2f} M | "
            f"{r.mb_s(name):.2f} | {per_core:.2f} | {r.mb_s(name, cpu=True):.2f} | {target} |"
        )
    return rows


def _words_line(w: WordStats) -> str:
    return (
        f"{w.words:,} words (GPT-2's split, as the word cache cuts them), of which "
        f"{w.distinct:,} distinct ({w.distinct / w.words:.1%}); the word cache run once over "
        f"the corpus in one process (as `--workers 1` runs it) found {w.hit_rate:.1%} of the "
        f"words cached and sent {w.misses:,} to `tokenizers`; {w.whole_docs} documents went "
        "to `tokenizers` whole (a character the cache's split does not take)"
    )


def tokenize_body(args, results: list[TokenizeResult], command: str, load: tuple) -> str:
    r, other = results
    c, w = r.corpus, r.words

    def taken(corpus: Corpus) -> str:
        return "; ".join(
            f"{name}: {s['taken']} documents, {s['taken_bytes'] / MB:.1f} MB (of "
            f"{s['distinct']} distinct in {s['files']} files)"
            for name, s in corpus.sources.items()
        )

    python_share = (
        sum(s["taken_bytes"] for name, s in c.sources.items() if not name.startswith("/"))
        / c.text_bytes
    )
    per_core = r.mb_s("prepare") / r.cores
    verdict = (
        f"The target, 5 MB/s per core for the default command, is {_met(per_core >= TOKENIZE_TARGET)}"
        f": {per_core:.2f} MB/s per core on this fresh text."
    )
    return "\n".join(
        [
            *_header(command, load),
            f"- Corpus: {c.text_bytes / MB:.1f} MB of document text (MB = 10^6 bytes of UTF-8), "
            f"{c.n_docs:,} documents, no document twice ({c.file_bytes / MB:.1f} MB as JSON "
            f"lines, sha256 {c.sha256[:16]}...), made by `build_fresh_corpus` in "
            "bench/data_pipeline.py from the text files on this machine (see below); "
            f"{r.n_tokens:,} tokens with EOS; the demo's tokenizer (byte-level BPE trained on "
            f"pydoc, vocabulary {DEMO_VOCAB}); cores = {r.cores} (os.sched_getaffinity)",
            f"- Words: {_words_line(w)}",
            "",
            *_tokenize_table(r),
            "",
            f"Word cache's benefit on this text: the default command is "
            f"{r.mb_s('prepare') / r.mb_s('prepare_nocache'):.2f}x `--no-word-cache`'s "
            f"throughput (wall), {r.mb_s('prepare', True) / r.mb_s('prepare_nocache', True):.2f}x per "
            f"CPU-second; one process with the cache is "
            f"{r.mb_s('prepare_1') / r.mb_s('prepare_nocache'):.2f}x `--no-word-cache` (wall, "
            f"that using `tokenizers`' own threads on every core), "
            f"{r.mb_s('prepare_1', True) / r.mb_s('prepare_nocache', True):.2f}x per "
            f"CPU-second. {verdict}",
            "",
            _peer_line(r),
            "",
            "The same, on fresh text without the Python packages: the /usr/share/doc and man-page "
            f"documents only, drawn the same way ({other.corpus.text_bytes / MB:.1f} MB, "
            f"{other.corpus.n_docs:,} documents, sha256 {other.corpus.sha256[:16]}..., "
            f"{other.n_tokens:,} tokens with EOS); {_words_line(other.words)}:",
            "",
            *_tokenize_table(other),
            "",
            f"Here the default command is {other.mb_s('prepare') / other.mb_s('prepare_nocache'):.2f}x "
            f"`--no-word-cache` (wall), {other.mb_s('prepare', True) / other.mb_s('prepare_nocache', True):.2f}x "
            f"per CPU-second; {other.mb_s('prepare') / other.cores:.2f} MB/s per core, target "
            f"{_met(other.mb_s('prepare') / other.cores >= TOKENIZE_TARGET)}. {_peer_line(other)}",
            "",
            f"Medians of {args.runs} runs, each running every row of both tables in turn. Each "
            "row runs "
            "the whole command, `python -m opt data prepare CORPUS.jsonl --tokenizer "
            "tokenizer.json --out PREFIX --no-progress [flags]`, as a user would: process "
            "start, reading and parsing the JSON lines, tokenizing, writing "
            "PREFIX.bin/.idx/.json with fsync. The word cache (`opt/data/fast_encode.py`) "
            "splits words with numpy and looks them up in a dict of the ids `tokenizers` gave "
            "them; only new words go to `tokenizers`. By default one worker process per usable "
            "core runs it (`opt/data/encode_pool.py`), each with its own cache, with the parent "
            "reading and writing. `--no-word-cache` is `tokenizers`' "
            "`encode_batch_fast` on batches of 1024 documents, parallel on every core by its "
            "own thread pool. The peer row runs that encoder alone (bench/tokenizers_peer.py, "
            "in a process of its own, timed inside it) on the non-empty documents already in "
            "memory as a list of str (no process start, no reading or JSON parsing, no writing "
            "in the timed part): `Tokenizer.from_file` afresh each run (untimed, so its BPE "
            "cache starts empty), then `encode_batch_fast(batch, add_special_tokens=False)` on "
            "batches of 1024 documents and `.ids` of each (batches of 256 up to all documents "
            "in one call measured within 10% of each other on a 20 MB cut of this corpus); "
            "before the first timed run, an untimed one's ids, EOS after each document, were "
            "checked equal to PREFIX.bin token for token. Tokens count the ids and one EOS per "
            "document, as the dataset holds them. The sharded row runs the whole command on "
            "the same corpus cut at its middle line into two files (the same documents in "
            "order), its shards deleted before every run: two `--shard-index` processes at once "
            "(`--workers 1` each, one per core), each writing its shard, then the merge reading "
            "both and writing PREFIX. The prepare rows wrote byte-identical PREFIX.bin and "
            "PREFIX.idx in every run, the sharded row included, and so did the two prepare "
            "rows of the second table (sha256 compared: "
            f"{r.digests['.bin'][:16]}... and {r.digests['.idx'][:16]}...). MB/s per core "
            f"divides by every core the process may use ({r.cores}), also for the one-process "
            "row. MB per CPU-second divides by the CPU time (user + system) of every thread "
            "and process involved, workers included, which other processes on a shared "
            "machine do not inflate.",
            "",
            "How the corpus was made (`build_fresh_corpus`, cached in "
            f"{c.path.parent}/ and reused between runs): every file under "
            + ", ".join(
                f"{root} ({'every text file' if suffixes is None else ' '.join(suffixes)})"
                for _name, root, suffixes, _skip in CORPUS_SOURCES
            )
            + ", in sorted order, .gz files decompressed; kept if UTF-8, without NUL, not "
            f"blank and at most {MAX_DOC_BYTES >> 20} MiB; {c.skipped:,} files failed that. "
            "Deduplicated by the sha256 of the text: "
            f"{c.duplicates:,} files repeated an earlier file's content and were dropped, "
            f"leaving {c.candidates:,} distinct documents ({c.candidate_bytes / MB:.1f} MB). "
            "Those were put in the order of their sha256 (which mixes the sources) and taken "
            f"until {args.corpus_mb:g} MB of text: {taken(c)}. Python source and its "
            f"documentation are {python_share:.0%} of the text, /usr/share/doc (changelogs, "
            "licences, READMEs, HTML manuals) and the man pages' troff source the rest: code, "
            "HTML and troff markup, not web prose. Near-duplicates that differ in some bytes "
            "(licences, changelogs of sibling packages) survive the exact-content dedupe. The "
            "second corpus is the same recipe on the last two sources alone "
            f"({other.corpus.candidates:,} distinct documents, "
            f"{other.corpus.candidate_bytes / MB:.1f} MB), taken until {args.corpus_mb:g} MB: "
            f"{taken(other.corpus)}.",
        ]
    )


def _peer_line(r: TokenizeResult) -> str:
    """The default command against `tokenizers`' batch encoder in-process (and the sharded
    run against the single command, where it was timed)."""
    line = (
        f"Against the peer, `tokenizers`' `encode_batch_fast` in-process: the default command "
        f"(file to dataset) makes {r.tokens_s('prepare') / r.cores / 1e6:.2f} M tokens/s per "
        f"core, {r.tokens_s('prepare') / r.tokens_s('encode_fast'):.2f}x the peer's "
        f"{r.tokens_s('encode_fast') / r.cores / 1e6:.2f} M (wall), "
        f"{r.tokens_s('prepare', True) / r.tokens_s('encode_fast', True):.2f}x per CPU-second"
    )
    if "prepare_1" in r.times:
        line += (
            f"; one process with the cache is "
            f"{r.tokens_s('prepare_1') / r.tokens_s('encode_fast'):.2f}x (wall), "
            f"{r.tokens_s('prepare_1', True) / r.tokens_s('encode_fast', True):.2f}x per "
            "CPU-second"
        )
    if "prepare_shards2" in r.times:
        line += (
            f". Sharded, `--shards 2 --launch local` takes "
            f"{statistics.median(r.times['prepare_shards2']):.2f} s against the single "
            f"command's {statistics.median(r.times['prepare']):.2f} s "
            f"({r.tokens_s('prepare_shards2') / r.tokens_s('prepare'):.2f}x its throughput; "
            f"{r.tokens_s('prepare_shards2', True) / r.tokens_s('prepare', True):.2f}x per "
            "CPU-second: the merge reads and writes every token once more)"
        )
    return line + "."


# ----- command line --------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Data pipeline cost: the time a step waits for data (prefetch on vs off) "
        "and the tokenization throughput of `opt data prepare`.",
    )
    parser.add_argument(
        "--layers", type=int, help="layers kept of the opt-125m shape (default 2; quick 1)"
    )
    parser.add_argument("--steps", type=int, help="measured steps per trainer (default 20)")
    parser.add_argument("--warmup", type=int, help="unmeasured steps per trainer (default 3)")
    parser.add_argument(
        "--corpus-mb", type=float, help="size of the tokenization corpus (default 100; quick 10)"
    )
    parser.add_argument(
        "--runs", type=int, help=f"tokenization runs, at least {MIN_RUNS} (default 5; quick 2)"
    )
    parser.add_argument(
        "--corpus-dir",
        type=Path,
        default=CORPUS_DIR,
        help=f"where the fresh corpus is built once and reused (default: {CORPUS_DIR})",
    )
    parser.add_argument("--skip-wait", action="store_true", help="only the tokenization part")
    parser.add_argument("--skip-tokenize", action="store_true", help="only the data-wait part")
    parser.add_argument("--write", type=Path, metavar="FILE", help="replace these sections in FILE")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 1 layer, 4 steps, a 10 MB corpus, 2 runs"
    )
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.runs < MIN_RUNS and not args.quick:
        parser.error(f"--runs must be at least {MIN_RUNS} for a median (or use --quick)")
    if min(args.layers, args.steps, args.runs) < 1 or args.warmup < 0 or args.corpus_mb <= 0:
        parser.error("--layers, --steps, --runs and --corpus-mb must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    command = command_line(argv)
    sections = []
    with tempfile.TemporaryDirectory(prefix="opt-data-bench-") as name:
        tmp = Path(name)
        if not args.skip_wait:
            load = os.getloadavg()
            results = [measure_wait(*config, args) for config in wait_configs(args, tmp)]
            sections.append(
                (WAIT_TITLE, wait_body(args, results, command, (load, os.getloadavg())))
            )
        if not args.skip_tokenize:
            load = os.getloadavg()
            results = measure_tokenize(args, tmp)
            body = tokenize_body(args, results, command, (load, os.getloadavg()))
            sections.append((TOKENIZE_TITLE, body))
    for title, body in sections:
        print(f"\n{title}\n\n{body}")
        if args.write:
            write_section(args.write, title, body)
            print(f"wrote section {title!r} to {args.write}")


if __name__ == "__main__":
    main()
