"""The guest agent's wire format, shared by the agent (guest) and the handshake (controller).

TCP, one UTF-8 JSON object per line, at most :data:`MAX_LINE` bytes a line, port 7300:

* ``{"op": "attest", "nonce": "<64 hex>", "qgs": "<host:port>" | null}`` →
  ``{"ok": true, "provider": "configfs-tsm" | "tdx-guest" | "emulated", "quote": "<b64>",
  "keys": {"x25519": "<b64>", "ssh-host": "<b64>", ...}, "event_log": "<b64>" | null}``.
  The agent makes a fresh X25519 key for every attest; the quote's REPORTDATA is
  :func:`tdxvm.attest.binding.report_data` of the nonce and ``keys``.
* ``{"op": "secret", "name": "<name>", "sealed": "<b64>"}`` → ``{"ok": true}``: the secret
  sealed (:func:`tdxvm.guest.envelope.seal`) to the X25519 key of the latest attest on the
  same connection, with ``info`` = :func:`secret_info` (name, that attest's nonce).
* any failure → ``{"ok": false, "error": "<message>"}``.

Standard library only: this ships into the guest.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from tdxvm.errors import TdxvmError

DEFAULT_PORT = 7300
MAX_LINE = 1 << 20
SECRET_INFO_PREFIX = b"tdxvm secret v1\x00"
X25519_KEY = "x25519"
_SECRET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class WireError(TdxvmError, ValueError):
    """A line that is not this protocol; the message says which field is wrong."""

    code = "agent-protocol"


def secret_info(name: str, nonce: bytes) -> bytes:
    """The HPKE ``info`` a secret called ``name`` is sealed with, after the attest with ``nonce``."""
    return SECRET_INFO_PREFIX + name.encode("utf-8") + b"\x00" + nonce


def check_secret_name(name: Any) -> str:
    """``name`` if it is a usable secret name (a file name: letters, digits, ``.``, ``_``, ``-``)."""
    if not isinstance(name, str) or not _SECRET_NAME.fullmatch(name):
        raise WireError(
            f"secret name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode("utf-8") + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """One request or answer line as a JSON object."""
    try:
        obj = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: absurd nesting
        raise WireError("the line is not UTF-8 JSON") from None
    if not isinstance(obj, dict):
        raise WireError("the line is not a JSON object")
    return obj


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(value: Any, field: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise WireError(f"{field}: expected a non-empty base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise WireError(f"{field}: not valid base64") from None


def read_line(stream: Any, *, limit: int = MAX_LINE) -> bytes | None:
    """The next line of a binary stream (``readline``), without its newline; None at the end.

    A line longer than ``limit``, or one cut off by the end of the stream, is a :class:`WireError`.
    """
    line = stream.readline(limit + 1)
    if not line:
        return None
    if not line.endswith(b"\n"):
        if len(line) > limit:
            raise WireError(f"line longer than {limit} bytes")
        raise WireError("the connection closed in the middle of a line")
    return line[:-1]
