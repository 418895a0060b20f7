"""Work folders of image builds: a killed build's is removed by the next build of the same
output; a running build's is left alone. SIGTERM unwinds a command like Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import click

from tdxvm.cli.output import run_guarded
from tdxvm.image.build import OWNER_FILE, _remove_stale_work


def _work(output, tag: str, pid: int | None):
    folder = output.with_name(f".{output.name}.work-{tag}")
    (folder / "rootfs").mkdir(parents=True)
    if pid is not None:
        (folder / OWNER_FILE).write_text(f"{pid}\n")
    return folder


def test_only_the_work_of_builds_that_are_gone_is_removed(tmp_path):
    output = tmp_path / "smoke"
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    killed = _work(output, "killed", int(gone.stdout))
    unowned = _work(output, "unowned", None)
    running = _work(output, "running", os.getpid())
    other = _work(tmp_path / "other", "killed", int(gone.stdout))  # another output's: not this build's business
    _remove_stale_work(output)
    assert not killed.exists() and not unowned.exists()
    assert running.exists() and other.exists()


def test_sigterm_unwinds_a_command_like_ctrl_c():
    cleaned = []

    @click.group()
    def cli() -> None:
        pass

    @cli.command("work")
    def work() -> None:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("SIGTERM did not interrupt the command")
        finally:
            cleaned.append(True)

    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert run_guarded(cli, ["work"]) == 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert cleaned == [True]
