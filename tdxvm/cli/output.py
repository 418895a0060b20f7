"""Output and error plumbing shared by the CLI commands.

Errors: any :class:`tdxvm.errors.TdxvmError` is one line on stderr (or its ``code`` and
message with ``-o json``) and its ``exit_status``; anything else is a bug (exit 4, with
the traceback). The exit statuses are :mod:`tdxvm.errors`' constants, kept importable
from here for the commands.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click

from tdxvm.errors import (  # noqa: F401 - EXIT_REFUSED, EXIT_UNREACHABLE: for the commands
    EXIT_BROKEN_PIPE,
    EXIT_INPUT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    TdxvmError,
)
from tdxvm.textsafe import safe_text

OUTPUT_OPTION = click.option(
    "-o",
    "--output",
    "output",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="text for people, json for scripts (one object on stdout).",
)


def json_verdict(cmd: click.Command) -> click.Command:
    """Mark ``cmd`` as one that answers with a verdict: with ``-o json`` its errors too
    (usage, unusable input, network, internal) carry ``"verdict": "error"``, so that a
    script's ``jq .verdict`` never reads null."""
    cmd.json_verdict = True  # type: ignore[attr-defined]
    return cmd


def _error_doc(code: str, message: str, *, verdict: bool) -> dict[str, Any]:
    doc: dict[str, Any] = {"verdict": "error"} if verdict else {}
    doc["error"] = {"code": code, "message": message}
    return doc


def _verdict_command(cli: click.Group, argv: list[str]) -> bool:
    name = next((a for a in argv if not a.startswith("-")), None)
    return bool(getattr(cli.commands.get(name or ""), "json_verdict", False))


class CliError(TdxvmError):
    """A usage or input problem found by the CLI itself (exit 2)."""

    code = "usage"


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False))


class WritablePath(click.ParamType):
    """A path the command will write: checked before any work starts, so a bad one is a
    usage error (exit 2, ``PATH: reason``) and never a traceback halfway through.

    ``file``: a file to (over)write; not a folder, and its folder must exist. ``folder``: a
    folder to create or fill; not a file, and its nearest existing ancestor must be a
    writable folder (missing folders in between are made).
    """

    name = "path"

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = os.fspath(value)  # type: ignore[arg-type]
        path = Path(text)
        if self.kind == "file":
            if path.is_dir():
                self.fail(f"{text}: is a folder, not a file", param, ctx)
            if not path.parent.is_dir():
                what = "is a file, not a folder" if path.parent.exists() else "does not exist"
                self.fail(f"{text}: its folder {path.parent} {what}", param, ctx)
            where = path.parent
        else:
            if path.exists() and not path.is_dir():
                self.fail(f"{text}: exists and is not a folder", param, ctx)
            where = path
            while not where.exists():
                where = where.parent
            if not where.is_dir():
                self.fail(f"{text}: {where} is a file, not a folder", param, ctx)
        if not os.access(where, os.W_OK | os.X_OK):
            self.fail(f"{text}: {where} is not writable", param, ctx)
        return text


def check_pccs(ctx: click.Context | None, param: click.Parameter | None, value: str | None) -> str | None:
    """``--pccs``: an https URL with a host; plain http only to this machine (a local PCCS)."""
    if value is None:
        return None
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a port that is not a number in 0..65535
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not a URL: {exc}") from None
    local = (parts.hostname or "") in ("localhost", "::1") or (parts.hostname or "").startswith("127.")
    if not parts.hostname or not (parts.scheme == "https" or (parts.scheme == "http" and local)):
        raise click.BadParameter(f"{value!r} is not an https URL with a host (plain http only to this machine)")
    return value


OUT_FILE = WritablePath("file")
OUT_FOLDER = WritablePath("folder")


def wrote(path: str, output: str, **details: object) -> None:
    """Where a command wrote its file: a line on stderr for people, ``{"wrote": PATH, ...}`` with -o json."""
    if output == "json":
        emit_json({"wrote": str(path), **details})
    else:
        extra = ", ".join(f"{v} {k}" for k, v in details.items())
        click.echo(f"wrote {path}" + (f" ({extra})" if extra else ""), err=True)


def parse_time(value: str | None) -> datetime:
    """``--at``: ``now``, ISO 8601 (``Z`` or an offset; naive means UTC) or UNIX seconds."""
    if value is None or value.strip().lower() == "now":
        return datetime.now(timezone.utc)
    text = value.strip()
    try:
        if text.lstrip("-").replace(".", "", 1).isdigit():
            return datetime.fromtimestamp(float(text), timezone.utc)
        at = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except (ValueError, OverflowError, OSError):
        raise CliError(f"--at: {value!r} is neither now, an ISO 8601 time nor UNIX seconds") from None
    at = at if at.tzinfo else at.replace(tzinfo=timezone.utc)
    if not 1970 <= at.year < 9000:  # certificates and collateral are dated in between; beyond, date arithmetic fails
        raise CliError(f"--at: {value!r} is out of range (1970 to 8999)")
    return at


def _terminated(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def run_guarded(cli: click.Group, argv: list[str]) -> int:
    """Run the click group; turn our errors into one clear line (or JSON) and an exit code.
    SIGTERM unwinds like Ctrl-C (exit 143), so work folders and half-made VMs are cleaned up."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
    want_json = _wants_json(argv)
    verdict = want_json and _verdict_command(cli, argv)
    stdout = sys.stdout
    try:
        # NO_COLOR (https://no-color.org): no ANSI colours even on a terminal.
        color = False if os.environ.get("NO_COLOR") else None
        cli.main(args=argv, prog_name="tdxvm", standalone_mode=False, color=color)
        return EXIT_OK
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.Abort as exc:
        if isinstance(exc.__context__, KeyboardInterrupt):  # Ctrl-C at a prompt: click turns it into Abort
            click.echo("interrupted", err=True)
            return EXIT_INTERRUPTED
        click.echo("aborted", err=True)
        if want_json:
            emit_json(_error_doc("aborted", "aborted", verdict=verdict))
        return EXIT_INPUT
    except click.ClickException as exc:
        if isinstance(exc, click.UsageError):
            exc.show()  # the user's own arguments, and the usage line
        else:  # a command's error: it may quote what the host or a guest said
            click.echo(f"Error: {safe_text(exc.format_message())}", err=True)
        if want_json:  # scripts parse stdout: the usage error is there too
            emit_json(_error_doc("usage", exc.format_message(), verdict=verdict))
        return EXIT_INPUT
    except SystemExit as exc:  # commands exit with their verdict
        if sys.stdout is not stdout:  # click swapped it on EPIPE: the reader left, not a refusal (exit 1)
            return EXIT_BROKEN_PIPE
        return exc.code if isinstance(exc.code, int) else EXIT_INPUT
    except TdxvmError as exc:  # ours: refused, unusable input or unreachable, as its class says
        if want_json:
            emit_json(_error_doc(exc.code, str(exc), verdict=verdict))
        else:
            click.echo(f"error: {safe_text(exc)}", err=True)
        return exc.exit_status
    except Exception as exc:  # a bug: say so plainly, keep the trace for the report
        click.echo("internal error (please report it with the lines below):", err=True)
        click.echo(safe_text(traceback.format_exc()), err=True)
        if want_json:  # scripts parse stdout: the error is there too
            emit_json(_error_doc("internal", f"internal error: {type(exc).__name__}: {exc}", verdict=verdict))
        return EXIT_INTERNAL
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return EXIT_INTERRUPTED


def _wants_json(argv: list[str]) -> bool:
    for i, arg in enumerate(argv):
        if arg in ("-o", "--output") and i + 1 < len(argv) and argv[i + 1] == "json":
            return True
        if arg in ("-ojson", "--output=json"):
            return True
    return False


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()
