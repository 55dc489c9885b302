"""The CheckpointManager on a tiny model, one process: what it saves and restores (every
piece it is handed, the RNG included), retention and what it protects, the checkpoints a
rollback hides, and the choice of where to resume. Seconds, no training loop."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from opt.checkpoint import checkpointer
from opt.checkpoint.manager import CheckpointManager, step_of
from opt.config import CheckpointConfig
from opt.errors import OptError
from opt.models.model import build_model
from opt.models.sizes import ModelArgs

ARGS = ModelArgs(n_layers=1, n_heads=2, d_model=16, vocab_size=32, max_positions=16)
LAYOUT = {"world_size": 1, "pp": 1, "dp_replicate": 1, "dp_shard": 1, "tp": 1}


@dataclass
class Counter:
    value: int = 0

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def _parts(seed: int = 0):
    model = build_model(ARGS, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randint(0, 32, (2, 8))).sum().backward()
    optimizer.step()
    return model, optimizer


def _manager(tmp_path, model, optimizer, pieces, protect=None, **cfg) -> CheckpointManager:
    config = CheckpointConfig(**{"async_save": False, "keep_last": 0, **cfg})
    return CheckpointManager(
        config, tmp_path / "ckpt", model_parts=[model], optimizers=[optimizer], states=pieces,
        model_args=ARGS, layout=LAYOUT, device=torch.device("cpu"), protect=protect,
        extra_files={"note.txt": b"hello"},
    )  # fmt: skip


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_everything_handed_over_comes_back(tmp_path, async_save):
    model, optimizer = _parts()
    pieces = {"progress": Counter(7), "other": Counter(3)}
    manager = _manager(tmp_path, model, optimizer, pieces, async_save=async_save)
    torch.manual_seed(123)
    manager.save(7)
    manager.close()
    expected_draw = torch.rand(4)
    path = manager.latest()
    assert path.name == "step_00000007" and (path / "note.txt").read_bytes() == b"hello"
    assert manager.read_states(path) == {"progress": {"value": 7}, "other": {"value": 3}}

    fresh, fresh_optim = _parts(seed=1)
    restored = {"progress": Counter(), "other": Counter()}
    again = _manager(tmp_path, fresh, fresh_optim, restored)
    assert again.resume() == path
    assert (restored["progress"].value, restored["other"].value) == (7, 3)
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(), strict=True)
    )
    assert optimizer.state_dict()["state"][0]["exp_avg"].equal(
        fresh_optim.state_dict()["state"][0]["exp_avg"]
    )
    assert torch.equal(torch.rand(4), expected_draw)  # the RNG stream went on where it was


def test_a_piece_kept_by_the_caller_is_not_restored(tmp_path):
    model, optimizer = _parts()
    pieces = {"progress": Counter(5), "supervisor": Counter(1)}
    manager = _manager(tmp_path, model, optimizer, pieces)
    path = manager.save(5)
    pieces["progress"].value, pieces["supervisor"].value = 9, 4
    manager.load(path, keep={"supervisor"})
    assert (pieces["progress"].value, pieces["supervisor"].value) == (5, 4)


def test_a_checkpoint_without_a_piece_is_refused_by_name(tmp_path):
    model, optimizer = _parts()
    manager = _manager(tmp_path, model, optimizer, {"progress": Counter(1)})
    path = manager.save(1)
    other = _manager(tmp_path, model, optimizer, {"progress": Counter(), "data": Counter()})
    with pytest.raises(OptError, match="has no 'data' state"):
        other.load(path)


def test_the_old_flat_trainer_state_reads_by_piece(tmp_path):
    model, optimizer = _parts()
    flat = {"step": 4, "tokens_seen": 40, "lr_scale": 0.9, "grad_clip": 0.6,
            "loss_scaler": {"scale": 1.0}, "data": {"pos": 8}}  # fmt: skip
    path = checkpointer.save_checkpoint(
        checkpointer.checkpoint_path(tmp_path / "ckpt", 4), model=model, model_args=ARGS,
        optimizer=optimizer, trainer_state=flat, step=4,
    )  # fmt: skip
    manager = _manager(tmp_path, model, optimizer, {})
    assert manager.read_states(path) == {
        "progress": {"step": 4, "tokens_seen": 40},
        "factors": {"lr_scale": 0.9, "grad_clip": 0.6},
        "loss_scaler": {"scale": 1.0},
        "data": {"pos": 8},
    }


def test_retention_keeps_the_newest_and_what_is_protected(tmp_path):
    model, optimizer = _parts()
    protected = {}
    manager = _manager(tmp_path, model, optimizer, {}, keep_last=2,
                       protect=lambda found: {p for p in found if step_of(p) == protected.get("step")})  # fmt: skip
    protected["step"] = 2
    for step in (1, 2, 3, 4, 5):
        manager.save(step)
    assert [step_of(p) for p in manager.checkpoints()] == [2, 4, 5]
    assert not list((tmp_path / "ckpt").glob(".*"))  # pruned ones deleted, not just hidden
    assert manager.due(10, last=False) is False and manager.due(1000, last=False)
    assert manager.due(3, last=True)


def test_a_rollback_hides_newer_checkpoints_atomically_then_deletes_them(tmp_path):
    model, optimizer = _parts()
    manager = _manager(tmp_path, model, optimizer, {})
    for step in (5, 10, 15):
        manager.save(step)
    target = manager.newest_at_or_before(12)
    assert step_of(target) == 10 and manager.newest_at_or_before(4) is None
    hidden = manager.hide_newer_than(target)
    assert [p.name for p in hidden] == ["step_00000015"]
    assert [step_of(p) for p in manager.checkpoints()] == [5, 10]
    assert (tmp_path / "ckpt" / ".step_00000015.discarded").is_dir()
    manager.delete_hidden()
    assert not list((tmp_path / "ckpt").glob(".*"))


def test_resume_none_a_path_and_init_from(tmp_path):
    model, optimizer = _parts()
    manager = _manager(tmp_path, model, optimizer, {"progress": Counter(3)})
    path = manager.save(3)
    assert (
        _manager(tmp_path, model, optimizer, {"progress": Counter()}, resume="none").resume()
        is None
    )
    named = {"progress": Counter()}
    assert _manager(tmp_path, model, optimizer, named, resume=str(path)).resume() == path
    assert named["progress"].value == 3
    fresh, fresh_optim = _parts(seed=2)
    starter = {"progress": Counter()}
    weights = _manager(tmp_path / "other", fresh, fresh_optim, starter, init_from=str(path))
    assert weights.resume() is None and weights.init_from_weights() == path
    assert starter["progress"].value == 0  # weights only: a fresh run
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(), strict=True)
    )


def test_another_shape_is_refused(tmp_path):
    model, optimizer = _parts()
    path = _manager(tmp_path, model, optimizer, {}).save(1)
    wider = ModelArgs(n_layers=1, n_heads=2, d_model=32, vocab_size=32, max_positions=16)
    other = build_model(wider)
    manager = CheckpointManager(
        CheckpointConfig(), tmp_path / "x", model_parts=[other],
        optimizers=[torch.optim.AdamW(other.parameters())], states={}, model_args=wider,
        layout=LAYOUT, device=torch.device("cpu"),
    )  # fmt: skip
    with pytest.raises(OptError, match="different model shape"):
        manager.load(path)
