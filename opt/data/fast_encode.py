"""Byte-level BPE encoding several times faster than ``tokenizers`` alone, with identical ids.

A byte-level BPE tokenizer (GPT-2's, OPT's, the ones ``opt data train-tokenizer`` makes)
encodes a text in two stages: GPT-2's regular expression splits it into words, and BPE
turns each word into ids, independently of its neighbours. Real text repeats its words
(Zipf's law), so nearly every word has been seen before. :class:`CachedByteLevelEncoder`
therefore

- splits with numpy, from a per-character class table, instead of a regex engine;
- looks each word up in a dict of the ids that ``tokenizers`` gave it before; and
- hands only the words it has not seen to ``tokenizers`` itself, in one batch.

The ids are ``tokenizers``' own, so they cannot differ as long as the split is the same.
The split depends only on each character's class (letter, number, whitespace, other) and on
a few ASCII characters (the space, the apostrophe, the contraction letters). The class
table comes from Unicode data, and every character the first time it appears is checked
against the tokenizer's own pre-tokenizer (:meth:`_verify_classes`); a document with a
character whose class disagrees, or with an added token's text (``</s>``, say), is encoded
by ``tokenizers`` whole. Tokenizers of any other shape (a normalizer, BPE dropout, another
pre-tokenizer), or whose split of a fixed test text differs from ours (another version of
the pattern), are not accepted by :func:`fast_encoder`, and callers use ``tokenizers``.
"""

from __future__ import annotations

import functools
import json
import random
import unicodedata
from collections.abc import Iterator, Sequence
from itertools import chain

import numpy as np
from tokenizers import Tokenizer

# Character classes of GPT-2's pattern
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
OTHER, LETTER, NUMBER, SPACE = 0, 1, 2, 3
BOUNDARY = 4  # between documents: no word crosses it
_N_CODE_POINTS = 0x110000
_BLANK, _APOSTROPHE = ord(" "), ord("'")
_SHORT_CONTRACTIONS = np.array([ord(c) for c in "stmd"], dtype=np.uint32)  # 's 't 'm 'd
_LONG_CONTRACTIONS = ("re", "ve", "ll")  # 're 've 'll
# Past this many distinct words the cache starts afresh, to bound memory on huge corpora;
# a million words of a few ids each is about 200 MB.
_MAX_CACHED_WORDS = 1 << 20
_YOUNG_MISS_RATE = 0.02  # above this share of new words, collect them with a set first
# Two control characters that text hardly ever holds: one ends each document in a batch's
# stream, one is written before each word to cut the stream into strings. Both are ASCII so
# that an ASCII batch stays a 1-byte-per-character string, which CPython slices fastest. A
# document that holds either goes to `tokenizers` whole.
_CUT, _DOC_END = 0x00, 0x01
_DOC_END_CHAR, _CUT_CHAR = chr(_DOC_END), chr(_CUT)
_DOC_END_INDEX = 0
_CHUNK_CHARS = 4 << 20  # characters a stream holds: its arrays take ~40 bytes each


@functools.cache
def unicode_class_table() -> np.ndarray:
    """Each code point's class under GPT-2's pattern, from this Python's Unicode data."""
    table = np.zeros(_N_CODE_POINTS, dtype=np.uint8)
    for code in range(_N_CODE_POINTS):
        char = chr(code)
        major = unicodedata.category(char)[0]
        if major == "L":
            table[code] = LETTER
        elif major == "N":
            table[code] = NUMBER
    # Oniguruma's \s is Unicode's White_Space property, which str.isspace() does not match
    # exactly (it adds U+001C..U+001F); the first-appearance check keeps both honest.
    for code in (*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B)):
        table[code] = SPACE
    for code in (0x2028, 0x2029, 0x202F, 0x205F, 0x3000):
        table[code] = SPACE
    table.setflags(write=False)
    return table


def word_starts(codes: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Where each word of GPT-2's split begins, for a text's code points and their classes.

    The pattern's alternatives resolve to runs of one class, adjusted in two ways:
    - a run of whitespace followed by more text gives up its last character, which starts
      the next word ( ``\\s+(?!\\S)`` backtracks one), and a final blank joins the run after
      it (`` ?\\p{L}+`` and its siblings);
    - an apostrophe that starts a word and is followed by s, t, m, d, re, ve or ll takes
      those letters, and the rest of the letters are the next word.
    """
    n = len(codes)
    starts = np.ones(n, dtype=bool)
    np.not_equal(classes[1:], classes[:-1], out=starts[1:])
    # Last character of each whitespace run that has text after it: a word of its own, or,
    # if it is a blank, the start of the next word.
    last = np.flatnonzero((classes[:-1] == SPACE) & (classes[1:] < SPACE))
    starts[last] = True
    starts[last[codes[last] == _BLANK] + 1] = False
    _join_contractions(codes, classes, starts)
    return np.flatnonzero(starts)


def _join_contractions(codes: np.ndarray, classes: np.ndarray, starts: np.ndarray) -> None:
    n = len(codes)
    quote = np.flatnonzero(codes[:-1] == _APOSTROPHE)
    if len(quote) == 0:
        return
    # The apostrophe starts a word: not inside a run of other characters, not after a blank.
    before = np.where(quote > 0, quote - 1, 0)
    at_start = (quote == 0) | ((classes[before] != OTHER) & (codes[before] != _BLANK))
    quote = quote[at_start & (classes[quote + 1] == LETTER)]
    short = quote[np.isin(codes[quote + 1], _SHORT_CONTRACTIONS)]
    long = quote[(quote + 2 < n) & ~np.isin(codes[quote + 1], _SHORT_CONTRACTIONS)]
    if len(long):
        pairs = codes[long + 1].astype(np.uint64) << 32 | codes[long + 2]
        wanted = [ord(a) << 32 | ord(b) for a, b in _LONG_CONTRACTIONS]
        long = long[np.isin(pairs, np.array(wanted, dtype=np.uint64))]
    for found, length in ((short, 2), (long, 3)):
        starts[found + 1] = False
        ends = found + length
        starts[ends[ends < n]] = True


class CachedByteLevelEncoder:
    """Encodes documents as ``tokenizer.encode_batch_fast`` would, from a word cache.

    Documents are encoded a few million characters at a time, as one stream: joined with a
    separator that no word crosses, split into words in one pass, and their ids gathered
    from the cache with numpy. A document holding the separator, the character used to cut
    words apart, an added token's text or a character whose class disagrees with the
    tokenizer's is encoded by ``tokenizers`` whole, in its place.
    """

    def __init__(self, tokenizer: Tokenizer, classes: np.ndarray | None = None) -> None:
        """``classes``: :func:`unicode_class_table`'s result, if the caller has it already."""
        self._tokenizer = tokenizer
        self._classes = (unicode_class_table() if classes is None else classes).copy()
        self._classes[_DOC_END] = BOUNDARY
        self._verified = np.zeros(_N_CODE_POINTS, dtype=bool)
        self._disagree = np.zeros(_N_CODE_POINTS, dtype=bool)
        self._verified[[_DOC_END, _CUT]] = True  # not probed: see _streamable
        # Added tokens are split out before the regex runs (and may strip spaces around).
        self._added = [t.content for t in tokenizer.get_added_tokens_decoder().values()]
        self._words = _WordTable()

    def encode_batch(self, documents: Sequence[str]) -> list[np.ndarray]:
        """Each document's ids, as ``encode_batch_fast(add_special_tokens=False)`` gives."""
        out: list[np.ndarray] = []
        for chunk in _chunks(documents, _CHUNK_CHARS):
            out += self._encode_chunk(chunk)
        return out

    def _encode_chunk(self, documents: Sequence[str]) -> list[np.ndarray]:
        """The chunk as one stream; if it has a document the stream cannot take, the others
        as one stream and each such document by ``tokenizers``, in its place."""
        text, codes = _joined(documents)
        if self._streamable(text, codes, len(documents)):
            return self._encode_stream(codes)
        whole = [not self._streamable(*_joined([doc]), 1) for doc in documents]
        _, codes = _joined([d for d, w in zip(documents, whole, strict=True) if not w])
        by_stream = iter(self._encode_stream(codes))
        by_tokenizers = iter(
            self._encode_whole([d for d, w in zip(documents, whole, strict=True) if w])
        )
        return [
            np.array(next(by_tokenizers), dtype=np.int64) if w else next(by_stream) for w in whole
        ]

    def _streamable(self, text: str, codes: np.ndarray, n_docs: int) -> bool:
        """Whether the stream can encode ``n_docs`` documents, joined by ``_joined`` into
        ``text`` and ``codes``: no added token's text, no stream separator of their own, and
        every character's class verified to agree."""
        separators = np.count_nonzero(codes == _DOC_END) != n_docs or _CUT_CHAR in text
        return not (
            separators or any(t in text for t in self._added) or not self._check_classes(codes)
        )

    def _check_classes(self, codes: np.ndarray) -> bool:
        """Verify characters seen for the first time; False if any disagrees."""
        fresh = codes[~self._verified[codes]]
        if len(fresh):
            distinct = np.zeros(_N_CODE_POINTS, dtype=bool)  # faster than np.unique here
            distinct[fresh] = True
            fresh = np.flatnonzero(distinct).astype(np.uint32)
            self._disagree[fresh] = ~self._verify_classes(fresh)
            self._verified[fresh] = True
        return not self._disagree[codes].any()

    def splits_like_tokenizer(self, text: str) -> bool:
        """Whether our split of ``text`` is the tokenizer's own: a check, at construction, that
        this version of ``tokenizers`` still splits with the pattern mirrored here."""
        return np.array_equal(*self._word_starts_both_ways(text))

    def _word_starts_both_ways(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Where words start in ``text``, in characters: by our split, by the tokenizer's."""
        # Byte-level pre-tokenizers rename the bytes, so the words are not compared.
        theirs = self._tokenizer.pre_tokenizer.pre_tokenize_str(text)
        their_starts = np.array([start for _, (start, _end) in theirs], dtype=np.int64)
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        return word_starts(codes, self._classes[codes]), their_starts

    def _verify_classes(self, fresh: np.ndarray) -> np.ndarray:
        """For each code point: does our split match the tokenizer's in every context?

        Each character is placed after a letter, a digit, a punctuation mark and a blank,
        and before a digit, in one probe per character: a wrong class joins or splits one
        of these pairs differently. The probes are split together, by both sides.
        """
        ok = (fresh < 0xD800) | (fresh > 0xDFFF)  # lone surrogates cannot reach the Rust side
        chars = list(map(chr, fresh[ok].tolist()))
        if not chars:
            return ok
        probes = [f"x{c}1{c}!{c} {c}1\n" for c in chars]
        wrong = np.setxor1d(*self._word_starts_both_ways("".join(probes)))
        # A probe ends in "1\n" before the next one's "x", so no word spans two probes; a
        # difference at a boundary still counts against both neighbours.
        probe = np.searchsorted(np.arange(len(probes)) * len(probes[0]), wrong, side="right") - 1
        probe = np.concatenate([probe - 1, probe, probe + 1]).clip(0, len(probes) - 1)
        verdicts = np.ones(len(chars), dtype=bool)
        verdicts[probe] = False
        ok[ok] = verdicts
        return ok

    def _encode_stream(self, codes: np.ndarray) -> list[np.ndarray]:
        """Each document's ids, from words cut out of the joined documents at once."""
        if len(codes) == 0:
            return []
        words = _cut(codes, word_starts(codes, self._classes[codes]))
        index = self._words.lookup(words, self._encode_whole)
        ids, word_ends = self._words.gather(index)
        doc_ends = word_ends[index == _DOC_END_INDEX]
        return np.split(ids, doc_ends[:-1])

    def _encode_whole(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        encodings = self._tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return [e.ids for e in encodings]


def _joined(documents: Sequence[str]) -> tuple[str, np.ndarray]:
    """The documents, each followed by ``_DOC_END``, as text and as code points. Lone
    surrogates pass through, to be refused by the class check rather than fail here."""
    text = "".join(doc + _DOC_END_CHAR for doc in documents)
    return text, np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def _chunks(documents: Sequence[str], max_chars: int) -> Iterator[Sequence[str]]:
    """Consecutive runs of documents of about ``max_chars`` characters (one, if longer)."""
    start, size = 0, 0
    for end, doc in enumerate(documents, 1):
        size += len(doc)
        if size >= max_chars:
            yield documents[start:end]
            start, size = end, 0
    if start < len(documents):
        yield documents[start:]


def _cut(codes: np.ndarray, starts: np.ndarray) -> list[str]:
    """The words that begin at ``starts``, as strings.

    ``_CUT`` is written before every word and ``str.split`` makes all the strings in one
    call, several times faster than slicing the text once per word.
    """
    marked = np.zeros(len(codes) + len(starts), dtype=np.uint32)  # zeros: _CUT is 0
    shift = np.zeros(len(codes), dtype=np.int64)
    shift[starts] = 1
    marked[np.arange(len(codes)) + np.cumsum(shift)] = codes
    return str(memoryview(marked), "utf-32-le").split(_CUT_CHAR)[1:]


class _Index(dict):
    """Word -> index in :class:`_WordTable`; an unknown word is noted and reads as -1."""

    def __init__(self) -> None:
        super().__init__()
        self.unknown: list[str] = []

    def __missing__(self, word: str) -> int:
        self.unknown.append(word)
        return -1


class _Column:
    """An int64 array that grows by doubling, so appending costs what is appended."""

    def __init__(self) -> None:
        self._data = np.zeros(1024, dtype=np.int64)
        self.size = 0

    def extend(self, values: np.ndarray) -> None:
        end = self.size + len(values)
        if end > len(self._data):
            grown = np.zeros(max(end, 2 * len(self._data)), dtype=np.int64)
            grown[: self.size] = self._data[: self.size]
            self._data = grown
        self._data[self.size : end] = values
        self.size = end

    @property
    def values(self) -> np.ndarray:
        return self._data[: self.size]


class _WordTable:
    """Every word seen so far, with all their ids in one flat array, found by index."""

    def __init__(self) -> None:
        self._index = _Index()
        self._clear()

    def _clear(self) -> None:
        self._index.clear()
        self._young = True
        self._flat, self._length, self._offset = _Column(), _Column(), _Column()
        self._add([_DOC_END_CHAR], [[]])  # index 0: the end of a document, no ids

    def _add(self, words: list[str], ids: list[Sequence[int]]) -> None:
        first = self._length.size
        self._index.update(zip(words, range(first, first + len(words)), strict=True))
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        self._offset.extend(self._flat.size + np.cumsum(lengths) - lengths)
        self._length.extend(lengths)
        self._flat.extend(np.fromiter(chain.from_iterable(ids), np.int64, int(lengths.sum())))

    def lookup(self, words: list[str], encode) -> np.ndarray:
        """Each word's index; words not seen before are encoded with ``encode`` first.

        While the cache is young most words are new, and noting each miss one by one (a
        Python call per word) costs more than collecting the new words with a set first.
        """
        if self._young:
            self._learn([w for w in dict.fromkeys(words) if w not in self._index], words, encode)
        index = np.fromiter(map(self._index.__getitem__, words), np.int64, len(words))
        unknown = self._index.unknown
        self._young = len(unknown) > len(words) * _YOUNG_MISS_RATE
        if not unknown:
            return index
        self._index.unknown = []
        if self._learn(list(dict.fromkeys(unknown)), words, encode):  # unique, in order
            # The cache started afresh, so every index found above is stale; all of these
            # words are in the new one.
            return np.fromiter(map(self._index.__getitem__, words), np.int64, len(words))
        at = np.flatnonzero(index < 0)
        found = map(self._index.__getitem__, map(words.__getitem__, at.tolist()))
        index[at] = np.fromiter(found, np.int64, len(at))
        return index

    def _learn(self, new: list[str], words: list[str], encode) -> bool:
        """Add the ``new`` words; if the cache is full, start afresh with all of ``words``.

        Returns whether it started afresh.
        """
        cleared = self._length.size + len(new) > _MAX_CACHED_WORDS
        if cleared:
            self._clear()
            new = [w for w in dict.fromkeys(words) if w not in self._index]
        if new:
            self._add(new, encode(new))
        return cleared

    def gather(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ids of the words ``index`` in a row, and where each word's ids end."""
        lengths = self._length.values[index]
        ends = np.cumsum(lengths)
        # Output position j holds flat[its word's offset + (j - where its word's ids start)].
        shift = np.repeat(self._offset.values[index] - (ends - lengths), lengths)
        return self._flat.values[np.arange(ends[-1]) + shift], ends


def fast_encoder(tokenizer: Tokenizer) -> CachedByteLevelEncoder | None:
    """A cached encoder for ``tokenizer``, or None if its pipeline is not the one we mirror.

    Mirrored: no normalizer, GPT-2's byte-level pre-tokenizer with its regex and no prefix
    space, and a BPE model without dropout (dropout makes ids random, so not cacheable).
    """
    spec = json.loads(tokenizer.to_str())
    pre = spec.get("pre_tokenizer") or {}
    model = spec.get("model") or {}
    byte_level = (
        pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space", False)
    )
    bpe = model.get("type") == "BPE" and not model.get("dropout")
    if spec.get("normalizer") is None and byte_level and bpe:
        encoder = CachedByteLevelEncoder(tokenizer)
        if encoder.splits_like_tokenizer(_self_check_text()):
            return encoder
    return None


@functools.cache
def _self_check_text() -> str:
    """Text that exercises every rule of the split: runs of each class, blanks and other
    whitespace before each, apostrophes with and without contraction letters."""
    pieces = [*" '  \n\n\t\r\xa0\u3000", *"stmdrevlSTMDx19!.,-", "é", "漢", "'re", "'ll", "'ve"]
    rng = random.Random(0)
    return "".join(rng.choice(pieces) for _ in range(4000))
