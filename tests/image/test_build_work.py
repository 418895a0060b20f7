"""Work folders of image builds: a killed build's is removed by the next build of the same
output; a running build's is left alone, even in the instant it is being made. SIGTERM
unwinds a command like Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import click

from tdxvm.cli.output import run_guarded
from tdxvm.image import build as build_mod
from tdxvm.image.build import OWNER_FILE, _remove_stale_work, _work_folder


def _work(output, tag: str, pid: int | None, kind: str = "work"):
    folder = output.with_name(f".{output.name}.{kind}-{tag}")
    (folder / "rootfs").mkdir(parents=True)
    if pid is not None:
        (folder / OWNER_FILE).write_text(f"{pid}\n")
    return folder


def _gone_pid() -> int:
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    return int(gone.stdout)


def test_only_the_work_of_builds_that_are_gone_is_removed(tmp_path):
    output, gone = tmp_path / "smoke", _gone_pid()
    killed = _work(output, "killed", gone)
    unowned = _work(output, "unowned", None)
    running = _work(output, "running", os.getpid())
    other = _work(tmp_path / "other", "killed", gone)  # another output's: not this build's business
    _remove_stale_work(output)
    assert not killed.exists() and not unowned.exists()
    assert running.exists() and other.exists()


def test_claim_folders_go_when_their_build_is_gone_and_stay_while_it_makes_them(tmp_path):
    output, gone = tmp_path / "smoke", _gone_pid()
    killed = _work(output, "killed", gone, kind="claim")
    running = _work(output, "running", os.getpid(), kind="claim")
    making = _work(output, "making", None, kind="claim")  # its owner file comes next
    orphan = _work(output, "orphan", None, kind="claim")  # its build died before writing one
    old = time.time() - build_mod._ORPHAN_CLAIM_SECONDS - 60
    os.utime(orphan, (old, old))
    _remove_stale_work(output)
    assert not killed.exists() and not orphan.exists()
    assert running.exists() and making.exists()


def test_a_work_folder_being_made_is_not_taken_by_another_builds_cleanup(tmp_path, monkeypatch):
    """Another build of the same output cleans up at the worst moment: right after each
    folder this build makes appears, before anything is written in it. The folder this
    build then works in must still exist, with its owner file."""
    output = tmp_path / "smoke"
    real_mkdir, made = os.mkdir, []

    def mkdir_then_other_build_cleans(path, mode=0o777, *, dir_fd=None):
        real_mkdir(path, mode, dir_fd=dir_fd)
        if os.path.basename(path).startswith(f".{output.name}."):
            made.append(path)
            _remove_stale_work(output)  # the concurrent build, at this instant

    monkeypatch.setattr(os, "mkdir", mkdir_then_other_build_cleans)
    work = _work_folder(output)
    monkeypatch.undo()
    assert made  # the other build did run in between
    assert work.is_dir() and (work / OWNER_FILE).read_text() == f"{os.getpid()}\n"
    assert work.name.startswith(f".{output.name}.work-") and work.stat().st_mode & 0o777 == 0o700
    assert [p.name for p in tmp_path.iterdir()] == [work.name]  # no claim folder left behind
    _remove_stale_work(output)  # a later build's cleanup leaves a running build's folder
    assert work.is_dir()


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
