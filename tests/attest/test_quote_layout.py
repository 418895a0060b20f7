"""The quote parser's one-unpack reading of well-formed quotes agrees with reading every
field in turn: the same structures for good quotes, the same error (field, offset,
message) for truncated or corrupted ones."""

from __future__ import annotations

import random
import struct

import pytest

from tdxvm.attest import quote as quote_mod
from tdxvm.attest.errors import QuoteFormatError
from tdxvm.attest.quote import parse_quote
from tdxvm.emulate.platform import EmulatedPlatform

from ..conftest import TESTDATA, utc

REAL = sorted(TESTDATA.glob("*/quote.bin"))


def _outcome(data: bytes):
    try:
        return parse_quote(data)
    except QuoteFormatError as exc:
        return ("error", str(exc), exc.field, exc.offset)


def _field_by_field(self, r, prefix):
    values = []
    for name, code, size in self.fields:
        values.extend(struct.unpack("<" + code, r.take(size, prefix + name)))
    return tuple(values)


def _slow(monkeypatch):
    """Turn every one-unpack reading off: each field read in turn."""
    monkeypatch.setattr(quote_mod._Layout, "read", _field_by_field)
    monkeypatch.setattr(quote_mod, "_regular_header", lambda r: None)
    monkeypatch.setattr(quote_mod, "_regular_signature", lambda r: None)


@pytest.fixture(scope="module")
def samples() -> list[bytes]:
    platform = EmulatedPlatform(at=utc("2025-06-20T00:00:00Z"), seed="quote-layout")
    emulated = [platform.sign_quote(), *(platform.sign_quote(version=5, body_type=t) for t in (2, 3, 4))]
    return [p.read_bytes() for p in REAL] + emulated


def _variants(quote: bytes, rnd: random.Random) -> list[bytes]:
    out = [quote, quote + b"\x00" * 7]  # padding after the signature data is allowed
    out += [quote[:n] for n in range(0, len(quote), 7)]
    for _ in range(300):
        b = bytearray(quote)
        for _ in range(rnd.randint(1, 3)):
            i = rnd.randrange(min(len(b), 1400))  # header, body, sizes, types, QE report, auth data
            b[i] = rnd.randrange(256)
        out.append(bytes(b))
    return out


def test_one_unpack_agrees_with_field_by_field(samples, monkeypatch):
    rnd = random.Random(5)
    cases = [v for q in samples for v in _variants(q, rnd)]
    fast = [_outcome(c) for c in cases]
    _slow(monkeypatch)
    slow = [_outcome(c) for c in cases]
    assert fast == slow
    assert sum(not isinstance(o, tuple) for o in fast) > len(samples)  # parsed ones among them
    assert {o[2] for o in fast if isinstance(o, tuple)} >= {
        "header.version",
        "body.report_data",
        "signature_data",
        "signature_data.certification_data.type",
    }


def test_body_types(samples):
    assert {parse_quote(q).body.body_type for q in samples} == {2, 3, 4}
