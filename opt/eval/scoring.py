"""Rank classification: the log-likelihood of each answer choice's tokens given the context,
and the two accuracies lm-eval reports from them.

Every sequence starts with OPT's ``</s>`` document prefix, then the context tokens, then
the continuation (the choice after a space, as T0 and lm-eval join input and target).
Sequences are batched with right padding, which a causal model never sees, and the head
is applied only at the positions that predict a continuation token, so a 50k vocabulary
costs (scored tokens x V), not (batch x length x V).

One forward can serve several choices of the same context: the input a choice needs
(prefix + context + its tokens but the last) that is a prefix of another choice's input is
read from that row. Single-token choices (Yes / No / Maybe) thus cost one forward of the
context for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from opt.errors import OptError


@dataclass(frozen=True)
class Request:
    """One context and its candidate continuations, as token ids (no ``</s>`` prefix)."""

    context: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]


def predictions(
    loglikelihoods: list[float], choices: list[str] | tuple[str, ...]
) -> tuple[int, int]:
    """(pred, pred_norm) as lm-eval computes them: argmax of the summed log-likelihood, and
    argmax of it divided by the choice's length in characters (``len(choice)``, the choice
    without the joining space); ties go to the first choice."""
    if len(loglikelihoods) != len(choices):
        raise ValueError("one log-likelihood per choice")
    pred = max(range(len(choices)), key=lambda i: (loglikelihoods[i], -i))
    norm = [ll / max(len(c), 1) for ll, c in zip(loglikelihoods, choices, strict=True)]
    pred_norm = max(range(len(choices)), key=lambda i: (norm[i], -i))
    return pred, pred_norm


class Scorer:
    """Sums of continuation log-probabilities under an OPT model: whole, or this rank's
    tensor-parallel share of one (every rank of its group then scores the same requests)."""

    def __init__(self, model, prefix_id: int | None, batch_size: int = 16, pad_id: int = 1):
        if batch_size < 1:
            raise OptError(f"batch size must be at least 1, not {batch_size}")
        self.model = model
        self.prefix_id = prefix_id
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.max_positions = model.args.max_positions
        self.truncated = 0  # rows whose context was cut from the left to fit

    def loglikelihoods(self, requests: list[Request]) -> list[list[float]]:
        """For each request, the summed log-probability of each continuation."""
        return [[s for s, _ in scored] for scored in self.scores(requests)]

    def scores(self, requests: list[Request]) -> list[list[tuple[float, bool]]]:
        """For each request and continuation: the summed log-probability, and whether every
        continuation token is the model's most likely next token (lm-eval's ``is_greedy``).
        With ``prefix_id`` None the context is taken as given (it must not be empty)."""
        prefix = () if self.prefix_id is None else (self.prefix_id,)
        rows: list[tuple[int, ...]] = []  # model inputs, deduplicated per request
        # (request, choice) -> (row, first scored position, tokens)
        reads: list[tuple[int, int, int, int, tuple[int, ...]]] = []
        for r, req in enumerate(requests):
            if any(len(c) == 0 for c in req.continuations):
                raise OptError("an answer choice tokenizes to nothing")
            if not prefix and not req.context:
                raise OptError("a request without a prefix token needs a context")
            full = [(*prefix, *req.context, *c) for c in req.continuations]
            inputs = [f[:-1] for f in full]
            # Longest first: a shorter input that is a prefix of a kept one reuses its row.
            kept: list[int] = []
            for c in sorted(range(len(inputs)), key=lambda i: -len(inputs[i])):
                host = next((k for k in kept if rows[k][: len(inputs[c])] == inputs[c]), None)
                if host is None:
                    rows.append(inputs[c])
                    host = len(rows) - 1
                    kept.append(host)
                # The position predicting the first continuation token.
                start = len(prefix) + len(req.context) - 1
                reads.append((r, c, host, start, req.continuations[c]))
        scores = self._row_scores(rows, reads)
        out: list[list[tuple[float, bool]]] = [[] for _ in requests]
        for req, row in zip(requests, out, strict=True):
            row.extend([(0.0, True)] * len(req.continuations))
        for (r, c, *_), s in zip(reads, scores, strict=True):
            out[r][c] = s
        return out

    def _row_scores(self, rows, reads) -> list[float]:
        by_row: dict[int, list[int]] = {}
        for i, read in enumerate(reads):
            by_row.setdefault(read[2], []).append(i)
        scores = [0.0] * len(reads)
        greedy = [True] * len(reads)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # little padding
        for b in range(0, len(order), self.batch_size):
            batch = order[b : b + self.batch_size]
            offsets = [max(0, len(rows[i]) - self.max_positions) for i in batch]
            self.truncated += sum(o > 0 for o in offsets)
            width = max(len(rows[i]) - o for i, o in zip(batch, offsets, strict=True))
            tokens = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            for j, (i, o) in enumerate(zip(batch, offsets, strict=True)):
                tokens[j, : len(rows[i]) - o] = torch.tensor(rows[i][o:])
            where_b, where_t, targets, owner = [], [], [], []
            for j, (i, o) in enumerate(zip(batch, offsets, strict=True)):
                for read_index in by_row[i]:
                    _, _, _, start, cont = reads[read_index]
                    if start - o < 0:
                        raise OptError(
                            f"an answer choice of {len(cont)} tokens does not fit the model's "
                            f"{self.max_positions} positions"
                        )
                    for t, token in enumerate(cont):
                        where_b.append(j)
                        where_t.append(start - o + t)
                        targets.append(token)
                        owner.append(read_index)
            logprobs, top = self._logprobs(tokens, where_b, where_t, targets)
            logprobs, top = logprobs.tolist(), top.tolist()
            for read_index, lp, g in zip(owner, logprobs, top, strict=True):
                scores[read_index] += lp
                greedy[read_index] = greedy[read_index] and g
        return list(zip(scores, greedy, strict=True))

    @torch.inference_mode()
    def _logprobs(self, tokens, where_b, where_t, targets) -> tuple[torch.Tensor, torch.Tensor]:
        """Per scored token: its log-probability, and whether it is the argmax."""
        model = self.model
        h = model.embed(tokens.to(model.embed_tokens.weight.device))  # (B, T, D)
        for layer in model.layers.values():
            h = layer(h)
        device = h.device
        picked = h[torch.tensor(where_b, device=device), torch.tensor(where_t, device=device)]
        logits = model.head(picked[None])[0]  # (N, V)
        if isinstance(logits, DTensor):  # tensor parallel: sharded over the vocabulary
            logits = logits.full_tensor()  # (scored tokens x V): small, unlike (B x T x V)
        logits = logits.float()
        targets = torch.tensor(targets, device=device)
        logprobs = F.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
        return logprobs, logits.argmax(-1) == targets
