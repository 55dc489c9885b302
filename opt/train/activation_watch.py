"""The last layer's activation norm, the supervisor's early warning.

The OPT-175B team saw the activation norms of the last layer grow before a divergence
(their logbook, and the OPT paper's §2.5), often while the loss still looked healthy. A
forward hook on the last decoder block sums the squares of its output and counts its
elements over the step's micro-batches; both go into the step's one agreed vector, summed
over every rank that holds the last block, so the agreed root mean square is exact under
every layout: data-parallel replicas and sequence-parallel slices add up to the whole
batch, and a tensor-parallel rank that holds a replicated copy adds to both sums alike.

Only training forwards count (train mode, autograd on): not validation, not the pipeline
schedule's shape inference (no autograd), and not activation checkpointing's recomputation
(which calls the wrapped block, not the outer module the hook is on).
The cost is one reduction over the block's output per micro-batch, a few hundredths of a
percent of the block's FLOPs at d_model 768.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from torch.utils.hooks import RemovableHandle


def training_forward(module: torch.nn.Module) -> bool:
    """Whether a block's forward is training work: train mode with autograd on. An
    evaluation (eval mode, no_grad) and the pipeline schedule's shape inference (no
    autograd) are not; activation checkpointing's recomputation in backward is (autograd
    is on while it reruns the wrapped block)."""
    return module.training and torch.is_grad_enabled()


class LastLayerWatch:
    def __init__(
        self, parts: list[torch.nn.Module], n_layers: int, micro_batches: int,
    ):  # fmt: skip
        """Watch the last block, wherever in ``parts`` it is; a step runs it
        ``micro_batches`` times."""
        self.micro_batches = micro_batches
        self.seen: list[tuple[torch.Tensor, int]] = []  # (sum of squares, elements) per forward
        self.handle: RemovableHandle | None = None
        last = str(n_layers - 1)
        for part in parts:
            layers = getattr(part, "layers", None)
            if layers is not None and last in layers:
                self.handle = layers[last].register_forward_hook(self._seen)

    def _seen(self, module: torch.nn.Module, inputs, output: torch.Tensor) -> None:
        if not training_forward(module):
            return  # an evaluation
        local = output.to_local() if isinstance(output, DTensor) else output
        with torch.no_grad():  # float64 accumulation without a float64 copy of the output
            sum_sq = torch.linalg.vector_norm(local.detach(), dtype=torch.float64) ** 2
        self.seen.append((sum_sq, local.numel()))

    def take(self) -> tuple[torch.Tensor, float] | None:
        """This rank's (sum of squares, element count) over the step's micro-batches, or None
        on a rank without the last block. Only the last ``micro_batches`` forwards count: a
        pipeline schedule's first step runs each stage once more before them, to infer its
        shapes from uninitialised buffers, with autograd on."""
        seen, self.seen = self.seen[-self.micro_batches :], []
        if not seen:
            return None
        return torch.stack([s for s, _ in seen]).sum(), float(sum(n for _, n in seen))
