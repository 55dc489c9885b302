"""A run's start and end as others see them: the run_start event (with what the
interruption before it cost), status.json for launchers and `opt status`, and the clean
stop on the scheduler's warning signal."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from opt import checkpoint as ckpt
from opt.checkpoint import manifest as ckpt_manifest
from opt.checkpoint.checkpointer import checkpoint_path
from opt.config import to_toml
from opt.run.status import FAILED, RUNNING, STOPPED_ON_SIGNAL, read_status
from opt.run.status import write_status as write_status_file

if TYPE_CHECKING:
    from opt.train.trainer import Trainer


def stop_on_signal(trainer: Trainer, received: str) -> None:
    """The scheduler's warning: a synchronous checkpoint of this step (unless one was
    just saved), then a clean exit that the launcher requeues."""
    if trainer.last_saved_step != trainer.step or trainer.pending_checkpoint is not None:
        trainer.save_checkpoint(sync=True)
    trainer.stopped_on_signal = True
    trainer.stop_requested = True
    trainer.stop_reason = (
        f"stopped on {received} at step {trainer.step}, checkpoint "
        f"{checkpoint_path(trainer.cfg.checkpoint_dir, trainer.step).name} saved for the requeue"
    )


def write_status(trainer: Trainer, state: str, **fields) -> None:
    newest = ckpt.latest_checkpoint(trainer.cfg.checkpoint_dir)
    write_status_file(
        trainer.cfg.run_dir,
        state=state,
        step=trainer.step,
        tokens=trainer.tokens_seen,
        max_steps=trainer.max_steps,
        last_checkpoint=str(newest) if newest else None,
        **fields,
    )


def log_start(trainer: Trainer, source: Path | None) -> None:
    """run_start (and config_change against the previous start of this run)."""
    previous = trainer.cfg.run_dir / "config.toml"
    if previous.is_file():
        changes = config_changes(previous.read_text(), to_toml(trainer.cfg))
        if changes:
            trainer.log_event("config_change", step=trainer.step, changes=changes)
    trainer.log_event(
        "run_start",
        step=trainer.step,
        tokens=trainer.tokens_seen,
        reason="resumed" if source is not None else "fresh",
        checkpoint=str(source) if source else None,
        world_size=trainer.dims.world_size,
        layout=trainer.layout,
        model=trainer.cfg.model.name,
        run_dir=str(trainer.cfg.run_dir),
        **work_lost(trainer, source),
    )
    if trainer.reconciled is not None:
        trainer.log_event(
            "intervention_completed_after_restart", step=trainer.step, tokens=trainer.tokens_seen,
            **trainer.reconciled,
        )  # fmt: skip


def work_lost(trainer: Trainer, source: Path | None) -> dict:
    """What the interruption before this resume cost: the steps (and tokens) trained
    past the checkpoint and, after a crash or a stop on a signal, the wall-clock time
    since training first reached it (compute thrown away, queueing, restart). Empty
    when nothing was lost (e.g. a finished run extended)."""
    previous = read_status(trainer.cfg.run_dir)
    interrupted = previous.get("state") in (RUNNING, STOPPED_ON_SIGNAL, FAILED)
    lost_steps = max(0, int(previous.get("step", 0)) - trainer.step)
    if source is None or not (interrupted or lost_steps):
        return {}
    saved_at = ckpt_manifest.read_manifest(source).get("saved_at")
    return {
        "previous_state": previous["state"],
        "previous_step": previous.get("step"),
        "lost_steps": lost_steps,
        "lost_tokens": max(0, int(previous.get("tokens", 0)) - trainer.tokens_seen),
        "lost_s": round(time.time() - saved_at, 1) if saved_at and interrupted else None,
    }


def config_changes(old_toml: str, new_toml: str) -> dict[str, list]:
    """Keys whose value differs between two resolved configs: {key: [old, new]}."""
    import tomllib

    def flat(text: str) -> dict:
        return {f"{s}.{k}": v for s, table in tomllib.loads(text).items() for k, v in table.items()}

    old, new = flat(old_toml), flat(new_toml)
    return {
        k: [old.get(k), new.get(k)]
        for k in sorted(old.keys() | new.keys())
        if old.get(k) != new.get(k)
    }
