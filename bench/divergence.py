"""The supervisor against runs that truly diverge: nothing injected into the loss or the
gradients, only settings and data that go wrong as they do in practice.

    python bench/divergence.py                              # every scenario, 3 runs each
    python bench/divergence.py --only lr_too_high --write BENCHMARKS.md

Each scenario trains the demo shape (opt-tiny, seq 128, 2048 tokens a step, the shipped
pydoc corpus) three times on the same number of steps:
- **reference**: sane settings (the demo's LR 2e-3 with its warmup and decay, clean data),
  with the supervisor on to count its false alarms; where it intervened, the reference's
  loss is that of a fourth run, the same without the supervisor;
- **no supervisor**: the scenario's fault, `supervisor.enabled = false`;
- **supervised**: the same fault, the supervisor on with its default detectors and ladder.
A scenario counts only if the unsupervised run ends at least 20% above the reference's
validation loss, or non-finite. Target: the supervised run ends within 5% of the reference.

Every run is `python -m opt train configs/demo.toml` in a process of its own, with
checkpoints every 10 steps (all three runs alike) and the drill off; the figures come from
each run's `metrics.jsonl` and public logbook.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from report import command_line, machine_info, write_section  # noqa: E402

TITLE = "## Divergence suite: the supervisor against runs that truly diverge (CPU)"
TOKENS_PER_STEP = 2048  # the demo's batch: 16 sequences of 128 tokens
DIVERGED = 1.20  # the unsupervised run must end at least this far above the reference
TARGET = 1.05  # the supervised run must end within this of the reference


@dataclass(frozen=True)
class Scenario:
    what: str
    fault: dict
    steps: int = 200
    reference: dict = field(default_factory=dict)  # beyond the demo's own settings
    poisoned: bool = False  # train on the corpus with a block of garbage documents


SCENARIOS = {
    "lr_too_high": Scenario(
        "peak LR 3.0 (1500x the demo's 2e-3), the demo's warmup and decay",
        {"optim.lr": 3.0},
    ),
    "fp16_scale_collapse": Scenario(
        "fp16 with dynamic loss scaling and a constant LR of 1.0 after the demo's warmup: the "
        "activations overflow fp16, step after step overflows, and the loss scale falls to "
        "its floor",
        {"train.precision": "fp16", "optim.lr": 1.0, "schedule.min_lr_ratio": 1.0},
        steps=60,
        reference={"train.precision": "fp16"},
    ),
    "poisoned_data": Scenario(
        "the training documents read in order (4 passes) at peak LR 2e-2 (10x the demo's, "
        "which trains well on clean data), with a block of 12 documents (about 12 steps of "
        "data: one token repeated, or random tokens, as bad crawl shards hold) at step 150; "
        "the reference reads the clean documents in order at the same LR",
        {},
        reference={"optim.lr": 2e-2},
        poisoned=True,
    ),
    "slow_divergence": Scenario(
        "the LR warms up over 200 steps to 0.7 and never decays: the validation loss falls "
        "to its best around step 60, then climbs over the next 200 steps (7.3 to 17 in a "
        "trial run, through 8.5 at step 120)",
        {
            "optim.lr": 0.7,
            "schedule.warmup_tokens": 200 * TOKENS_PER_STEP,
            "schedule.min_lr_ratio": 1.0,
        },
        steps=300,
    ),
}


# Healthy runs the defaults were not tuned on: other seeds (initialisation, data order,
# dropout) and other shapes of the same corpus.
HELD_OUT = {
    "seed 1": {"run.seed": 1},
    "seed 2": {"run.seed": 2},
    "seed 3": {"run.seed": 3},
    "2 layers, d_model 256": {"model.n_layers": 2, "model.d_model": 256},
    "8 layers, d_model 64": {"model.n_layers": 8, "model.d_model": 64, "model.n_heads": 2},
    "LR 6e-3, 3x the demo's": {"optim.lr": 6e-3},
}


@dataclass
class Run:
    name: str
    final_loss: float
    loss_kind: str  # "validation" or "training (median of the last 5 logged)"
    interventions: list[str]
    tokens_lost: int
    wall_s: float
    stopped_for_human: bool
    returncode: int


def poisoned_corpus(root: Path) -> Path:
    """The pydoc corpus repeated (4 copies, one epoch of 200 steps read in order) with a
    block of random-token documents inserted at step 150's position; tokenized with the
    demo's own tokenizer. Returns the token-file prefix."""
    import random

    from opt.data.corpus import builtin_documents
    from opt.data.prepare import (
        BUILTIN_SPLIT_SEED,
        BUILTIN_VALID_FRACTION,
        ensure_builtin_dataset,
        held_out,
        prepare_dataset,
    )
    from opt.data.tokenizer import load_tokenizer

    clean = ensure_builtin_dataset(root / "pydoc", 8192)
    tokenizer = load_tokenizer(clean.parent / "tokenizer.json")
    # The training documents only: the held-out ones stay held out (validation reads the
    # clean corpus's held-out split).
    documents = [
        d for i, d in enumerate(builtin_documents("pydoc"))
        if not held_out(i, BUILTIN_VALID_FRACTION, BUILTIN_SPLIT_SEED)
    ] * 4  # fmt: skip
    # About 150 steps' worth of text precedes the block (the corpus tokenizes to ~1.3 tokens
    # per 4 characters; measured, not assumed: the tokens are counted below).
    rng = random.Random(0)
    vocab = [tokenizer.id_to_token(i) for i in range(200, 8000)]
    # Random tokens, and one token repeated: both are found in real crawls.
    garbage = [
        " ".join([vocab[7]] * 2000 if i % 2 == 0 else (rng.choice(vocab) for _ in range(2000)))
        for i in range(12)
    ]
    counted, at = 0, 0
    while counted < 150 * TOKENS_PER_STEP and at < len(documents):
        counted += len(tokenizer.encode(documents[at]).ids) + 1
        at += 1
    documents = documents[:at] + garbage + documents[at:]
    prefix = root / "poisoned" / "train"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    (prefix.parent / "tokenizer.json").write_bytes((clean.parent / "tokenizer.json").read_bytes())
    prepare_dataset(documents, tokenizer, prefix, show_progress=False)
    return prefix


def run(
    tmp: Path, name: str, scenario: Scenario, supervised: bool | None, data: Path,
    extra: dict | None = None,
) -> Run:  # fmt: skip
    """One `opt train` of the demo config: the reference (supervised None), or the fault;
    ``extra``: further overrides (a held-out seed or shape)."""
    work = tmp / name
    work.mkdir(parents=True)
    overrides = {
        "run.name": name,
        "run.dir": str(work / "runs"),
        "checkpoint.dir": str(work / "checkpoints"),
        "logbook.dir": str(work / "logbook"),
        "data.path": str(data),
        "data.builtin": "",  # built above; a builtin corpus would be rebuilt over data.path
        "train.max_steps": scenario.steps,
        "checkpoint.every": 10,
        "checkpoint.keep_last": 0,
        "metrics.log_every": 5,
        "metrics.tensorboard": False,
        "metrics.peak_tflops": 1.0,
        "supervisor.enabled": supervised is not False,
        **scenario.reference,
        **({} if supervised is None else scenario.fault),
        **(extra or {}),
    }
    if scenario.poisoned:
        clean = data.parent.parent / "pydoc" / "train"
        overrides["data.shuffle"] = False
        overrides["validation.path"] = f"{clean}-valid"
        if supervised is None:  # the reference trains on the clean corpus, in order
            overrides["data.path"] = str(clean)
    command = [sys.executable, "-m", "opt", "train", str(REPO / "configs" / "demo.toml"),
               "--supervisor.drill", '""',
               *[f"--{k}={json.dumps(v)}" for k, v in overrides.items()]]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(command, cwd=work, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    wall = time.perf_counter() - start
    (work / "output.txt").write_text(result.stdout + result.stderr)
    if result.returncode not in (0, 3):
        raise SystemExit(f"{name} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    final, kind = final_loss(work / "runs" / name)
    events = [json.loads(line) for line in (work / "logbook" / name / "events.jsonl").open()]
    acts = [f"{e['step']}: {e['action']} ({e['detector']})" for e in events
            if e["kind"] in ("intervention", "stop_for_human")]  # fmt: skip
    lost = sum(e.get("tokens_lost") or 0 for e in events if e["kind"] == "intervention")
    return Run(name, final, kind, acts, lost, wall, result.returncode == 3, result.returncode)


def final_loss(run_dir: Path) -> tuple[float, str]:
    """The run's last validation loss, or the median of its last 5 logged training losses."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    valid = [r["val_loss"] for r in rows if r.get("val_loss") is not None]
    if valid:
        return valid[-1], "validation"
    return statistics.median(r["loss"] for r in rows[-5:]), "training (last 5 logged)"


def verdict(ref: Run, nosup: Run, sup: Run) -> tuple[bool, bool]:
    diverged = not math.isfinite(nosup.final_loss) or nosup.final_loss >= DIVERGED * ref.final_loss
    met = math.isfinite(sup.final_loss) and sup.final_loss <= TARGET * ref.final_loss
    return diverged, met


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=sorted(SCENARIOS))
    parser.add_argument("--write", type=Path)
    parser.add_argument(
        "--false-alarms", action="store_true",
        help="also train healthy runs of held-out seeds and shapes with the supervisor on, "
        "and count its interventions (none is the target)",
    )  # fmt: skip
    args = parser.parse_args()
    names = args.only or list(SCENARIOS)
    rows, alarms = [], []
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        from opt.data.prepare import ensure_builtin_dataset

        clean = ensure_builtin_dataset(tmp / "data" / "pydoc", 8192)
        poisoned = None
        for key in names:
            scenario = SCENARIOS[key]
            data = clean
            if scenario.poisoned:
                poisoned = poisoned or poisoned_corpus(tmp / "data")
                data = poisoned
            ref = run(tmp, f"{key}-reference", scenario, None, data)
            if ref.interventions:
                # The supervisor acted on the healthy run (a false alarm, reported): its
                # loss is no longer the reference's. Train the reference without it too.
                plain = run(tmp, f"{key}-reference-plain", scenario, None, data,
                            {"supervisor.enabled": False})  # fmt: skip
                ref = dataclasses.replace(ref, final_loss=plain.final_loss, wall_s=plain.wall_s)
            nosup = run(tmp, f"{key}-nosup", scenario, False, data)
            sup = run(tmp, f"{key}-supervised", scenario, True, data)
            diverged, met = verdict(ref, nosup, sup)
            rows.append((key, scenario, ref, nosup, sup, diverged, met))
            print(f"[{key}] reference {ref.final_loss:.4f}, no supervisor "
                  f"{nosup.final_loss:.4f}, supervised {sup.final_loss:.4f} "
                  f"({'diverged' if diverged else 'DID NOT DIVERGE'}, "
                  f"{'target met' if met else 'target NOT met'}); interventions: "
                  f"{'; '.join(sup.interventions) or 'none'}; false alarms in the reference: "
                  f"{'; '.join(ref.interventions) or 'none'}", flush=True)  # fmt: skip
        if args.false_alarms:
            healthy = Scenario("healthy", {})
            for label, extra in HELD_OUT.items():
                ref = run(tmp, f"healthy-{label}", healthy, None, clean, extra)
                alarms.append((label, ref))
                print(f"[held out: {label}] final loss {ref.final_loss:.4f}; interventions: "
                      f"{'; '.join(ref.interventions) or 'none'}", flush=True)  # fmt: skip
    (Path.cwd() / "divergence-results.json").write_text(
        json.dumps(
            [
                {
                    "scenario": key,
                    "reference": dataclasses.asdict(ref),
                    "nosup": dataclasses.asdict(n),
                    "supervised": dataclasses.asdict(s),
                    "diverged": d,
                    "met": m,
                }
                for key, _, ref, n, s, d, m in rows
            ]
            + [{"held_out": label, "run": dataclasses.asdict(r)} for label, r in alarms],
            indent=1,
        )
    )
    body = report(rows, args, alarms)
    print(body)
    if args.write:
        write_section(args.write, TITLE, body)


def report(rows, args, alarms) -> str:
    lines = [
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- Machine: {machine_info(2)['cpu']}",
        f"- Command: `{command_line(sys.argv[1:])}`",
        "- Each scenario: three `opt train configs/demo.toml` runs of the same number of steps "
        "(reference with sane settings and the supervisor on, counting its false alarms; the "
        "fault without the supervisor; the fault with the supervisor's defaults), and where "
        "the supervisor intervened in the reference, a fourth: the reference without it, "
        "whose loss the table shows; checkpoints and validation every 10 steps; the drill off; "
        "fp32 unless the scenario says fp16; one process each, one at a time",
        "",
        "| scenario | steps | final loss: reference | no supervisor | supervised | diverged "
        "(≥ 1.2× ref) | target (≤ 1.05× ref) | supervisor's interventions | tokens lost to "
        "rollbacks | false alarms in the reference | wall time ref / no sup / sup |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, scenario, ref, nosup, sup, diverged, met in rows:
        acts = "; ".join(sup.interventions) or "none"
        if sup.stopped_for_human:
            acts += " (stopped for a human)"
        lines.append(
            f"| {key} | {scenario.steps} | {ref.final_loss:.4f} | {nosup.final_loss:.4f} "
            f"({nosup.final_loss / ref.final_loss:.2f}×) | {sup.final_loss:.4f} "
            f"({sup.final_loss / ref.final_loss:.2f}×) | {'yes' if diverged else 'no'} | "
            f"{'met' if met else 'not met'} | {acts} | {sup.tokens_lost:,} | "
            f"{len(ref.interventions) or 'none'} | "
            f"{ref.wall_s:.0f} / {nosup.wall_s:.0f} / {sup.wall_s:.0f} s |"
        )
    lines += ["", "Scenarios:"]
    for key, scenario, ref, *_ in rows:
        lines.append(f"- `{key}`: {scenario.what}. Loss compared: {ref.loss_kind}.")
    if alarms:
        lines += [
            "",
            "False alarms on held-out healthy runs (seeds and shapes the defaults were not tuned "
            "on; the demo's settings, the supervisor on, 200 steps):",
            "",
            "| run | final validation loss | supervisor's interventions | wall time |",
            "|---|---|---|---|",
        ]
        for label, ref in alarms:
            acts = "; ".join(ref.interventions) or "none"
            lines.append(f"| {label} | {ref.final_loss:.4f} | {acts} | {ref.wall_s:.0f} s |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
