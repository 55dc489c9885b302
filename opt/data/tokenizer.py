"""Byte-level BPE tokenizers: load the ones OPT ships, or train a small one for experiments.

OPT uses the GPT-2 byte-level BPE with four special tokens placed first in the vocabulary:
``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3. ``</s>`` is also the document separator in
the pretraining data, so :func:`eos_id` is the id that :mod:`opt.data.prepare` appends to
every document.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from opt.errors import OptError

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
"""OPT's special tokens, in id order: a trained tokenizer gives them ids 0, 1, 2, 3."""

GPT2_EOS = "<|endoftext|>"
"""The separator of plain GPT-2 vocabularies, used when ``</s>`` is absent."""

_MIN_VOCAB = len(SPECIAL_TOKENS) + 256  # the specials plus one token per byte


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer from ``tokenizer.json``, or a directory holding it or GPT-2 files.

    A directory is searched for ``tokenizer.json`` first, then for the ``vocab.json`` +
    ``merges.txt`` pair that GPT-2 and the original OPT release ship.
    """
    path = Path(path)
    if path.is_file():
        return _from_json(path)
    if not path.is_dir():
        raise OptError(f"tokenizer not found: {path}")
    if (path / "tokenizer.json").is_file():
        return _from_json(path / "tokenizer.json")
    vocab, merges = path / "vocab.json", path / "merges.txt"
    if vocab.is_file() and merges.is_file():
        return _from_gpt2_files(vocab, merges)
    raise OptError(f"no tokenizer.json or vocab.json + merges.txt in {path}")


def _from_json(path: Path) -> Tokenizer:
    # `tokenizers` raises a bare Exception for both I/O and parse errors.
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise OptError(f"cannot read tokenizer {path}: {e}") from e


def _from_gpt2_files(vocab: Path, merges: Path) -> Tokenizer:
    try:
        model = models.BPE.from_file(str(vocab), str(merges))
    except Exception as e:
        raise OptError(f"cannot read BPE files {vocab} and {merges}: {e}") from e
    tokenizer = _byte_level(model)
    # Mark the specials that the vocabulary already holds as special, so that "</s>" in
    # text maps to its id instead of being split into bytes; their ids do not change.
    present = [t for t in (*SPECIAL_TOKENS, GPT2_EOS) if tokenizer.token_to_id(t) is not None]
    tokenizer.add_special_tokens(present)
    return tokenizer


def _byte_level(model: models.BPE) -> Tokenizer:
    """Wrap a BPE model in GPT-2's byte-level pipeline (no prefix space, as OPT/GPT-2)."""
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer whose special-token ids match OPT's.

    The result may have fewer than ``vocab_size`` tokens when the corpus runs out of merges.
    """
    if vocab_size < _MIN_VOCAB:
        raise OptError(f"vocab size must be at least {_MIN_VOCAB} (4 specials + 256 bytes)")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),  # added first, in order: ids 0..3
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable
        show_progress=False,
    )
    tokenizer = _byte_level(models.BPE())
    counter = _Counter(texts)
    tokenizer.train_from_iterator(counter, trainer=trainer)
    if counter.count == 0:
        raise OptError("empty corpus: no text to train the tokenizer on")
    return tokenizer


class _Counter:
    """Passes texts through while counting them, to reject an empty corpus after training."""

    def __init__(self, texts: Iterable[str]) -> None:
        self._texts = texts
        self.count = 0

    def __iter__(self) -> Iterator[str]:
        for text in self._texts:
            if text:
                self.count += 1
                yield text


def eos_id(tokenizer: Tokenizer) -> int:
    """The document separator's id: ``</s>`` (OPT), else ``<|endoftext|>`` (GPT-2)."""
    for token in ("</s>", GPT2_EOS):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise OptError(f"tokenizer has no end-of-document token ('</s>' or '{GPT2_EOS}')")
