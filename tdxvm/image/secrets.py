"""Disk volume keys in the controller's secret store, and nowhere else.

A volume key is generated at build time and stored as ``disk/<image name>`` in
:class:`tdxvm.secretstore.SecretStore`: a folder under ``$XDG_DATA_HOME/tdxvm/secrets``
(else ``~/.local/share/tdxvm/secrets``) or one the user gives, folders mode 0700, files
mode 0600 created with ``O_CREAT | O_EXCL`` and renamed into place. The image, the
manifest, the logs and the output folder never hold it; errors name the key, never
its bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

from tdxvm.secretstore import SecretStore, SecretStoreError

VOLUME_KEY_BYTES = 64  # aes-xts-plain64 with two AES-256 keys
KIND = "disk"

KEYSLOT_INFO = b"tdxvm luks2 keyslot v1"

__all__ = ["VOLUME_KEY_BYTES", "SecretStoreError", "generate_volume_key", "keyslot_passphrase", "load", "store"]


def generate_volume_key() -> bytes:
    """A fresh 512-bit volume key from the operating system's CSPRNG."""
    return secrets.token_bytes(VOLUME_KEY_BYTES)


def keyslot_passphrase(volume_key: bytes) -> bytes:
    """The passphrase of the image's LUKS2 keyslot: ASCII hex of HKDF-SHA256(volume key,
    info "tdxvm luks2 keyslot v1") (RFC 5869, no salt, 32 bytes). The keyslot lets the
    image's owner open it offline with standard tools; the guest never uses it: the
    controller releases the volume key itself to the attested TD, whose initramfs maps the
    payload with fixed parameters and never reads the header (:mod:`tdxvm.guest.rootdisk`)."""
    prk = hmac.new(bytes(32), volume_key, hashlib.sha256).digest()
    okm = hmac.new(prk, KEYSLOT_INFO + b"\x01", hashlib.sha256).digest()
    return okm.hex().encode()


def _store(directory: Path | None) -> SecretStore:
    return SecretStore(directory=directory)


def _check(name: str, key: bytes) -> None:
    if len(key) != VOLUME_KEY_BYTES:
        raise SecretStoreError(f"volume key {KIND}/{name} is {len(key)} bytes, expected {VOLUME_KEY_BYTES}")


def store(name: str, key: bytes, *, directory: Path | None = None, replace: bool = False) -> Path:
    """Keep ``key`` as ``disk/<name>``; refused if it exists unless ``replace``. Returns its path."""
    _check(name, key)
    return _store(directory).put(f"{KIND}/{name}", key, replace=replace)


def load(name: str, *, directory: Path | None = None) -> bytes:
    """The volume key stored as ``disk/<name>`` (mode and length checked)."""
    key = _store(directory).get(f"{KIND}/{name}")
    _check(name, key)
    return key
