"""The controller's SSH key: how tdxvm logs in to the guests it built.

An Ed25519 key kept in the secret store as ``ssh/controller`` (OpenSSH private key
format, mode 0600), made on first use. Its public half goes into every image's
``/root/.ssh/authorized_keys``; the guest's own host key is checked against the key its
attestation quote binds, never taken on first use.

Its public half also names the controller: :func:`controller_id` (the first 16 hex
digits of the SHA-256 of the raw Ed25519 public key) is the ``controller`` label of every
VM the controller launches, so that another controller's VMs are told apart
(:mod:`tdxvm.launch.ownership`). The id is not secret; copying the secret store to
another machine carries the key, and with it the id.
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from tdxvm.secretstore import SecretStore

SECRET = "ssh/controller"
ID_HEX = 16  # hex digits of a controller id


def controller_key(store: SecretStore) -> Ed25519PrivateKey:
    """The controller's key (made and stored on first use)."""
    pem = store.get_or_make(
        SECRET,
        lambda: Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    loaded = serialization.load_ssh_private_key(pem, password=None)
    if not isinstance(loaded, Ed25519PrivateKey):
        raise TypeError(f"{SECRET} in {store.directory} is not an Ed25519 key")
    return loaded


def public_line(key: Ed25519PrivateKey, comment: str = "tdxvm-controller") -> str:
    """The ``authorized_keys`` line of ``key``."""
    raw = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return f"{raw.decode()} {comment}"


def key_id(key: Ed25519PublicKey) -> str:
    """A controller's id: the first :data:`ID_HEX` hex digits of SHA-256 of its raw public key."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:ID_HEX]


def controller_id(store: SecretStore) -> str:
    """This controller's id (its key made and stored on first use, as :func:`controller_key`)."""
    return key_id(controller_key(store).public_key())


def known_controller_id(store: SecretStore) -> str | None:
    """This controller's id, or None while the store holds no key yet; never makes one
    (for commands that only read: ``plan``, ``status``, ``destroy``)."""
    return controller_id(store) if store.exists(SECRET) else None
