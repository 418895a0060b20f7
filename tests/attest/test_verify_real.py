"""Verdicts on quotes signed by real Intel hardware (../shared/testdata/tdx/README.md)."""

from __future__ import annotations

import struct
from datetime import timedelta

import pytest

from tdxvm.attest.collateral import load_bundle
from tdxvm.attest.errors import AttestError, QuoteFormatError
from tdxvm.attest.policy import Policy
from tdxvm.attest.quote import LAUNCH_TD_ATTRIBUTES, parse_quote
from tdxvm.attest.verdict import appraise
from tdxvm.attest.verify import QuoteVerifier

from ..conftest import utc

V4_FROM, V4_TO = utc("2025-06-19T10:32:27Z"), utc("2025-07-19T10:00:35Z")
V5_FROM, V5_TO = utc("2026-02-18T10:58:51Z"), utc("2026-03-20T10:41:15Z")


def _load(testdata, name, collateral=None):
    quote = (testdata / name / "quote.bin").read_bytes()
    return quote, load_bundle(testdata / (collateral or name) / "collateral.json")


def codes(verdict):
    return [r.code for r in verdict.reasons]


@pytest.mark.parametrize("at", [V4_FROM, V4_FROM + (V4_TO - V4_FROM) / 2, V4_TO])
def test_v4_up_to_date_inside_window(testdata, at):
    quote, coll = _load(testdata, "dcap-qvl-v4")
    v = appraise(quote, coll, at=at)
    assert v.accepted, v.reasons
    assert v.result.tcb.status == "UpToDate"
    assert v.result.tcb.advisory_ids == ()
    assert v.result.fmspc == "B0C06F000000"


def test_v4_one_day_after_tcb_info_expired(testdata):
    quote, coll = _load(testdata, "dcap-qvl-v4")
    v = appraise(quote, coll, at=V4_TO + timedelta(days=1))
    assert not v.accepted
    assert "collateral-expired" in codes(v)
    assert any("TCB info expired" in r.message for r in v.reasons)


def test_v4_one_day_before_not_yet_valid(testdata):
    quote, coll = _load(testdata, "dcap-qvl-v4")
    v = appraise(quote, coll, at=V4_FROM - timedelta(days=1))
    assert not v.accepted
    assert "collateral-not-yet-valid" in codes(v)


@pytest.mark.parametrize("at", [V5_FROM, V5_TO])
def test_v5_up_to_date(testdata, at):
    quote, coll = _load(testdata, "go-tdx-guest-v5")
    v = appraise(quote, coll, at=at)
    assert v.accepted, v.reasons
    assert v.result.tcb.status == "UpToDate"
    assert v.result.quote.body.body_type == 3


def test_v5_outside_window(testdata):
    quote, coll = _load(testdata, "go-tdx-guest-v5")
    assert not appraise(quote, coll, at=V5_TO + timedelta(days=1)).accepted
    assert not appraise(quote, coll, at=V5_FROM - timedelta(days=1)).accepted


def test_v5_no_tcb_level(testdata):
    quote, coll = _load(testdata, "dcap-qvl-v5-no-tcb-level")
    v = appraise(quote, coll, at=V5_FROM + timedelta(days=3))
    assert not v.accepted
    assert codes(v) == ["tcb-level-not-found"]
    assert v.result.tcb is None


def test_debug_td_refused_by_default_policy(testdata):
    quote = (testdata / "trustee-debug-td" / "quote.bin").read_bytes()
    q = parse_quote(quote)
    assert q.body.debug
    # No collateral ships for it; the policy alone must refuse it, whatever the collateral.
    _, coll = _load(testdata, "dcap-qvl-v4")
    v = appraise(quote, coll, at=V4_FROM)
    assert "debug-td" in codes(v)
    assert not v.accepted
    allowed = appraise(quote, coll, at=V4_FROM, policy=Policy(allow_debug=True))
    assert "debug-td" not in codes(allowed)


@pytest.mark.parametrize(("name", "at"), [("dcap-qvl-v4", V4_FROM), ("go-tdx-guest-v5", V5_FROM)])
def test_real_quotes_carry_the_attributes_a_launch_pins(testdata, name, at):
    """Real TDs launched with SEPT_VE_DISABLE report exactly that: a policy pinning
    tdxvm's launch attributes (every bit compared) and MR_SERVICETD zero accepts them."""
    quote, coll = _load(testdata, name)
    policy = Policy(td_attributes=LAUNCH_TD_ATTRIBUTES.to_bytes(8, "little").hex())
    assert appraise(quote, coll, at=at, policy=policy).accepted
    pinned_service_td = Policy(mr_service_td="00" * 48)
    assert appraise(quote, coll, at=at, policy=pinned_service_td).accepted == (name != "dcap-qvl-v4")


def test_verdict_lists_unpinned_registers(testdata):
    quote, coll = _load(testdata, "dcap-qvl-v4")
    doc = appraise(quote, coll, at=V4_FROM).to_dict()
    assert doc["verdict"] == "accept"
    assert [line.split(" not pinned: ")[0] for line in doc["policy_exceptions"]] == [
        "mrtd",
        "rtmr0",
        "rtmr1",
        "rtmr2",
        "rtmr3",
    ]
    b = parse_quote(quote).body
    pinned = Policy(mrtd=b.mr_td.hex(), rtmr1=b.rtmrs[1].hex(), rtmr2=b.rtmrs[2].hex())
    doc = appraise(quote, coll, at=V4_FROM, policy=pinned).to_dict()
    assert doc["verdict"] == "accept" and [line.split(" not pinned: ")[0] for line in doc["policy_exceptions"]] == [
        "rtmr0",
        "rtmr3",
    ]


def test_preproduction_root_refused(testdata):
    quote = (testdata / "cc-api-preprod-root" / "quote.bin").read_bytes()
    _, coll = _load(testdata, "dcap-qvl-v4")
    v = appraise(quote, coll, at=V4_FROM)
    assert not v.accepted
    assert "untrusted-root" in codes(v)
    assert any(r.message.startswith("PCK certificate chain") for r in v.reasons if r.code == "untrusted-root")


def test_wrong_collateral_is_fmspc_mismatch(testdata):
    quote = (testdata / "go-tdx-guest-ccel" / "quote.bin").read_bytes()
    _, coll = _load(testdata, "dcap-qvl-v4")
    v = appraise(quote, coll, at=V4_FROM)
    assert "fmspc-mismatch" in codes(v)


def test_custom_root_refuses_intel_chain(testdata):
    from tdxvm.attest.chain import TrustAnchor
    from tdxvm.attest.pck import parse_pem_chain

    quote, coll = _load(testdata, "dcap-qvl-v4")
    other_root = parse_pem_chain(
        parse_quote((testdata / "cc-api-preprod-root" / "quote.bin").read_bytes()).signature.pck_chain_pem
    )[-1]
    v = appraise(quote, coll, at=V4_FROM, trust_anchor=TrustAnchor.from_certificate(other_root))
    assert not v.accepted
    assert "untrusted-root" in codes(v)
    # With the root untrusted, its CRL cannot vouch for the intermediates either.
    assert set(codes(v)) <= {"untrusted-root", "crl-missing"}


def _signature_end(raw: bytes) -> int:
    return 48 + 584 + 4 + struct.unpack_from("<I", raw, 632)[0]


@pytest.mark.parametrize("region", ["header", "body", "signature"])
def test_every_byte_flip_is_refused(testdata, region):
    raw, coll = _load(testdata, "dcap-qvl-v4")
    start, end = {"header": (0, 48), "body": (48, 632), "signature": (632, _signature_end(raw))}[region]
    verifier = QuoteVerifier()
    assert appraise(raw, coll, at=V4_FROM, verifier=verifier).accepted
    for i in range(start, end):
        mutated = bytearray(raw)
        mutated[i] ^= 0xFF
        try:
            v = appraise(bytes(mutated), coll, at=V4_FROM, verifier=verifier)
        except QuoteFormatError:
            continue
        assert not v.accepted, f"flipping byte {i} was accepted"
        assert v.reasons and all(r.code and r.message for r in v.reasons)


def test_warm_verifier_gives_same_verdicts(testdata):
    quote, coll = _load(testdata, "dcap-qvl-v4")
    verifier = QuoteVerifier()
    first = appraise(quote, coll, at=V4_FROM, verifier=verifier).to_dict()
    assert appraise(quote, coll, at=V4_FROM, verifier=verifier).to_dict() == first
    late = appraise(quote, coll, at=V4_TO + timedelta(days=1), verifier=verifier)
    assert not late.accepted  # the cache never skips the time checks


def test_naive_time_is_rejected(testdata):
    quote, coll = _load(testdata, "dcap-qvl-v4")
    with pytest.raises(AttestError):
        appraise(quote, coll, at=V4_FROM.replace(tzinfo=None))


def test_warm_cache_is_keyed_by_whole_certificate(testdata):
    """A PCK leaf with its original signature value but an altered TBS must be refused,
    even by a verifier that already accepted the genuine certificate (regression: the
    caches were once keyed by the signature value alone)."""
    import base64

    from cryptography.hazmat.primitives.serialization import Encoding

    from tdxvm.attest.pck import parse_pem_chain

    raw, coll = _load(testdata, "dcap-qvl-v4")
    q = parse_quote(raw)
    chain = parse_pem_chain(q.signature.pck_chain_pem)
    leaf_der = bytearray(chain[0].public_bytes(Encoding.DER))
    tbs = chain[0].tbs_certificate_bytes
    start = bytes(leaf_der).index(tbs)
    # Change one byte of the subject's text, keeping the DER well-formed.
    subject_pos = start + tbs.index(b"Intel SGX PCK Certificate") + 6
    leaf_der[subject_pos] ^= 0x20
    forged_pem = b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(bytes(leaf_der)) + b"-----END CERTIFICATE-----\n"
    old_pem = q.signature.pck_chain_pem
    first_end = old_pem.index(b"-----END CERTIFICATE-----") + len(b"-----END CERTIFICATE-----\n")
    new_pem = forged_pem + old_pem[first_end:]
    cert_data_end = raw.index(old_pem) + len(old_pem)
    size_at = raw.index(old_pem) - 4
    forged = bytearray(raw[:size_at] + struct.pack("<I", len(new_pem)) + new_pem + raw[cert_data_end:])
    delta = len(new_pem) - len(old_pem)
    # Fix the enclosing lengths: certification data (type 6) and signature data.
    outer_size_at = 636 + 64 + 64 + 2
    struct.pack_into("<I", forged, outer_size_at, struct.unpack_from("<I", forged, outer_size_at)[0] + delta)
    struct.pack_into("<I", forged, 632, struct.unpack_from("<I", forged, 632)[0] + delta)
    verifier = QuoteVerifier()
    assert appraise(raw, coll, at=V4_FROM, verifier=verifier).accepted
    v = appraise(bytes(forged), coll, at=V4_FROM, verifier=verifier)
    assert parse_pem_chain(v.result.quote.signature.pck_chain_pem)[0].signature == chain[0].signature
    assert not v.accepted
    assert "cert-signature" in codes(v)


def test_caches_stay_bounded(testdata):
    quote, coll = _load(testdata, "dcap-qvl-v4")
    verifier = QuoteVerifier(cache_limit=2)
    for _ in range(5):
        assert appraise(quote + b"", coll, at=V4_FROM, verifier=verifier).accepted
    other = (testdata / "go-tdx-guest-ccel" / "quote.bin").read_bytes()
    for q in (other, quote, other, quote):
        appraise(q, coll, at=V4_FROM, verifier=verifier)
        assert len(verifier._pck) <= 2 and len(verifier._qe_reports) <= 2
    assert appraise(quote, coll, at=V4_FROM, verifier=verifier).accepted
