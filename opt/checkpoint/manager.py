"""The checkpoint manager: handed the pieces of a run's state, it owns everything about
checkpoints of that run: saving (sync or async, with background staging), committing,
retention, resuming, and the checkpoints a rollback may go back to.

It is given, not taken: the model parts and their optimizers (written through DCP, so the
layouts reshard), and a dict of small ``Stateful`` pieces (step, schedule factors, loss
scaler, data position, supervisor; each with ``state_dict``/``load_state_dict``) that go
into ``trainer.pt`` under their names. Each rank's RNG streams are saved beside them and
restored when the layout is the same. It never imports the trainer: anything with these
pieces can be checkpointed.

Every rank calls every method (they are collective where DCP is); only rank 0 commits,
prunes and renames.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Protocol

import torch

from opt import dist
from opt.checkpoint import checkpointer as io
from opt.checkpoint.resume import newest_complete_checkpoint, verify_together
from opt.checkpoint.staging import BackgroundStager
from opt.config import CheckpointConfig
from opt.errors import OptError
from opt.models.sizes import ModelArgs


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


# Checkpoints written before the pieces had names held one flat dict; their keys, by piece.
_FLAT_STATE = {
    "progress": ("step", "tokens_seen"),
    "factors": ("lr_scale", "grad_clip"),
}


def _by_piece(state: dict) -> dict:
    """``trainer.pt`` as {piece: state}, whichever format wrote it."""
    if "progress" in state or "step" not in state:
        return state
    pieces = {name: {k: state[k] for k in keys} for name, keys in _FLAT_STATE.items()}
    flat = {k for keys in _FLAT_STATE.values() for k in keys}
    return {**pieces, **{k: v for k, v in state.items() if k not in flat}}


def step_of(path: Path) -> int:
    return int(path.name.split("_")[1])


class CheckpointManager:
    def __init__(
        self,
        cfg: CheckpointConfig,
        root: Path,
        *,
        model_parts: list[torch.nn.Module],
        optimizers: list[torch.optim.Optimizer],
        states: Mapping[str, Stateful],
        model_args: ModelArgs,
        layout: dict,
        device: torch.device,
        extra_files: Mapping[str, bytes] | None = None,
        protect: Callable[[list[Path]], set[Path]] | None = None,
        on_skip: Callable[[Path, str], None] | None = None,
    ):
        """``protect(checkpoints)`` names the checkpoints pruning must keep (a rollback
        target); ``on_skip(path, problem)`` hears of a checkpoint resume set aside."""
        self.cfg = cfg
        self.root = Path(root)
        self.model_parts = model_parts
        self.optimizers = optimizers
        self.states = dict(states)
        self.model_args = model_args
        self.layout = layout
        self.device = device
        self.extra_files = dict(extra_files or {})
        self.protect = protect
        self.on_skip = on_skip
        self.rank = dist.rank_and_world()[0]
        self.last_saved_step = -1
        self.staging_wait_s = 0.0  # time the loop waited for a background copy, in all
        self._pending: io.PendingCheckpoint | None = None
        self._stager: BackgroundStager | None = None  # made at the first async save
        self._pruning: Future | None = None  # rank 0: old checkpoints being deleted
        # Background writes get their own gloo group: their collectives must not interleave
        # with the training loop's on the default group.
        self._write_group = None
        if cfg.async_save and dist.rank_and_world()[1] > 1:
            self._write_group = torch.distributed.new_group(backend="gloo")

    # ----- what is there ---------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """Complete checkpoints of this run, oldest first."""
        return io.list_checkpoints(self.root)

    def latest(self) -> Path | None:
        return io.latest_checkpoint(self.root)

    def newest_at_or_before(self, step: int) -> Path | None:
        """The newest complete checkpoint of a step no later than ``step``."""
        found = [p for p in self.checkpoints() if step_of(p) <= step]
        return found[-1] if found else None

    def read_states(self, path: Path) -> dict:
        """The small pieces of a checkpoint ({name: state}), without loading anything."""
        return _by_piece(io.load_trainer_state(path))

    # ----- saving ----------------------------------------------------------------------------
    def due(self, step: int, last: bool) -> bool:
        return step % self.cfg.every == 0 or last

    @property
    def in_flight(self) -> bool:
        return self._pending is not None

    def save(self, step: int, *, sync: bool = False) -> Path:
        """Checkpoint the pieces as they are now, as step ``step``. Async (the default unless
        ``sync``) returns once the save is under way; the model and optimizer must then not
        change before ``wait_until_staged``."""
        self.finish()  # at most one save in flight
        async_save = self.cfg.async_save and not sync
        if async_save and self.cfg.async_staging and self._stager is None:
            self._stager = BackgroundStager(self.device)
        result = io.save_checkpoint(
            io.checkpoint_path(self.root, step),
            model=self.model_parts,
            model_args=self.model_args,
            optimizer=self.optimizers,
            trainer_state={name: piece.state_dict() for name, piece in self.states.items()},
            step=step,
            extra_files=self.extra_files,
            layout=self.layout,
            async_save=async_save,
            process_group=self._write_group,
            stager=self._stager if async_save else None,
        )
        self.last_saved_step = step
        if isinstance(result, io.PendingCheckpoint):
            self._pending = result
            return result.final
        self._prune()
        dist.barrier()
        return result

    def poll(self) -> None:
        """Commit the async save in flight if its writes are done (each rank decides alone;
        only rank 0 commits)."""
        if self._pending is not None and self._pending.done():
            self.finish()

    def finish(self) -> None:
        """Wait for the async save in flight, if any, and commit it."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        pending.finish()
        # Deleting the oldest checkpoint's files would cost the loop as much as the commit.
        self._prune(background=True)

    def wait_until_staged(self) -> None:
        """Before anything changes the weights or the optimizer state in place: an async
        save's background copy of them must be complete."""
        if self._pending is not None:
            start = time.perf_counter()
            self._pending.wait_until_staged()
            self.staging_wait_s += time.perf_counter() - start

    def close(self) -> None:
        """Commit the save in flight, free the staging buffers, and wait for pruning: a
        finished run leaves exactly ``keep_last`` checkpoints."""
        self.finish()
        if self._stager is not None:
            self._stager.close()
            self._stager = None
        self._wait_for_pruning()

    def _prune(self, background: bool = False) -> None:
        if self.rank != 0:
            return
        self._wait_for_pruning()
        protect = self.protect(self.checkpoints()) if self.protect is not None else set()
        self._pruning = io.prune_checkpoints(
            self.root, self.cfg.keep_last, protect=protect, background=background
        )

    def _wait_for_pruning(self) -> None:
        if self._pruning is not None:
            self._pruning.result()
            self._pruning = None

    # ----- loading ---------------------------------------------------------------------------
    def resume(self) -> Path | None:
        """Restore everything per ``checkpoint.resume``; returns the checkpoint, or None when
        there is nothing to resume from."""
        source = self._resume_source()
        if source is not None:
            self.load(source, verified=True)
        return source

    def init_from_weights(self) -> Path | None:
        """A fresh run's weights from ``checkpoint.init_from``, if it names a checkpoint."""
        if self.cfg.init_from is None:
            return None
        source = Path(self.cfg.init_from)
        self._check_same_shape(source, dropout_may_differ=True)
        io.load_model_weights(source, self.model_parts)
        return source

    def load(self, path: Path, *, keep: Iterable[str] = (), verified: bool = False) -> None:
        """Restore model, optimizer, this rank's RNG (same layout only) and every piece
        except those named in ``keep``, which stay as they are (a rollback keeps the
        supervisor's memory of the incident)."""
        self._check_same_shape(path)
        state = io.load_training_state(
            path, self.model_parts, self.optimizers, layout=self.layout, verified=verified
        )
        state = _by_piece(state)
        keep = set(keep)
        for name, piece in self.states.items():
            if name in keep:
                continue
            if name not in state:
                raise OptError(f"checkpoint {path} has no {name!r} state to resume from")
            piece.load_state_dict(state[name])

    def _resume_source(self) -> Path | None:
        resume = self.cfg.resume
        if resume == "none":
            return None
        if resume == "auto":
            return newest_complete_checkpoint(self.root, self.on_skip)
        problem = verify_together(Path(resume))
        if problem is not None:
            raise OptError(problem)
        return Path(resume)

    def _check_same_shape(self, source: Path, dropout_may_differ: bool = False) -> None:
        """The checkpoint's model is this run's; a fresh run from other weights (fine-tuning)
        may set its own dropout, which is no part of the weights."""
        saved = io.load_model_args(source)
        if dropout_may_differ:
            mine = self.model_args
            saved = saved.replace(dropout=mine.dropout, attn_dropout=mine.attn_dropout)
        if saved != self.model_args:
            raise OptError(f"checkpoint {source} holds a different model shape than this run's")

    # ----- rollback --------------------------------------------------------------------------
    def hide_newer_than(self, target: Path) -> list[Path]:
        """Take every checkpoint newer than ``target`` out of view (collective): renamed to
        a hidden ``.step_*.discarded``, atomically, so a crash never leaves one half-deleted
        but still looking complete. Returns the checkpoints hidden (by their old names);
        ``delete_hidden`` deletes them once nothing needs them."""
        newer = [p for p in self.checkpoints() if step_of(p) > step_of(target)]
        dist.barrier()  # every rank has listed them before they move
        if self.rank == 0:
            for path in newer:
                path.rename(path.with_name(f".{path.name}.discarded"))
        dist.barrier()
        return newer

    def delete_hidden(self) -> None:
        """Delete what ``hide_newer_than`` (or a killed job's prune) left hidden (rank 0)."""
        if self.rank == 0:
            self._wait_for_pruning()
            io.prune_checkpoints(self.root, keep_last=0)
