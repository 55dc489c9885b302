"""Text generation: greedy or sampled decoding with a KV cache, prompts batched with left
padding.

Each prompt starts after OPT's ``</s>``, as every pretraining document does (opt/score.py
scores text the same way). A batch is left-padded so that every row's next token comes out
at the same index; the model's padding mask keeps the padding out of attention and out of
the position count, so a row decodes as it would alone. Sampling follows transformers'
order and definitions (temperature, then top-k, then top-p) and draws from a private
``torch.Generator``, so a seed reproduces a run without touching the global RNG.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from tokenizers import Tokenizer

from opt.data.tokenizer import eos_id
from opt.errors import OptError
from opt.models.model import KVCache, OPTModel

Finish = Literal["eos", "stop", "length"]


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: the most likely one when ``temperature`` is 0, else a
    draw from the softmax of logits / temperature, restricted to the ``top_k`` most likely
    tokens (0: all) and then to the nucleus of probability ``top_p`` (1: all)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:  # also refuses NaN
            raise OptError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise OptError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise OptError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """``logits`` (..., V) with all but the ``k`` largest set to -inf (ties with the k-th
    kept, as transformers keeps them); k = 0 keeps everything."""
    if k == 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """``logits`` (..., V) restricted to the nucleus: the smallest set of most likely tokens
    whose probability reaches ``p`` (a token is dropped when the tokens more likely than it
    already hold ``p``); the most likely token always stays."""
    if p >= 1:
        return logits
    ordered, order = torch.sort(logits, dim=-1, descending=True)
    probs = ordered.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
    drop = before >= p
    drop[..., 0] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def next_tokens(
    logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The next token of each row of ``logits`` (B, V): (B,) ids."""
    if sampling.greedy:
        return logits.argmax(-1)
    logits = top_k_filter(logits.float() / sampling.temperature, sampling.top_k)
    probs = top_p_filter(logits, sampling.top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass(frozen=True)
class Generation:
    """One prompt's continuation: its text (cut before a stop string), the generated token
    ids (without the end-of-document token), and why it ended."""

    text: str
    token_ids: list[int]
    finish: Finish


@torch.inference_mode()
def generate_ids(
    model: OPTModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    eos: int,
    sampling: Sampling = Sampling(),
    generator: torch.Generator | None = None,
    should_stop: Callable[[list[int]], bool] | None = None,
) -> list[tuple[list[int], Finish]]:
    """Continue each token-id prompt, decoding them as one left-padded batch: per prompt the
    new ids (an ``eos`` ends a row and is not included) and why the row ended. A row also
    ends when ``should_stop`` returns True for its ids so far."""
    if model.training:
        raise OptError("generation needs the model in eval mode (dropout off)")
    batch, longest = len(prompts), max(len(p) for p in prompts)
    device = model.embed_tokens.weight.device
    tokens = torch.full((batch, longest), eos, dtype=torch.long)
    real = torch.zeros(batch, longest, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        real[row, longest - len(prompt) :] = True
    tokens, real = tokens.to(device), real.to(device)
    # The last new token is never fed back, so the cache needs one position less.
    cache = KVCache.allocate(model, batch, longest + max_new_tokens - 1)
    padding = real if not bool(real.all()) else None
    # Logits of the last position only: the head over a whole prompt would be wasted work.
    h = model.hidden_states(tokens, cache, padding)[:, -1:]  # (B, 1, D)
    logits = model.head(h)[:, -1]  # (B, V)

    new: list[list[int]] = [[] for _ in range(batch)]
    finish: list[Finish | None] = [None] * batch
    for step in range(max_new_tokens):
        chosen = next_tokens(logits, sampling, generator)  # (B,)
        for row, token in enumerate(chosen.tolist()):
            if finish[row] is not None:
                continue
            if token == eos:
                finish[row] = "eos"
                continue
            new[row].append(token)
            if should_stop is not None and should_stop(new[row]):
                finish[row] = "stop"
        if all(f is not None for f in finish) or step == max_new_tokens - 1:
            break
        logits = model(chosen[:, None], cache=cache)[:, -1]
    return [(ids, f or "length") for ids, f in zip(new, finish, strict=True)]


def generate(
    model: OPTModel,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: Sequence[str] | None = None,
    batch_size: int = 8,
    truncate: bool = False,
) -> list[Generation]:
    """Continue each prompt by up to ``max_new_tokens`` tokens: greedy when ``temperature``
    is 0, else sampled (:class:`Sampling`) from a generator seeded with ``seed`` (the same
    seed, prompts and batch size give the same texts). A continuation ends at the end of a
    document (``</s>``) or once it contains one of the ``stop`` strings, where its text is
    cut. Prompts are decoded ``batch_size`` at a time, longest first (less padding).

    A prompt that leaves no room for ``max_new_tokens`` in the model's positions is refused,
    or with ``truncate`` cut from the left to ``max_positions - max_new_tokens`` tokens,
    ``</s>`` prefix included (lm-eval's Hugging Face backend cuts generation contexts so)."""
    sampling = Sampling(temperature, top_p, top_k)
    if not prompts:
        raise OptError("no prompts to continue")
    if max_new_tokens < 1:
        raise OptError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise OptError(f"batch_size must be >= 1, got {batch_size}")
    stop = [s for s in (stop or []) if s]
    eos = eos_id(tokenizer)
    # OPT starts every document after a </s>; an empty prompt is an unconditional start.
    encoded = [[eos, *tokenizer.encode(p).ids] for p in prompts]
    limit = model.args.max_positions
    if truncate:
        if max_new_tokens >= limit:
            raise OptError(
                f"max_new_tokens={max_new_tokens} leaves no room for a prompt in this "
                f"model's max_positions={limit}"
            )
        encoded = [ids[-(limit - max_new_tokens) :] for ids in encoded]
    for i, ids in enumerate(encoded):
        if len(ids) - 1 + max_new_tokens > limit:
            raise OptError(
                f"prompt {i + 1} is {len(ids) - 1} tokens, which with max_new_tokens="
                f"{max_new_tokens} is more than this model's max_positions={limit}"
            )
        if max(ids) >= model.args.vocab_size:
            raise OptError("the tokenizer produces ids outside this model's vocabulary")
    generator = torch.Generator(model.embed_tokens.weight.device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()

    def should_stop(ids: list[int]) -> bool:
        text = tokenizer.decode(ids)
        return any(s in text for s in stop)

    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    results: dict[int, Generation] = {}
    for first in range(0, len(order), batch_size):
        rows = order[first : first + batch_size]
        outputs = generate_ids(
            model,
            [encoded[i] for i in rows],
            max_new_tokens,
            eos=eos,
            sampling=sampling,
            generator=generator,
            should_stop=should_stop if stop else None,
        )
        for i, (ids, finish) in zip(rows, outputs, strict=True):
            results[i] = Generation(_cut(tokenizer.decode(ids), stop), ids, finish)
    return [results[i] for i in range(len(prompts))]


def _cut(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string."""
    ends = [text.find(s) for s in stop if s in text]
    return text[: min(ends)] if ends else text
