"""The controller's SSH key: how tdxvm logs in to the guests it built.

An Ed25519 key kept in the secret store as ``ssh/controller`` (OpenSSH private key
format, mode 0600), made on first use. Its public half goes into every image's
``/root/.ssh/authorized_keys``; the guest's own host key is checked against the key its
attestation quote binds, never taken on first use.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tdxvm.secretstore import SecretStore

SECRET = "ssh/controller"


def controller_key(store: SecretStore) -> Ed25519PrivateKey:
    """The controller's key (made and stored on first use)."""
    if not store.exists(SECRET):
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        store.put(SECRET, pem)
    loaded = serialization.load_ssh_private_key(store.get(SECRET), password=None)
    if not isinstance(loaded, Ed25519PrivateKey):
        raise TypeError(f"{SECRET} in {store.directory} is not an Ed25519 key")
    return loaded


def public_line(key: Ed25519PrivateKey, comment: str = "tdxvm-controller") -> str:
    """The ``authorized_keys`` line of ``key``."""
    raw = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return f"{raw.decode()} {comment}"
