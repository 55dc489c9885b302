"""How this rank's model part computes: kernels swapped into the plain model from outside,
as the tensor-parallel plan is applied, so that opt/models/model.py holds no switches.

Each swap keeps the model's numbers (the tests hold each to the plain model's), and each
applies only where it can:

- **the chunked head + loss** (opt/models/fused_loss.py, ``train.loss_chunk``) replaces the
  tied head of a part that holds the whole head, outside tensor parallelism: the loss is
  then computed inside ``forward(tokens, targets)`` without the whole batch's logits;
- **the sparse embedding gradient** on a whole, unsharded model: with the head tied, the
  weight's gradient is dense anyway (the head's GEMM), and a sparse lookup gradient is added
  into it row by row instead of materialising and adding a second dense vocab x d matrix
  (154 MB at 125M) every backward. FSDP and DTensor weights cannot take sparse gradients,
  and a first pipeline stage without the head would only make a sparse gradient;
- **bf16 via fp32 on CPUs** (opt/models/kernels.py, ``train.cpu_bf16_compute``): the
  blocks' linears, their attention and the tied head compute bf16 from exact fp32 copies.
  350M's embedding projections stay native, as they always were.
"""

from __future__ import annotations

from torch import nn

from opt.models.fused_loss import ChunkedLossHead
from opt.models.kernels import Bf16ViaFp32Attention, Bf16ViaFp32Head, Bf16ViaFp32Linear
from opt.models.model import Attention, FeedForward, OPTModel, ScaledDotProductAttention


def is_whole(model: OPTModel) -> bool:
    """Whether this part embeds tokens and ends in the head: no pipeline cut it."""
    return model.embed_positions is not None and model.lm_head is not None


def use_bf16_via_fp32(model: OPTModel) -> None:
    """Swap each block's linears and attention, and the head, for their bf16-via-fp32 kind."""
    for module in list(model.modules()):
        if isinstance(module, (Attention, FeedForward)):
            for name, child in list(module.named_children()):
                if type(child) is nn.Linear:
                    setattr(module, name, _bf16_via_fp32_linear(child))
                elif type(child) is ScaledDotProductAttention:
                    setattr(module, name, Bf16ViaFp32Attention())
    if model.lm_head is not None and not isinstance(model.lm_head, ChunkedLossHead):
        model.lm_head = Bf16ViaFp32Head()


def _bf16_via_fp32_linear(linear: nn.Linear) -> Bf16ViaFp32Linear:
    """The same parameters (meta or allocated) in a ``Bf16ViaFp32Linear``."""
    swapped = Bf16ViaFp32Linear(
        linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta"
    )
    swapped.weight, swapped.bias = linear.weight, linear.bias
    return swapped


def use_chunked_loss(model: OPTModel, chunk: int, bf16_via_fp32: bool = False) -> None:
    """The tied head with the chunked loss: ``model(tokens, targets)`` returns the loss."""
    if model.lm_head is None:
        raise ValueError("the chunked loss needs the model's head")
    model.lm_head = ChunkedLossHead(chunk, bf16_via_fp32)


def use_sparse_embedding_grad(model: OPTModel) -> None:
    """The token lookup's gradient as sparse rows, added into the tied head's dense one."""
    if not is_whole(model):
        raise ValueError("a sparse embedding gradient needs the tied head on the same part")
    model.embed_tokens.sparse = True


def apply_compute(
    model: OPTModel,
    *,
    loss_chunk: int = 0,
    bf16_via_fp32: bool = False,
    tensor_parallel: bool = False,
    data_parallel: bool = False,
) -> bool:
    """Every swap this part can take, before any parallel wrapper is applied (under
    ``tensor_parallel`` its weights become DTensors; under ``data_parallel`` FSDP shards
    them); returns whether its forward computes the loss (with targets) by the chunked head."""
    if bf16_via_fp32:
        use_bf16_via_fp32(model)
    whole = is_whole(model)
    fused_loss = loss_chunk > 0 and whole and not tensor_parallel
    if fused_loss:
        use_chunked_loss(model, loss_chunk, bf16_via_fp32)
    if whole and not tensor_parallel and not data_parallel:
        use_sparse_embedding_grad(model)
    return fused_loss
