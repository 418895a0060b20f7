"""The emulated certificates and CRLs have Intel's profile and read back correctly."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, NameOID

from tdxvm.attest.pck import parse_pck_extension, pck_ca_type
from tdxvm.emulate import DEFAULT_TCB_LEVELS, EmulatedPlatform, Validity
from tdxvm.emulate.sgxext import SGX_EXTENSION_OID

from .conftest import AT


def _cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def _ext(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> x509.Extension:
    return cert.extensions.get_extension_for_oid(oid)


def test_names_are_intels_marked_emulated(platform: EmulatedPlatform) -> None:
    assert _cn(platform.root_ca_cert) == "tdxvm Emulated SGX Root CA"
    assert _cn(platform.pck_ca_cert) == "tdxvm Emulated SGX PCK Platform CA"
    assert _cn(platform.pck_cert) == "tdxvm Emulated SGX PCK Certificate"
    assert _cn(platform.tcb_signing_cert) == "tdxvm Emulated SGX TCB Signing"
    assert "not Intel" in platform.root_ca_cert.subject.rfc4514_string()
    assert pck_ca_type(platform.pck_ca_cert) == "platform"
    assert pck_ca_type(platform.variant(pck_ca_kind="processor").pck_ca_cert) == "processor"


def test_chain_signatures_and_constraints(platform: EmulatedPlatform) -> None:
    root, ca, leaf, tcb = (
        platform.root_ca_cert,
        platform.pck_ca_cert,
        platform.pck_cert,
        platform.tcb_signing_cert,
    )
    root.verify_directly_issued_by(root)
    ca.verify_directly_issued_by(root)
    leaf.verify_directly_issued_by(ca)
    tcb.verify_directly_issued_by(root)
    for cert, is_ca, path in (
        (root, True, 1),
        (ca, True, 0),
        (leaf, False, None),
        (tcb, False, None),
    ):
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        assert cert.version == x509.Version.v3
        bc = _ext(cert, ExtensionOID.BASIC_CONSTRAINTS)
        ku = _ext(cert, ExtensionOID.KEY_USAGE)
        assert bc.critical and ku.critical
        assert bc.value.ca is is_ca and bc.value.path_length == path
        assert ku.value.key_cert_sign is is_ca and ku.value.crl_sign is is_ca
        assert ku.value.digital_signature is not is_ca
        assert cert.signature_hash_algorithm.name == "sha256"
        assert 0 < cert.serial_number < 2**159


def test_pck_extension_reads_back(platform: EmulatedPlatform) -> None:
    ext = _ext(platform.pck_cert, x509.ObjectIdentifier(SGX_EXTENSION_OID))
    assert ext.critical is False
    parsed = parse_pck_extension(platform.pck_cert)
    level = DEFAULT_TCB_LEVELS[0]
    assert parsed.tcb_components == level.sgx_components
    assert parsed.pce_svn == level.pce_svn
    assert parsed.cpu_svn == bytes(level.sgx_components)
    assert parsed.fmspc == platform.fmspc
    assert parsed.pce_id == bytes(2)
    assert parsed.sgx_type == 1
    assert parsed.platform_instance_id is not None and len(parsed.platform_instance_id) == 16
    assert (parsed.dynamic_platform, parsed.cached_keys, parsed.smt_enabled) == (True, True, True)
    processor = parse_pck_extension(platform.variant(pck_ca_kind="processor").pck_cert)
    assert processor.platform_instance_id is None and processor.dynamic_platform is None


def test_crls_carry_revoked_serials(platform: EmulatedPlatform) -> None:
    clean_root = x509.load_der_x509_crl(platform.collateral().root_ca_crl)
    clean_pck = x509.load_der_x509_crl(platform.collateral().pck_crl)
    assert len(clean_root) == 0 and len(clean_pck) == 0
    assert clean_root.is_signature_valid(platform.root_ca_cert.public_key())
    assert clean_pck.is_signature_valid(platform.pck_ca_cert.public_key())
    assert clean_pck.issuer == platform.pck_ca_cert.subject
    assert clean_root.next_update_utc == AT + timedelta(days=29)

    bad = platform.variant(revoke_pck=True, revoke_pck_ca=True, revoked_pck_serials=[12345])
    pck_crl = x509.load_der_x509_crl(bad.collateral().pck_crl)
    root_crl = x509.load_der_x509_crl(bad.collateral().root_ca_crl)
    assert {r.serial_number for r in pck_crl} == {12345, bad.pck_cert.serial_number}
    assert {r.serial_number for r in root_crl} == {bad.pck_ca_cert.serial_number}
    entry = root_crl.get_revoked_certificate_by_serial_number(bad.pck_ca_cert.serial_number)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise


def test_validity_windows(platform: EmulatedPlatform) -> None:
    for cert in (
        platform.root_ca_cert,
        platform.pck_ca_cert,
        platform.pck_cert,
        platform.tcb_signing_cert,
    ):
        assert cert.not_valid_before_utc < AT < cert.not_valid_after_utc
    window = Validity.around(AT, before=timedelta(days=10), after=-timedelta(days=1))
    expired = platform.variant(pck_validity=window)
    assert expired.pck_cert.not_valid_after_utc == AT - timedelta(days=1)
    assert not window.contains(AT)


def test_deterministic_from_seed_and_times(platform: EmulatedPlatform) -> None:
    again = EmulatedPlatform(at=AT, seed="tests/emulate")
    assert again.root_ca_der == platform.root_ca_der
    assert again.pck_chain_pem == platform.pck_chain_pem
    assert again.collateral() == platform.collateral()
    assert EmulatedPlatform(at=AT, seed="other").root_ca_der != platform.root_ca_der


def test_times_must_be_timezone_aware() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        EmulatedPlatform(at=AT.replace(tzinfo=None), seed="x")
