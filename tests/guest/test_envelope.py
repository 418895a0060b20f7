"""HPKE envelopes: interoperable with cryptography's RFC 9180 implementation, and refused
whenever the key, the purpose or the bytes are wrong."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from tdxvm.guest.envelope import EnvelopeError, open_sealed, seal

SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


def raw(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


@settings(max_examples=30, deadline=None)
@given(st.binary(max_size=200), st.binary(max_size=64))
def test_interoperates_with_cryptography_hpke(plaintext, info):
    sk = X25519PrivateKey.generate()
    assert SUITE.decrypt(seal(plaintext, raw(sk), info=info), sk, info=info) == plaintext
    assert open_sealed(SUITE.encrypt(plaintext, sk.public_key(), info=info), sk, info=info) == plaintext


def test_each_seal_is_fresh():
    sk = X25519PrivateKey.generate()
    a, b = seal(b"k" * 32, raw(sk), info=b"disk"), seal(b"k" * 32, raw(sk), info=b"disk")
    assert a != b and a[:32] != b[:32]


def test_refusals():
    sk = X25519PrivateKey.generate()
    blob = seal(b"secret disk key", raw(sk), info=b"tdxvm disk-key smoke")
    with pytest.raises(EnvelopeError, match="does not open"):
        open_sealed(blob, X25519PrivateKey.generate(), info=b"tdxvm disk-key smoke")
    with pytest.raises(EnvelopeError, match="does not open"):
        open_sealed(blob, sk, info=b"tdxvm model-key smoke")
    for i in (0, 31, 32, len(blob) - 1):
        tampered = bytearray(blob)
        tampered[i] ^= 1
        with pytest.raises(EnvelopeError):
            open_sealed(bytes(tampered), sk, info=b"tdxvm disk-key smoke")
    with pytest.raises(EnvelopeError, match="too short"):
        open_sealed(blob[:40], sk, info=b"x")
    with pytest.raises(EnvelopeError, match="X25519"):
        seal(b"x", b"short", info=b"x")
