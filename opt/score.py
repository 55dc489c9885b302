"""Per-token losses of a text under a checkpoint: the quickest look at what a model learned."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from opt import checkpoint as ckpt
from opt.data.tokenizer import eos_id, load_tokenizer
from opt.errors import OptError


def score_text(checkpoint: str | Path, text: str, tokenizer_path: str | Path | None = None) -> dict:
    """Loss of every token of ``text`` given the ones before it, after OPT's ``</s>`` prefix."""
    checkpoint = Path(checkpoint)
    model = ckpt.load_model(checkpoint).eval()  # first: a wrong path is named as a checkpoint
    tokenizer = load_tokenizer(tokenizer_path or checkpoint)
    ids = tokenizer.encode(text).ids
    if not ids:
        raise OptError("nothing to score: the text is empty")
    # OPT starts every document after a </s>, so the first real token is predicted too.
    tokens = [eos_id(tokenizer), *ids]
    if len(tokens) > model.args.max_positions:
        raise OptError(
            f"text is {len(ids)} tokens; this model scores at most {model.args.max_positions - 1}"
        )
    if max(tokens) >= model.args.vocab_size:
        raise OptError("the tokenizer produces ids outside this model's vocabulary")
    batch = torch.tensor([tokens])
    with torch.no_grad():
        logits = model(batch[:, :-1])  # (1, T, V)
    losses = F.cross_entropy(logits[0].float(), batch[0, 1:], reduction="none").tolist()
    mean = sum(losses) / len(losses)
    return {
        "checkpoint": str(checkpoint),
        "n_tokens": len(ids),
        "tokens": [tokenizer.decode([i]) for i in ids],
        "token_ids": ids,
        "losses": losses,
        "mean_loss": mean,
        "perplexity": math.exp(mean),
    }
