"""Repository hygiene that CI must enforce: lint, format, and a README that matches CI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUFF = shutil.which("ruff", path=str(Path(sys.executable).parent))


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]])
def test_ruff_is_clean(command):
    assert RUFF is not None, "ruff is part of the [dev] extra"
    result = subprocess.run([RUFF, *command, "."], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ci_runs_the_readme_test_command_verbatim():
    ci_command = (REPO / ".ci/run").read_text().strip().splitlines()[-1]
    readme = (REPO / "README.md").read_text()
    assert f"\n{ci_command}\n" in readme
    assert ci_command.endswith("python -m pytest")


def test_readme_quick_start_has_exactly_two_commands():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = section.split("```")[1::2]  # each starts with its language tag
    commands = [
        ln for b in blocks if not b.startswith("text") for ln in b.splitlines()[1:] if ln.strip()
    ]
    assert len(commands) == 2, commands
    assert all(c.startswith("python3 -m venv .venv && ") for c in commands)
    assert "opt train configs/demo.toml" in commands[0]
