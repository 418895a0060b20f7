"""Static checks that CI runs with the tests: ruff's lint (import order and line length
included, as pyproject.toml configures them) and ruff's formatter, over the package,
the tests and the benchmarks. Fix with ``ruff check --fix`` and ``ruff format``."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TREES = ("tdxvm", "tests", "bench")


def _ruff() -> str:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    return ruff


def test_ruff_clean():
    proc = subprocess.run(
        [_ruff(), "check", "--output-format", "concise", *TREES], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_formatted():
    proc = subprocess.run([_ruff(), "format", "--check", *TREES], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_no_formatter_escapes():
    """The formatter decides the layout everywhere: no ``fmt: skip``/``fmt: off`` markers."""
    marker = "fmt: " + "(skip|off)"  # split, so this file does not match itself
    proc = subprocess.run(
        ["grep", "-rnE", "--include=*.py", f"# {marker}", *TREES], cwd=REPO, capture_output=True, text=True
    )
    assert proc.stdout == "", proc.stdout
