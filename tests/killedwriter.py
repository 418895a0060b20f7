"""A tdxvm writer in another process, stopped in the middle of its write: the tests' way
to leave what a killed one leaves (SIGKILL: no cleanup of its own runs), or to have a
live one at work while another run cleans up.

Its script prints the path of what it is writing once there is something in it, then
waits for a line on its standard input before it goes on.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest


class Writer:
    def __init__(self, script: str, *args: object) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script, *map(str, args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            _, err = self.proc.communicate()
            pytest.fail(f"the writer stopped before it wrote anything:\n{err}")
        self.path = Path(line.strip())

    def kill(self) -> None:
        """SIGKILL, as the OOM killer or ``kill -9`` would: nothing of the writer's runs."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.communicate()

    def finish(self) -> tuple[int, str, str]:
        """Let it go on to the end: its exit status, the rest of its stdout, its stderr."""
        out, err = self.proc.communicate("\n", timeout=120)
        return self.proc.returncode, out, err

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.kill()
