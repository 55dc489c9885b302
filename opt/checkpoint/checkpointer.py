"""Saving and loading training state with torch.distributed.checkpoint (DCP).

Model and optimizer tensors go through DCP from the start, so the same code saves a single
process today and a sharded, reshardable layout once parallelism is applied. The small
trainer state (step, schedule, loss scale, data position) and each rank's RNG state are
plain tensors/primitives saved with ``torch.save`` and read back with ``weights_only=True``:
nothing the project loads is ever unpickled freely.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from opt.checkpoint import manifest
from opt.checkpoint.staging import BackgroundStager
from opt.dist import barrier, rank_and_world
from opt.errors import OptError
from opt.faults import maybe_inject_fault
from opt.models.model import OPTModel, empty_model
from opt.models.sizes import ModelArgs

# DCP warns on every call without a process group; one process is a supported layout here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)

STEP_DIR = re.compile(r"^step_(\d+)$")
MODEL_ARGS_FILE = "model.json"
TRAINER_FILE = "trainer.pt"


# Optimizer state keyed by parameter name, not by position in one optimizer: the keys are
# the same whether the model is one module or several pipeline stages, which is what lets
# a checkpoint be loaded under another layout.
STATE_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)

Modules = torch.nn.Module | list[torch.nn.Module]
Optimizers = torch.optim.Optimizer | list[torch.optim.Optimizer] | None


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _model_state(models: Modules) -> dict:
    """One flat state dict over every local part (a tied embedding appears once)."""
    state = {}
    for model in _as_list(models):
        state.update(get_model_state_dict(model, options=STATE_OPTIONS))
    return state


def _training_states(models: Modules, optimizers: Optimizers) -> list[tuple[dict, dict]]:
    return [
        get_state_dict(model, optimizer, options=STATE_OPTIONS)
        for model, optimizer in zip(_as_list(models), _as_list(optimizers), strict=True)
    ]


def checkpoint_path(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class PendingCheckpoint:
    """An async save in flight. Its shards are still being written to the temporary
    directory; the manifest (which makes it a checkpoint) is committed by ``finish``.

    ``written`` is the background job: DCP's write of the staged tensors and then, on rank
    0, the fsync and SHA-256 of every file, so that the commit in the training loop is only
    the manifest and a rename. DCP's save returns on rank 0 (the coordinator) only after
    every rank's writes and the metadata are done, so no further collective is needed.
    ``staged`` completes when the tensors are copied, if the copy is in the background."""

    final: Path
    tmp: Path
    meta: dict
    written: Future
    staged: Future | None = None

    def done(self) -> bool:
        return self.written.done()

    def wait_until_staged(self) -> None:
        """Until the background copy of the tensors is complete: after it, the live ones may
        change. A failed copy fails the save, which ``finish`` reports."""
        if self.staged is not None:
            wait([self.staged])

    def finish(self) -> Path:
        """Wait for this rank's writes (and on rank 0 the hashing); rank 0 then commits."""
        try:
            files = self.written.result()
        except Exception as err:  # a failed background write on any rank
            raise OptError(f"async checkpoint {self.final} failed: {_first_line(err)}") from None
        rank = rank_and_world()[0]
        maybe_inject_fault(rank, "save", self.meta["step"])  # shards written, no manifest
        if rank == 0:
            manifest.commit(self.tmp, self.final, self.meta, files)
        return self.final


def _write_in_background(
    state: dict, tmp: Path, writer: FileSystemWriter, process_group, stager: BackgroundStager | None
) -> tuple[Future, Future | None]:
    """Start an async save: (the write-and-seal job, the background copy or None).

    Like ``dcp.async_save``, but on one long-lived thread: DCP starts a new thread for every
    save, and on a busy CPU waiting for it to start cost the loop tens of milliseconds.
    """
    # The stager's copy is a Future if it runs in the background; the writer's own is a
    # fresh host copy, made here and freed after the write.
    staging = (stager or writer).stage(state)
    staged = staging if isinstance(staging, Future) else None
    rank = rank_and_world()[0]

    def write() -> dict | None:
        host_state = staged.result() if staged is not None else staging
        dcp.save(host_state, storage_writer=writer, process_group=process_group)
        return manifest.seal_files(tmp) if rank == 0 else None

    # One thread: one save is in flight at a time (a trainer finishes one before the next).
    return _thread("opt-ckpt-write").submit(write), staged


def save_checkpoint(
    final: str | Path,
    *,
    model: Modules,
    model_args: ModelArgs,
    optimizer: Optimizers = None,
    trainer_state: dict | None = None,
    step: int = 0,
    extra_files: dict[str, bytes] | None = None,
    layout: dict | None = None,
    async_save: bool = False,
    process_group=None,
    stager: BackgroundStager | None = None,
) -> Path | PendingCheckpoint:
    """Write a complete checkpoint to ``final`` atomically; every rank must call this.

    ``model``/``optimizer`` may be lists (one per local pipeline stage). ``layout``
    (parallel degrees) is recorded, and ``step`` in the manifest, so a resume under the same layout restores each rank's
    RNG stream, and one under another layout knows not to.

    With ``async_save`` the tensors are staged to host memory and written in the
    background (collectives on ``process_group``, which must not be the training group);
    the returned ``PendingCheckpoint`` commits the manifest when ``finish`` is called.
    Until then the directory is a temporary one that resume never picks. Staging is done
    here, unless ``stager`` (a :class:`~opt.checkpoint.staging.BackgroundStager`) copies in
    the background: then the caller must not change the model or optimizer state before
    the pending checkpoint's ``wait_until_staged``.
    """
    final = Path(final)
    rank, world = rank_and_world()
    tmp = manifest.temporary_path(final)
    if rank == 0:
        manifest.begin(final)
    barrier()
    if optimizer is not None:
        model_sd, optim_sd = {}, {}
        for part_model, part_optim in _training_states(model, optimizer):
            model_sd.update(part_model)
            optim_sd.update(part_optim)
        state = {"model": model_sd, "optim": optim_sd}
    else:
        state = {"model": _model_state(model)}
    # The small files go first: a rank joins DCP's collectives only after writing them, so
    # when the coordinator's save completes every rank's files are in place.
    if trainer_state is not None:
        torch.save(rng_state(), tmp / f"rng_rank{rank:05d}.pt")
    if rank == 0:
        (tmp / MODEL_ARGS_FILE).write_text(json.dumps(model_args.to_dict(), indent=1))
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_FILE)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
    # IO_THREADS files per rank, written in parallel, and later hashed in parallel.
    writer = FileSystemWriter(tmp, thread_count=manifest.IO_THREADS)
    if async_save:
        written, staged = _write_in_background(state, tmp, writer, process_group, stager)
    else:
        dcp.save(state, storage_writer=writer)
    meta = {
        "step": step,
        "saved_at": time.time(),  # when training first reached this step: for time lost
        "world_size": world,
        "layout": layout or {"world_size": world},
        "contents": ["model"] + (["optim", "trainer"] if optimizer is not None else []),
    }
    if async_save:
        return PendingCheckpoint(final, tmp, meta, written, staged)
    barrier()
    maybe_inject_fault(rank, "save", step)  # every shard written, the manifest not yet
    if rank == 0:
        manifest.commit(tmp, final, meta)
    barrier()
    return final


def load_model_args(path: str | Path) -> ModelArgs:
    path = Path(path)
    manifest.read_manifest(path)
    try:
        return ModelArgs.from_dict(json.loads((path / MODEL_ARGS_FILE).read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as err:
        raise OptError(
            f"corrupt checkpoint {path}: cannot read {MODEL_ARGS_FILE} ({err})"
        ) from None


def _dcp_load(state: dict, path: Path) -> None:
    try:
        dcp.load(state, checkpoint_id=path)
    except Exception as err:  # DCP wraps reader failures in several exception types
        raise OptError(f"corrupt checkpoint {path}: {_first_line(err)}") from None


def load_model_weights(path: str | Path, model: Modules, verify: bool = True) -> dict:
    """Load only the model tensors (into ``model`` or each part, in place); returns the
    manifest. The checkpoint may have been saved under any parallel layout."""
    path = Path(path)
    info = manifest.verify_checkpoint(path) if verify else manifest.read_manifest(path)
    for part in _as_list(model):
        state = {"model": get_model_state_dict(part, options=STATE_OPTIONS)}
        _dcp_load(state, path)
        set_model_state_dict(part, state["model"], options=STATE_OPTIONS)
    return info


def load_model(path: str | Path, device: str | torch.device = "cpu") -> OPTModel:
    """A model of the checkpoint's shape holding its weights (verified against the manifest)."""
    model = empty_model(load_model_args(path), device)
    load_model_weights(path, model)
    return model


def load_training_state(
    path: str | Path,
    model: Modules,
    optimizer: Optimizers,
    layout: dict | None = None,
    verified: bool = False,
) -> dict:
    """Restore model, optimizer and this rank's RNG; returns the trainer state dict.

    DCP reshards: each rank reads the pieces of the saved tensors its own shards cover,
    whatever layout wrote them. One load per local part (every rank holds as many).
    """
    path = Path(path)
    # Sizes always; checksums unless the caller's ranks have just verified them together.
    info = manifest.verify_checkpoint(path, checksums=not verified)
    if "trainer" not in info.get("contents", []):
        raise OptError(
            f"{path} holds weights only; start from it with --checkpoint.init_from instead"
        )
    for part_model, part_optim, (model_sd, optim_sd) in zip(
        _as_list(model), _as_list(optimizer), _training_states(model, optimizer), strict=True
    ):
        state = {"model": model_sd, "optim": optim_sd}
        _dcp_load(state, path)
        set_state_dict(
            part_model,
            part_optim,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=STATE_OPTIONS,
        )
    rank, world = rank_and_world()
    # Per-rank RNG streams only mean something under the same layout; a resharded resume
    # keeps the freshly seeded ones.
    if info.get("layout", {"world_size": info.get("world_size")}) == (
        layout or {"world_size": world}
    ):
        set_rng_state(_load_plain(path / f"rng_rank{rank:05d}.pt"))
    return _load_plain(path / TRAINER_FILE)


def load_trainer_state(path: str | Path) -> dict:
    """Only the small trainer state of a checkpoint (step, data position, factors, ...)."""
    path = Path(path)
    manifest.read_manifest(path)
    return _load_plain(path / TRAINER_FILE)


def _load_plain(file: Path) -> dict:
    """torch.load restricted to tensors and primitives: a checkpoint never runs code."""
    try:
        return torch.load(file, weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError from a truncated zip, ...
        raise OptError(f"corrupt checkpoint: cannot load {file} ({_first_line(err)})") from None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root`` (those with a manifest), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and (child / manifest.MANIFEST).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def prune_checkpoints(
    root: str | Path, keep_last: int, protect: set[Path] = frozenset(), background: bool = False
) -> Future | None:
    """Delete all but the newest ``keep_last`` complete checkpoints (and any in ``protect``).

    Each one is first renamed to a hidden ``.step_*.discarded`` (atomic, so resume never
    sees a half-deleted checkpoint), then deleted. Deleting a large checkpoint's files takes
    a while (0.2 s for 825 MB here); with ``background`` it runs in a worker thread and the
    returned future says when it is done. Interpreter exit waits for it; a process killed
    first leaves the hidden directory, which the next prune removes."""
    root = Path(root)
    hidden = []
    if root.is_dir():  # left behind by a rollback, or by a job that died while deleting
        hidden = sorted(root.glob(".step_*.discarded"))
    if keep_last > 0:
        for path in list_checkpoints(root)[:-keep_last]:
            if path not in protect:
                discarded = path.with_name(f".{path.name}.discarded")
                shutil.rmtree(discarded, ignore_errors=True)  # an older copy of the same step
                os.replace(path, discarded)
                hidden.append(discarded)
    if not background:
        _delete_all(hidden)
        return None
    return _thread("opt-ckpt-prune").submit(_delete_all, hidden)


def _delete_all(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)  # a sweep may race a background delete


@functools.cache
def _thread(name: str) -> ThreadPoolExecutor:
    """One long-lived worker thread per name and process, made on first use."""
    return ThreadPoolExecutor(1, thread_name_prefix=name)
