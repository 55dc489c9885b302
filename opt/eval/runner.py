"""`opt eval`'s work: every example of every task under every chosen prompt, scored by rank
classification, zero- or few-shot, summarised per prompt and per task (the T0 view)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

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
    log_samples: bool = False  # keep every scored example's log-likelihoods (samples.jsonl)


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
    model,
    tokenizer,
    prefix_id: int,
    spec: EvalSpec,
    prepared: list[Prepared] | None = None,
    tp: int = 1,
) -> dict:
    """Score every task; the results as ``results.json`` holds them (with ``samples`` when
    ``spec.log_samples``).

    Under a process group (torchrun, `opt launch local`) the examples are sharded over the
    data-parallel ranks: rank r of the world // tp groups scores every (world // tp)-th
    request from r, and the scores are gathered, so every rank returns what one process
    would. The ``tp`` ranks of a group (consecutive global ranks: tensor parallelism is the
    innermost mesh dimension) hold one model between them and score the same requests."""
    prepared = prepare(spec) if prepared is None else prepared
    rank, world = rank_and_world()
    dp_rank, dp = rank // tp, world // tp
    scorer = Scorer(model, prefix_id, spec.batch_size)
    # Every task's requests in one call: the batches then sort by length across tasks, and
    # fewer of them are part-filled than task by task.
    per_task = [build_requests(prep, spec, tokenizer) for prep in prepared]
    every = [item for items in per_task for item in items]
    mine = scorer.loglikelihoods([req for *_, req in every[dp_rank::dp]])
    scored = iter(_interleave(_gather(mine)[::tp], len(every)))
    tasks, samples = {}, {}
    for prep, items in zip(prepared, per_task, strict=True):
        lls = [next(scored) for _ in items]
        outcomes: dict[int, list[tuple[int, int, int]]] = {
            t: [] for t in range(len(prep.templates))
        }
        rows = []
        for (t, i, rendered, _), ll in zip(items, lls, strict=True):
            pred, pred_norm = predictions(ll, rendered.choices)
            outcomes[t].append((i, int(pred == rendered.gold), int(pred_norm == rendered.gold)))
            if spec.log_samples:
                rows.append({
                    "prompt": prep.templates[t].name, "example": i,
                    "choices": list(rendered.choices), "gold": rendered.gold,
                    "loglikelihoods": ll, "pred": pred, "pred_norm": pred_norm,
                })  # fmt: skip
        choices = [len(rendered.choices) for _, _, rendered, _ in items]
        chance = sum(1 / n for n in choices) / len(choices) if choices else None
        tasks[prep.task.name] = summarise_task(prep, outcomes, spec.seed, chance)
        samples[prep.task.name] = rows
    out = {
        "split": spec.split,
        "shots": spec.shots,
        "seed": spec.seed,
        "limit": spec.limit,
        "truncated_contexts": sum(_gather(scorer.truncated)[::tp]),
        "tasks": tasks,
    }
    return {**out, "samples": samples} if spec.log_samples else out


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
    prep: Prepared,
    outcomes: dict[int, list[tuple[int, int, int]]],
    seed: int,
    chance: float | None = None,
) -> dict:
    """Per prompt: accuracy (summed log-likelihood) and acc_norm with bootstrap 95% CIs; per
    task: their spread over the prompts that scored at least one example, and ``chance``,
    the accuracy of a uniform guess over each scored item's choices."""
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
        "n_choices": len(prep.task.labels) or None,  # None: a user's task
        "chance": chance,
        "prompts": prompts,
        "acc": spread([p["acc"] for p in scored]) if scored else None,
        "acc_norm": spread([p["acc_norm"] for p in scored]) if scored else None,
    }


def evaluate_checkpoint(
    checkpoint: str | Path,
    spec: EvalSpec,
    tokenizer_path: str | Path | None = None,
    tp: int = 1,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Load a checkpoint (any layout it was saved under) and its tokenizer, and evaluate;
    with ``tp`` > 1 (under a process group) the model is split over groups of ``tp``
    consecutive ranks as training splits it, and each group scores a share of the examples."""
    from opt import checkpoint as ckpt
    from opt.data.tokenizer import eos_id, load_tokenizer

    prepared = prepare(spec)
    checkpoint = Path(checkpoint)
    device = device or torch.device("cpu")
    if tp == 1:
        model = ckpt.load_model(checkpoint, device)
    else:
        model = _tensor_parallel_model(checkpoint, tp, device)
    model = model.to(dtype).eval()
    tokenizer = load_tokenizer(tokenizer_path or checkpoint)
    if tokenizer.get_vocab_size() > model.args.vocab_size:
        raise OptError("the tokenizer produces ids outside this model's vocabulary")
    results = evaluate(model, tokenizer, eos_id(tokenizer), spec, prepared, tp)
    return {"checkpoint": str(checkpoint), "tp": tp, **results}


def _tensor_parallel_model(checkpoint: Path, tp: int, device: torch.device):
    """This rank's tensor-parallel share of the checkpoint's model (Megatron's split, as in
    training, without sequence parallelism), its weights read from the checkpoint."""
    from opt import checkpoint as ckpt
    from opt.models.model import OPTModel
    from opt.parallel.dims import ParallelDims
    from opt.parallel.rules import tensor_parallel_problem
    from opt.parallel.tensor_parallel import apply_tensor_parallel

    world = rank_and_world()[1]
    if world % tp:
        raise OptError(f"--tp {tp} does not divide the {world} processes")
    args = ckpt.load_model_args(checkpoint)
    problem = tensor_parallel_problem(args, tp)
    if problem:
        raise OptError(problem.replace("parallel.tp", "--tp"))
    meshes = ParallelDims(world, tp=tp).build_meshes(device.type)
    with torch.device("meta"):
        model = OPTModel(args)
    apply_tensor_parallel(model, meshes["tp"], sequence_parallel=False)
    model.to_empty(device=device)
    ckpt.load_model_weights(checkpoint, model)
    return model
