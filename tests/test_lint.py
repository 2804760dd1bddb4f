"""The code's style is checked with the rest: ruff's lint rules and its formatting, as
pyproject.toml configures them (the pre-commit hooks run the same two commands)."""

import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_finds_nothing_to_fix(command):
    result = subprocess.run([sys.executable, "-m", "ruff", *command, "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, (
        f"ruff {' '.join(command)} (fix with: ruff check --fix . && ruff format .):\n"
        f"{result.stdout[-4000:]}{result.stderr[-2000:]}"
    )
