"""The tests' one way to run the ``tdxvm`` command in-process: its exit code and what it
printed on stdout and stderr."""

from __future__ import annotations

import pytest

from tdxvm.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err
