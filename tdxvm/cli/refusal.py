"""The one refusal printer of the CLI: what was refused and every reason, or the JSON document.

A refusal is an answer ("no"), not a failure to get one: like an acceptance it goes to
stdout, and the command exits 1. In text::

    REFUSED  smoke did not attest; nothing was released and the VM is stopped
      - [measurement-mismatch] quote field RTMR2 is 1a2b…, expected 3c4d…
      - [rtmr3-log-missing] the service returned no RTMR3 event log (at https://10.0.0.5:8443)

Each reason shows its stable ``code``, its ``message`` and, where the reason names one
its message does not already, ``where`` it was found (a quote field and byte offset, an
address). Reasons are quoted from what a host or a guest sent, so every line goes
through :func:`tdxvm.textsafe.safe_text`. With ``-o json`` the command's own document is
printed as it is (its shape is the command's contract, see docs/cli.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import click

from tdxvm.cli.output import emit_json
from tdxvm.cli.style import styled
from tdxvm.textsafe import safe_text


def _get(reason: Any, key: str) -> Any:
    return reason.get(key) if isinstance(reason, Mapping) else getattr(reason, key, None)


def reason_fields(reason: Any) -> tuple[str, str, str | None]:
    """``(code, message, where)`` of a reason: a :class:`tdxvm.attest.result.Reason`, or a
    dict with ``code`` and ``message``, and ``where`` or a quote's ``field`` and ``offset``."""
    where = _get(reason, "where")
    field, offset = _get(reason, "field"), _get(reason, "offset")
    if where is None and field is not None:
        where = f"{field} at byte offset {offset}" if offset is not None else str(field)
    return str(_get(reason, "code")), str(_get(reason, "message")), None if where is None else str(where)


def reason_lines(reasons: Iterable[Any], *, indent: str = "  ") -> list[str]:
    """``- [code] message (where)``, one per reason; a message's further lines indented under it."""
    lines = []
    for reason in reasons:
        code, message, where = reason_fields(reason)
        text = f"{indent}- [{code}] {message}" + (f" ({where})" if where and where not in message else "")
        lines.append(safe_text(text.replace("\n", "\n" + indent + "    ")))
    return lines


def reason_dicts(reasons: Iterable[Any]) -> list[dict[str, Any]]:
    """The reasons for a JSON document: each one's own ``to_dict()`` (``code``, ``message``)."""
    return [dict(r) if isinstance(r, Mapping) else r.to_dict() for r in reasons]


def print_exceptions(lines: Iterable[str]) -> None:
    """A verdict's policy exceptions, one ``policy exception:`` line each (in yellow on a
    terminal); the cache's line quotes what a PCS or PCCS answered, so each is escaped."""
    for line in lines:
        click.echo(click.style(safe_text(f"policy exception: {line}"), fg="yellow"))


def refused_line(headline: str) -> str:
    """``REFUSED  headline``, the word in red on a terminal (not under NO_COLOR)."""
    return styled("REFUSED", fg="red", bold=True) + "  " + safe_text(headline)


def print_refusal(headline: str, reasons: Iterable[Any], output: str, *, document: Mapping[str, Any]) -> None:
    """The refusal on stdout: ``document`` with ``-o json``, else the headline and every reason."""
    if output == "json":
        emit_json(dict(document))
        return
    click.echo(refused_line(headline))
    for line in reason_lines(reasons):
        click.echo(line)
