"""`opt eval`'s work: every example of every task under every chosen prompt, scored by rank
classification, zero- or few-shot, summarised per prompt and per task (the T0 view)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from opt.dist import rank_and_world
from opt.errors import OptError
from opt.eval.prompts import Rendered, Template, select_templates
from opt.eval.scoring import Request, Scorer, predictions
from opt.eval.stats import bootstrap_ci, spread
from opt.eval.tasks import Task, load_examples

FEWSHOT_SEPARATOR = "\n\n"  # between demonstrations, and before the scored input
TARGET_SEPARATOR = " "  # between an input and its target (T0, lm-eval)


@dataclass(frozen=True)
class EvalSpec:
    """What to evaluate; the fields are the command line's."""

    tasks: tuple[Task, ...]
    data_dir: Path
    split: str = "validation"
    prompts: str = "all"  # "all" or comma-separated template names (with one task)
    shots: int = 0
    fewshot_split: str = "train"
    seed: int = 0
    limit: int | None = None
    batch_size: int = 16


@dataclass
class Prepared:
    """A task's examples and templates, read and checked before any model is loaded."""

    task: Task
    examples: list[dict]
    templates: list[Template]
    pool: list[dict] | None  # the few-shot source split
    pool_is_split: bool  # the pool is the scored split itself: skip the scored example


def prepare(spec: EvalSpec) -> list[Prepared]:
    """Read every task's data and templates (bad input fails here, before the model loads)."""
    if spec.shots < 0:
        raise OptError(f"--shots must be 0 or more, not {spec.shots}")
    if spec.limit is not None and spec.limit < 1:
        raise OptError(f"--limit must be at least 1, not {spec.limit}")
    if spec.prompts != "all" and len(spec.tasks) > 1:
        raise OptError("--prompts names templates of one task; use it with a single --tasks")
    out = []
    for task in spec.tasks:
        examples = load_examples(task, spec.data_dir, spec.split)
        if spec.limit is not None:
            examples = examples[: spec.limit]
        templates = select_templates(task.templates(), spec.prompts)
        pool, same = None, False
        if spec.shots:
            same = spec.fewshot_split == spec.split
            pool = examples if same else load_examples(task, spec.data_dir, spec.fewshot_split)
        out.append(Prepared(task, examples, templates, pool, same))
    return out


def fewshot_demos(
    template: Template,
    example: dict,
    position: int,
    pool: list[dict],
    pool_is_split: bool,
    shots: int,
    seed: int,
    key: str,
) -> list[Rendered]:
    """``shots`` labelled demonstrations for one scored example under ``template``: the
    pool in an order drawn from ``Random(f"{seed}:{key}:{position}")``, keeping those the
    template renders, never the scored example itself (by position when the pool is the
    scored split, and by value always). The order does not depend on the template, so every
    prompt of an example sees the same demonstrations wherever they render."""
    rng = random.Random(f"{seed}:{key}:{position}")
    order = rng.sample(range(len(pool)), len(pool))
    demos = []
    for j in order:
        if (pool_is_split and j == position) or pool[j] == example:
            continue
        rendered = template.render(pool[j])
        if rendered is not None:
            demos.append(rendered)
            if len(demos) == shots:
                return demos
    raise OptError(
        f"{key}: only {len(demos)} labelled examples render under template "
        f"{template.name!r}; {shots} shots asked for"
    )


def context_text(rendered: Rendered, demos: list[Rendered]) -> str:
    """The demonstrations (input, space, target), then the scored input, blank-line joined."""
    shots = [d.input + TARGET_SEPARATOR + d.target for d in demos]
    return FEWSHOT_SEPARATOR.join([*shots, rendered.input])


def build_requests(
    prep: Prepared, spec: EvalSpec, tokenizer
) -> list[tuple[int, int, Rendered, Request]]:
    """(template index, example position, rendered, request) for every example a template
    applies to."""
    out = []
    for t, template in enumerate(prep.templates):
        for i, example in enumerate(prep.examples):
            rendered = template.render(example)
            if rendered is None:
                continue
            demos = []
            if spec.shots:
                demos = fewshot_demos(
                    template,
                    example,
                    i,
                    prep.pool,
                    prep.pool_is_split,
                    spec.shots,
                    spec.seed,
                    prep.task.name,
                )
            context = tokenizer.encode(context_text(rendered, demos)).ids
            conts = tuple(
                tuple(tokenizer.encode(TARGET_SEPARATOR + c).ids) for c in rendered.choices
            )
            out.append((t, i, rendered, Request(tuple(context), conts)))
    return out


def evaluate(
    model, tokenizer, prefix_id: int, spec: EvalSpec, prepared: list[Prepared] | None = None
) -> dict:
    """Score every task; the results as ``results.json`` holds them.

    Under a process group (torchrun, `opt launch local`) the examples are sharded over the
    ranks, each holding the whole model: rank r scores every world-th request from r, and
    the scores are gathered, so every rank returns what one process would."""
    prepared = prepare(spec) if prepared is None else prepared
    rank, world = rank_and_world()
    scorer = Scorer(model, prefix_id, spec.batch_size)
    tasks = {}
    for prep in prepared:
        items = build_requests(prep, spec, tokenizer)
        mine = scorer.loglikelihoods([req for *_, req in items[rank::world]])
        lls = _interleave(_gather(mine), len(items))
        outcomes: dict[int, list[tuple[int, int, int]]] = {
            t: [] for t in range(len(prep.templates))
        }
        for (t, i, rendered, _), ll in zip(items, lls, strict=True):
            pred, pred_norm = predictions(ll, rendered.choices)
            outcomes[t].append((i, int(pred == rendered.gold), int(pred_norm == rendered.gold)))
        tasks[prep.task.name] = summarise_task(prep, outcomes, spec.seed)
    return {
        "split": spec.split,
        "shots": spec.shots,
        "seed": spec.seed,
        "limit": spec.limit,
        "truncated_contexts": sum(_gather(scorer.truncated)),
        "tasks": tasks,
    }


def _gather(obj) -> list:
    """``obj`` from every rank, in rank order (``[obj]`` without a process group)."""
    world = rank_and_world()[1]
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _interleave(shards: list[list], n: int) -> list:
    """Undo the ``items[rank::world]`` split."""
    out = [None] * n
    for rank, shard in enumerate(shards):
        out[rank :: len(shards)] = shard
    return out


def summarise_task(
    prep: Prepared, outcomes: dict[int, list[tuple[int, int, int]]], seed: int
) -> dict:
    """Per prompt: accuracy (summed log-likelihood) and acc_norm with bootstrap 95% CIs; per
    task: their spread over the prompts that scored at least one example."""
    prompts = []
    for t, template in enumerate(prep.templates):
        rows = sorted(outcomes[t])
        entry = {"name": template.name, "id": template.id, "n": len(rows)}
        for k, metric in ((1, "acc"), (2, "acc_norm")):
            values = [r[k] for r in rows]
            entry[metric] = sum(values) / len(values) if values else None
            entry[f"{metric}_ci"] = list(bootstrap_ci(values, seed)) if values else None
        prompts.append(entry)
    scored = [p for p in prompts if p["n"]]
    return {
        "n_examples": len(prep.examples),
        "n_choices": len(prep.task.labels),
        "prompts": prompts,
        "acc": spread([p["acc"] for p in scored]) if scored else None,
        "acc_norm": spread([p["acc_norm"] for p in scored]) if scored else None,
    }


def evaluate_checkpoint(
    checkpoint: str | Path, spec: EvalSpec, tokenizer_path: str | Path | None = None
) -> dict:
    """Load a checkpoint (any layout it was saved under) and its tokenizer, and evaluate."""
    from opt import checkpoint as ckpt
    from opt.data.tokenizer import eos_id, load_tokenizer

    prepared = prepare(spec)
    checkpoint = Path(checkpoint)
    model = ckpt.load_model(checkpoint).eval()
    tokenizer = load_tokenizer(tokenizer_path or checkpoint)
    if tokenizer.get_vocab_size() > model.args.vocab_size:
        raise OptError("the tokenizer produces ids outside this model's vocabulary")
    results = evaluate(model, tokenizer, eos_id(tokenizer), spec, prepared)
    return {"checkpoint": str(checkpoint), **results}
