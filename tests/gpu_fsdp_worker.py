"""FSDP's bf16 gathers on one GPU, started by tests/test_gpu.py in a process of its own.

The trainer shards only when dp > 1, with one rank per GPU (NCCL refuses two ranks on one
device), so on one GPU its own FSDP path cannot run. This process applies the trainer's
FSDP (``opt.parallel.data_parallel.apply_fsdp`` with bf16 ``param_dtype``, as
``parallel.fsdp_mixed_precision`` does) over a one-rank NCCL mesh, and trains the same
model beside it without FSDP under plain bf16 autocast. It writes to the JSON file named by
argv[1]: the dtype of every parameter as each module's forward saw it, the type and dtype
of the parameters and gradients after a backward, each step's loss, and each gradient's
distance from the plain model's after the first backward.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from opt.config import OptimConfig
from opt.models.model import OPTModel, canonical_name
from opt.models.sizes import get_model_args
from opt.parallel.compute import apply_compute
from opt.parallel.data_parallel import apply_fsdp
from opt.parallel.dims import ParallelDims
from opt.parallel.parallelize import ParallelModel, materialize
from opt.train.optim import build_optimizer

STEPS = 3
BATCH, SEQ = 4, 32


def build(fsdp: bool, mesh, device: torch.device) -> OPTModel:
    args = get_model_args("opt-tiny").reshaped(n_layers=2, d_model=64, vocab_size=512)
    args = args.replace(dropout=0.0)  # one forward each: nothing random between the two
    with torch.device("meta"):
        model = OPTModel(args)
    # The compute swaps a data-parallel part takes (the chunked head + loss), on both.
    apply_compute(model, loss_chunk=4096, data_parallel=True)
    if fsdp:
        apply_fsdp(model, mesh, reshard_after_forward=True, param_dtype=torch.bfloat16)
    materialize(ParallelModel(ParallelDims(1, dp_shard=1), [model]), device, seed=0)
    return model


def watch_forward_dtypes(model: nn.Module) -> dict[str, str]:
    """{parameter: dtype} as each Linear, LayerNorm and Embedding sees it in its forward."""
    seen: dict[str, str] = {}

    def hook(prefix: str):
        def record(module: nn.Module, _inputs) -> None:
            for name, param in module.named_parameters(recurse=False):
                seen[canonical_name(f"{prefix}.{name}")] = str(param.dtype)

        return record

    for prefix, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.LayerNorm, nn.Embedding)):
            module.register_forward_pre_hook(hook(prefix))
    return seen


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def main() -> None:
    out = sys.argv[1]
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1,
                            device_id=device)  # fmt: skip
    try:
        mesh = init_device_mesh("cuda", (1,), mesh_dim_names=("dp_shard",))
        generator = torch.Generator().manual_seed(0)
        tokens = [torch.randint(0, 512, (BATCH, SEQ + 1), generator=generator)
                  for _ in range(STEPS)]  # fmt: skip
        report: dict = {}
        grads: dict[str, dict[str, torch.Tensor]] = {}
        for kind in ("plain", "fsdp"):
            model = build(kind == "fsdp", mesh, device)
            optimizer = build_optimizer(model, OptimConfig(lr=1e-3))
            seen = watch_forward_dtypes(model)
            losses = []
            for step, batch in enumerate(tokens):
                batch = batch.to(device)
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(batch[:, :-1], batch[:, 1:])
                loss.backward()
                losses.append(loss.item())
                if step == 0:
                    named = [(canonical_name(n), p) for n, p in model.named_parameters()]
                    grads[kind] = {n: full(p.grad).detach().float().clone() for n, p in named}
                    report[f"{kind}_after_backward"] = {
                        n: {
                            "param": type(p).__name__, "param_dtype": str(p.dtype),
                            "grad": type(p.grad).__name__, "grad_dtype": str(p.grad.dtype),
                        }
                        for n, p in named
                    }  # fmt: skip
                optimizer.step()
            report[f"{kind}_forward_dtypes"] = seen
            report[f"{kind}_losses"] = losses
        report["grad_distance"] = {
            name: (torch.linalg.vector_norm(grads["fsdp"][name] - reference)
                   / torch.linalg.vector_norm(reference)).item()
            for name, reference in grads["plain"].items()
        }  # fmt: skip
    finally:
        dist.destroy_process_group()
    with open(out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
