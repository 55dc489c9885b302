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
   PREFIX`` (the whole command, process start included) on a corpus of the built-in pydoc
   documents repeated to 100 MB, with the tokenizer the demo
   trains on that corpus (vocabulary 8192). MB of document text per second, divided by the
   cores this process may run on; against the same command with ``--workers 1`` and with
   ``--no-word-cache``, and ``Tokenizer.encode_batch_fast`` alone. The cold rows encode the distinct documents once
   with an empty word cache, against ``encode_batch_fast`` on them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from tokenizers import Tokenizer

from opt.config import load_config
from opt.data.corpus import builtin_documents
from opt.data.fast_encode import fast_encoder, unicode_class_table
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
MIN_RUNS = 5
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
# What is timed, in this order within each run: the label of its row, and what it runs.
TOKENIZE_ROWS = {
    "prepare": "`opt data prepare` (the default: word cache, {cores} worker processes)",
    "prepare_1": "`opt data prepare --workers 1` (word cache, one process)",
    "prepare_nocache": "`opt data prepare --no-word-cache` (the peer: `tokenizers` alone)",
    "encode": "`{encoder}` alone, in-process, batches of 1024",
    "cold": "word cache from empty, in-process, on the {n} distinct documents",
    "cold_peer": "`{encoder}` on the same {n} documents",
}
PREPARE_FLAGS = {"prepare": [], "prepare_1": ["--workers", "1"],
                 "prepare_nocache": ["--no-word-cache"]}  # fmt: skip


@dataclass
class TokenizeResult:
    text_bytes: int
    file_bytes: int
    n_docs: int
    n_tokens: int
    times: dict[str, list[float]]  # wall seconds per run, and "<name>_cpu": CPU seconds
    cold_bytes: int  # text in the distinct documents that the cold rows encode
    cores: int
    encoder: str  # the Tokenizer method timed alone

    def mb_s(self, name: str, cpu: bool = False) -> float:
        size = self.cold_bytes if name.startswith("cold") else self.text_bytes
        return size / MB / statistics.median(self.times[f"{name}_cpu" if cpu else name])


def build_corpus(path: Path, target_mb: float) -> tuple[int, int]:
    """pydoc's documents, one JSON line each, repeated to ``target_mb``; (text bytes, docs)."""
    docs = builtin_documents("pydoc")
    one = sum(len(d.encode("utf-8")) for d in docs)
    repeats = max(1, round(target_mb * MB / one))
    with path.open("w", encoding="utf-8") as f:
        for _ in range(repeats):
            for doc in docs:
                f.write(json.dumps({"text": doc}) + "\n")
    return one * repeats, len(docs) * repeats


def prepare_command(corpus: Path, tokenizer: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "opt", "data", "prepare", str(corpus), "--tokenizer",
            str(tokenizer), "--out", str(out), "--no-progress"]  # fmt: skip


def measure_tokenize(args: argparse.Namespace, tmp: Path) -> TokenizeResult:
    # The demo's tokenizer: what `data.builtin = "pydoc"` trains for opt-tiny's vocabulary.
    tokenizer_path = ensure_builtin_dataset(tmp / "pydoc", vocab_size=DEMO_VOCAB).parent
    tokenizer_path = tokenizer_path / "tokenizer.json"
    corpus = tmp / "corpus.jsonl"
    text_bytes, n_docs = build_corpus(corpus, args.corpus_mb)
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    docs = [json.loads(line)["text"] for line in corpus.open(encoding="utf-8")]
    distinct = builtin_documents("pydoc")
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    unicode_class_table()  # built once per process (~0.3 s), as in any `opt data prepare`
    times: dict[str, list[float]] = {f"{n}{cpu}": [] for n in TOKENIZE_ROWS for cpu in ("", "_cpu")}
    outputs = {}
    for run in range(args.runs):  # alternating, so noise from other processes hits both
        for name, flags in PREPARE_FLAGS.items():
            out = tmp / name / "corpus"
            with _timed(times, name):
                done = subprocess.run([*prepare_command(corpus, tokenizer_path, out), *flags],
                                      capture_output=True, text=True)  # fmt: skip
            if done.returncode != 0:
                raise SystemExit(f"opt data prepare failed: {done.stderr.strip()[-500:]}")
            outputs[name] = json.loads(out.with_suffix(".json").read_text())
        with _timed(times, "encode"):
            for i in range(0, len(docs), 1024):
                encode(docs[i : i + 1024], add_special_tokens=False)
        encoder = fast_encoder(tokenizer)
        with _timed(times, "cold"):
            cold = encoder.encode_batch(distinct)
        with _timed(times, "cold_peer"):
            cold_peer = encode(distinct, add_special_tokens=False)
        if [ids.tolist() for ids in cold] != [e.ids for e in cold_peer]:
            raise SystemExit("the word cache's ids differ from the tokenizer's")
        if len({meta["sha256"] for meta in outputs.values()}) != 1:
            raise SystemExit("opt data prepare wrote different tokens with the word cache")
        timings = [
            f"{n} {times[n][-1]:.2f} s ({times[n + '_cpu'][-1]:.2f} CPU s)" for n in TOKENIZE_ROWS
        ]
        print(f"[tokenize] run {run + 1}: " + ", ".join(timings), flush=True)
    cold_bytes = sum(len(d.encode("utf-8")) for d in distinct)
    n_tokens = outputs["prepare"]["n_tokens"]
    return TokenizeResult(text_bytes, corpus.stat().st_size, n_docs, n_tokens, times,
                          cold_bytes, _cores(), encode.__name__)  # fmt: skip


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


def tokenize_body(args, r: TokenizeResult, command: str, load: tuple) -> str:
    rows = []
    for name, label in TOKENIZE_ROWS.items():
        label = label.format(encoder=r.encoder, n=len(builtin_documents("pydoc")), cores=r.cores)
        per_core = r.mb_s(name) / r.cores
        target = _met(per_core >= TOKENIZE_TARGET) if name == "prepare" else ""
        rows.append(
            f"| {label} | {statistics.median(r.times[name]):.3f} s | {r.mb_s(name):.2f} | "
            f"{per_core:.2f} | {r.mb_s(name, cpu=True):.2f} | {target} |"
        )
    return "\n".join(
        [
            *_header(command, load),
            f"- Corpus: the {len(builtin_documents('pydoc'))} pydoc documents repeated to "
            f"{r.n_docs} documents, {r.text_bytes / MB:.1f} MB of text ({r.file_bytes / MB:.1f}"
            f" MB as JSON lines), {r.n_tokens:,} tokens with EOS; the demo's tokenizer "
            f"(byte-level BPE trained on pydoc, vocabulary {DEMO_VOCAB}); MB = 10^6 bytes of "
            f"UTF-8 document text; cores = {r.cores} (os.sched_getaffinity)",
            "",
            "| | median time | MB/s | MB/s per core | MB per CPU-second "
            "| target >= 5 MB/s per core |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            f"Medians of {args.runs} runs, each running the rows in turn. The prepare rows run "
            "the whole command, `python -m opt data prepare CORPUS.jsonl --tokenizer "
            "tokenizer.json --out PREFIX --no-progress [flags]`, as a user would: process "
            "start, reading and parsing the JSON lines, tokenizing, writing "
            "PREFIX.bin/.idx/.json with fsync. The word cache (`opt/data/fast_encode.py`) "
            "splits words with numpy and looks them up in a dict of the ids `tokenizers` gave "
            "them; only new words go to `tokenizers`. By default one worker process per usable "
            "core runs it (`opt/data/encode_pool.py`), with the parent reading and writing. "
            "All three prepare rows wrote byte-identical token files in every run (sha256 "
            "compared). MB/s per core divides by every core the process may use "
            f"(os.sched_getaffinity: {r.cores}), also for the one-process row. MB per "
            "CPU-second divides by the CPU time (user + system) of every thread and process "
            "involved, workers included, which other processes on a shared machine do not "
            "inflate. The corpus repeats the same documents, so after each worker's first "
            "batch every word is cached: the cold rows give the other end, a new encoder on "
            "the distinct documents once in this process (every word new at its first use; "
            "the ids compared equal to the peer's).",
        ]
    )


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
            result = measure_tokenize(args, tmp)
            body = tokenize_body(args, result, command, (load, os.getloadavg()))
            sections.append((TOKENIZE_TITLE, body))
    for title, body in sections:
        print(f"\n{title}\n\n{body}")
        if args.write:
            write_section(args.write, title, body)
            print(f"wrote section {title!r} to {args.write}")


if __name__ == "__main__":
    main()
