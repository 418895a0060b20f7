"""API keys of the inference service: the set the controller released, kept as hashes.

The controller (:mod:`tdxvm.provision.apikeys`) releases the set to the attested guest
as one sealed secret named :data:`SECRET_NAME`, which the agent opens only if the
controller's release key sealed it, and keeps in ``/run/tdxvm/secrets`` (TD memory).
The secret holds each key's name and the SHA-256 of the key, never the key itself::

    {"format": "tdxvm-api-keys/1", "keys": [{"name": "default", "sha256": "<64 hex>"}]}

so neither the guest's memory nor its files hold a usable key. Keys are 256-bit random
strings (:func:`generate`), so one unsalted SHA-256 is as strong as any slow hash here.

:class:`KeyFile` is the service's view of that file: it reads it again whenever it
changes (a new inode, size or mtime: the agent replaces it atomically), so re-provisioning
rotates the keys without restarting the model. A missing or unreadable file accepts no
key: the service fails closed.

Standard library only: this runs in the guest.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
from collections.abc import Mapping
from pathlib import Path

from tdxvm.errors import TdxvmError

SECRET_NAME = "api-keys"
FORMAT = "tdxvm-api-keys/1"
PREFIX = "tdxvm-"
MAX_KEYS = 256
MAX_FILE = 64 * 1024
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HEX = re.compile(r"^[0-9a-f]{64}$")
_KEY = re.compile(r"^tdxvm-[A-Za-z0-9_-]{43}$")


class ApiKeysError(TdxvmError):
    """A key set or a key that is not in tdxvm's form; the message says which field."""

    code = "api-keys"


def generate() -> str:
    """A new API key: ``tdxvm-`` and 32 random bytes in unpadded base64url (43 characters)."""
    return PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def check_key(key: str, where: str) -> str:
    """``key`` if it has :func:`generate`'s form (``where`` names it in the error)."""
    if not _KEY.fullmatch(key):
        raise ApiKeysError(f"{where}: not a tdxvm API key (tdxvm- and 43 base64url characters)")
    return key


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise ApiKeysError(f"API key name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    return name


def key_hash(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def document(keys: Mapping[str, str]) -> bytes:
    """The released secret for ``keys`` (name → key): names and hashes only."""
    if not keys:
        raise ApiKeysError("an API key set needs at least one key")
    if len(keys) > MAX_KEYS:
        raise ApiKeysError(f"an API key set holds at most {MAX_KEYS} keys, not {len(keys)}")
    entries = [
        {"name": check_name(name), "sha256": key_hash(check_key(key, f"API key {name}")).hex()}
        for name, key in sorted(keys.items())
    ]
    return json.dumps({"format": FORMAT, "keys": entries}, sort_keys=True).encode()


def parse(data: bytes, where: str) -> dict[bytes, str]:
    """The key hashes (→ names) of a released secret; :class:`ApiKeysError` names the field."""
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise ApiKeysError(f"{where}: not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ApiKeysError(f"{where}: format: not {FORMAT}")
    entries = doc.get("keys")
    if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_KEYS or set(doc) != {"format", "keys"}:
        raise ApiKeysError(f"{where}: keys: a list of 1 to {MAX_KEYS} keys (and nothing else beside format)")
    out: dict[bytes, str] = {}
    for i, entry in enumerate(entries):
        if (
            not isinstance(entry, dict)
            or set(entry) != {"name", "sha256"}
            or not isinstance(entry["name"], str)
            or not NAME_PATTERN.fullmatch(entry["name"])
            or not isinstance(entry["sha256"], str)
            or not _HEX.fullmatch(entry["sha256"])
        ):
            raise ApiKeysError(f"{where}: keys.{i}: {{name, sha256: 64 lowercase hex}}")
        out[bytes.fromhex(entry["sha256"])] = entry["name"]
    return out


class KeyFile:
    """The released key set in ``path``, read again whenever the file changes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._seen: tuple[int, int, int] | None | str = "unread"
        self._hashes: dict[bytes, str] = {}
        self.problem: str | None = None

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def current(self) -> dict[bytes, str]:
        """The key hashes now in force (empty, with :attr:`problem` set, when there are none)."""
        seen = self._stat()
        with self._lock:
            if seen != self._seen:
                self._seen, self._hashes, self.problem = seen, {}, None
                try:
                    if seen is None:
                        raise ApiKeysError(f"{self.path}: no API keys released yet (tdxvm provision releases them)")
                    if seen[1] > MAX_FILE:
                        raise ApiKeysError(f"{self.path}: larger than {MAX_FILE} bytes")
                    self._hashes = parse(self.path.read_bytes(), str(self.path))
                except (ApiKeysError, OSError) as exc:
                    self.problem = str(exc)
            return self._hashes

    def check(self, token: str) -> str | None:
        """The name of the key ``token`` is, or None."""
        digest = key_hash(token)
        found = None
        for known, name in self.current().items():  # every entry compared, in constant time each
            if hmac.compare_digest(known, digest):
                found = name
        return found
