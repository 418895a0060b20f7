"""The CLI's one progress printer (tdxvm/cli/progress.py): lines on stderr for people,
in place on a terminal, nothing with -o json, NO_COLOR respected, host text escaped."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from tdxvm.cli.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_json_prints_nothing_at_all(capsys):
    p = Progress("json", tty=True)
    p.start("boot")
    p.done("boot", "done", seconds=1.0, detail="x")
    p.note("scratch", "waiting")
    p.meter("upload", 1, 2, 1.0)
    p.counter("encrypting", 10)(10)
    assert capsys.readouterr() == ("", "")


def test_off_a_terminal_only_finished_lines_without_carriage_returns(capsys):
    p = Progress("text", width=10, tty=False)
    p.start("rootfs")
    p.meter("upload", 5, 10, 1.0)
    p.done("rootfs", "done", seconds=312.44, detail="412 packages")
    p.note("", "debootstrap trixie")
    p.done("kernel", "cached", seconds=0.0)
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "  rootfs     done      312.4 s  412 packages",
        "  debootstrap trixie",
        "  kernel     cached      0.0 s",
    ]
    assert "\r" not in err and "..." not in err


def test_on_a_terminal_the_result_writes_over_its_phase(capsys):
    p = Progress("text", width=7, tty=True)
    p.step("boot", "start")
    p.step("boot", "done", 12.34, "")
    p.step("quote", "start")
    p.note("", "the agent answered")  # another line: the pending phase line is ended first
    p.step("quote", "done", 0.5, "")
    err = capsys.readouterr().err
    assert err == (
        "  boot    ...\r  boot    done       12.3 s\n  quote   ...\n  the agent answered\n  quote   done        0.5 s\n"
    )


def test_meter_refreshes_in_place_five_times_a_second_and_ends_its_line(capsys):
    clock = Clock()
    p = Progress("text", width=8, tty=True, clock=clock)
    p.meter("upload", 0, 4 * 2**20, 0.0)
    clock.now += 0.1
    p.meter("upload", 1 * 2**20, 4 * 2**20, 0.1)  # too soon: not shown
    clock.now += 0.15
    p.meter("upload", 2 * 2**20, 4 * 2**20, 1.0)
    p.note("upload", "interrupted (reset); resuming (try 2)")  # a note never overwrites the meter
    p.meter("upload", 4 * 2**20, 4 * 2**20, 2.0)  # the end is always shown
    err = capsys.readouterr().err
    assert err == (
        "  upload     0.0%  0 of 4 MiB  0 MiB/s"
        "\r  upload    50.0%  2 of 4 MiB  2 MiB/s"
        "\n  upload   interrupted (reset); resuming (try 2)\n"
        "  upload   100.0%  4 of 4 MiB  2 MiB/s\n"
    )


def test_counter_adds_bytes(capsys):
    clock = Clock()
    p = Progress("text", width=10, tty=True, clock=clock)
    add = p.counter("decrypting", 3 * 2**20)
    clock.now += 1.0
    add(2**20)
    clock.now += 1.0
    add(2 * 2**20)
    err = capsys.readouterr().err
    assert err.endswith("\r  decrypting 100.0%  3 of 3 MiB  2 MiB/s\n") and err.startswith(
        "  decrypting  33.3%  1 of 3 MiB"
    )


def test_host_text_is_escaped(capsys):
    p = Progress("text", width=0, tty=False)
    p.done("vm\x1b]0;owned\x07 on a:", "failed", detail="libvirt said \x1b[2J\u202eno")
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\u202e" not in err and "\x07" not in err
    assert "vm\\x1b]0;owned\\x07 on a:" in err and "libvirt said \\x1b[2J\\u202eno" in err


def _failed_step() -> click.Command:
    @click.command()
    def cmd() -> None:
        Progress("text", width=6, tty=False).done("rootfs", "failed", seconds=1.0, detail="\x1b[31mhost red")

    return cmd


@pytest.mark.parametrize("no_color", [None, "1"])
def test_status_colour_only_without_no_color(monkeypatch, no_color):
    if no_color is None:
        monkeypatch.delenv("NO_COLOR", raising=False)
    else:
        monkeypatch.setenv("NO_COLOR", no_color)
    result = CliRunner().invoke(_failed_step(), [], color=True)
    assert result.exit_code == 0, result.output
    coloured = "\x1b[31mfailed  \x1b[0m"
    assert (coloured in result.stderr) == (no_color is None)
    assert (
        "failed" in result.stderr and "\\x1b[31mhost red" in result.stderr
    )  # the host's own sequence: shown, never run
