"""What every benchmark writes: the machine, the command, aligned markdown tables, and
sections of BENCHMARKS.md replaced in place. Light to import (no transformers), so that
benchmarks running one process per measurement do not pay for it."""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

FILE_HEADER = (
    "# Benchmarks\n\n"
    "Each section is reproduced by running the command it lists from the repository root; "
    "`--write` replaces that section in place.\n"
)


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def machine_info(threads: int) -> dict[str, str]:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    if torch.cuda.is_available():
        cpu = f"{torch.cuda.get_device_name()} with {cpu}"
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    return {
        "cpu": f"{cpu}, {cores} logical cores ({usable} usable), "
        f"{torch.backends.cpu.get_cpu_capability()}",
        "software": f"torch {torch.__version__}, transformers {_version('transformers')}",
        "threads": str(threads),
    }


def aligned_table(rows: list[tuple[str, ...]]) -> str:
    """A markdown table whose first row is the header, columns padded to line up."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(cells) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(rows[0]), rule, *(line(row) for row in rows[1:])])


def command_line(argv: list[str]) -> str:
    """The command that reproduces this run, as it would be typed from the repository root."""
    script = Path(sys.argv[0]).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(Path.cwd())
    return shlex.join(["python", str(script), *argv])


def write_section(path: Path, title: str, body: str) -> None:
    """Replace the section under ``title`` (up to the next # or ## heading), or append one."""
    text = path.read_text() if path.exists() else FILE_HEADER
    lines = text.splitlines()
    section = [title, "", *body.splitlines()]
    start = next((i for i, line in enumerate(lines) if line.strip() == title), None)
    if start is None:
        lines = [*_strip_trailing_blank(lines), "", *section]
    else:
        end = _section_end(lines, start)
        after = lines[end:]
        lines = [*lines[:start], *section, *([""] if after else []), *after]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def _section_end(lines: list[str], start: int) -> int:
    in_fence = False
    for i in range(start + 1, len(lines)):
        if lines[i].lstrip().startswith("```"):
            in_fence = not in_fence
        elif not in_fence and (lines[i].startswith("# ") or lines[i].startswith("## ")):
            return i
    return len(lines)


def _strip_trailing_blank(lines: list[str]) -> list[str]:
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    return lines
