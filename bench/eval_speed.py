"""Evaluation speed: `opt eval` against lm-evaluation-harness's Hugging Face backend.

    python bench/eval_speed.py --write BENCHMARKS.md

(run with a Python that has ``lm_eval`` 0.4.x installed next to opt's dependencies.)

One randomly initialised model of opt-125m's shape (our init, seed 0), fp32 on the CPU,
saved as our checkpoint and exported with ``to_hf``; a byte-level BPE tokenizer trained here
on the demo corpus (``pydoc_data.topics``), which the HF directory gets too, with the
post-processor that starts every text with ``</s>`` as facebook/opt's tokenizer does (so
that lm-eval's HF backend scores what ours scores). Nothing is downloaded.

The data are SYNTHETIC: examples in SuperGLUE's schema for rte, cb, copa, wic and wsc, their
text drawn (seeded) from sentences of the demo corpus and their labels at random. The
accuracies mean nothing; the scored work is that of the real tasks: every original-task
PromptSource template of each task (`opt eval --prompts all`, the default), zero-shot.

The scored items are the same on every side: each (task, template, example) that renders is
rendered by our code (the template's input and choices), and written as one JSONL row
``{context, choices, gold}`` of a local lm-eval ``multiple_choice`` task per opt task,
joined to each choice by ``target_delimiter: " "`` as ``opt eval`` joins them. ``doc_to_text``
and ``doc_to_choice`` name the fields (lm-eval then reads them without a Jinja pass). An
"example" below is one such item, scored over all its choices.

Sides, each in the same process of this script and as the command a user types:
- ``ours``: ``python -m opt eval CKPT --tasks rte,cb,copa,wic,wsc --data DIR --out DIR``;
- ``hf``: ``python -m lm_eval run --model hf --model_args pretrained=HF,dtype=float32,
  attn_implementation=A --batch_size B --include_path TASKS --tasks ...``, the peer, with
  the batch size and attention implementation that were fastest in a tuning pass (one run
  of each over the first examples of each task; its figures are in the section);
- ``lm-eval + opt``: lm-eval's command line with our backend (``python -m
  opt.eval.lm_eval_backend --model opt --model_args checkpoint=CKPT``), the same task
  files, the peer's batch size.

Two figures per side. "Command": the whole command's wall time (interpreter start, imports,
model load, evaluation, results written), the headline. "In process": the evaluation alone
on an already loaded model (``opt.eval.runner.evaluate``; lm-eval's ``simple_evaluate``
given the loaded ``LM`` object), and inside it the scoring: tokenization and log-likelihoods
(``build_requests`` plus ``Scorer.loglikelihoods`` for ours, the model's ``loglikelihood``
for lm-eval), timed by wrapping those functions in this process (nothing in opt changes).
The rest of the in-process time is the harness's own: data, prompts, requests, metrics
(ours computes bootstrap CIs per prompt).

Sizes: 2 examples per task under every template (about 110 scored examples) by default, so
that the whole script (tuning, then 3 rounds of 3 commands and 3 in-process runs, some 10
minutes on the 2-core machine of BENCHMARKS.md) fits one hold of the shared machine's CPU
lock; each command still runs 15-40 s. The start-up of a command is a fixed cost (lm-eval's
is larger: it indexes its thousands of task files), so the whole-command ratio depends on
the number of examples, and the scoring ratio is what it tends to with more; the section
gives both, and the start-up apart.

Rounds alternate the side order; medians with min-max. The first round's in-process runs
also keep the log-likelihoods (ours) and the samples (lm-eval's ``log_samples``) for the
check. A check that can fail: per (task,
prompt) accuracy (and acc_norm) of ``ours`` must equal the peer's on these items, and the
per-choice log-likelihoods of the two are compared (largest difference).
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may come from the hub
os.environ["HF_DATASETS_OFFLINE"] = "1"

import argparse
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from report import aligned_table, command_line, machine_info, write_section  # noqa: E402

TITLE = "## Evaluation speed (CPU)"
TASK_NAMES = ("rte", "cb", "copa", "wic", "wsc")
VOCAB = 4096


# -- model, tokenizer, synthetic data ------------------------------------------------------


def corpus_sentences() -> list[str]:
    """Plain English sentences of 6-25 words from the demo corpus, in a fixed order."""
    from pydoc_data.topics import topics

    out, seen = [], set()
    for key in sorted(topics):
        text = re.sub(r"\s+", " ", topics[key])
        for s in re.split(r"(?<=[.!?]) ", text):
            s = s.strip()
            plain = re.fullmatch(r"[A-Z][A-Za-z ,']+\.", s) and 6 <= len(s.split()) <= 25
            if plain and s not in seen:
                seen.add(s)
                out.append(s)
    return out


def synthetic_examples(task: str, n: int, sentences: list[str], seed: int) -> list[dict]:
    """``n`` examples of ``task`` in the Hugging Face super_glue schema, random labels."""
    rng = random.Random(f"{seed}:{task}")

    def short(s: str, lo: int, hi: int) -> str:
        words = s[:-1].split()
        return " ".join(words[: rng.randint(lo, hi)]).rstrip(",") + "."

    out = []
    for idx in range(n):
        if task in ("rte", "cb"):
            premise = " ".join(rng.sample(sentences, rng.randint(1, 3)))
            ex = {"premise": premise, "hypothesis": short(rng.choice(sentences), 5, 12)}
            ex["label"] = rng.randrange(2 if task == "rte" else 3)
        elif task == "copa":
            ex = {
                "premise": short(rng.choice(sentences), 5, 14),
                "choice1": short(rng.choice(sentences), 4, 10),
                "choice2": short(rng.choice(sentences), 4, 10),
                "question": rng.choice(["cause", "effect"]),
                "label": rng.randrange(2),
            }
        elif task == "wic":
            while True:
                s1, s2 = rng.sample(sentences, 2)
                common = sorted(
                    {w for w in re.findall(r"[a-z]{4,}", s1)} & set(re.findall(r"[a-z]{4,}", s2))
                )
                if common:
                    break
            word = rng.choice(common)
            ex = {"word": word, "sentence1": s1, "sentence2": s2}
            ex |= {"start1": s1.find(word), "end1": s1.find(word) + len(word)}
            ex |= {"start2": s2.find(word), "end2": s2.find(word) + len(word)}
            ex["label"] = rng.randrange(2)
        else:  # wsc
            text = rng.choice(sentences)
            words = text.split()
            i, j = sorted(rng.sample(range(len(words)), 2))
            ex = {
                "text": text,
                "span1_index": i,
                "span2_index": j,
                "span1_text": words[i].strip(",."),
                "span2_text": words[j].strip(",."),
                "label": rng.randrange(2),
            }
        out.append({**ex, "idx": idx})
    return out


def build_inputs(root: Path, examples: int, sentences: list[str]) -> dict:
    """Checkpoint, HF directory, our data directory, lm-eval task files; the scored items."""
    from pydoc_data.topics import topics

    from opt.checkpoint import save_checkpoint
    from opt.convert.hf import to_hf
    from opt.data.tokenizer import train_tokenizer
    from opt.eval.runner import EvalSpec, context_text, prepare
    from opt.eval.tasks import parse_tasks
    from opt.models.model import build_model
    from opt.models.sizes import MODEL_SIZES

    tokenizer = train_tokenizer((topics[k] for k in sorted(topics)), vocab_size=VOCAB)
    model_args = MODEL_SIZES["opt-125m"]
    assert tokenizer.get_vocab_size() <= model_args.vocab_size
    model = build_model(model_args, seed=0)
    ckpt, hf = root / "ckpt", root / "hf"
    save_checkpoint(
        ckpt,
        model=model,
        model_args=model_args,
        extra_files={"tokenizer.json": tokenizer.to_str().encode()},
    )
    del model
    to_hf(ckpt, hf)  # with an OPT-style tokenizer that starts every text with </s>

    data, tasks_dir = root / "data", root / "lm_eval_tasks"
    for task in TASK_NAMES:
        (data / task).mkdir(parents=True)
        rows = synthetic_examples(task, examples, sentences, seed=0)
        (data / task / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = EvalSpec(tasks=tuple(parse_tasks(",".join(TASK_NAMES))), data_dir=data)
    tasks_dir.mkdir()
    items = {}  # task -> [(template name, example position, context, choices, gold)]
    for prep in prepare(spec):
        name = prep.task.name
        items[name] = []
        for template in prep.templates:  # the order of build_requests
            for i, example in enumerate(prep.examples):
                rendered = template.render(example)
                if rendered is not None:
                    context = context_text(rendered, [])
                    items[name].append(
                        (template.name, i, context, list(rendered.choices), rendered.gold)
                    )
        rows = [{"context": c, "choices": ch, "gold": g, "template": t, "example": i}
                for t, i, c, ch, g in items[name]]  # fmt: skip
        path = tasks_dir / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tasks_dir / f"evalspeed_{name}.yaml").write_text(
            f"task: evalspeed_{name}\n"
            "dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    validation: {path}\n"
            "validation_split: validation\n"
            "output_type: multiple_choice\n"
            "doc_to_text: context\n"
            "doc_to_choice: choices\n"
            "doc_to_target: gold\n"
            'target_delimiter: " "\n'
            "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
        )
    return {"ckpt": ckpt, "hf": hf, "data": data, "tasks_dir": tasks_dir, "items": items}


# -- the sides -----------------------------------------------------------------------------


def lm_eval_tasks() -> list[str]:
    return [f"evalspeed_{t}" for t in TASK_NAMES]


def commands(paths: dict, root: Path, peer: dict) -> dict[str, list[str]]:
    """The command line of each side, as a user types it."""
    py = sys.executable
    lm_common = [
        "--tasks", ",".join(lm_eval_tasks()), "--include_path", str(paths["tasks_dir"]),
        "--batch_size", str(peer["batch"]), "--device", "cpu",
    ]  # fmt: skip
    return {
        "ours": [
            py, "-m", "opt", "eval", str(paths["ckpt"]), "--tasks", ",".join(TASK_NAMES),
            "--data", str(paths["data"]), "--out", str(root / "out_ours"),
            "--batch-size", str(peer["ours_batch"]),
        ],
        "hf": [
            py, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
            f"pretrained={paths['hf']},dtype=float32,attn_implementation={peer['attn']}",
            *lm_common, "--output_path", str(root / "out_hf"),
        ],
        "lm-eval + opt": [
            py, "-m", "opt.eval.lm_eval_backend", "--model", "opt", "--model_args",
            f"checkpoint={paths['ckpt']}", *lm_common, "--output_path", str(root / "out_opt"),
        ],
    }  # fmt: skip


def run_command(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return seconds


class Timer:
    """Wraps a function so that the seconds spent inside it add up."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn):
        def timed(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


class Ours:
    """`opt eval`'s evaluation on a loaded model, scoring timed, log-likelihoods kept."""

    def __init__(self, paths: dict, batch: int) -> None:
        from opt import checkpoint as ckpt
        from opt.data.tokenizer import eos_id, load_tokenizer
        from opt.eval import runner
        from opt.eval.tasks import parse_tasks

        self.runner = runner
        self.model = ckpt.load_model(paths["ckpt"]).eval()
        self.tokenizer = load_tokenizer(paths["ckpt"])
        self.eos = eos_id(self.tokenizer)
        self.spec = runner.EvalSpec(
            tasks=tuple(parse_tasks(",".join(TASK_NAMES))), data_dir=paths["data"], batch_size=batch
        )

    def run(self, keep: bool = False) -> tuple[float, float, dict]:
        """(seconds in evaluate, of which scoring, results); ``keep``: also the lls (from
        the results' samples, ``--log-samples``)."""
        import dataclasses

        from opt.eval import scoring

        timer = Timer()
        original_build, original_ll = self.runner.build_requests, scoring.Scorer.loglikelihoods
        self.runner.build_requests = timer.wrap(original_build)
        scoring.Scorer.loglikelihoods = timer.wrap(original_ll)
        spec = dataclasses.replace(self.spec, log_samples=keep)
        try:
            start = time.perf_counter()
            results = self.runner.evaluate(self.model, self.tokenizer, self.eos, spec)
            seconds = time.perf_counter() - start
        finally:
            self.runner.build_requests, scoring.Scorer.loglikelihoods = original_build, original_ll
        if keep:  # per task, in the scored items' order (template by template)
            samples = results.pop("samples")
            results["_lls"] = {t: [r["loglikelihoods"] for r in samples[t]] for t in TASK_NAMES}
        return seconds, timer.seconds, results


class LmEvalSide:
    """lm-eval's ``simple_evaluate`` on a loaded ``LM`` (hf or ours), ``loglikelihood`` timed."""

    def __init__(self, lm, paths: dict) -> None:
        from lm_eval.tasks import TaskManager

        self.lm = lm
        self.loglikelihood = lm.loglikelihood
        self.task_manager = TaskManager(include_path=str(paths["tasks_dir"]))

    def run(self, keep: bool = False, limit: int | None = None) -> tuple[float, float, dict]:
        import lm_eval

        timer = Timer()
        self.lm.loglikelihood = timer.wrap(self.loglikelihood)
        try:
            start = time.perf_counter()
            out = lm_eval.simple_evaluate(
                model=self.lm,
                tasks=lm_eval_tasks(),
                task_manager=self.task_manager,
                num_fewshot=0,
                limit=limit,
                log_samples=keep,
                verbosity="ERROR",
            )
            seconds = time.perf_counter() - start
        finally:
            self.lm.loglikelihood = self.loglikelihood
        return seconds, timer.seconds, out


def hf_lm(paths: dict, batch: int, attn: str):
    import transformers
    from lm_eval.models.huggingface import HFLM

    transformers.logging.set_verbosity_error()
    return HFLM(
        pretrained=str(paths["hf"]),
        device="cpu",
        dtype="float32",
        batch_size=batch,
        attn_implementation=attn,
    )


# -- the check -----------------------------------------------------------------------------


def agreement(paths: dict, ours: dict, peer: dict) -> dict:
    """Per (task, prompt) acc and acc_norm of ours and the peer, and the largest difference
    between their per-choice log-likelihoods."""
    rows, max_diff, n_items = [], 0.0, 0
    for task in TASK_NAMES:
        items = paths["items"][task]
        samples = sorted(peer["samples"][f"evalspeed_{task}"], key=lambda s: s["doc_id"])
        assert len(samples) == len(items), (task, len(samples), len(items))
        for (_, _, context, choices, _), s, lls in zip(
            items, samples, ours["_lls"][task], strict=True
        ):
            assert s["doc"]["context"] == context and s["doc"]["choices"] == choices
            theirs = [float(r[0]) for r in s["filtered_resps"]]
            max_diff = max(max_diff, *(abs(a - b) for a, b in zip(lls, theirs, strict=True)))
            n_items += 1
        by_prompt: dict[str, list[tuple[float, float]]] = {}
        for (template, *_), s in zip(items, samples, strict=True):
            by_prompt.setdefault(template, []).append((s["acc"], s["acc_norm"]))
        for prompt in ours["tasks"][task]["prompts"]:
            if not prompt["n"]:
                continue
            got = by_prompt[prompt["name"]]
            peer_acc = sum(a for a, _ in got) / len(got)
            peer_norm = sum(b for _, b in got) / len(got)
            rows.append(
                (task, prompt["name"], prompt["n"], prompt["acc"], peer_acc,
                 prompt["acc_norm"], peer_norm)
            )  # fmt: skip
    return {
        "prompts": len(rows),
        "acc_equal": sum(abs(r[3] - r[4]) < 1e-12 for r in rows),
        "norm_equal": sum(abs(r[5] - r[6]) < 1e-12 for r in rows),
        "max_ll_diff": max_diff,
        "items": n_items,
        "mismatches": [r for r in rows if abs(r[3] - r[4]) >= 1e-12 or abs(r[5] - r[6]) >= 1e-12],
    }


# -- main ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2, help="synthetic examples per task")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", default="16,32,64", help="batch sizes tuned on each side")
    parser.add_argument("--attn", default="sdpa,eager", help="HF attention implementations")
    parser.add_argument("--tune-rows", type=int, default=6, help="peer tuning: rows per task")
    parser.add_argument("--tune-limit", type=int, default=1, help="ours tuning: examples per task")
    parser.add_argument("--write", type=Path, metavar="FILE")
    args = parser.parse_args()

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["HF_DATASETS_CACHE"] = str(root / "datasets_cache")  # before datasets loads
        import lm_eval  # noqa: F401

        import opt.eval.lm_eval_backend

        env = {**os.environ, "PYTHONPATH": str(REPO)}
        sentences = corpus_sentences()
        paths = build_inputs(root, args.examples, sentences)
        n_items = {t: len(v) for t, v in paths["items"].items()}
        total = sum(n_items.values())
        print(f"{len(sentences)} corpus sentences; items per task {n_items}, total {total}")
        batches = [int(b) for b in args.batches.split(",")]

        # Tuning: one run per setup, the peer on the first --tune-rows rows of each lm-eval
        # task, ours on the first --tune-limit examples of each task under every template.
        tuning = {}
        for attn in args.attn.split(","):
            for batch in batches:
                side = LmEvalSide(hf_lm(paths, batch, attn), paths)
                if not tuning:
                    side.run(limit=2)  # warm-up: the first lm-eval run in this process
                seconds, scoring, _ = side.run(limit=args.tune_rows)
                tuning[("hf", attn, batch)] = (seconds, scoring)
                print("tune hf", attn, batch, f"{seconds:.2f}s scoring {scoring:.2f}s")
                del side
        tune_items = (
            sum(min(n, args.tune_rows) for n in n_items.values()),
            sum(i < args.tune_limit for v in paths["items"].values() for _, i, *_ in v),
        )
        best = min((k for k in tuning), key=lambda k: tuning[k][0])
        peer = {"attn": best[1], "batch": best[2]}
        ours_tuning = {}
        for batch in batches:
            side = Ours(paths, batch)
            side.spec = replace(side.spec, limit=args.tune_limit)
            seconds, scoring, _ = side.run()
            ours_tuning[batch] = (seconds, scoring)
            print("tune ours", batch, f"{seconds:.2f}s scoring {scoring:.2f}s")
            del side
        peer["ours_batch"] = min(ours_tuning, key=lambda b: ours_tuning[b][0])

        # Loaded once for the in-process rows; the check from their first round.
        inproc = {
            "ours": Ours(paths, peer["ours_batch"]),
            "hf": LmEvalSide(hf_lm(paths, peer["batch"], peer["attn"]), paths),
            "lm-eval + opt": LmEvalSide(
                opt.eval.lm_eval_backend.OptLM(
                    checkpoint=str(paths["ckpt"]), batch_size=peer["batch"]
                ),
                paths,
            ),
        }
        cmds = commands(paths, root, peer)
        names = list(cmds)
        wall = {n: [] for n in names}
        inner = {n: [] for n in names}
        first = {}
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                wall[name].append(run_command(cmds[name], env))
                seconds, scoring, out = inproc[name].run(keep=r == 0)
                inner[name].append((seconds, scoring))
                first.setdefault(name, out)
                print(f"round {r} {name}: command {wall[name][-1]:.1f}s, in process "
                      f"{seconds:.1f}s (scoring {scoring:.1f}s)")  # fmt: skip
        check = agreement(paths, first["ours"], first["hf"])
        check_opt = agreement(paths, first["ours"], first["lm-eval + opt"])
        print("agreement with hf:", {k: v for k, v in check.items() if k != "mismatches"})
        print(
            "agreement with lm-eval + opt:",
            {k: v for k, v in check_opt.items() if k != "mismatches"},
        )
        for row in check["mismatches"][:10]:
            print("  mismatch", row)

    load_end = os.getloadavg()
    results = {"wall": wall, "inner": inner, "total": total, "n_items": n_items}
    body = section_body(
        args, results, peer, tuning, ours_tuning, tune_items, check, check_opt,
        load_start, load_end, len(sentences),
    )  # fmt: skip
    print(body)
    if args.write:
        write_section(args.write, TITLE, body)


def section_body(
    args, results, peer, tuning, ours_tuning, tune_items, check, check_opt,
    load_start, load_end, n_sentences,
) -> str:  # fmt: skip
    info = machine_info(torch.get_num_threads())
    total = results["total"]
    setups = {
        "ours": f"`opt eval`, --batch-size {peer['ours_batch']}",
        "hf": f"lm-eval hf, batch {peer['batch']}, {peer['attn']}, logits cache on",
        "lm-eval + opt": f"lm-eval with our backend `opt`, batch {peer['batch']}",
    }
    rows = [(
        "side", "setup", "command s (min-max)", "examples/s", "vs hf",
        "start-up s", "in process s", "scoring s", "scoring examples/s", "harness s",
    )]  # fmt: skip
    med = {}
    for name, walls in results["wall"].items():
        evals = [s for s, _ in results["inner"][name]]
        scores = [c for _, c in results["inner"][name]]
        med[name] = (statistics.median(walls), statistics.median(evals), statistics.median(scores))
    for name, walls in results["wall"].items():
        w, e, s = med[name]
        rows.append((
            name, setups[name], f"{w:.1f} ({min(walls):.1f}-{max(walls):.1f})",
            f"{total / w:.2f}", f"{med['hf'][0] / w:.2f}x", f"{w - e:.1f}", f"{e:.1f}",
            f"{s:.1f}", f"{total / s:.2f}", f"{e - s:.1f}",
        ))  # fmt: skip
    tune_rows = [("setup", "s (tuning run)", "of which scoring s")]
    for (_, attn, batch), (s, c) in tuning.items():
        tune_rows.append((f"hf {attn} batch {batch}", f"{s:.2f}", f"{c:.2f}"))
    for batch, (s, c) in ours_tuning.items():
        tune_rows.append((f"ours batch {batch}", f"{s:.2f}", f"{c:.2f}"))
    ratio = med["hf"][0] / med["ours"][0]
    score_ratio = med["hf"][2] / med["ours"][2]
    n_items = ", ".join(f"{t} {n}" for t, n in results["n_items"].items())

    def agree(c) -> str:
        return (
            f"acc equal on {c['acc_equal']} of {c['prompts']} (task, prompt) pairs, acc_norm on "
            f"{c['norm_equal']}; largest per-choice log-likelihood difference "
            f"{c['max_ll_diff']:.2e} over {c['items']} items"
        )

    return "\n".join(
        [
            f"- Command: `{command_line(sys.argv[1:])}` (under `flock /tmp/cpu.lock`, with the "
            "Python of a venv holding lm_eval 0.4.13 and opt's dependencies)",
            f"- Machine: {info['cpu']}; {info['software']}, lm_eval 0.4.13; "
            f"{info['threads']} threads",
            f"- Load average (1 min) {load_start[0]:.2f} at start, {load_end[0]:.2f} at end",
            "- Model: opt-125m shape, random init (seed 0), fp32, CPU, no compile on any side; "
            f"tokenizer: byte-level BPE of {VOCAB} tokens trained on the demo corpus.",
            f"- Data: SYNTHETIC SuperGLUE-schema examples ({args.examples} per task, sentences "
            f"of the demo corpus, {n_sentences} available, random labels) under every "
            f"original-task PromptSource template, zero-shot: {total} scored examples "
            f"({n_items}); an example is one (example, prompt) pair scored over all its "
            "choices. The same rendered items go to every side.",
            "- Command: the whole command a user types, interpreter start to exit, results "
            "written; examples/s = scored examples / its median. In process: the evaluation "
            "on a loaded model (`runner.evaluate`; lm-eval's `simple_evaluate` with the "
            "`LM` object); scoring: tokenizing the requests and their log-likelihoods "
            "(`build_requests` + `Scorer.loglikelihoods`; the `LM`'s `loglikelihood`); "
            "harness = in process - scoring; start-up = command - in process (interpreter, "
            "imports, model load, task index, results written: a fixed cost, so the command "
            "ratio grows towards the scoring ratio with more examples). "
            f"Medians of {args.rounds} rounds, side order alternating.",
            "- Target (issue 19): at least as fast as the peer (lm-eval's HF backend at its "
            "fastest setup here).",
            "",
            aligned_table(rows),
            "",
            f"- Whole command: ours {ratio:.2f}x the peer "
            f"({'met' if ratio >= 1 else 'missed'}); scoring alone {score_ratio:.2f}x.",
            f"- Agreement with hf: {agree(check)}.",
            f"- Agreement with lm-eval + opt: {agree(check_opt)}.",
            f"- Tuning, in process, one timed run per setup after a warm-up, fastest taken: "
            f"the peer on lm-eval's `limit` of {args.tune_rows} rows per task "
            f"({tune_items[0]} examples), ours on `--limit {args.tune_limit}` examples per "
            f"task under every template ({tune_items[1]} examples). The two sides' tuning runs "
            "score different items: compare within a side only.",
            "",
            aligned_table(tune_rows),
        ]
    )


if __name__ == "__main__":
    main()
