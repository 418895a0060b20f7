"""REPORTDATA binding of the nonce and the guest's public keys."""

from __future__ import annotations

import hashlib
import os
import struct

import pytest

from tdxvm.attest.binding import TAG, BindingError, check_report_data, keys_digest, report_data

KEYS = {"x25519": os.urandom(32), "ssh-host": b"\x00\x00\x00\x0bssh-ed25519" + os.urandom(36), "tls": os.urandom(91)}


def test_layout_matches_the_documented_encoding():
    nonce = os.urandom(32)
    encoded = b"".join(
        struct.pack(">H", len(n)) + n.encode() + struct.pack(">I", len(KEYS[n])) + KEYS[n] for n in sorted(KEYS)
    )
    expected = hashlib.sha512(TAG + nonce + hashlib.sha512(encoded).digest()).digest()
    assert report_data(nonce, KEYS) == expected
    assert len(expected) == 64


def test_every_input_matters():
    nonce = os.urandom(32)
    rd = report_data(nonce, KEYS)
    assert check_report_data(rd, nonce, KEYS)
    assert not check_report_data(rd, os.urandom(32), KEYS)  # a replayed quote
    for name in KEYS:
        changed = dict(KEYS, **{name: KEYS[name][:-1] + bytes([KEYS[name][-1] ^ 1])})
        assert not check_report_data(rd, nonce, changed)
        dropped = {k: v for k, v in KEYS.items() if k != name}
        assert not check_report_data(rd, nonce, dropped)
    # Moving bytes between keys changes the encoding (lengths are part of it).
    a = {"x25519": b"ab", "tls": b"c"}
    b = {"x25519": b"a", "tls": b"bc"}
    assert keys_digest(a) != keys_digest(b)


def test_bad_inputs():
    with pytest.raises(BindingError, match="nonce"):
        report_data(b"short", KEYS)
    with pytest.raises(BindingError, match="empty"):
        report_data(os.urandom(32), {"x25519": b""})
    with pytest.raises(BindingError, match="key name"):
        report_data(os.urandom(32), {"bad name": b"x"})
    for name in ("x25519\u0660", "ключ", "", "k" * 256):  # a guest's names outside ASCII: refused, not a crash
        with pytest.raises(BindingError, match="1 to 255 ASCII letters"):
            report_data(os.urandom(32), {name: b"x"})


def test_a_guest_key_name_outside_ascii_is_a_refusal_reason():
    from tdxvm.provision.handshake import binding_reasons

    [reason] = binding_reasons(bytes(64), os.urandom(32), {"x25519": b"k" * 32, "ssh-h\u00f6st": b"x"})
    assert reason.code == "report-data-binding" and "cannot be bound" in reason.message
