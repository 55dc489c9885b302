"""The ``opt data`` commands: train a tokenizer, deduplicate sources, and tokenize a corpus into a
dataset (in one process, or in shards over local processes or a Slurm array)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from opt.data.corpus import BadRecords, iter_documents, parse_limit, resolve_inputs, total_bytes
from opt.data.dataset import DatasetPaths, valid_prefix
from opt.data.prepare import prepare_dataset, save_tokenizer
from opt.data.tokenizer import load_tokenizer, train_tokenizer
from opt.errors import OptError
from opt.host_memory import retain_freed_memory
from opt.launch.prepare_shards import add_shard_arguments, run_sharded, sharded

# Below this much text one process tokenizes about as soon as several: each worker costs
# half a CPU-second to start and to fill its word cache (measured on 2 cores).
_PARALLEL_MIN_BYTES = 32 << 20

_INPUTS_HELP = (
    "a .txt file (one document); JSON lines, one object per line (.jsonl/.json, gzipped "
    ".jsonl.gz/.json.gz, or zstd .jsonl.zst/.json.zst as the Pile ships); a .parquet file; a "
    "directory that datasets' save_to_disk wrote (one split: not a DatasetDict); a directory "
    "of any of these (read in sorted order); or builtin:pydoc (Python's own documentation, no "
    "download needed). The text is under --text-key. A malformed record is skipped with a "
    "warning naming its file and line (or row, from 0), and counted"
)
_TEXT_KEY_HELP = "JSON field or Parquet/dataset column holding the text (default: text)"
_MAX_BAD_HELP = (
    "fail, publishing nothing, past this many malformed records (a count: 10), or at the end "
    "if more than this fraction (0.001) or percentage (0.1%%) of the records were malformed "
    "(default: skip any number)"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``data`` command group to the main CLI's subparsers."""
    data = subparsers.add_parser(
        "data",
        help="prepare training data: tokenizers, deduplication and tokenized datasets",
        description="Train a tokenizer, deduplicate sources, or tokenize text into a memory-mapped dataset.",
    )
    commands = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    _add_prepare(commands)
    _add_train_tokenizer(commands)
    _add_dedup(commands)


def _add_prepare(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "prepare",
        help="tokenize documents into PREFIX.bin/.idx/.json",
        description=(
            "Tokenize documents, appending the end-of-document token to each, into a "
            "memory-mapped dataset: PREFIX.bin (tokens), PREFIX.idx (document offsets) and "
            "PREFIX.json (metadata, written last). With --valid-fraction, whole documents are "
            "held out into a second dataset, PREFIX-valid.bin/.idx/.json, which the training "
            "set does not contain; the trainer validates on it. Files are replaced atomically."
        ),
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=_INPUTS_HELP)
    p.add_argument(
        "--tokenizer",
        required=True,
        type=Path,
        help="tokenizer.json, or a directory with it or with GPT-2 vocab.json + merges.txt",
    )
    p.add_argument("--out", required=True, type=Path, metavar="PREFIX", help="output prefix")
    p.add_argument("--text-key", default="text", help=_TEXT_KEY_HELP)
    p.add_argument("--max-bad-records", type=_limit, metavar="N", help=_MAX_BAD_HELP)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--no-word-cache",
        action="store_true",
        help="encode every word with `tokenizers` (same ids, several times slower)",
    )
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="tokenizing processes for the word cache (default: every usable core, or 1 for "
        f"inputs under {_PARALLEL_MIN_BYTES >> 20} MB, where starting them costs more)",
    )
    p.add_argument(
        "--valid-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="hold out about this fraction of the documents (whole documents, chosen by a "
        "seeded hash of their number: the same split every run) into PREFIX-valid; "
        "default 0: no held-out set (and an old PREFIX-valid is removed)",
    )
    p.add_argument(
        "--split-seed",
        type=int,
        default=0,
        metavar="N",
        help="seed of the held-out choice (default: 0)",
    )
    add_shard_arguments(p)
    p.set_defaults(func=_prepare)


def _add_train_tokenizer(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "train-tokenizer",
        help="train a byte-level BPE tokenizer, writing DIR/tokenizer.json",
        description=(
            "Train a byte-level BPE tokenizer with OPT's special tokens "
            "(<s>=0, <pad>=1, </s>=2, <unk>=3) and write DIR/tokenizer.json."
        ),
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=_INPUTS_HELP)
    p.add_argument("--vocab-size", required=True, type=int, help="largest vocabulary to learn")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    p.add_argument("--text-key", default="text", help=_TEXT_KEY_HELP)
    p.add_argument("--max-bad-records", type=_limit, metavar="N", help=_MAX_BAD_HELP)
    p.set_defaults(func=_train_tokenizer)


def _limit(text: str) -> int | float:
    try:
        return parse_limit(text)
    except OptError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _prepare(args: argparse.Namespace) -> int:
    if args.workers is not None and args.workers < 1:
        raise OptError(f"--workers must be at least 1, not {args.workers}")
    if not 0 <= args.valid_fraction < 1:
        raise OptError(f"--valid-fraction must be in [0, 1), not {args.valid_fraction}")
    sources = resolve_inputs(args.inputs)
    tokenizer = load_tokenizer(args.tokenizer)
    size = total_bytes(sources, args.text_key)
    retain_freed_memory()  # batches allocate and free the same large arrays (see workers)
    workers = args.workers or (len(os.sched_getaffinity(0)) if size >= _PARALLEL_MIN_BYTES else 1)
    source = {"inputs": list(args.inputs), "tokenizer": str(args.tokenizer)}
    if sharded(args):
        return run_sharded(args, sources, tokenizer, source, workers)
    bad = BadRecords(args.max_bad_records)

    def documents():
        yield from iter_documents(sources, args.text_key, bad)
        # prepare_dataset records `source` once the documents are exhausted.
        source["bad_records"] = bad.as_meta()

    meta = prepare_dataset(
        documents(),
        tokenizer,
        args.out,
        total_bytes=size,
        show_progress=not args.no_progress,
        source=source,
        word_cache=not args.no_word_cache,
        workers=workers,
        valid_fraction=args.valid_fraction,
        split_seed=args.split_seed,
    )
    paths = DatasetPaths.of(args.out)
    print(
        f"prepared {meta['n_tokens']:,} tokens in {meta['n_docs']:,} documents: "
        f"{paths.bin}, {paths.idx}, {paths.meta}"
    )
    if "split" in meta:
        split, held = meta["split"], DatasetPaths.of(valid_prefix(args.out))
        print(
            f"held out {split['valid_tokens']:,} tokens in {split['valid_docs']:,} documents: "
            f"{held.bin}, {held.idx}, {held.meta}"
        )
    if bad.count:
        print(bad.summary())
    return 0


def _train_tokenizer(args: argparse.Namespace) -> int:
    sources = resolve_inputs(args.inputs)
    bad = BadRecords(args.max_bad_records)
    tokenizer = train_tokenizer(iter_documents(sources, args.text_key, bad), args.vocab_size)
    path = save_tokenizer(tokenizer, args.out / "tokenizer.json")
    print(f"trained a {tokenizer.get_vocab_size():,}-token tokenizer: {path}")
    if bad.count:
        print(bad.summary())
    return 0


def _add_dedup(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "dedup",
        help="remove exact and near-duplicate documents across sources (MinHash LSH)",
        description=(
            "Deduplicate several sources together, as OPT-175B did (MinHash LSH, Jaccard >= "
            "0.95 across all sources). Exact duplicates: identical text. Near duplicates: "
            "estimated Jaccard of word n-gram shingles (ASCII-lowercased, split on whitespace) "
            "at or above --threshold, every LSH candidate confirmed by its signature. The first "
            "copy is kept: sources in the order first named, each source's inputs in the order "
            "given. Writes DIR/NAME.jsonl.zst (kept documents, input order) per source, "
            "DIR/removed.jsonl.zst (every removed document and what it duplicates) and "
            "DIR/dedup-report.json/.md, all renamed into place at the end; nothing on error."
        ),
    )
    p.add_argument(
        "sources",
        nargs="+",
        metavar="NAME=INPUT",
        help=f"a source name and one input ({_INPUTS_HELP}); repeat NAME= for more inputs",
    )
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    p.add_argument(
        "--threshold",
        type=float,
        default=0.95,
        help="remove a document whose estimated Jaccard with a kept one is at least this "
        "(default: 0.95, as OPT)",
    )
    p.add_argument(
        "--num-perm", type=int, default=128, metavar="N", help="MinHash permutations (default: 128)"
    )
    p.add_argument(
        "--ngram", type=int, default=5, metavar="N", help="words per shingle (default: 5)"
    )
    p.add_argument("--seed", type=int, default=1, help="MinHash permutations' seed (default: 1)")
    p.add_argument("--text-key", default="text", help="JSON field holding the text (default: text)")
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="processes computing signatures (default: every usable core, or 1 for inputs "
        "under 32 MB); the output does not depend on it",
    )
    p.add_argument("--max-bad-records", type=_limit, metavar="N", help=_MAX_BAD_HELP)
    p.set_defaults(func=_dedup)


def _dedup(args: argparse.Namespace) -> int:
    from opt.data.dedup import REPORT_JSON, REPORT_MD, DedupSettings, dedup_sources, parse_sources

    settings = DedupSettings(args.threshold, args.num_perm, args.ngram, args.seed, args.text_key)
    bad = BadRecords(args.max_bad_records)
    report = dedup_sources(parse_sources(args.sources), args.out, settings, workers=args.workers,
                           bad=bad)  # fmt: skip
    print(report.markdown(), end="")
    if bad.count:
        print(bad.summary())
    total = report.total()
    print(
        f"kept {total.kept:,} of {total.documents:,} documents in "
        f"{', '.join(str(args.out / s.output) for s in report.sources)}; "
        f"report: {args.out / REPORT_MD}, {args.out / REPORT_JSON}"
    )
    return 0
