"""Host- and guest-written text on the terminal: every control character is shown as an
escape, so none can move the cursor, forge a line, retitle the window or write the
clipboard; and the CLI's error line goes through it."""

from __future__ import annotations

import click
import pytest

from tdxvm.cli.output import CliError, run_guarded
from tdxvm.launch.console import clean
from tdxvm.provision.handshake import GuestError
from tdxvm.textsafe import safe_text

# What a hostile agent or endpoint might send: a green "ACCEPTED" over the line, OSC 52
# (write the clipboard), an 8-bit CSI, a right-to-left override, a carriage return.
HOSTILE = "\x1b[2K\r\x1b[32mACCEPTED\x1b[0m \x1b]52;c;ZWNobyBwd25lZA==\x07 \x9b31m \u202etxt.exe"
UNSAFE = ("\x1b", "\r", "\x07", "\x9b", "\u202e")


def test_every_control_character_is_shown_as_an_escape():
    shown = safe_text(HOSTILE)
    assert not any(c in shown for c in UNSAFE)
    assert shown == ("\\x1b[2K\\x0d\\x1b[32mACCEPTED\\x1b[0m \\x1b]52;c;ZWNobyBwd25lZA==\\x07 \\x9b31m \\u202etxt.exe")
    assert safe_text("line one\n\tline two é ✓") == "line one\n\tline two é ✓"  # newlines, tabs, letters stay
    assert safe_text(GuestError("x\x1b", address="10.0.2.15:7300", phase="hello")).endswith("hello: x\\x1b")


def test_the_serial_console_loses_its_colours_and_shows_the_rest():
    assert clean(b"\x1b[0;32m  OK  \x1b[0m] Started\r\n\x1b]0;title\x07\xc2\x9b2J") == "  OK  ] Started\n0;title\\x9b2J"


@click.group()
def _cli() -> None:
    pass


@_cli.command("guest")
def _guest_error() -> None:
    raise GuestError(HOSTILE, address="10.0.2.15:7300", phase="unlock")


@_cli.command("command")
def _command_error() -> None:
    raise CliError(f"endpoint said: {HOSTILE}")


@pytest.mark.parametrize("command", ["guest", "command"])
def test_an_error_that_quotes_a_guest_reaches_the_terminal_inert(capsys, command):
    code = run_guarded(_cli, [command])
    err = capsys.readouterr().err
    assert code != 0 and "ACCEPTED" in err and "ZWNobyBwd25lZA==" in err
    assert not any(c in err for c in UNSAFE)
