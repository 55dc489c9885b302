"""The peer of `opt data prepare` in bench/data_pipeline.py: `tokenizers`' own batch encoder,
in a process of its own, on documents already in memory.

    python bench/tokenizers_peer.py CORPUS.jsonl TOKENIZER.json [--check PREFIX --eos ID]

Reads the non-empty documents of CORPUS.jsonl (untimed), loads the tokenizer afresh
(untimed: its BPE cache starts empty), then times ``encode_batch_fast`` on batches of
documents and the ``.ids`` of each: no file I/O, `tokenizers`' thread pool on every core.
Prints one JSON line: wall and CPU seconds of the timed part, and the tokens (ids plus one
EOS per document, as a dataset holds them). With ``--check``, the ids, EOS after each
document, must equal the dataset PREFIX.bin token for token (exit 1 if not).

A process of its own, not the benchmark's: there, after the word-cache statistics and with
both corpora in memory, the same encoding measured about 20% slower.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

BATCH_DOCS = 1024  # as `--no-word-cache` batches; 256 to all in one call measured alike


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus", type=Path)
    parser.add_argument("tokenizer", type=Path)
    parser.add_argument("--check", type=Path, metavar="PREFIX")
    parser.add_argument("--eos", type=int)
    args = parser.parse_args(argv)
    with args.corpus.open(encoding="utf-8") as f:
        docs = [text for text in (json.loads(line)["text"] for line in f) if text]
    tokenizer = Tokenizer.from_file(str(args.tokenizer))
    kept: list[list[int]] = []
    n_tokens = 0
    wall, cpu = time.perf_counter(), _cpu_seconds()
    for i in range(0, len(docs), BATCH_DOCS):
        batch = tokenizer.encode_batch_fast(docs[i : i + BATCH_DOCS], add_special_tokens=False)
        ids = [e.ids for e in batch]
        n_tokens += sum(map(len, ids)) + len(ids)
        if args.check:
            kept.extend(ids)
    wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
    if args.check:
        meta = json.loads(args.check.with_suffix(".json").read_text())
        dtype = np.dtype(meta["dtype"])
        mine = np.concatenate([np.asarray([*x, args.eos], dtype=dtype) for x in kept])
        if not np.array_equal(mine, np.fromfile(args.check.with_suffix(".bin"), dtype=dtype)):
            print("encode_batch_fast's ids differ from the dataset's tokens", file=sys.stderr)
            return 1
    print(json.dumps({"wall": wall, "cpu": cpu, "n_tokens": n_tokens}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
