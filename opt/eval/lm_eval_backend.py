"""An lm-evaluation-harness model backend for opt checkpoints, registered as ``opt``.

    python -m opt.eval.lm_eval_backend --model opt --model_args checkpoint=CKPT \
        --tasks TASKS [--include_path DIR] [--batch_size 16] [any other lm_eval option]

runs lm-eval's own command line with ``opt`` registered. (lm-eval 0.4.13 finds models only in
its own registry: no entry points are read, and ``--include_path`` adds tasks, not models, so
a bare ``lm_eval --model opt`` cannot see this module; from Python, importing it registers
the model for ``lm_eval.simple_evaluate(model="opt", ...)``.)

lm-eval is an optional dependency (``pip install -e .[lm-eval]``): this module imports it at
the top, and nothing else in opt imports this module, so opt works without it.

Text is tokenized without special tokens, and every sequence starts with OPT's ``</s>``
document prefix, as in pretraining and in `opt eval` (lm-eval's Hugging Face backend does
the same in ``loglikelihood`` on OPT, whose HF tokenizer prepends ``</s>``; its rolling
windows put their prefix token before that one, so they match ours only with
``add_bos_token=False``). A context
and continuation are split as lm-eval splits them: trailing spaces of the context move to the
continuation, and the continuation's tokens are those of ``context + continuation`` after the
context's, so a merge across the boundary is scored as the model would see it.

- ``loglikelihood``: requests that share a context are scored together by
  :class:`opt.eval.scoring.Scorer` (one forward can serve several continuations), batched.
- ``loglikelihood_rolling``: the document's tokens in windows of the model's
  ``max_positions``, each token predicted once with as much context as fits, the first
  window after the ``</s>`` prefix (the windows lm-eval's docstring and HF backend use).
- ``generate_until``: :func:`opt.eval.generate.generate` (greedy unless ``do_sample`` and a
  positive temperature; top-k, top-p; sampled runs seeded by the ``seed`` model arg),
  requests with the same arguments decoded as left-padded batches, cut at the ``until``
  strings. A prompt that does not fit ``max_positions`` with ``max_gen_toks`` new tokens is
  refused (lm-eval's HF backend cuts it from the left instead).
"""

from __future__ import annotations

import logging
from pathlib import Path

import lm_eval.models  # noqa: F401  (lm-eval's own models first: see main())
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from opt.errors import OptError
from opt.eval.generate import generate
from opt.eval.scoring import Request, Scorer

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default for generate_until


@register_model("opt")
class OptLM(LM):
    """An opt checkpoint (any layout it was saved under) as an lm-eval model.

    Model args: ``checkpoint`` (required), ``tokenizer`` (a tokenizer.json or directory;
    default: the checkpoint's), ``batch_size`` (rows per forward; lm-eval's ``--batch_size``
    sets it too), ``device`` (default: cuda if there is one, else cpu), ``seed`` (for sampled generation)."""

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        tokenizer: str | Path | None = None,
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        device: str | None = None,
        seed: int = 0,
        max_batch_size: int | None = None,  # passed by lm-eval's CLI; unused
        **unused,
    ) -> None:
        super().__init__()
        if unused:
            raise OptError(f"unknown model args for opt: {', '.join(sorted(unused))}")
        if checkpoint is None:
            raise OptError("the opt backend needs --model_args checkpoint=DIR")
        from opt import checkpoint as ckpt
        from opt.data.tokenizer import eos_id, load_tokenizer

        self.checkpoint = Path(checkpoint)
        self._device = _device(device)  # LM.device reads it
        self.model = ckpt.load_model(self.checkpoint).eval().to(self._device)
        self.tokenizer = load_tokenizer(tokenizer or self.checkpoint)
        if self.tokenizer.get_vocab_size() > self.model.args.vocab_size:
            raise OptError("the tokenizer produces ids outside this model's vocabulary")
        self.eos = eos_id(self.tokenizer)
        self.batch_size = _batch_size(batch_size)
        self.seed = int(seed)
        self.max_length = self.model.args.max_positions
        # Contexts are built with their </s> prefix here, so the scorer adds none.
        self.scorer = Scorer(self.model, prefix_id=None, batch_size=self.batch_size)

    # --- tokenization ------------------------------------------------------------------

    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(``</s>`` + context tokens, continuation tokens), split as lm-eval splits them."""
        if not context:
            return [self.eos], self.tok_encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tok_encode(context + continuation)
        context_ids = self.tok_encode(context)
        return [self.eos, *context_ids], whole[len(context_ids) :]

    # --- lm-eval's interface -----------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(*req.args) for req in requests]
        for req, (_, cont) in zip(requests, pairs, strict=True):
            if not cont:
                raise OptError(f"continuation {req.args[1]!r} tokenizes to nothing")
        by_context: dict[tuple[int, ...], list[int]] = {}
        for i, (context, _) in enumerate(pairs):
            by_context.setdefault(tuple(context), []).append(i)
        grouped = [
            Request(context, tuple(tuple(pairs[i][1]) for i in members))
            for context, members in by_context.items()
        ]
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for members, scores in zip(by_context.values(), self.scorer.scores(grouped), strict=True):
            for i, score in zip(members, scores, strict=True):
                out[i] = score
        for req, score in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood", req.args, score)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows: list[Request] = []
        owner: list[int] = []
        for r, req in enumerate(requests):
            for context, block in rolling_windows(
                self.tok_encode(req.args[0]), self.eos, self.max_length
            ):
                windows.append(Request(tuple(context), (tuple(block),)))
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, scores in zip(owner, self.scorer.scores(windows), strict=True):
            totals[r] += scores[0][0]
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        # Requests with the same generation arguments are decoded together.
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        out = [""] * len(requests)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0))
            top_p = float(kwargs.pop("top_p", 1.0))
            top_k = int(kwargs.pop("top_k", 0) or 0)
            if kwargs:
                raise OptError(f"generation arguments opt does not support: {sorted(kwargs)}")
            if not do_sample:
                temperature = 0.0
            generations = generate(
                self.model,
                self.tokenizer,
                [requests[i].args[0] for i in members],
                max_new,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                seed=self.seed,
                stop=until,
                batch_size=self.batch_size,
                truncate=True,  # a long few-shot context keeps its end, as lm-eval's hf does
            )
            for i, g in zip(members, generations, strict=True):
                out[i] = g.text
                self.cache_hook.add_partial("generate_until", requests[i].args, g.text)
        return out


def rolling_windows(
    tokens: list[int], prefix: int, max_length: int
) -> list[tuple[list[int], list[int]]]:
    """(context, block) pairs that together predict every token of ``tokens`` once: blocks
    of up to ``max_length`` tokens in order, each after as many preceding tokens (the first
    after ``prefix``) as fit in ``max_length`` inputs."""
    if max_length < 1:
        raise OptError(f"max_length must be at least 1, not {max_length}")
    seq = [prefix, *tokens]
    out = []
    for start in range(1, len(seq), max_length):
        end = min(start + max_length, len(seq))
        first = max(0, end - 1 - max_length)  # the inputs are seq[first : end - 1]
        out.append((seq[first:start], seq[start:end]))
    return out


def _device(name: str | None) -> torch.device:
    """The device asked for; lm-eval's command line asks for cuda:0 unless told otherwise,
    so a CUDA device on a machine without one means the CPU (as lm-eval's HF backend)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        log.warning("no CUDA device here: evaluating on the CPU instead of %s", name)
        return torch.device("cpu")
    return device


def _batch_size(value: int | str | None) -> int:
    if value is None or value == "auto" or str(value).startswith("auto:"):
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except ValueError as err:
        raise OptError(f"batch_size must be a positive integer, not {value!r}") from err
    if size < 1:
        raise OptError(f"batch_size must be a positive integer, not {value!r}")
    return size


def main() -> None:
    """lm-eval's command line, with ``opt`` registered (this module is imported by now)."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
