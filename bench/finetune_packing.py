"""Fine-tuning with packed rows against one example per row.

    python bench/finetune_packing.py --write BENCHMARKS.md

The example mixture (configs/mixtures/example.toml: three made-up datasets, short
examples) on opt-tiny's shape, randomly initialised (seed 0; speed does not depend on the
weights), fp32 on the CPU, trained by the real trainer (`Trainer.train_step`: forward,
backward, clipping, AdamW) with the tokenizer of the demo corpus. Three setups, each a fresh
trainer, alternating in one process for ``--rounds`` rounds of ``--steps`` steps after one
warm-up step:

- ``packed``: rows of 128 tokens, whole examples packed into each (segment masks);
- ``one per row, 128``: the same rows, one example each, padded;
- ``one per row, shortest``: one example per row in rows just long enough for the longest
  rendering (its fastest reasonable setup: less padding), as many rows per step as fit the
  same tokens per step.

Reported per setup: answer tokens (the tokens the loss is on) and examples per second, the
share of row slots that hold a real token, all medians over the rounds; "vs packed" divides
answer tokens/s by the packed setup's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from report import aligned_table, command_line, machine_info, write_section  # noqa: E402

TITLE = "## Fine-tuning: packed rows against one example per row (CPU)"
MIXTURE = REPO / "configs" / "mixtures" / "example.toml"
ROW = 128
ROWS_PER_STEP = 16


def trainer_for(tmp: Path, tokenizer: Path, seq_len: int, rows: int, packing: bool):
    from opt.config import load_config
    from opt.train.trainer import Trainer

    values = {
        "model.name": "opt-tiny",
        "model.dropout": 0.0,
        "finetune.mixture": str(MIXTURE),
        "finetune.packing": packing,
        "data.tokenizer": str(tokenizer),
        "data.seq_len": seq_len,
        "data.prefetch": False,
        "train.batch_tokens": seq_len * rows,
        "train.micro_batch_size": rows,
        "train.precision": "fp32",
        "metrics.log_every": 10_000,
        "metrics.tensorboard": False,
        "metrics.peak_tflops": 1.0,
        "checkpoint.resume": "none",
        "checkpoint.initial": False,
        "run.dir": str(tmp / "runs"),
        "checkpoint.dir": str(tmp / "checkpoints"),
        "logbook.dir": str(tmp / "logbook"),
        "run.name": f"pack-{packing}-{seq_len}",
    }
    return Trainer(load_config(None, values=values))


def timed_steps(trainer, steps: int) -> tuple[float, int, int, float]:
    """(seconds, answer tokens, examples, real-token share) over ``steps`` steps."""
    seconds = answers = examples = 0
    real = []
    for _ in range(steps):
        probe = trainer.loader.stream.copy()
        batches = trainer.loader.next_microbatches(trainer.grad_accum)
        trainer.loader.stream = probe  # the step below reads the same batches
        start = time.perf_counter()
        trainer.train_step()
        seconds += time.perf_counter() - start
        answers += batches[0].step_loss_tokens
        examples += batches[0].step_examples
        real.append(
            float(
                sum((b.segments > 0).sum() for b in batches)
                / sum(b.tokens.numel() for b in batches)
            )
        )
    return seconds, answers, examples, statistics.mean(real)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--write", type=Path, metavar="FILE")
    args = parser.parse_args()

    from opt.data.prepare import ensure_builtin_dataset
    from opt.data.tokenizer import load_tokenizer
    from opt.finetune.mixture import load_mixture
    from opt.finetune.stream import survey

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prefix = ensure_builtin_dataset(tmp / "pydoc", vocab_size=8192)
        tokenizer = prefix.parent / "tokenizer.json"
        counts = survey(load_mixture(MIXTURE), load_tokenizer(tokenizer), ROW)
        longest = max(c["longest"] for c in counts.values())
        short = -(-longest // 8) * 8  # rounded up to a multiple of 8
        setups = {
            "packed": trainer_for(tmp, tokenizer, ROW, ROWS_PER_STEP, True),
            "one per row, 128": trainer_for(tmp, tokenizer, ROW, ROWS_PER_STEP, False),
            f"one per row, {short}": trainer_for(
                tmp, tokenizer, short, ROW * ROWS_PER_STEP // short, False
            ),
        }
        for trainer in setups.values():
            trainer.train_step()  # warm-up
        runs = {name: [] for name in setups}
        names = list(setups)
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                runs[name].append(timed_steps(setups[name], args.steps))
    load_end = os.getloadavg()
    body = section_body(args, runs, short, load_start, load_end)
    print(body)
    if args.write:
        write_section(args.write, TITLE, body)


def section_body(args, runs, short: int, load_start, load_end) -> str:
    info = machine_info(torch.get_num_threads())
    rates = {
        name: (
            statistics.median(a / s for s, a, _, _ in r),
            statistics.median(e / s for s, _, e, _ in r),
            statistics.median(f for *_, f in r),
        )
        for name, r in runs.items()
    }
    packed = rates["packed"][0]
    rows = [("setup", "answer tokens/s", "examples/s", "real tokens in rows", "vs packed")]
    for name, (answers, examples, real) in rates.items():
        rows.append((name, f"{answers:.0f}", f"{examples:.1f}", f"{100 * real:.0f}%",
                     f"{answers / packed:.2f}x"))  # fmt: skip
    return "\n".join(
        [
            f"- Command: `{command_line(sys.argv[1:])}` (under `flock /tmp/cpu.lock`)",
            f"- Machine: {info['cpu']}; {info['software']}; {info['threads']} threads",
            f"- Load average (1 min) {load_start[0]:.2f} at start, {load_end[0]:.2f} at end",
            "- Model: opt-tiny's shape, random init, fp32, the trainer's full step (AdamW, "
            "clipping); data: configs/mixtures/example.toml (made-up, short examples), "
            f"rows of {ROW} tokens, {ROW * ROWS_PER_STEP} tokens a step; one per row, "
            f"{short}: rows as long as the longest rendering, rounded up to 8.",
            f"- Medians of {args.rounds} rounds of {args.steps} steps, setups alternating.",
            "",
            aligned_table(rows),
        ]
    )


if __name__ == "__main__":
    main()
