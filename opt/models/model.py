"""The OPT decoder in plain single-device PyTorch.

Nothing here imports torch.distributed, and nothing here is a switch: tensor, pipeline and
data parallelism, and the faster kernels a run may choose (the chunked head + loss, the
sparse embedding gradient, bf16 via fp32 on CPUs), are applied from outside by
opt/parallel. Three properties make that possible:
- blocks live in an ``nn.ModuleDict`` keyed by layer id, and ``forward`` walks whatever is
  left, so a pipeline stage is this model with blocks (and the embedding or head) removed;
- the attention kernel and the tied head are modules of their own, so they can be swapped;
- modules can be built on the meta device and filled later by ``init_weights``.

Inference adds one optional argument, a :class:`KVCache`: ``forward`` with a cache (or a
padding mask) takes the cached path, and without either it is the training path unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from opt.errors import OptError
from opt.models.init import init_parameters
from opt.models.sizes import ModelArgs

# OPT's learned positions start at index 2 (fairseq reserved 0 and 1 for padding).
POSITION_OFFSET = 2


class ScaledDotProductAttention(nn.Module):
    """Causal attention of (B, H, T, Dh) queries, keys and values: PyTorch's fused kernel;
    with ``mask`` (B, 1, T, T) bool, attention where it is True (packed examples)."""

    def forward(self, q, k, v, dropout_p: float, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)


@dataclass
class KVCache:
    """Keys and values of every position a model has seen, for decoding token by token.

    Allocated once for ``capacity`` positions: each forward writes its keys and values in
    place (no concatenation, so a step allocates nothing that grows), and ``valid`` records
    which positions hold real tokens, so that a left-padded batch attends past its padding.
    """

    keys: dict[str, torch.Tensor]  # layer id -> (B, H, capacity, Dh)
    values: dict[str, torch.Tensor]
    valid: torch.Tensor  # (B, capacity) bool: a real token, not padding
    length: int = 0  # positions filled

    @classmethod
    def allocate(cls, model: OPTModel, batch: int, capacity: int) -> KVCache:
        args, weight = model.args, model.embed_positions.weight
        shape = (batch, args.n_heads, capacity, args.head_dim)

        def buffers() -> dict[str, torch.Tensor]:
            return {
                name: torch.empty(shape, dtype=weight.dtype, device=weight.device)
                for name in model.layers
            }

        valid = torch.zeros(batch, capacity, dtype=torch.bool, device=weight.device)
        return cls(buffers(), buffers(), valid)

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]


@dataclass(frozen=True)
class CachedAttention:
    """One layer's part of a cached forward: store the new keys and values at ``start`` and
    attend over every position so far, under ``mask`` (B, 1, T, start + T) when plain
    causal attention is not enough."""

    keys: torch.Tensor  # (B, H, capacity, Dh)
    values: torch.Tensor
    start: int
    mask: torch.Tensor | None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        end = self.start + k.shape[2]
        self.keys[:, :, self.start : end] = k
        self.values[:, :, self.start : end] = v
        k, v = self.keys[:, :, :end], self.values[:, :, :end]
        if self.mask is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)
        # No padding: a single new token sees everything; a first chunk is plain causal.
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.head_dim = args.head_dim
        self.attn_dropout = args.attn_dropout
        d = args.d_model
        # Separate q/k/v (not one fused qkv) so a column-parallel plan shards each by heads.
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.sdpa = ScaledDotProductAttention()
        self.out_proj = nn.Linear(d, d)

    def forward(
        self,
        x: torch.Tensor,
        cached: CachedAttention | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        # -1 rather than n_heads: under tensor parallelism each rank holds only its heads.
        q = self.q_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        if cached is None:
            drop = self.attn_dropout if self.training else 0.0
            # (B, H, T, Dh); the mask only when there is one, so pretraining's call is as it was
            y = self.sdpa(q, k, v, drop) if mask is None else self.sdpa(q, k, v, drop, mask)
        else:
            y = cached(q, k, v)
        y = y.transpose(1, 2).reshape(batch, seq, -1)  # (B, T, D)
        return self.out_proj(y)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.fc1 = nn.Linear(args.d_model, args.ffn_dim)
        self.fc2 = nn.Linear(args.ffn_dim, args.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class Block(nn.Module):
    """One decoder layer; pre-LN for every OPT size but 350M, which is post-LN."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.pre_norm = args.pre_norm
        self.dropout = args.dropout
        self.attn_norm = nn.LayerNorm(args.d_model)
        self.attn = Attention(args)
        self.ffn_norm = nn.LayerNorm(args.d_model)
        self.ffn = FeedForward(args)

    def forward(  # (B, T, D) -> (B, T, D)
        self,
        x: torch.Tensor,
        cached: CachedAttention | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        drop = self.dropout if self.training else 0.0
        if self.pre_norm:
            a = self.attn(self.attn_norm(x), cached=cached, mask=mask)
            x = x + F.dropout(a, drop, self.training)
            return x + F.dropout(self.ffn(self.ffn_norm(x)), drop, self.training)
        x = self.attn_norm(
            x + F.dropout(self.attn(x, cached=cached, mask=mask), drop, self.training)
        )
        return self.ffn_norm(x + F.dropout(self.ffn(x), drop, self.training))


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss, computed in fp32 whatever the autocast dtype."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


class LMHead(nn.Module):
    """The tied output projection: logits, or with targets the mean loss. A module without
    parameters of its own (the weight is the embedding matrix) so that a tensor-parallel
    plan can lay out its input and a run can swap in a head that never builds the whole
    batch's logits (opt/models/fused_loss.py)."""

    def forward(
        self, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        logits = F.linear(h, weight)  # (B, T, D) -> (B, T, V)
        return logits if targets is None else cross_entropy(logits, targets)


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """Causal attention within each packed example: a query sees the keys at or before it
    that carry its segment id ((B, T) ints; padding is one segment of its own, so no row is
    empty). (B, 1, T, T) bool."""
    seq = segments.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=segments.device).tril()
    return (segments[:, :, None] == segments[:, None, :]).unsqueeze(1) & causal


def causal_padding_mask(valid: torch.Tensor, start: int) -> torch.Tensor:
    """Which keys (of ``valid`` (B, S) real-token flags) each query at positions start..S-1
    attends to: those at or before it that are real tokens, and always itself, so that a
    padding query's row is never empty (an empty row makes NaN, and the padding's keys and
    values would carry it into every real row: weight 0 times NaN). (B, 1, T, S) bool."""
    keys = torch.arange(valid.shape[1], device=valid.device)
    queries = keys[start:, None]  # (T, 1)
    return ((keys <= queries) & valid[:, None, None, :]) | (keys == queries)


# Wrappers (activation checkpointing, torch.compile) insert these into parameter names.
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def canonical_name(name: str) -> str:
    """A parameter's name as in the plain model, whatever wrappers were applied."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


class OPTModel(nn.Module):
    """OPT decoder with tied input/output embeddings; ``forward`` maps tokens to logits.

    A pipeline stage is this module with parts set to None or deleted: without
    ``embed_positions`` the input is taken as hidden states, and without ``lm_head`` the
    hidden states are returned instead of logits.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.word_embed_dim)
        self.embed_positions = nn.Embedding(args.max_positions + POSITION_OFFSET, args.d_model)
        self.project_in = (
            nn.Linear(args.word_embed_dim, args.d_model, bias=False)
            if args.projects_embeddings
            else None
        )
        self.layers = nn.ModuleDict({str(i): Block(args) for i in range(args.n_layers)})
        self.final_norm = nn.LayerNorm(args.d_model) if args.pre_norm else None
        self.project_out = (
            nn.Linear(args.d_model, args.word_embed_dim, bias=False)
            if args.projects_embeddings
            else None
        )
        self.lm_head = LMHead()

    def embed(  # (B, T) int -> (B, T, D)
        self, tokens: torch.Tensor, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token plus position embeddings; ``positions`` ((T,) or (B, T), counted from 0)
        default to 0..T-1, a batch that is neither padded nor continuing a cache."""
        seq = tokens.shape[1]
        last = seq - 1 if positions is None else int(positions.max())
        if last >= self.args.max_positions:
            raise OptError(
                f"sequence length {last + 1} exceeds the model's "
                f"max_positions={self.args.max_positions}"
            )
        # Called as a module (not F.embedding) so a tensor-parallel plan's hooks run.
        h = self.embed_tokens(tokens)
        if self.project_in is not None:
            h = self.project_in(h)
        if positions is None:
            positions = torch.arange(POSITION_OFFSET, seq + POSITION_OFFSET, device=tokens.device)
        else:
            positions = positions + POSITION_OFFSET
        return h + self.embed_positions(positions)

    def head(self, h: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) from hidden states (B, T, D); with targets, the mean loss."""
        if self.final_norm is not None:
            h = self.final_norm(h)
        if self.project_out is not None:
            h = self.project_out(h)
        # Tied output: reuse the embedding matrix instead of a separate lm_head parameter.
        # Targets by keyword: a tensor-parallel plan lays out the positional inputs only.
        return self.lm_head(h, self.embed_tokens.weight, targets=targets)

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        padding_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits, or with ``targets`` the mean next-token loss (computed inside forward so
        that a wrapper's hooks, FSDP's unsharding included, cover the tied head).

        Packed examples (fine-tuning): ``positions`` (B, T) restart at 0 for each example
        and ``segments`` (B, T) number them, so no token attends outside its own example.
        With a ``cache`` or a ``padding_mask`` this is inference: see :meth:`hidden_states`.
        """
        if cache is not None or padding_mask is not None:
            return self.head(self.hidden_states(tokens, cache, padding_mask), targets)
        h = self.embed(tokens, positions) if self.embed_positions is not None else tokens
        if segments is None:
            for layer in self.layers.values():
                h = layer(h)
        else:
            mask = segment_mask(segments)
            for layer in self.layers.values():
                h = layer(h, mask=mask)
        return self.head(h, targets) if self.lm_head is not None else h

    def hidden_states(
        self,
        tokens: torch.Tensor,
        cache: KVCache | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The last block's output (B, T, D) for ``tokens`` (B, T) following the positions
        already in ``cache`` (none without one), which it extends. Inference, on the whole
        model: dropout must be off (``eval()``).

        ``padding_mask`` (B, T) marks real tokens True; padding (on the left, for a batch of
        prompts of different lengths) is attended by nothing after it, and positions count
        real tokens only, as transformers' OPT counts them (the cumulative sum of the mask),
        so a padded row computes what it would alone.
        """
        batch, seq = tokens.shape
        if cache is None:
            cache = KVCache.allocate(self, batch, seq)
        start, end = cache.length, cache.length + seq
        if end > cache.capacity:
            raise OptError(f"{end} positions overflow a KV cache of {cache.capacity}")
        cache.valid[:, start:end] = True if padding_mask is None else padding_mask
        valid = cache.valid[:, :end]
        padded = not bool(valid.all())
        if padded:
            # Padding sits at position -1 (row 1 of the table, fairseq's padding row).
            positions = (valid.cumsum(1) * valid - 1)[:, start:]
            mask = causal_padding_mask(valid, start)
        else:
            positions = torch.arange(start, end, device=tokens.device)
            mask = None
        h = self.embed(tokens, positions)
        for name, layer in self.layers.items():
            h = layer(h, CachedAttention(cache.keys[name], cache.values[name], start, mask))
        cache.length = end
        return h

    def init_rule(self, name: str) -> tuple[str, float]:
        """OPT's init for one parameter: (normal, 0.006) for weights, with the projections
        that write into the residual stream scaled down by 1/sqrt(2L); ones and zeros for
        LayerNorms and biases."""
        name = canonical_name(name)
        if "norm." in name:
            return ("ones", 0.0) if name.endswith("weight") else ("zeros", 0.0)
        if name.endswith("bias"):
            return "zeros", 0.0
        std = self.args.init_std
        if name.endswith(("out_proj.weight", "fc2.weight")):
            return "normal", std / math.sqrt(2 * self.args.n_layers)
        return "normal", std

    def init_weights(self, seed: int = 0) -> None:
        """Initialise every parameter present (a pipeline stage holds only some); values
        depend on the seed and the parameter's name and position, not on the layout."""
        named = [(canonical_name(n), p) for n, p in self.named_parameters()]
        init_parameters(named, self.init_rule, seed)


def empty_model(args: ModelArgs, device: str | torch.device = "cpu") -> OPTModel:
    """Build on meta and allocate uninitialised storage: for weights about to be loaded
    (initialising first would be wasted work, and slow at 175B)."""
    with torch.device("meta"):
        model = OPTModel(args)
    return model.to_empty(device=device)


def build_model(args: ModelArgs, device: str | torch.device = "cpu", seed: int = 0) -> OPTModel:
    """Build on meta, then allocate on ``device`` and initialise: the path parallel code takes."""
    model = empty_model(args, device)
    model.init_weights(seed)
    return model


def count_parameters(args: ModelArgs) -> int:
    """Exact parameter count (tied embedding counted once), computed on the meta device."""
    with torch.device("meta"):
        model = OPTModel(args)
    return sum(p.numel() for p in model.parameters())
