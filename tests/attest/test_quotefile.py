"""Quote files: what is not a quote gets a first message that says what it is instead."""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tdxvm.attest.collateral import load_bundle
from tdxvm.attest.errors import QuoteFormatError
from tdxvm.attest.quote import parse_quote
from tdxvm.attest.quotefile import diagnose, load_quote
from tdxvm.attest.verdict import appraise

from ..conftest import TESTDATA, utc


@pytest.fixture(scope="module")
def raw(testdata) -> bytes:
    return (testdata / "dcap-qvl-v4" / "quote.bin").read_bytes()


def refused(data: bytes) -> QuoteFormatError:
    with pytest.raises(QuoteFormatError) as err:
        load_quote(data)
    assert err.value.code == "quote-format"
    return err.value


def test_binary_and_hex_quotes_read_as_before(raw):
    assert load_quote(raw).raw == raw
    assert load_quote(raw.hex().encode() + b"\n").raw == raw
    assert load_quote(b"0x" + raw.hex().upper().encode()).raw == raw


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "the quote file is empty (0 bytes)"),
        (b" \n\n", "only whitespace (3 bytes)"),
        (b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n", "PEM text (CERTIFICATE)"),
        (b'{"tcb_info": "{}", "qe_identity": "{}"}', "collateral bundle (JSON with qe_identity, tcb_info)"),
        (b'{"quote": "0400", "event_log": []}', 'its "quote" member may hold one (extract it, e.g. jq -r .quote'),
        (b'{"something": 1}', "the quote file is a JSON object"),
        (b"[1, 2]", "the quote file is a JSON document"),
        (b"040002008", "hex text with an odd number of digits (9)"),
        (b"hello, this is not a quote\n", "the quote file is text ('hello, this is n'…)"),
    ],
)
def test_common_mistakes_named(data, words):
    err = refused(data)
    assert words in err.message
    assert (err.field, err.offset) == ("quote", 0)
    assert err.message.startswith("quote at byte offset 0: ")


@pytest.mark.parametrize("encode", [base64.b64encode, base64.urlsafe_b64encode])
def test_base64_quote_named(raw, encode):
    err = refused(encode(raw) + b"\n")
    assert "base64 text (of what starts like a v4 quote)" in err.message and "base64 -d" in err.message


def test_structural_errors_keep_field_and_offset(raw):
    """A quote-shaped input keeps the parser's own field and offset (no guess replaces it)."""
    err = refused(struct.pack("<H", 3) + raw[2:])
    assert (err.field, err.offset) == ("header.version", 0) and "an SGX enclave quote" in err.message
    err = refused(raw[:4] + struct.pack("<I", 0) + raw[8:])
    assert (err.field, err.offset) == ("header.tee_type", 4) and "(SGX) is not TDX" in err.message
    err = refused(raw.hex()[:1000].encode())  # hex of a cut quote: the decoded bytes' error
    assert err.field.startswith("body.") and err.offset < 500
    assert diagnose(raw) is None


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000))
def test_any_bytes_either_parse_or_raise_quote_format_error(data):
    with contextlib.suppress(QuoteFormatError):
        load_quote(data)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_any_text_either_parse_or_raise_quote_format_error(text):
    with contextlib.suppress(QuoteFormatError):
        load_quote(text.encode())
    with contextlib.suppress(QuoteFormatError):
        load_quote(json.dumps({"quote": text}).encode())


def test_diagnosis_never_replaces_a_parse(raw):
    # Even a quote whose bytes happen to look like text still parses: diagnose is asked only after a failure.
    assert parse_quote(raw) == load_quote(raw)


@functools.cache
def _v4_with_collateral():
    d = TESTDATA / "dcap-qvl-v4"
    return (d / "quote.bin").read_bytes(), load_bundle(d / "collateral.json")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), min_size=1, max_size=6), st.integers(0, 10_000))
def test_quote_content_is_never_the_verifiers_error(flips, cut):
    """What a quote holds decides the verdict, never an error: a mutated quote either
    fails to parse (QuoteFormatError, the "no" of verify-quote) or is verified, whatever
    its PCK chain, signatures or TD report say. Only the verifier's own inputs raise."""
    raw, collateral = _v4_with_collateral()
    data = bytearray(raw)
    for pos, value in flips:
        data[pos % len(data)] ^= value
    try:
        quote = load_quote(bytes(data[: max(cut, 1)]))
    except QuoteFormatError:
        return
    appraise(quote, collateral, at=utc("2025-06-20T00:00:00Z"))  # never raises
