"""Saving and loading training state with torch.distributed.checkpoint (DCP).

Model and optimizer tensors go through DCP from the start, so the same code saves a single
process today and a sharded, reshardable layout once parallelism is applied. The small
trainer state (step, schedule, loss scale, data position) and each rank's RNG state are
plain tensors/primitives saved with ``torch.save`` and read back with ``weights_only=True``:
nothing the project loads is ever unpickled freely.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from opt.checkpoint import manifest
from opt.errors import OptError
from opt.models.model import OPTModel, empty_model
from opt.models.sizes import ModelArgs

# DCP warns on every call without a process group; one process is a supported layout here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)

STEP_DIR = re.compile(r"^step_(\d+)$")
MODEL_ARGS_FILE = "model.json"
TRAINER_FILE = "trainer.pt"


def checkpoint_path(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    final: str | Path,
    *,
    model: torch.nn.Module,
    model_args: ModelArgs,
    optimizer: torch.optim.Optimizer | None = None,
    trainer_state: dict | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write a complete checkpoint to ``final`` atomically; every rank must call this."""
    final = Path(final)
    rank, world = _rank_world()
    tmp = manifest.temporary_path(final)
    if rank == 0:
        manifest.begin(final)
    _barrier()
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    else:
        dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=tmp)
    if trainer_state is not None:
        torch.save(rng_state(), tmp / f"rng_rank{rank:05d}.pt")
    if rank == 0:
        (tmp / MODEL_ARGS_FILE).write_text(json.dumps(model_args.to_dict(), indent=1))
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_FILE)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
    _barrier()
    if rank == 0:
        meta = {
            "step": (trainer_state or {}).get("step", 0),
            "world_size": world,
            "contents": ["model"] + (["optim", "trainer"] if optimizer is not None else []),
        }
        manifest.commit(tmp, final, meta)
    _barrier()
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


def load_model_weights(path: str | Path, model: torch.nn.Module, verify: bool = True) -> dict:
    """Load only the model tensors (into ``model``, in place); returns the manifest."""
    path = Path(path)
    info = manifest.verify_checkpoint(path) if verify else manifest.read_manifest(path)
    state = {"model": get_model_state_dict(model)}
    _dcp_load(state, path)
    set_model_state_dict(model, state["model"])
    return info


def load_model(path: str | Path, device: str | torch.device = "cpu") -> OPTModel:
    """A model of the checkpoint's shape holding its weights (verified against the manifest)."""
    model = empty_model(load_model_args(path), device)
    load_model_weights(path, model)
    return model


def load_training_state(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict:
    """Restore model, optimizer and this rank's RNG; returns the trainer state dict."""
    path = Path(path)
    info = manifest.verify_checkpoint(path)
    if "trainer" not in info.get("contents", []):
        raise OptError(
            f"{path} holds weights only; start from it with --checkpoint.init_from instead"
        )
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    _dcp_load(state, path)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    rank, world = _rank_world()
    # Per-rank RNG streams only mean something under the same world size; a resharded
    # resume keeps the freshly seeded ones.
    if info.get("world_size") == world:
        set_rng_state(_load_plain(path / f"rng_rank{rank:05d}.pt"))
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


def prune_checkpoints(root: str | Path, keep_last: int, protect: set[Path] = frozenset()) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (and any in ``protect``)."""
    if keep_last <= 0:
        return
    found = list_checkpoints(root)
    for path in found[:-keep_last]:
        if path not in protect:
            shutil.rmtree(path)
