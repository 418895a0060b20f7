"""Secrets wrapped to an attested guest: HPKE (RFC 9180), base mode, single shot.

Suite: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM (ids 0x0020, 0x0001,
0x0002). The controller seals a secret (a disk key, a model key) to the ephemeral
X25519 key whose hash the TD bound into its quote's REPORTDATA; only that TD holds the
private key, so a host that intercepts the channel learns nothing. ``info`` names what
is sealed and for whom (it enters the key schedule), so a blob sealed as one thing
cannot be opened as another.

Wire format: ``enc (32 bytes, the sender's ephemeral X25519 key) ‖ AES-GCM ciphertext``,
the same bytes ``cryptography``'s own HPKE produces. The construction is written out
here from X25519, HKDF and AES-GCM so that it also runs on the older ``cryptography``
of the guest's Debian; the tests check it against ``cryptography.hazmat.primitives.hpke``.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

KEM_ID, KDF_ID, AEAD_ID = 0x0020, 0x0001, 0x0002
ENC_SIZE = 32
_KEM_SUITE = b"KEM" + struct.pack(">H", KEM_ID)
_HPKE_SUITE = b"HPKE" + struct.pack(">HHH", KEM_ID, KDF_ID, AEAD_ID)
_MODE_BASE = b"\x00"


class EnvelopeError(Exception):
    """A sealed secret could not be opened: wrong key, wrong ``info``, or tampered."""

    code = "envelope"


def _extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()


def _expand(prk: bytes, info: bytes, length: int) -> bytes:
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def _labeled_extract(suite: bytes, salt: bytes, label: bytes, ikm: bytes) -> bytes:
    return _extract(salt, b"HPKE-v1" + suite + label + ikm)


def _labeled_expand(suite: bytes, prk: bytes, label: bytes, info: bytes, length: int) -> bytes:
    return _expand(prk, struct.pack(">H", length) + b"HPKE-v1" + suite + label + info, length)


def _shared_secret(dh: bytes, enc: bytes, recipient: bytes) -> bytes:
    prk = _labeled_extract(_KEM_SUITE, b"", b"eae_prk", dh)
    return _labeled_expand(_KEM_SUITE, prk, b"shared_secret", enc + recipient, 32)


def _key_and_nonce(shared_secret: bytes, info: bytes) -> tuple[bytes, bytes]:
    psk_id_hash = _labeled_extract(_HPKE_SUITE, b"", b"psk_id_hash", b"")
    info_hash = _labeled_extract(_HPKE_SUITE, b"", b"info_hash", info)
    context = _MODE_BASE + psk_id_hash + info_hash
    secret = _labeled_extract(_HPKE_SUITE, shared_secret, b"secret", b"")
    key = _labeled_expand(_HPKE_SUITE, secret, b"key", context, 32)
    nonce = _labeled_expand(_HPKE_SUITE, secret, b"base_nonce", context, 12)
    return key, nonce


def _raw(public: X25519PublicKey) -> bytes:
    return public.public_bytes(Encoding.Raw, PublicFormat.Raw)


def seal(plaintext: bytes, recipient: bytes, *, info: bytes) -> bytes:
    """Seal ``plaintext`` to the 32-byte X25519 public key ``recipient``."""
    try:
        recipient_key = X25519PublicKey.from_public_bytes(recipient)
    except ValueError:
        raise EnvelopeError("the recipient key is not a 32-byte X25519 public key") from None
    ephemeral = X25519PrivateKey.generate()
    enc = _raw(ephemeral.public_key())
    dh = ephemeral.exchange(recipient_key)
    key, nonce = _key_and_nonce(_shared_secret(dh, enc, recipient), info)
    return enc + AESGCM(key).encrypt(nonce, plaintext, b"")


def open_sealed(blob: bytes, private_key: X25519PrivateKey, *, info: bytes) -> bytes:
    """Open a blob from :func:`seal` with the recipient's private key."""
    if len(blob) < ENC_SIZE + 16:
        raise EnvelopeError(f"sealed secret is {len(blob)} bytes, too short")
    enc, ciphertext = blob[:ENC_SIZE], blob[ENC_SIZE:]
    try:
        dh = private_key.exchange(X25519PublicKey.from_public_bytes(enc))
    except ValueError:
        raise EnvelopeError("sealed secret carries an invalid X25519 key") from None
    key, nonce = _key_and_nonce(_shared_secret(dh, enc, _raw(private_key.public_key())), info)
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, b"")
    except InvalidTag:
        raise EnvelopeError("sealed secret does not open: wrong key, wrong purpose, or tampered") from None
