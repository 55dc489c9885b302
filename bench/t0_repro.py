"""A small reproduction of T0's two claims on synthetic prompted tasks, on the CPU.

    flock /tmp/cpu.lock python bench/t0_repro.py --write BENCHMARKS.md

Claims (Sanh et al. 2021, "Multitask Prompted Training Enables Zero-Shot Task
Generalization"): (a) multitask prompted fine-tuning raises accuracy on a held-out task
cluster above the pretrained model's; (b) more prompts per training dataset lower the spread
of held-out accuracy over the held-out task's prompts.

Everything is MADE UP by this script (seeded; no published data or prompt is used), written
into a temporary directory:
- four training datasets, each in its own cluster, each with 8 natural-language templates in
  PromptSource's YAML format: ``sentiment`` (a review built from positive or negative word
  lists), ``topic`` (a sentence built from one of four topics' word lists), ``paraphrase``
  (two sentences listing the same three things in another order, or one thing swapped), and
  ``facts`` (closed-book QA: the colour of each of 60 invented creatures, always the same);
- one held-out task in the ``nli`` cluster (T0 held out NLI): ``entail``, a premise naming
  three things in a place and a hypothesis naming one or two; entailed iff every thing it
  names is in the premise (balanced). 8 Yes/No-style templates (several answer wordings), 240
  examples, scored by ``opt eval`` (every template, per-prompt accuracy). Chance is 50%.
  The mixture names ``nli`` as held out, so ``opt finetune`` would refuse it if it leaked.
  ``paraphrase`` is the training task closest to it (word overlap), as T0's paraphrase
  datasets are the closest to its NLI: the transfer tested is to a new task, a new input form
  and new answer wordings, not to a new skill.

Pretrained start: the demo checkpoint (``opt train configs/demo.toml``: opt-tiny, 200 steps
on the Python docs), trained here into the temporary directory. It is tiny and its corpus is
code documentation, so whatever it knows of English is little.

Arms, each fine-tuned with ``opt finetune`` from those weights with the same steps, batch,
learning rate and seed (the run seed and the mixture seed): ``all`` draws one of the 8
templates per example, ``one`` renders every example of a dataset through its first
template. ``pretrained`` is evaluated without fine-tuning. With ``--seeds N`` each fine-tuned
arm runs N seeds.

Numbers: per arm and seed, the held-out median, IQR and min–max of the per-prompt accuracies
(``opt eval``'s results.json); between arms, a paired bootstrap (the same resampled examples
for every prompt and both arms, from ``opt eval --log-samples``) of the difference in median
accuracy over prompts, and of the difference in IQR and in range. The script asserts nothing
about them: they are what was measured. A diagnostic T0 did not report: per prompt, the AUC
of the log-likelihood margin between the two answers (50 = no signal), which shows whether
the scores separate the classes when a prompt's bias to one answer pins accuracy at 50%.

Size: 600 steps of 2048 tokens (lr 1e-3, a tiny model's rate, decaying to 1e-4) per run; at
150 steps (a first try) the training loss on the answers was still 1.7 nats per token and
every arm sat at exactly 50% on every held-out prompt, so the default is four times that;
the whole script is about 10 minutes on 2 cores with 2 seeds.

The supervisor is off in the fine-tuning runs: with it on, the one-template arm (its answer
loss near 0.14 by step 300) was rolled back for "slow divergence" (a 3% rise of a median
loss that small is noise), to the only checkpoint, step 0, where the true starting loss
(10.5) then read as a spike against the median of the discarded steps, ten times, and the
run stopped for a human. Reported to the project as a supervisor problem; it is not what
this benchmark measures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from report import aligned_table, command_line, machine_info, write_section

from opt.eval.stats import LEVEL, RESAMPLES, spread

REPO = Path(__file__).resolve().parent.parent
TITLE = "## T0's claims at toy scale: held-out accuracy and prompt robustness (synthetic tasks)"

POSITIVE = [
    "wonderful",
    "great",
    "lovely",
    "excellent",
    "delightful",
    "charming",
    "superb",
    "brilliant",
]
NEGATIVE = ["awful", "terrible", "boring", "dreadful", "poor", "dull", "horrible", "weak"]
SUBJECTS = ["film", "meal", "hotel", "book", "concert", "game", "show", "trip"]
TOPICS = {
    "sports": ["football", "tennis", "goal", "match", "team", "player", "coach", "race"],
    "food": ["bread", "soup", "cheese", "kitchen", "recipe", "dinner", "sugar", "apple"],
    "science": [
        "atom",
        "cell",
        "planet",
        "energy",
        "theory",
        "experiment",
        "laboratory",
        "molecule",
    ],
    "music": ["guitar", "song", "piano", "melody", "drum", "choir", "concert", "rhythm"],
}
THINGS = [
    "cat",
    "dog",
    "horse",
    "bird",
    "chair",
    "table",
    "lamp",
    "box",
    "boat",
    "car",
    "tree",
    "flower",
    "key",
    "cup",
]
PLACES = ["garden", "kitchen", "park", "house", "station", "market", "field", "room"]
COLOURS = ["red", "blue", "green", "yellow", "black", "white"]


def template(key: str, jinja: str, choices: str | None) -> str:
    lines = [f"  {key}: !Template"]
    if choices:
        lines.append(f"    answer_choices: {json.dumps(choices)}")
    lines += [
        f"    id: {key}",
        f"    jinja: {json.dumps(jinja)}",
        "    metadata: !TemplateMetadata",
        "      choices_in_prompt: false",
        "      original_task: true",
        f"    name: {key}",
        "    reference: made up by bench/t0_repro.py",
    ]
    return "\n".join(lines)


def write_templates(path: Path, dataset: str, prompts: list[tuple[str, str | None]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = [template(f"{dataset}_{i}", j, c) for i, (j, c) in enumerate(prompts)]
    path.write_text(f"dataset: {dataset}\ntemplates:\n" + "\n".join(body) + "\n")


A = " ||| {{ answer_choices[label] }}"
TEMPLATES = {
    "sentiment": [
        ("{{text}} Is this review positive or negative?" + A, "negative ||| positive"),
        ("Review: {{text}}\nDid the writer like it?" + A, "No ||| Yes"),
        ("{{text}} The sentiment of this text is" + A, "negative ||| positive"),
        ("Was the following opinion good or bad? {{text}}" + A, "bad ||| good"),
        ("{{text}} Would the author recommend it?" + A, "No ||| Yes"),
        ("Here is a review: {{text}} Is the reviewer happy?" + A, "No ||| Yes"),
        ("{{text}} True or false: the writer enjoyed it." + A, "False ||| True"),
        ("Thumbs up or thumbs down? {{text}}" + A, "thumbs down ||| thumbs up"),
    ],
    "topic": [
        ("{{text}} What is this about?" + A, "sports ||| food ||| science ||| music"),
        ('Topic of the sentence "{{text}}":' + A, "sports ||| food ||| science ||| music"),
        ("{{text}} This belongs in the section on" + A, "sport ||| cooking ||| science ||| music"),
        (
            "Which subject: sports, food, science or music? {{text}}" + A,
            "sports ||| food ||| science ||| music",
        ),
        ("Read: {{text}} The field is" + A, "athletics ||| cuisine ||| physics ||| songs"),
        ("{{text}} Classify the topic." + A, "Sports ||| Food ||| Science ||| Music"),
        ('A librarian files "{{text}}" under' + A, "sports ||| food ||| science ||| music"),
        ("{{text}} In one word, the theme is" + A, "games ||| eating ||| research ||| sound"),
    ],
    "paraphrase": [
        ("{{s1}} {{s2}} Do these say the same thing?" + A, "No ||| Yes"),
        ("Sentence one: {{s1}}\nSentence two: {{s2}}\nSame meaning?" + A, "no ||| yes"),
        ('Is "{{s2}}" a paraphrase of "{{s1}}"?' + A, "No ||| Yes"),
        ("{{s1}} / {{s2}} Equivalent or different?" + A, "different ||| equivalent"),
        ("{{s1}} In other words, {{s2}} True or false?" + A, "False ||| True"),
        ('Do "{{s1}}" and "{{s2}}" match?' + A, "They differ ||| They match"),
        ("First: {{s1}} Second: {{s2}} Is the second a rewording of the first?" + A, "No ||| Yes"),
        ("{{s1}} Rewritten: {{s2}} Is the rewrite faithful?" + A, "unfaithful ||| faithful"),
    ],
    "facts": [
        ("What colour is the {{name}}?" + A, " ||| ".join(COLOURS)),
        ("The {{name}} is coloured" + A, " ||| ".join(COLOURS)),
        ("Q: Which colour does a {{name}} have? A:" + A, " ||| ".join(COLOURS)),
        ("Describe the colour of the {{name}}." + A, " ||| ".join(COLOURS)),
        ("If you saw a {{name}}, it would look" + A, " ||| ".join(COLOURS)),
        ("Trivia: the {{name}}'s colour?" + A, " ||| ".join(COLOURS)),
        ("Everyone knows that the {{name}} is" + A, " ||| ".join(COLOURS)),
        ("Name the colour of a {{name}}:" + A, " ||| ".join(COLOURS)),
    ],
}
HELD_OUT = [
    ("{{premise}} Question: {{hypothesis}} Yes or no?" + A, "Yes ||| No"),
    ("Suppose {{premise}} Can we infer that \"{{hypothesis}}\"?" + A, "Yes ||| No"),
    ("{{premise}} Based on that, is it true that {{hypothesis}}" + A, "true ||| false"),
    ("Premise: {{premise}}\nHypothesis: {{hypothesis}}\nDoes the premise entail it?" + A,
     "yes ||| no"),
    ("Given that {{premise}} Does it follow that {{hypothesis}}" + A, "Yes ||| No"),
    ("{{premise}} Therefore, {{hypothesis}} Is this correct?" + A, "correct ||| incorrect"),
    ("Read: {{premise}} Must it be that {{hypothesis}}" + A, "Yes ||| No"),
    ("{{premise}} Using only this, \"{{hypothesis}}\" is" + A, "guaranteed ||| not guaranteed"),
]  # fmt: skip


def things_sentence(things: list[str], place: str) -> str:
    return f"The {things[0]}, the {things[1]} and the {things[2]} were in the {place}."


def make_datasets(root: Path, n_train: int, n_heldout: int) -> None:
    """The JSONL files and templates of every task (seeded: the same every run)."""
    rng = random.Random(20)
    rows: dict[str, list[dict]] = {k: [] for k in TEMPLATES}
    for _ in range(n_train):
        label = rng.randrange(2)
        words = POSITIVE if label else NEGATIVE
        a, b = rng.sample(words, 2)
        text = f"The {rng.choice(SUBJECTS)} was {a}, and the whole thing felt {b}."
        rows["sentiment"].append({"text": text, "label": label})
        label = rng.randrange(4)
        a, b = rng.sample(TOPICS[list(TOPICS)[label]], 2)
        rows["topic"].append({"text": f"Today we read about the {a} and the {b}.", "label": label})
        label = rng.randrange(2)
        three, place = rng.sample(THINGS, 3), rng.choice(PLACES)
        other = list(three)
        rng.shuffle(other)
        if not label:
            other[rng.randrange(3)] = rng.choice([t for t in THINGS if t not in three])
        s2 = f"In the {place} were the {other[0]}, the {other[1]} and the {other[2]}."
        rows["paraphrase"].append({"s1": things_sentence(three, place), "s2": s2, "label": label})
    syllables = ["zor", "vak", "mip", "tul", "bre", "nok", "sa", "fen", "dri", "qua", "lo", "ty"]
    names = sorted({"".join(rng.sample(syllables, 3)) for _ in range(80)})[:60]
    for name in names:
        rows["facts"].append({"name": name, "label": rng.randrange(len(COLOURS))})
    for name, examples in rows.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        with open(root / name / "train.jsonl", "w") as f:
            f.writelines(json.dumps(e) + "\n" for e in examples)
        write_templates(root / name / "templates.yaml", name, TEMPLATES[name])
    held = []
    for i in range(n_heldout):
        label = i % 2  # 0: entailed
        three, place = rng.sample(THINGS, 3), rng.choice(PLACES)
        named = rng.sample(three, rng.choice((1, 2)))
        if label:
            named[rng.randrange(len(named))] = rng.choice([t for t in THINGS if t not in three])
        hyp = " and the ".join(named)
        verb = "was" if len(named) == 1 else "were"
        held.append({"premise": things_sentence(three, place),
                     "hypothesis": f"the {hyp} {verb} in the {place}.", "label": label})  # fmt: skip
    rng.shuffle(held)
    (root / "eval" / "entail").mkdir(parents=True, exist_ok=True)
    with open(root / "eval" / "entail" / "validation.jsonl", "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in held)
    write_templates(root / "entail" / "templates.yaml", "entail", HELD_OUT)


def write_mixture(root: Path, seed: int, one_prompt: bool) -> Path:
    lines = [f"seed = {seed}", "cap = 500000",
             'held_out_clusters = ["nli", "coreference", "sentence_completion", "word_sense"]']  # fmt: skip
    for name in TEMPLATES:
        prompts = json.dumps([f"{name}_0"]) if one_prompt else '"all"'
        lines += ["", "[[dataset]]", f'name = "{name}"', f'data = "{name}/train.jsonl"',
                  f'templates = "{name}/templates.yaml"', f'cluster = "{name}"',
                  f"prompts = {prompts}"]  # fmt: skip
    path = root / f"mixture-{'one' if one_prompt else 'all'}-{seed}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def opt(*argv: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "opt", *argv], cwd=REPO, env=env,
                            capture_output=True, text=True)  # fmt: skip
    if result.returncode:
        sys.exit(f"opt {' '.join(argv)} failed:\n{result.stderr[-4000:]}")


def finetune(tmp: Path, init: Path, mixture: Path, name: str, seed: int, steps: int) -> Path:
    config = tmp / f"{name}.toml"
    config.write_text(f"""[run]
name = "{name}"
dir = "{tmp / "runs"}"
seed = {seed}
[model]
name = "opt-tiny"
[data]
seq_len = 128
[finetune]
mixture = "{mixture}"
packing = true
[checkpoint]
init_from = "{init}"
dir = "{tmp / "ck"}"
every = {steps}
keep_last = 1
[logbook]
dir = "{tmp / "logbook"}"
[optim]
lr = 1.0e-3
[schedule]
warmup_tokens = {2048 * 10}
decay_tokens = {2048 * steps}
min_lr_ratio = 0.1
[train]
batch_tokens = 2048
micro_batch_size = 8
max_steps = {steps}
precision = "fp32"
[metrics]
log_every = 50
[supervisor]
enabled = false
""")
    opt("finetune", str(config))
    return tmp / "ck" / name / f"step_{steps:08d}"


def evaluate(tmp: Path, checkpoint: Path, name: str) -> tuple[dict, np.ndarray, list]:
    """``opt eval`` on the held-out task: its results.json entry and the per-(prompt, example)
    correctness (acc: summed log-likelihood), prompts in template order."""
    out = tmp / "eval-out" / name
    opt("eval", str(checkpoint), "--tasks", f"entail={tmp / 'entail' / 'templates.yaml'}",
        "--data", str(tmp / "eval"), "--split", "validation", "--out", str(out),
        "--log-samples")  # fmt: skip
    task = json.loads((out / "results.json").read_text())["tasks"]["entail"]
    names = [p["name"] for p in task["prompts"]]
    correct = np.zeros((len(names), task["n_examples"]))
    margin = np.zeros_like(correct)  # log-likelihood of the entailed answer minus the other
    gold = np.zeros(task["n_examples"], dtype=int)
    for line in (out / "samples.jsonl").read_text().splitlines():
        row = json.loads(line)
        t, i = names.index(row["prompt"]), row["example"]
        correct[t, i] = row["pred"] == row["gold"]
        margin[t, i] = row["loglikelihoods"][0] - row["loglikelihoods"][1]
        gold[i] = row["gold"]
    return task, correct, [auc(m[gold == 0], m[gold == 1]) for m in margin], gold


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(margin of an entailed example > margin of a non-entailed one), ties counted half:
    whether the scores separate the classes, whatever answer the prompt is biased to."""
    greater = (pos[:, None] > neg[None, :]).mean()
    return float(greater + 0.5 * (pos[:, None] == neg[None, :]).mean())


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, gold: np.ndarray, seed: int = 0
) -> dict[str, tuple]:
    """Point value and percentile interval of (a - b) in median, IQR and range of per-prompt
    accuracy, resampling the examples (the same draw for every prompt and both arms) within
    each gold label, as the data were made balanced: a plain resample unbalances them, and a
    prompt that always gives one answer then moves off 50% with it, which opens a spread
    between prompts biased to different answers that the data do not have."""
    rng = np.random.default_rng(seed)
    idx = np.concatenate(
        [rng.choice(np.flatnonzero(gold == g), size=(RESAMPLES, int((gold == g).sum())))
         for g in np.unique(gold)], axis=1)  # fmt: skip

    def stats(x: np.ndarray) -> np.ndarray:  # x: (..., prompts) accuracies
        q25, med, q75 = np.percentile(x, [25, 50, 75], axis=-1)
        return np.stack([med, q75 - q25, x.max(-1) - x.min(-1)])

    point = stats(a.mean(1)) - stats(b.mean(1))
    boot = stats(a[:, idx].mean(-1).T) - stats(b[:, idx].mean(-1).T)
    tail = (1 - LEVEL) / 2 * 100
    lo, hi = np.percentile(boot, [tail, 100 - tail], axis=-1)
    return {k: (point[i], lo[i], hi[i]) for i, k in enumerate(("median", "iqr", "range"))}


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def diff(t: tuple) -> str:
    return f"{100 * t[0]:+.1f} [{100 * t[1]:+.1f}, {100 * t[2]:+.1f}]"


def said(results: list[tuple], sign: int) -> str:
    """How many seeds show the effect: interval excluding 0 (and holding its own point
    estimate), point estimate only, interval on the other side; and how many intervals miss
    their point estimate (IQR and range are biased under resampling, which adds noise and so
    spread: such an interval is not evidence either way)."""
    good = [(p, lo, hi) for p, lo, hi in results if lo <= p <= hi]
    sure = sum(sign * lo > 0 and sign * hi > 0 for _, lo, hi in good)
    point = sum(sign * p > 0 for p, _, _ in results)
    against = sum(sign * lo < 0 and sign * hi < 0 for _, lo, hi in good)
    n = len(results)
    return (
        f"{sure} of {n} seeds with the interval excluding 0, {point} of {n} in the point "
        f"estimate, {against} with the interval on the other side, {n - len(good)} with an "
        "interval that misses its own point estimate"
    )


def caveat(runs: dict, chance: float) -> list[str]:
    """A sentence when every arm sits at chance: then a smaller spread is prompts agreeing
    on giving one answer, not robustness."""
    medians = [spread(c.mean(1))["median"] for _, c, _, _ in runs.values()]
    aucs = [float(np.median(a)) for _, _, a, _ in runs.values()]
    if max(abs(m - chance) for m in medians) > 0.02 or max(abs(a - 0.5) for a in aucs) > 0.05:
        return []
    return [
        "Every arm's median accuracy is within 2 points of chance and its median AUC within 5 "
        "of 50: no arm does the held-out task, and most prompts give one answer to every "
        "example, so a smaller spread here (0 when all of an arm's prompts sit at 50%) is "
        "prompts agreeing at chance, not robustness; (b) cannot be read from these runs.",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="fine-tuning steps per run")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per fine-tuned arm")
    parser.add_argument("--train-examples", type=int, default=600, help="per training dataset")
    parser.add_argument("--heldout-examples", type=int, default=240)
    parser.add_argument("--write", type=Path, help="replace this script's BENCHMARKS.md section")
    args = parser.parse_args()
    load_start, start = os.getloadavg(), time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="t0_repro-"))
    make_datasets(tmp, args.train_examples, args.heldout_examples)
    print(f"data and templates in {tmp}", flush=True)
    opt("train", "configs/demo.toml", "--run.dir", str(tmp / "runs"), "--checkpoint.dir",
        str(tmp / "ck"), "--logbook.dir", str(tmp / "logbook"))  # fmt: skip
    init = tmp / "ck" / "demo" / "step_00000200"
    print(f"pretrained {init} at {time.monotonic() - start:.0f} s", flush=True)
    runs = {("pretrained", None): evaluate(tmp, init, "pretrained")}
    for seed in range(args.seeds):
        for arm in ("all", "one"):
            mixture = write_mixture(tmp, seed, one_prompt=arm == "one")
            ckpt = finetune(tmp, init, mixture, f"{arm}-{seed}", seed, args.steps)
            runs[(arm, seed)] = evaluate(tmp, ckpt, f"{arm}-{seed}")
            print(f"{arm} seed {seed} done at {time.monotonic() - start:.0f} s", flush=True)
    wall, load_end = time.monotonic() - start, os.getloadavg()

    rows = [("arm", "seed", "median", "IQR", "min", "max", "per-prompt accuracies",
             "AUC median [min, max]")]  # fmt: skip
    for (arm, seed), (task, correct, aucs, _) in runs.items():
        s = spread(correct.mean(1))
        if abs(s["median"] - task["acc"]["median"]) > 1e-9:
            print(f"warning: samples.jsonl disagrees with results.json for {arm} {seed}")
        rows.append((arm, "–" if seed is None else str(seed), pct(s["median"]), pct(s["iqr"]),
                     pct(s["min"]), pct(s["max"]),
                     " ".join(pct(a) for a in correct.mean(1)),
                     f"{pct(np.median(aucs))} [{pct(min(aucs))}, {pct(max(aucs))}]"))  # fmt: skip
    base, gold = runs[("pretrained", None)][1], runs[("pretrained", None)][3]
    verdict = {"a": [], "b_iqr": [], "b_range": []}
    cmp_rows = [("seed", "all − pretrained: median", "one − pretrained: median",
                 "all − one: median", "all − one: IQR", "all − one: range")]  # fmt: skip
    for seed in range(args.seeds):
        full, one = runs[("all", seed)][1], runs[("one", seed)][1]
        vs_base, one_base, vs_one = (paired_bootstrap(full, base, gold),
                                     paired_bootstrap(one, base, gold),
                                     paired_bootstrap(full, one, gold))  # fmt: skip
        verdict["a"].append(vs_base["median"])
        verdict["b_iqr"].append(vs_one["iqr"])
        verdict["b_range"].append(vs_one["range"])
        cmp_rows.append((str(seed), diff(vs_base["median"]), diff(one_base["median"]),
                         diff(vs_one["median"]), diff(vs_one["iqr"]), diff(vs_one["range"])))  # fmt: skip
    chance = runs[("pretrained", None)][0]["chance"]
    info = machine_info(torch_threads())
    body = "\n".join([
        f"Command: `{command_line(sys.argv[1:])}` (under `flock /tmp/cpu.lock`).",
        f"Machine: {info['cpu']}; {info['software']}; {info['threads']} threads.",
        f"Wall time {wall / 60:.1f} min; load average (1 min) {load_start[0]:.2f} at the start, "
        f"{load_end[0]:.2f} at the end.",
        "",
        "Synthetic, made-up tasks (see the script's docstring): 4 training datasets in 4 "
        f"clusters, {args.train_examples} examples each (facts: 60), 8 templates each; held-out "
        f"`entail` (cluster nli), {args.heldout_examples} examples, 8 templates, chance "
        f"{pct(chance)}%. Start: the demo checkpoint (opt-tiny, 200 steps on pydoc). Fine-tuning: "
        f"{args.steps} steps of 2048 tokens (packed rows of 128), lr 1e-3, fp32; `all` draws one "
        "of 8 templates per example, `one` uses each dataset's first template; same steps, "
        "data and seed.",
        "",
        "Held-out accuracy (%) over the 8 prompts (`opt eval`, summed log-likelihood):",
        "",
        aligned_table(rows),
        "",
        f"Differences in percentage points, point [{LEVEL:.0%} paired bootstrap over the "
        f"{base.shape[1]} examples, resampled within each label, {RESAMPLES} resamples]: (a) is a positive median "
        "difference over `pretrained`; (b) is a negative IQR / range difference `all − one`.",
        "",
        aligned_table(cmp_rows),
        "",
        "Why an effect may not show at this scale: opt-tiny has 4 layers of width 128 (about "
        "1.8M parameters with its embeddings), pretrained for 200 steps on Python's "
        "documentation, so it brings little English and no reasoning to the fine-tuning; T0's "
        "effects were measured on T5+LM models of 3B and 11B parameters. The tasks are synthetic and few (4 training datasets, not 38), "
        "the runs short, and 240 held-out examples give intervals of about ±6 points per "
        "prompt.",
        "",
        *caveat(runs, chance),
        f"(a) `all` above `pretrained` in median: {said(verdict['a'], +1)}.",
        f"(b) `all` below `one` in IQR: {said(verdict['b_iqr'], -1)}; in range: "
        f"{said(verdict['b_range'], -1)}.",
    ])  # fmt: skip
    print(body)
    if args.write:
        write_section(args.write, TITLE, body)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
