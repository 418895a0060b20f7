"""The controller's release key: what makes a guest accept a secret from this controller only.

An X25519 key kept in the secret store as ``release/controller`` (32 raw bytes, mode
0600), made on first use. Every secret the controller releases to an attested guest (the
disk passphrase, a model key) is sealed with HPKE Auth mode under this key
(:mod:`tdxvm.guest.envelope`). Its public half is built into every image the controller
builds, in the root filesystem and the initramfs (:data:`GUEST_PATH`), so it is part of
what the quote measures; the guest's unlock step and agent open a secret only when it
was sealed by that key. A host that attests the guest itself can seal to the same
attested key, but its blob does not open there.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from tdxvm.secretstore import SecretStore, SecretStoreError

SECRET = "release/controller"
GUEST_PATH = "/etc/tdxvm/controller-release.pub"  # hex of the 32-byte public key, one line


def release_key(store: SecretStore) -> X25519PrivateKey:
    """The controller's release key (made and stored on first use)."""
    raw = store.get_or_make(
        SECRET, lambda: X25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    )
    if len(raw) != 32:
        raise SecretStoreError(f"secret {SECRET} in {store.directory} is not a 32-byte X25519 key")
    return X25519PrivateKey.from_private_bytes(raw)


def public_hex(key: X25519PrivateKey) -> str:
    """How the public half is written into an image and its manifest."""
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
