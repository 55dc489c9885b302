"""Checkpoints: atomic under a crash, complete by manifest, corruption refused, safe loading."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from opt import checkpoint as ckpt
from opt.checkpoint import checkpointer, manifest
from opt.checkpoint.checkpointer import checkpoint_path
from opt.errors import OptError
from opt.fsutil import sha256_file
from opt.models.model import build_model
from opt.models.sizes import ModelArgs

ARGS = ModelArgs(n_layers=2, n_heads=2, d_model=16, vocab_size=50, max_positions=16)


def _trained(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(ARGS, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randint(0, 50, (2, 8))).sum().backward()
    optimizer.step()
    return model, optimizer


def _save(root, step, model, optimizer):
    return ckpt.save_checkpoint(
        checkpoint_path(root, step),
        model=model,
        model_args=ARGS,
        optimizer=optimizer,
        trainer_state={"step": step, "note": torch.tensor([1.0, 2.0])},
    )


def test_save_then_load_restores_model_optimizer_rng_and_trainer_state(tmp_path):
    model, optimizer = _trained()
    rng_before = torch.get_rng_state()
    path = _save(tmp_path, 3, model, optimizer)
    torch.rand(5)  # move the RNG on; loading must bring it back
    fresh, fresh_opt = build_model(ARGS), None
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    state = ckpt.load_training_state(path, fresh, fresh_opt)
    assert state["step"] == 3 and torch.equal(state["note"], torch.tensor([1.0, 2.0]))
    assert torch.equal(torch.get_rng_state(), rng_before)
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
    saved = optimizer.state_dict()["state"]
    loaded = fresh_opt.state_dict()["state"]
    assert all(torch.equal(saved[i]["exp_avg_sq"], loaded[i]["exp_avg_sq"]) for i in saved)
    assert ckpt.load_model_args(path) == ARGS


def test_a_crash_before_the_manifest_leaves_nothing_loadable(tmp_path, monkeypatch):
    from opt.faults import InjectedFault

    model, optimizer = _trained()
    good = _save(tmp_path, 1, model, optimizer)
    # Every shard written, then the process fails before the manifest that commits them.
    monkeypatch.setenv("OPT_INJECT_FAULT", "0:save:raise")
    with pytest.raises(InjectedFault):
        _save(tmp_path, 2, model, optimizer)
    monkeypatch.undo()
    assert manifest.temporary_path(checkpoint_path(tmp_path, 2)).exists()  # the debris
    assert not checkpoint_path(tmp_path, 2).exists()
    assert ckpt.latest_checkpoint(tmp_path) == good
    # The next save of that step clears the debris and completes.
    assert _save(tmp_path, 2, model, optimizer) == ckpt.latest_checkpoint(tmp_path)
    assert not manifest.temporary_path(checkpoint_path(tmp_path, 2)).exists()


def test_a_directory_without_manifest_is_not_a_checkpoint(tmp_path):
    (tmp_path / "step_00000009").mkdir()
    assert ckpt.list_checkpoints(tmp_path) == []
    with pytest.raises(OptError, match="not a complete checkpoint"):
        ckpt.load_model_args(tmp_path / "step_00000009")
    with pytest.raises(OptError, match="checkpoint not found"):
        ckpt.load_model_args(tmp_path / "missing")


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest"])
def test_corruption_is_refused_with_a_clear_error(tmp_path, damage):
    model, optimizer = _trained()
    path = _save(tmp_path, 1, model, optimizer)
    shard = next(path.glob("*.distcp"))
    if damage == "flip":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
        message = "fails its checksum"
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-10])
        message = "has .* bytes, the manifest says"
    elif damage == "delete":
        shard.unlink()
        message = "missing file"
    else:
        (path / "manifest.json").write_text("{not json")
        message = "unreadable"
    fresh = build_model(ARGS)
    with pytest.raises(OptError, match=message):
        ckpt.load_training_state(path, fresh, torch.optim.AdamW(fresh.parameters()))


def test_trainer_state_is_loaded_without_unpickling_arbitrary_objects(tmp_path):
    """A pickled object in trainer.pt (manifest updated to match) is refused, never run."""
    model, optimizer = _trained()
    path = _save(tmp_path, 1, model, optimizer)
    torch.save({"step": 1, "payload": _Payload()}, path / "trainer.pt")
    info = json.loads((path / "manifest.json").read_text())
    info["files"]["trainer.pt"] = {
        "bytes": (path / "trainer.pt").stat().st_size,
        "sha256": sha256_file(path / "trainer.pt"),
    }
    (path / "manifest.json").write_text(json.dumps(info))
    fresh = build_model(ARGS)
    with pytest.raises(OptError, match="cannot load"):
        ckpt.load_training_state(path, fresh, torch.optim.AdamW(fresh.parameters()))


class _Payload:
    pass


def test_retention_keeps_the_newest_and_protected(tmp_path):
    model, optimizer = _trained()
    paths = [_save(tmp_path, step, model, optimizer) for step in (1, 2, 3, 4)]
    ckpt.prune_checkpoints(tmp_path, keep_last=2, protect={paths[0]})
    assert ckpt.list_checkpoints(tmp_path) == [paths[0], paths[2], paths[3]]


def test_pruning_in_the_background_hides_at_once_and_deletes_later(tmp_path, monkeypatch):
    """The loop's commit only renames; the deletion runs in a thread. A leftover hidden
    directory (a job killed mid-delete) is swept by the next prune."""
    model, optimizer = _trained()
    paths = [_save(tmp_path, step, model, optimizer) for step in (1, 2, 3)]
    (tmp_path / ".step_00000000.discarded").mkdir()  # left by a killed job
    release = threading.Event()
    real_delete = checkpointer._delete_all

    def held_delete(hidden):
        release.wait(timeout=30)
        real_delete(hidden)

    monkeypatch.setattr(checkpointer, "_delete_all", held_delete)
    future = ckpt.prune_checkpoints(tmp_path, keep_last=1, background=True)
    # Before any file is deleted, resume sees only the kept checkpoint.
    assert ckpt.list_checkpoints(tmp_path) == [paths[2]]
    assert not paths[0].exists() and (tmp_path / f".{paths[0].name}.discarded").is_dir()
    assert not future.done()
    release.set()
    future.result(timeout=30)
    assert sorted(p.name for p in tmp_path.iterdir()) == [paths[2].name]


def test_weights_only_checkpoint_loads_weights_but_cannot_resume(tmp_path):
    model, _ = _trained()
    path = ckpt.save_checkpoint(tmp_path / "w", model=model, model_args=ARGS)
    fresh = build_model(ARGS)
    ckpt.load_model_weights(path, fresh)
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(), strict=True)
    )
    with pytest.raises(OptError, match="weights only"):
        ckpt.load_training_state(path, fresh, torch.optim.AdamW(fresh.parameters()))
