"""Where raw documents come from: text files, JSON-lines files, or a corpus built into Python.

The built-in ``pydoc`` corpus is the reference documentation that CPython ships in
``pydoc_data.topics`` (about 0.5 MB of English and code). It needs no download, so tests and
smoke runs can train a real tokenizer and model on it anywhere.

An input is named by a string: ``builtin:<name>``, a ``.txt`` file (one document per file), a
``.jsonl``/``.json`` file (one JSON object per line, the text under ``text_key``), or a
directory, which stands for the supported files under it in sorted order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from opt.errors import OptError

BUILTIN_SCHEME = "builtin:"
TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".json")
_BUILTINS = ("pydoc",)

Source = str | Path
"""A resolved input: ``"builtin:<name>"`` or the path of one readable file."""


def builtin_documents(name: str = "pydoc") -> list[str]:
    """The documents of a built-in corpus, in a fixed order (sorted by topic)."""
    if name != "pydoc":
        raise OptError(f"unknown built-in corpus {name!r} (available: {', '.join(_BUILTINS)})")
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distributions strip pydoc_data from the stdlib
        raise OptError("built-in corpus 'pydoc' needs pydoc_data, missing from this Python") from e
    return [topics[key] for key in sorted(topics)]


def read_documents(path: str | Path, text_key: str = "text") -> Iterator[str]:
    """Yield the documents of one ``.txt`` or ``.jsonl``/``.json`` file, lazily."""
    path = Path(path)
    if path.suffix in TEXT_SUFFIXES:
        yield _read_text(path)
    elif path.suffix in JSONL_SUFFIXES:
        yield from _read_jsonl(path, text_key)
    else:
        raise OptError(f"unsupported input {path}: expected {_suffix_list()}")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise OptError(f"input not found: {path}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise OptError(f"cannot read {path}: {e}") from e


def _read_jsonl(path: Path, text_key: str) -> Iterator[str]:
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    yield _text_of(line, text_key, f"{path}:{lineno}")
    except FileNotFoundError as e:
        raise OptError(f"input not found: {path}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise OptError(f"cannot read {path}: {e}") from e


def _text_of(line: str, text_key: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise OptError(f"{where}: invalid JSON ({e.msg})") from e
    text = record.get(text_key) if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise OptError(f"{where}: expected a JSON object with a string field {text_key!r}")
    return text


def resolve_inputs(inputs: Sequence[str]) -> list[Source]:
    """Check every input up front and expand directories, so a bad name fails before work."""
    if not inputs:
        raise OptError("no inputs given")
    sources: list[Source] = []
    for spec in inputs:
        if spec.startswith(BUILTIN_SCHEME):
            builtin_documents(spec.removeprefix(BUILTIN_SCHEME))  # validates the name
            sources.append(spec)
        else:
            sources.extend(_resolve_path(Path(spec)))
    return sources


def _resolve_path(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _supported(p))
        if not files:
            raise OptError(f"no {_suffix_list()} files under {path}")
        return files
    if not path.is_file():
        raise OptError(f"input not found: {path}")
    if not _supported(path):
        raise OptError(f"unsupported input {path}: expected {_suffix_list()}")
    return [path]


def _supported(path: Path) -> bool:
    return path.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES


def _suffix_list() -> str:
    return ", ".join(TEXT_SUFFIXES + JSONL_SUFFIXES)


def iter_documents(sources: Sequence[Source], text_key: str = "text") -> Iterator[str]:
    """All documents of the resolved sources, in order."""
    for source in sources:
        if isinstance(source, str) and source.startswith(BUILTIN_SCHEME):
            yield from builtin_documents(source.removeprefix(BUILTIN_SCHEME))
        else:
            yield from read_documents(source, text_key)


def total_bytes(sources: Sequence[Source]) -> int:
    """Approximate text size in bytes, for a progress bar (JSON framing is counted too)."""
    size = 0
    for source in sources:
        if isinstance(source, str) and source.startswith(BUILTIN_SCHEME):
            docs = builtin_documents(source.removeprefix(BUILTIN_SCHEME))
            size += sum(len(d.encode("utf-8")) for d in docs)
        else:
            size += Path(source).stat().st_size
    return size
