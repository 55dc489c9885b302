"""Carrying out the supervisor's decisions on a trainer, and writing them to the logbook.

Every rank runs this with the same decision; only rank 0 touches the logbook and deletes
abandoned checkpoints. A rollback happens in-process: model, optimizer, data position and
RNG are reloaded on every rank from the newest healthy checkpoint, while the supervisor's
own state and the lowered LR/clip factors carry over (the schedule is scaled, not reset).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from opt import checkpoint as ckpt
from opt import dist as distributed
from opt.faults import maybe_inject_fault
from opt.supervisor.supervisor import KILL_SWITCH_FILE

if TYPE_CHECKING:
    from opt.train.trainer import StepResult, Trainer


def hyperparameters(trainer: Trainer) -> dict[str, float]:
    group = trainer.optimizers[0].param_groups[0]
    return {
        "lr_scale": trainer.lr_scale,
        "grad_clip": trainer.grad_clip,
        "adam_eps": group["eps"],
        "adam_beta2": group["betas"][1],
    }


def healthy_checkpoint(trainer: Trainer) -> Path | None:
    """Newest complete checkpoint saved before the incident began, with the margin."""
    limit = trainer.supervisor.rollback_limit()
    found = [p for p in ckpt.list_checkpoints(trainer.cfg.checkpoint_dir) if _step(p) <= limit]
    return found[-1] if found else None


def protected_checkpoints(trainer: Trainer) -> set[Path]:
    """The newest checkpoint old enough to be a rollback target stays until a newer one is."""
    if trainer.supervisor is None:
        return set()
    limit = trainer.step - trainer.cfg.supervisor.healthy_margin
    found = [p for p in ckpt.list_checkpoints(trainer.cfg.checkpoint_dir) if _step(p) <= limit]
    return {found[-1]} if found else set()


def _step(path: Path) -> int:
    return int(path.name.split("_")[1])


def carry_out(trainer: Trainer, result: StepResult) -> None:
    decision = result.decision
    anomaly = decision.anomaly
    event = {
        "step": result.step,
        "tokens": trainer.tokens_seen,
        "detector": anomaly.detector if anomaly else decision.reason,
        "numbers": anomaly.numbers if anomaly else {},
        "action": decision.rung or "+".join(decision.moves),
        "before": hyperparameters(trainer),
        "detail": _detail(anomaly),
    }
    if "stop" in decision.moves:
        _stop(trainer, decision.reason, event)
        return
    if "rollback" not in decision.moves:
        trainer.log_event("intervention", **event, after=hyperparameters(trainer))
        return
    target = healthy_checkpoint(trainer)
    if target is None:
        reason = (
            f"no healthy checkpoint saved by step {trainer.supervisor.rollback_limit()} "
            "to roll back to"
        )
        _stop(trainer, reason, event)
        return
    rollback(trainer, target, result.step, decision.moves, event)


def plan_rollback(
    trainer: Trainer, target: Path, anomaly_step: int, moves: tuple[str, ...]
) -> dict:
    """What the rollback will do, decided before anything is changed, so that it can be
    logged first and finished from the logbook if the job dies half-way."""
    cfg = trainer.cfg.supervisor
    saved = ckpt.load_trainer_state(target)
    target_step = int(saved["step"])
    lower = "lower_lr_clip" in moves
    plan = {
        "checkpoint": str(target),
        "rolled_back_to_step": target_step,
        "tokens_lost": (anomaly_step - target_step) * trainer.cfg.train.batch_tokens,
        "after": {
            **hyperparameters(trainer),
            "lr_scale": trainer.lr_scale * (cfg.lr_factor if lower else 1.0),
            "grad_clip": trainer.grad_clip * (cfg.clip_factor if lower else 1.0),
        },
    }
    if "skip_data" in moves:
        first = max(anomaly_step - cfg.skip_data_steps, target_step) + 1
        plan["skipped_data"] = step_samples(
            trainer, int(saved["data"]["pos"]), target_step, first, anomaly_step
        )
        plan["skipped_steps"] = [first, anomaly_step]
    return plan


def step_samples(trainer: Trainer, pos: int, done_steps: int, first: int, last: int) -> list[int]:
    """Stream positions [start, end) that steps ``first..last`` (1-based, inclusive) read,
    given the stream stands at ``pos`` after ``done_steps`` steps (no skips in between)."""
    per_step = trainer.loader.samples_per_step(trainer.grad_accum)
    return [pos + (first - done_steps - 1) * per_step, pos + (last - done_steps) * per_step]


def rollback(
    trainer: Trainer, target: Path, anomaly_step: int, moves: tuple[str, ...], event: dict
) -> None:
    """Hide the untrusted checkpoints, log the plan, then carry it out in-process.

    A job killed after the log line resumes from ``target`` (the newest complete
    checkpoint left) and ``reconcile_with_logbook`` re-applies the logged factors and skips.
    """
    sup = trainer.supervisor
    trainer.finish_checkpoint()
    plan = plan_rollback(trainer, target, anomaly_step, moves)
    discarded = [
        p for p in ckpt.list_checkpoints(trainer.cfg.checkpoint_dir) if _step(p) > _step(target)
    ]
    hidden = [p.with_name(f".{p.name}.discarded") for p in discarded]
    if trainer.rank == 0:
        # Saved while the divergence was brewing: never resume from them. A rename is
        # atomic, so a crash never leaves one half-deleted but still looking complete.
        for path, tmp in zip(discarded, hidden, strict=True):
            os.replace(path, tmp)
    distributed.barrier()
    trainer.log_event(
        "intervention", **event, **plan, discarded_checkpoints=[p.name for p in discarded]
    )
    maybe_inject_fault(trainer.rank, "rollback")
    carried_supervisor = sup.state_dict()
    skips = trainer.loader.stream.state_dict()["skips"]
    state = ckpt.load_training_state(
        target, trainer.model_parts, trainer.optimizers, layout=trainer.layout
    )
    trainer.load_state_dict(state)
    sup.load_state_dict(carried_supervisor)
    trainer.lr_scale = plan["after"]["lr_scale"]
    trainer.grad_clip = plan["after"]["grad_clip"]
    for start, end in [*skips, *([plan["skipped_data"]] if "skipped_data" in plan else [])]:
        trainer.loader.stream.skip(start, end)  # skips decided after the target still hold
    if "reset_optimizer" in moves:
        for optimizer in trainer.optimizers:
            optimizer.state.clear()
        sup.rewarmup_start = trainer.step
    if trainer.rank == 0:
        for tmp in hidden:
            shutil.rmtree(tmp, ignore_errors=True)


def reconcile_with_logbook(trainer: Trainer, source: Path) -> dict | None:
    """After resuming from ``source``: if the logbook's last rollback went to this very
    checkpoint, the job died between that rollback and its next checkpoint, and its
    lowered factors and data skips (logged, not yet saved) are applied again."""
    import torch.distributed as dist

    decision = [None]
    if trainer.rank == 0 and trainer.logbook is not None and trainer.logbook.events_path.exists():
        events = trainer.logbook.events()
        last = max(
            (i for i, e in enumerate(events) if e.get("rolled_back_to_step") is not None),
            default=None,
        )
        if last is not None and events[last]["rolled_back_to_step"] == trainer.step:
            later = events[last:]
            factors = next(e["after"] for e in reversed(later) if e.get("after"))
            skips = [e["skipped_data"] for e in later if e.get("skipped_data")]
            decision[0] = {
                "after": factors,
                "skipped_data": skips,
                "from_step": events[last]["step"],
                "furthest_step": max(e.get("step", 0) for e in later),
            }
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(decision, src=0)
    found = decision[0]
    if found is None:
        return None
    before = hyperparameters(trainer)
    trainer.lr_scale = float(found["after"]["lr_scale"])
    trainer.grad_clip = float(found["after"]["grad_clip"])
    for start, end in found["skipped_data"]:
        trainer.loader.stream.skip(start, end)
    # A drill fires only the first time through its step: the dead job had got that far.
    sup = trainer.supervisor
    sup.furthest_step = max(sup.furthest_step, int(found.pop("furthest_step")))
    return {"before": before, "after": hyperparameters(trainer), **found}


def _stop(trainer: Trainer, reason: str, event: dict) -> None:
    trainer.stop_requested = True
    if reason == "kill switch":
        trainer.stop_reason = "kill switch: stopped at a step boundary by the operator"
        trainer.save_checkpoint(sync=True)  # a healthy state: resume continues from it
        switch = trainer.cfg.run_dir / KILL_SWITCH_FILE
        if trainer.rank == 0 and switch.exists():
            switch.rename(switch.with_name("STOP.consumed"))  # so a restart trains on
        event["detail"] = reason
        trainer.log_event("intervention", **event, after=hyperparameters(trainer))
        return
    trainer.human_needed = True
    newest = ckpt.latest_checkpoint(trainer.cfg.checkpoint_dir)
    why = (
        f"{event['detector']} at step {event['step']}: {reason}; the run is resumable from {newest}"
    )
    trainer.stop_reason = f"stopped for a human after {why}"
    trainer.log_event("stop_for_human", **event, reason=why)


def _detail(anomaly) -> str:
    if anomaly is None:
        return ""
    n = anomaly.numbers
    if anomaly.detector == "loss_spike":
        return (
            f"loss {n['loss']:.4f} vs median {n['loss_median']:.4f} "
            f"(robust std {n['loss_robust_std']:.4f})"
        )
    if anomaly.detector == "grad_norm_explosion":
        return f"grad norm {n['grad_norm']:.3g} vs median {n['grad_norm_median']:.3g}"
    if anomaly.detector == "loss_scale_collapse":
        return f"loss scale {n['loss_scale']:g}, {n['overflows_in_window']} overflows in the window"
    return f"loss {n['loss']}, grad norm {n['grad_norm']}"


def apply_manual(trainer: Trainer) -> None:
    """An `opt intervene` request: rank 0 reads it, every rank applies the same values."""
    import json

    import torch.distributed as dist

    from opt.supervisor.cli import INTERVENE_FILE

    path = trainer.cfg.run_dir / INTERVENE_FILE
    request = [None]
    if trainer.rank == 0:
        try:
            request[0] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            request[0] = {"error": str(err)}
        path.rename(path.with_name("INTERVENE.applied.json"))
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(request, src=0)
    request = request[0]
    event = {"step": trainer.step, "tokens": trainer.tokens_seen, "action": "manual",
             "reason": request.get("reason", ""), "before": hyperparameters(trainer)}  # fmt: skip
    if "error" in request:
        trainer.log_event(
            "manual_intervention", **event, detail=f"unreadable request: {request['error']}"
        )
        return
    if "lr_scale" in request:
        trainer.lr_scale = float(request["lr_scale"])
    if "grad_clip" in request:
        trainer.grad_clip = float(request["grad_clip"])
    if "skip_steps" in request:
        first, last = request["skip_steps"]
        first = max(first, trainer.step + 1)
        if first <= last:
            pos = trainer.loader.state_dict()["pos"]
            start, end = step_samples(trainer, pos, trainer.step, first, last)
            trainer.loader.stream.skip(start, end)
            event["skipped_data"] = [start, end]
            event["skipped_steps"] = [first, last]
    event["after"] = hyperparameters(trainer)
    trainer.log_event("manual_intervention", **event)
