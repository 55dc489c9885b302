"""Downstream accuracy in the training loop (``[downstream]``): `opt eval`'s rank
classification of the weights being trained, every ``every_steps`` steps and/or after every
checkpoint save.

Everything that can be wrong is checked when the job starts, before the model is built:
the task names, the data (every task's split read, its templates chosen), the tokenizer,
and the layout. Pipeline and sequence parallelism are refused for now (a stage holds part
of the model; a sequence-sharded residual stream cannot be read at the scored positions).
The examples are split over the data-parallel ranks and their scores gathered, as
`opt eval` does; a tensor-parallel group scores the same examples, its logits gathered over
the vocabulary shards at the scored positions only (opt/eval/scoring.py); FSDP's
parameters are gathered for the evaluation and resharded after.

Nothing of the training state changes: the model runs in eval mode (no dropout) under
inference mode, and the RNG is forked around it; the activation and straggler watches only
count training forwards.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from opt.config import DownstreamConfig
from opt.errors import OptError
from opt.eval.runner import EvalSpec, Prepared, evaluate, prepare
from opt.eval.tasks import parse_tasks
from opt.run.logbook.events import DownstreamEval, TaskAccuracy


@dataclass(frozen=True)
class DownstreamPlan:
    """What was checked at job start: the spec and every task's examples and templates."""

    spec: EvalSpec
    prepared: list[Prepared]


def plan_downstream(
    cfg: DownstreamConfig, tp: int, pp: int, sequence_parallel: bool = False
) -> DownstreamPlan | None:
    """Check ``[downstream]`` against the data and the layout (one OptError line), or None
    when no task is set."""
    if not cfg.enabled:
        return None
    if pp > 1 or (tp > 1 and sequence_parallel):
        raise OptError(
            f"downstream.tasks is not supported with pipeline or sequence parallelism yet "
            f"(parallel.pp={pp}, parallel.sequence_parallel={sequence_parallel}); evaluate "
            "checkpoints with `opt eval`"
        )
    try:
        tasks = tuple(parse_tasks(cfg.tasks))
    except OptError as err:
        raise OptError(f"downstream.tasks: {err}") from None
    data = Path(cfg.data)
    if not data.is_dir():
        raise OptError(f"downstream.data: no such folder: {data}")
    spec = EvalSpec(
        tasks=tasks, data_dir=data, split=cfg.split, prompts=cfg.prompts, shots=cfg.shots,
        limit=cfg.limit, batch_size=cfg.batch_size,
    )  # fmt: skip
    try:
        prepared = prepare(spec)
    except OptError as err:
        raise OptError(f"downstream: {err}") from None
    return DownstreamPlan(spec, prepared)


class DownstreamEvaluator:
    """Evaluates the downstream tasks on the model as it is (collective: every rank calls
    it at the same step); ``report`` hears of each evaluation (rank 0 writes)."""

    def __init__(
        self,
        cfg: DownstreamConfig,
        plan: DownstreamPlan,
        parts: list[nn.Module],
        tokenizer_file: Path | None,
        *,
        device: torch.device,
        compute_context: Callable[[], AbstractContextManager],
        report: Callable[[DownstreamEval], None] | None = None,
        tp: int = 1,
    ) -> None:
        from opt.data.tokenizer import eos_id, load_tokenizer

        if tokenizer_file is None:
            raise OptError(
                "downstream.tasks needs the training data's tokenizer (tokenizer.json beside "
                "the token files, or data.tokenizer)"
            )
        if len(parts) != 1:
            raise OptError("downstream.tasks needs the whole model on each rank")
        self.cfg = cfg
        self.plan = plan
        self.model = parts[0]
        self.tokenizer = load_tokenizer(tokenizer_file)
        if self.tokenizer.get_vocab_size() > self.model.args.vocab_size:
            raise OptError("downstream: the tokenizer produces ids outside the model's vocabulary")
        self.prefix_id = eos_id(self.tokenizer)
        self.device = device
        self.compute_context = compute_context
        self.report = report
        self.tp = tp  # a tensor-parallel group scores the same examples (tp innermost)

    def due(self, step: int, saved: bool) -> bool:
        """Whether the step just taken (and saved, if ``saved``) is evaluated."""
        every = self.cfg.every_steps
        return (every > 0 and step % every == 0) or (self.cfg.at_checkpoints and saved)

    def evaluate(self, step: int) -> DownstreamEval:
        start = time.perf_counter()
        model = self.model
        mode = model.training
        fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)]
        devices = [self.device] if self.device.type != "cpu" else []
        try:
            model.eval()
            rng = torch.random.fork_rng(devices, device_type=self.device.type)
            with rng, self.compute_context():
                # Every rank gathers every FSDP unit's parameters once, and keeps them for
                # the evaluation: the ranks run different numbers of forwards (their shares
                # differ), so no forward may all-gather. The scorer calls the blocks, not the
                # root's forward, so the root's unit is gathered here too.
                for unit in fsdp:
                    unit.set_reshard_after_forward(False, recurse=False)
                for unit in fsdp:
                    unit.unshard()
                results = evaluate(model, self.tokenizer, self.prefix_id, self.plan.spec,
                                   self.plan.prepared, tp=self.tp)  # fmt: skip
        finally:
            model.train(mode)
            for unit in fsdp:  # as apply_fsdp set them without pipeline parallelism
                unit.set_reshard_after_forward(True, recurse=False)
                unit.reshard()
        tasks = {}
        for name, task in results["tasks"].items():
            acc = task["acc"]
            if acc is None:
                continue  # no prompt applied to any example
            tasks[name] = TaskAccuracy(
                median=acc["median"], iqr=acc["iqr"], min=acc["min"], max=acc["max"],
                prompts=sum(1 for p in task["prompts"] if p["n"]), examples=task["n_examples"],
            )  # fmt: skip
        event = DownstreamEval(
            step=step, split=self.plan.spec.split, shots=self.plan.spec.shots, tasks=tasks,
            seconds=time.perf_counter() - start,
        )  # fmt: skip
        if self.report is not None:
            self.report(event)
        return event
