"""Repository invariants: lint clean, and CI runs exactly the README's test command."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO


def _ruff() -> str:
    exe = Path(sys.executable).with_name("ruff")
    if exe.exists():
        return str(exe)
    found = shutil.which("ruff")
    if not found:
        pytest.skip("ruff not installed")
    return found


def test_ruff_clean():
    for args in (["check", "."], ["format", "--check", "."]):
        result = subprocess.run([_ruff(), *args], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_ci_runs_the_readme_test_command():
    blocks = REPO.joinpath("README.md").read_text().split("```bash\n")
    commands = [b.split("\n```")[0].strip() for b in blocks[1:3]]
    assert len(commands) == 2 and "mtpkit" in commands[0] and "pytest" in commands[1]
    ci = REPO.joinpath(".ci", "run").read_text().strip().splitlines()
    assert ci[-1] == commands[1]
