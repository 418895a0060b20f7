"""The trust anchor's CA flag: known beforehand for Intel's root (its hash pins the
certificate, whose basic constraints say CA), read from the certificate for a root
given as one; either way a chain's check gives the same answer as decoding the root."""

from __future__ import annotations

from tdxvm.attest.chain import INTEL_SGX_ROOT_CA_SHA256, TrustAnchor, _is_ca, der_sha256
from tdxvm.attest.collateral import load_bundle
from tdxvm.attest.pck import parse_pem_chain
from tdxvm.attest.verify import QuoteVerifier

from ..conftest import utc

AT = utc("2025-06-20T00:00:00Z")


def _v4(testdata):
    return (testdata / "dcap-qvl-v4" / "quote.bin").read_bytes(), load_bundle(
        testdata / "dcap-qvl-v4" / "collateral.json"
    )


def test_intel_root_is_a_ca(testdata):
    _, coll = _v4(testdata)
    root = parse_pem_chain(coll.tcb_info_issuer_chain)[-1]
    assert der_sha256(root) == INTEL_SGX_ROOT_CA_SHA256 == TrustAnchor.intel().sha256
    assert _is_ca(root) and TrustAnchor.intel().ca is True
    assert TrustAnchor.from_certificate(root).ca is True
    assert (
        TrustAnchor(sha256=INTEL_SGX_ROOT_CA_SHA256, name="Intel SGX Root CA") == TrustAnchor.intel()
    )  # the flag is not identity


def test_known_flag_gives_the_verdict_of_the_decoded_one(testdata):
    quote, coll = _v4(testdata)
    unknown = TrustAnchor(
        sha256=INTEL_SGX_ROOT_CA_SHA256, name="Intel SGX Root CA"
    )  # decoded from the root certificate
    for at in (AT, utc("2025-08-01T00:00:00Z"), utc("2019-01-01T00:00:00Z")):
        assert QuoteVerifier().verify(quote, coll, at=at) == QuoteVerifier(trust_anchor=unknown).verify(
            quote, coll, at=at
        )


def test_flag_is_what_the_chain_check_uses(testdata):
    quote, coll = _v4(testdata)
    not_ca = TrustAnchor(sha256=INTEL_SGX_ROOT_CA_SHA256, name="Intel SGX Root CA", ca=False)
    result = QuoteVerifier(trust_anchor=not_ca).verify(quote, coll, at=AT)
    assert "cert-not-ca" in {r.code for r in result.reasons} and not result.genuine
