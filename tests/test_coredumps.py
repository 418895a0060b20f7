"""A tdxvm command that crashes leaves no core file with the keys it held."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

CRASH = """
import os, signal, sys
if sys.argv[1] == "tdxvm":
    import tdxvm.cli
    try:
        tdxvm.cli.main(["--version"])
    except SystemExit:
        pass
os.kill(os.getpid(), signal.SIGSEGV)
"""


def _crash(folder: Path, how: str) -> list[Path]:
    def allow_cores() -> None:
        hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
        resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))

    proc = subprocess.run(
        [sys.executable, "-c", CRASH, how], cwd=folder, preexec_fn=allow_cores, capture_output=True, check=False
    )
    assert proc.returncode == -signal.SIGSEGV, proc.stderr
    return list(folder.iterdir())


def test_a_crashing_command_writes_no_core(tmp_path):
    pattern = Path("/proc/sys/kernel/core_pattern").read_text().strip()
    if pattern.startswith("|") or "/" in pattern:
        pytest.skip(f"core_pattern {pattern!r} does not write into the working folder")
    if resource.getrlimit(resource.RLIMIT_CORE)[1] == 0:
        pytest.skip("core files are off for this whole session (hard RLIMIT_CORE 0)")
    for name in ("plain", "tdxvm"):
        (tmp_path / name).mkdir()
    control = _crash(tmp_path / "plain", "plain")
    assert control, "the control (a plain Python crash) wrote no core: the test shows nothing here"
    assert _crash(tmp_path / "tdxvm", "tdxvm") == []


def test_no_other_process_may_read_its_memory():
    """After a command: PR_GET_DUMPABLE 0, so ptrace and /proc/PID/mem are root's only
    and no core is written whatever the limit; and the core limit 0 for what it starts
    (checked wherever core_pattern sends cores elsewhere than the working folder)."""
    code = (
        "import ctypes, resource, tdxvm.cli\n"
        "try:\n    tdxvm.cli.main(['--version'])\nexcept SystemExit:\n    pass\n"
        "print(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0), resource.getrlimit(resource.RLIMIT_CORE)[0])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "0 0"
