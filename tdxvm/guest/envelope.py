"""Secrets wrapped to an attested guest by the controller: HPKE (RFC 9180), Auth mode, single shot.

Suite: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM (ids 0x0020, 0x0001,
0x0002); mode ``mode_auth`` (RFC 9180 §5.1.3). The controller seals a secret (a disk
key, a model key) to the ephemeral X25519 key whose hash the TD bound into its quote's
REPORTDATA, and authenticates it with its own long-term X25519 key (the *release key*,
:mod:`tdxvm.releasekey`), whose public half is built into the measured image:

- only that TD holds the recipient's private key, so a host that intercepts the channel
  learns nothing;
- only the controller holds the sender's private key, so a host that attests the TD
  itself cannot make it accept a secret of the host's choosing (its own disk passphrase
  or model key): the blob does not open under the image's controller key.

``info`` names what is sealed and after which attestation (it enters the key schedule),
and the KEM context binds the recipient's and the sender's public keys, so a blob
sealed as one thing, for one key, by one sender cannot be opened as anything else.

Wire format: ``enc (32 bytes, the sender's ephemeral X25519 key) ‖ AES-GCM ciphertext``.
The construction is written out here from X25519, HKDF and AES-GCM so that it also runs
on the older ``cryptography`` of the guest's Debian (and because ``cryptography`` has no
Auth mode); the tests check it against RFC 9180's test vectors (A.1.3, A.2.3).
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tdxvm.errors import TdxvmError

KEM_ID, KDF_ID, AEAD_ID = 0x0020, 0x0001, 0x0002
ENC_SIZE = 32
KEY_SIZE = 32  # AES-256-GCM
_KEM_SUITE = b"KEM" + struct.pack(">H", KEM_ID)
MODE_AUTH = 0x02


class EnvelopeError(TdxvmError):
    """A sealed secret could not be opened: wrong key, wrong sender, wrong ``info``, or tampered."""

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


def _auth_shared_secret(dh: bytes, enc: bytes, recipient: bytes, sender: bytes) -> bytes:
    """DHKEM's ExtractAndExpand for AuthEncap/AuthDecap: ``dh = DH(skE, pkR) ‖ DH(skS, pkR)``,
    ``kem_context = enc ‖ pkR ‖ pkS`` (RFC 9180 §4.1)."""
    prk = _labeled_extract(_KEM_SUITE, b"", b"eae_prk", dh)
    return _labeled_expand(_KEM_SUITE, prk, b"shared_secret", enc + recipient + sender, 32)


def _key_and_nonce(
    shared_secret: bytes, info: bytes, *, aead_id: int = AEAD_ID, key_size: int = KEY_SIZE, mode: int = MODE_AUTH
) -> tuple[bytes, bytes]:
    """KeySchedule (RFC 9180 §5.1) without a PSK; ``aead_id``/``key_size`` only vary in tests."""
    suite = b"HPKE" + struct.pack(">HHH", KEM_ID, KDF_ID, aead_id)
    psk_id_hash = _labeled_extract(suite, b"", b"psk_id_hash", b"")
    info_hash = _labeled_extract(suite, b"", b"info_hash", info)
    context = bytes([mode]) + psk_id_hash + info_hash
    secret = _labeled_extract(suite, shared_secret, b"secret", b"")
    key = _labeled_expand(suite, secret, b"key", context, key_size)
    nonce = _labeled_expand(suite, secret, b"base_nonce", context, 12)
    return key, nonce


def raw_public(key: X25519PrivateKey | X25519PublicKey) -> bytes:
    """The 32-byte raw public key of an X25519 key pair (or public key)."""
    public = key.public_key() if isinstance(key, X25519PrivateKey) else key
    return public.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _public(raw: bytes, what: str) -> X25519PublicKey:
    try:
        return X25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise EnvelopeError(f"the {what} key is not a 32-byte X25519 public key") from None


def seal(plaintext: bytes, recipient: bytes, *, info: bytes, sender: X25519PrivateKey) -> bytes:
    """Seal ``plaintext`` to the 32-byte X25519 public key ``recipient``, authenticated by ``sender``."""
    recipient_key = _public(recipient, "recipient")
    ephemeral = X25519PrivateKey.generate()
    enc = raw_public(ephemeral)
    dh = ephemeral.exchange(recipient_key) + sender.exchange(recipient_key)
    key, nonce = _key_and_nonce(_auth_shared_secret(dh, enc, recipient, raw_public(sender)), info)
    return enc + AESGCM(key).encrypt(nonce, plaintext, b"")


def open_sealed(blob: bytes, private_key: X25519PrivateKey, *, info: bytes, sender: bytes) -> bytes:
    """Open a blob from :func:`seal` with the recipient's private key; it opens only if it
    was sealed by the holder of the private half of ``sender`` (32 bytes, X25519)."""
    sender_key = _public(sender, "sender")
    if len(blob) < ENC_SIZE + 16:
        raise EnvelopeError(f"sealed secret is {len(blob)} bytes, too short")
    enc, ciphertext = blob[:ENC_SIZE], blob[ENC_SIZE:]
    try:
        dh = private_key.exchange(X25519PublicKey.from_public_bytes(enc)) + private_key.exchange(sender_key)
    except ValueError:
        raise EnvelopeError("sealed secret carries an invalid X25519 key") from None
    key, nonce = _key_and_nonce(_auth_shared_secret(dh, enc, raw_public(private_key), sender), info)
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, b"")
    except InvalidTag:
        raise EnvelopeError(
            "sealed secret does not open: not sealed by the controller's release key, "
            "for another purpose or key, or tampered"
        ) from None
