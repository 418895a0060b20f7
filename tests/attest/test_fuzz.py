"""Fuzzing: random and mutated quotes and collateral never raise anything but AttestError."""

from __future__ import annotations

import dataclasses

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tdxvm.attest.collateral import load_bundle
from tdxvm.attest.errors import AttestError
from tdxvm.attest.pck import parse_pem_chain
from tdxvm.attest.quote import parse_quote
from tdxvm.attest.verdict import appraise
from tdxvm.attest.verify import QuoteVerifier

from ..conftest import TESTDATA, utc

AT = utc("2025-06-20T00:00:00Z")
QUOTE = (TESTDATA / "dcap-qvl-v4" / "quote.bin").read_bytes()
COLLATERAL = load_bundle(TESTDATA / "dcap-qvl-v4" / "collateral.json")
VERIFIER = QuoteVerifier()
DER = Encoding.DER


def _mutations(data: bytes):
    positions = st.integers(min_value=0, max_value=len(data) - 1)
    flip = st.tuples(st.just("flip"), positions, st.integers(1, 255))
    cut = st.tuples(st.just("cut"), positions, st.just(0))
    insert = st.tuples(st.just("insert"), positions, st.integers(0, 255))
    return st.lists(st.one_of(flip, cut, insert), min_size=1, max_size=8)


def _apply(data: bytes, ops) -> bytes:
    out = bytearray(data)
    for op, pos, value in ops:
        pos = min(pos, max(len(out) - 1, 0))
        if not out:
            break
        if op == "flip":
            out[pos] ^= value
        elif op == "cut":
            del out[pos:]
        else:
            out.insert(pos, value)
    return bytes(out)


def _same_certs(a: bytes | str, b: bytes | str) -> bool:
    try:
        return [c.public_bytes(DER) for c in parse_pem_chain(a)] == [c.public_bytes(DER) for c in parse_pem_chain(b)]
    except AttestError:
        return False


ORIGINAL = parse_quote(QUOTE)


def _check(quote: bytes) -> None:
    """Only AttestError may escape; an accepted quote must mean the same as the original."""
    try:
        verdict = appraise(quote, COLLATERAL, at=AT, verifier=VERIFIER)
    except AttestError:
        return
    if verdict.accepted:
        q = verdict.result.quote
        assert q.signed_data == ORIGINAL.signed_data
        assert dataclasses.replace(q.signature, pck_chain_pem=b"") == dataclasses.replace(
            ORIGINAL.signature, pck_chain_pem=b""
        )
        assert _same_certs(q.signature.pck_chain_pem, ORIGINAL.signature.pck_chain_pem)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutations(QUOTE))
def test_mutated_quotes(ops):
    _check(_apply(QUOTE, ops))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=6000))
def test_random_quotes(data):
    _check(data)


FIELDS = [f.name for f in dataclasses.fields(COLLATERAL)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(FIELDS), st.data())
def test_mutated_collateral(field, data):
    value = getattr(COLLATERAL, field)
    raw = value.encode() if isinstance(value, str) else value
    mutated = _apply(raw, data.draw(_mutations(raw)))
    if isinstance(value, str):
        try:
            mutated_value = mutated.decode()
        except UnicodeDecodeError:
            return
    else:
        mutated_value = mutated
    if mutated_value == value:
        return
    coll = dataclasses.replace(COLLATERAL, **{field: mutated_value})
    try:
        verdict = appraise(QUOTE, coll, at=AT, verifier=QuoteVerifier())
    except AttestError:
        return
    if verdict.accepted:
        # Only a re-spelling of the same certificates (PEM whitespace) may still pass.
        assert field.endswith("_issuer_chain") and _same_certs(mutated_value, value), f"mutated {field} was accepted"


@pytest.mark.parametrize("field", FIELDS)
def test_each_collateral_field_is_load_bearing(field):
    """Corrupting any one field (one byte in its middle) never yields an accepted quote."""
    value = getattr(COLLATERAL, field)
    raw = bytearray(value.encode() if isinstance(value, str) else value)
    mid = len(raw) // 2
    raw[mid] = ord("A") if raw[mid] != ord("A") else ord("B")
    mutated = raw.decode() if isinstance(value, str) else bytes(raw)
    try:
        verdict = appraise(QUOTE, dataclasses.replace(COLLATERAL, **{field: mutated}), at=AT, verifier=QuoteVerifier())
    except AttestError:
        return
    assert not verdict.accepted, f"a corrupted {field} was accepted"
