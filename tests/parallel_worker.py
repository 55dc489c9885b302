"""One rank of a parallel-exactness run, started by torchrun from tests/test_parallel.py.

Trains ``steps`` steps of a tiny model and writes, to OUT_DIR:
- ``grads_rank{r}.pt``: the full (unsharded) gradient of every parameter this rank's
  pipeline stage(s) hold, after step 1 (clipping is off, so these are the raw gradients);
- ``losses.json`` (rank 0): the loss of every step, as agreed across ranks;
- ``activations.json`` (rank 0): every step's agreed RMS of the last block's output;
- ``valid.json`` (rank 0): the held-out loss before step 1 and after the last step (and
  one after step 1 that the single process does not take: the steps after it must not
  notice it);
- ``rank{r}.pt``: this rank's own copy of every replicated LayerNorm parameter and a draw
  from its RNG after training (what its next dropout mask would come from).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from opt import dist as distributed
from opt.config import load_config
from opt.models.model import canonical_name
from opt.train.trainer import Trainer


def full_gradients(trainer: Trainer) -> dict[str, torch.Tensor]:
    grads = {}
    for part, stage in zip(trainer.model_parts, trainer.parallel.stage_indices, strict=True):
        for name, param in part.named_parameters():
            grad = param.grad
            full = grad.full_tensor() if isinstance(grad, DTensor) else grad
            if name == "embed_tokens.weight" and stage != 0:
                continue  # the last stage's twin of the tied embedding
            grads[canonical_name(name)] = full.detach().clone()
    return grads


def main() -> None:
    out_dir, steps, config, *overrides = sys.argv[1:]
    out = Path(out_dir)
    trainer = Trainer(load_config(config, overrides))
    if steps == "fit":  # the whole loop, supervisor included: record what this rank did
        results = trainer.fit()
        actions = [[r.step, r.decision.rung, r.skipped, trainer.factors.lr_scale] for r in results]
        (out / f"actions_rank{trainer.rank}.json").write_text(json.dumps(actions))
        (out / f"final_rank{trainer.rank}.json").write_text(
            json.dumps(
                [
                    trainer.step,
                    trainer.factors.lr_scale,
                    trainer.factors.grad_clip,
                    trainer.stop is not None and trainer.stop.human_needed,
                ]
            )
        )
        distributed.destroy()
        return
    valid = [trainer.validate().loss]
    results = [trainer.train_step()]
    torch.save(full_gradients(trainer), out / f"grads_rank{trainer.rank}.pt")
    valid.append(trainer.validate().loss)
    results += [trainer.train_step() for _ in range(int(steps) - 1)]
    valid.append(trainer.validate().loss)
    if trainer.rank == 0:
        (out / "losses.json").write_text(json.dumps([r.loss for r in results]))
        (out / "activations.json").write_text(json.dumps([r.activation_rms for r in results]))
        (out / "valid.json").write_text(json.dumps(valid))
    norms = {
        canonical_name(name): (p.to_local() if isinstance(p, DTensor) else p).detach().clone()
        for part in trainer.model_parts
        for name, p in part.named_parameters()
        if "norm" in name
    }
    torch.save({"norms": norms, "draw": torch.rand(8)}, out / f"rank{trainer.rank}.pt")
    distributed.destroy()


if __name__ == "__main__":
    main()
