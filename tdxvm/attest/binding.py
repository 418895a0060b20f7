"""REPORTDATA: what a TD binds into its quote, so the controller can trust its keys.

``REPORTDATA = SHA-512(tag ‖ nonce ‖ SHA-512(keys))`` (64 bytes, the whole field), where
``keys`` is the canonical encoding of every public key the controller will rely on
after attestation: the ephemeral X25519 key that secrets are wrapped to, the SSH host
key, the TLS key. The nonce is fresh per attestation (a replayed quote carries another
nonce); the tag separates this use from any other use of REPORTDATA.

Canonical encoding of ``keys``: for each key, sorted by name, ``u16 BE len(name) ‖
name ‖ u32 BE len(value) ‖ value``. Names are ``x25519`` (32 raw bytes), ``ssh-host``
(the OpenSSH wire-format public key blob) and ``tls`` (the DER SubjectPublicKeyInfo);
other names may be added, and an absent key is simply not listed. Both sides compute
the same bytes from the same keys, and no two different key sets encode alike.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Mapping

from tdxvm.errors import TdxvmError

TAG = b"tdxvm report-data v1\x00"
NONCE_SIZE = 32
REPORT_DATA_SIZE = 64


class BindingError(TdxvmError):
    code = "binding"


def keys_digest(keys: Mapping[str, bytes]) -> bytes:
    """SHA-512 of the canonical encoding of ``keys`` (name → public key bytes)."""
    h = hashlib.sha512()
    for name in sorted(keys):
        if not isinstance(name, str) or not name.isascii() or not name.replace("-", "").isalnum() or len(name) > 255:
            raise BindingError(f"key name {name!r} must be 1 to 255 ASCII letters, digits and '-'")
        raw_name = name.encode("ascii")
        value = keys[name]
        if not value:
            raise BindingError(f"key {name!r} is empty")
        h.update(struct.pack(">H", len(raw_name)) + raw_name + struct.pack(">I", len(value)) + value)
    return h.digest()


def report_data(nonce: bytes, keys: Mapping[str, bytes]) -> bytes:
    """The 64-byte REPORTDATA a TD puts in its quote for ``nonce`` and ``keys``."""
    if len(nonce) != NONCE_SIZE:
        raise BindingError(f"the nonce must be {NONCE_SIZE} bytes, got {len(nonce)}")
    return hashlib.sha512(TAG + nonce + keys_digest(keys)).digest()


def check_report_data(quoted: bytes, nonce: bytes, keys: Mapping[str, bytes]) -> bool:
    """Whether a quote's REPORTDATA binds exactly this nonce and these keys."""
    return hmac.compare_digest(quoted, report_data(nonce, keys))
