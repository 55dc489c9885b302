"""How long `opt eval` takes on a checkpoint over SuperGLUE-sized validation splits.

    python bench/eval_full_size.py CHECKPOINT [--out DIR]

The real data cannot be fetched on the machine of BENCHMARKS.md (no hub), so the examples
are SYNTHETIC, made by ``bench/eval_speed.py``'s generator (SuperGLUE's schema, sentences of
the demo corpus, random labels), in the numbers of the real validation splits: RTE 277,
CB 56, COPA 100, WiC 638, WSC 104. The work is that of the real evaluation (every
original-task PromptSource template of each task, zero-shot, the same choices), up to the
texts' lengths; the accuracies mean nothing. Prints the command's wall time and the number
of scored (example, prompt) pairs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from eval_speed import corpus_sentences, synthetic_examples  # noqa: E402

# Hugging Face super_glue validation sizes (rte, cb, copa, wic, wsc.fixed).
VALIDATION_SIZES = {"rte": 277, "cb": 56, "copa": 100, "wic": 638, "wsc": 104}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out", type=Path, help="where opt eval writes (default: a temp dir)")
    args = parser.parse_args()
    sentences = corpus_sentences()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        for task, n in VALIDATION_SIZES.items():
            (data / task).mkdir(parents=True)
            rows = synthetic_examples(task, n, sentences, seed=0)
            (data / task / "validation.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in rows)
            )
        out = args.out or Path(tmp) / "out"
        command = [sys.executable, "-m", "opt", "eval", str(args.checkpoint.resolve()), "--tasks",
                   ",".join(VALIDATION_SIZES), "--data", str(data), "--out", str(out)]  # fmt: skip
        start = time.perf_counter()
        subprocess.run(command, check=True, cwd=REPO, capture_output=True)
        seconds = time.perf_counter() - start
        results = json.loads((out / "results.json").read_text())
    pairs = sum(p["n"] for t in results["tasks"].values() for p in t["prompts"])
    print(f"{seconds:.1f} s for {pairs} scored (example, prompt) pairs "
          f"({pairs / seconds:.0f} per second), whole command")  # fmt: skip


if __name__ == "__main__":
    main()
