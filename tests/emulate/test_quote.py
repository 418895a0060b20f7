"""Emulated quotes parse back (tdxvm and dcap-qvl) with the fields they were signed with."""

from __future__ import annotations

import hashlib
import struct

import dcap_qvl
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st

from tdxvm.attest.pck import parse_pem_chain
from tdxvm.attest.quote import TD_ATTR_DEBUG, TD_ATTR_SEPT_VE_DISABLE, parse_quote
from tdxvm.emulate import DEFAULT_QE_AUTH_DATA, EmulatedPlatform, TdReportFields

CASES = [(4, None, 2, 584), (5, 2, 2, 584), (5, 3, 3, 648), (5, 4, 4, 885)]
FIELDS = dict(
    mr_td=bytes([1]) * 48,
    rtmrs=tuple(bytes([0x10 + i]) * 48 for i in range(4)),
    report_data=bytes(range(64)),
    mr_config_id=bytes([2]) * 48,
    mr_owner=bytes([3]) * 48,
    mr_owner_config=bytes([4]) * 48,
    xfam=bytes.fromhex("e71a060000000000"),
)
EX_FIELDS = dict(
    vmid=7,
    td_id=bytes([5]) * 32,
    dev_info=bytes([6]) * 48,
    init_tee_fmspc=bytes([8]) * 12,
    cur_service_td_attributes=bytes([9]) * 8,
)


def _verify_raw(key: ec.EllipticCurvePublicKey, sig: bytes, data: bytes) -> None:
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    key.verify(der, data, ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize(("version", "body_type", "parsed_type", "size"), CASES)
def test_parse_quote_reads_back_the_fields(
    platform: EmulatedPlatform, version: int, body_type: int | None, parsed_type: int, size: int
) -> None:
    extra = EX_FIELDS if body_type == 4 else {}
    raw = platform.sign_quote(version=version, body_type=body_type, **FIELDS, **extra)
    q = parse_quote(raw)
    assert q.header.version == version and q.header.tee_type == 0x81
    assert q.header.qe_vendor_id.hex() == "939a7233f79c4ca9940a0db3957f0607"
    b = q.body
    assert b.body_type == parsed_type
    assert len(q.signed_data) == 48 + size + (6 if version == 5 else 0)
    for name, value in {**FIELDS, **extra}.items():
        assert getattr(b, name) == value, name
    assert b.tee_tcb_svn == platform.tee_tcb_svn
    assert b.td_attributes == (TD_ATTR_SEPT_VE_DISABLE).to_bytes(8, "little")
    assert b.sept_ve_disable and not b.debug
    if parsed_type >= 3:
        assert b.tee_tcb_svn2 == platform.tee_tcb_svn and b.mr_service_td == bytes(48)


def test_signature_data_is_what_a_verifier_checks(platform: EmulatedPlatform) -> None:
    q = parse_quote(platform.sign_quote(version=5, body_type=3))
    sig = q.signature
    att = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + sig.attestation_key)
    _verify_raw(att, sig.signature, q.signed_data)
    chain = parse_pem_chain(sig.pck_chain_pem)
    assert chain == [platform.pck_cert, platform.pck_ca_cert, platform.root_ca_cert]
    _verify_raw(chain[0].public_key(), sig.qe_report_signature, sig.qe_report.raw)
    assert sig.qe_auth_data == DEFAULT_QE_AUTH_DATA
    expected = hashlib.sha256(sig.attestation_key + sig.qe_auth_data).digest() + bytes(32)
    assert sig.qe_report.report_data == expected
    qe = platform.qe
    report = sig.qe_report
    assert (report.mr_signer, report.isv_prod_id, report.isv_svn) == (
        qe.mrsigner,
        qe.isv_prod_id,
        qe.isv_svn,
    )
    assert (report.misc_select, report.attributes, report.mr_enclave) == (
        0,
        qe.attributes,
        qe.mrenclave,
    )


@pytest.mark.parametrize(("version", "body_type", "parsed_type", "size"), CASES)
def test_dcap_qvl_parser_agrees(
    platform: EmulatedPlatform, version: int, body_type: int | None, parsed_type: int, size: int
) -> None:
    extra = EX_FIELDS if body_type == 4 else {}
    parsed = dcap_qvl.parse_quote(platform.sign_quote(version=version, body_type=body_type, **FIELDS, **extra))
    assert parsed.is_tdx() and parsed.header.version == version
    assert parsed.fmspc() == platform.fmspc.hex().upper()
    assert parsed.ca() == "platform"
    report = parsed.report
    assert bytes(report.mr_td) == FIELDS["mr_td"]
    assert bytes(report.rt_mr3) == FIELDS["rtmrs"][3]
    assert bytes(report.report_data) == FIELDS["report_data"]
    assert bytes(report.tee_tcb_svn) == platform.tee_tcb_svn
    if parsed_type == 4:
        assert isinstance(report, dcap_qvl.TdReport15Ex)
        assert report.vmid == EX_FIELDS["vmid"]
        for name in ("td_id", "dev_info", "init_tee_fmspc", "cur_service_td_attributes"):
            assert bytes(getattr(report, name)) == EX_FIELDS[name], name
    ext = parsed.pck_extension()
    assert ext is not None and bytes(ext.fmspc) == platform.fmspc


def test_debug_and_raw_attributes(platform: EmulatedPlatform) -> None:
    attrs = TD_ATTR_SEPT_VE_DISABLE | TD_ATTR_DEBUG
    assert parse_quote(platform.sign_quote(td_attributes=attrs)).body.debug
    assert parse_quote(platform.sign_quote(td_attributes=attrs.to_bytes(8, "little"))).body.debug


def test_sign_body_and_report_object(platform: EmulatedPlatform) -> None:
    fields = TdReportFields(mr_td=bytes([7]) * 48, tee_tcb_svn=platform.tee_tcb_svn)
    a = platform.sign_body(fields.encode(3), version=5, body_type=3)
    b = platform.sign_quote(version=5, report=fields)
    assert a == b  # deterministic signatures
    assert parse_quote(platform.sign_quote(report=fields, mr_owner=bytes([1]) * 48)).body.mr_td == bytes([7]) * 48


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (dict(version=3), "version 4 or 5"),
        (dict(version=4, body_type=3), "body type 2"),
        (dict(version=5, body_type=9), "body type 9"),
        (dict(mr_td=bytes(47)), "mr_td must be 48"),
        (dict(report_data=bytes(32)), "report_data must be 64"),
        (dict(rtmrs=(bytes(48),) * 3), "rtmrs"),
        (dict(vmid=256), "vmid"),
    ],
)
def test_bad_input_is_refused(platform: EmulatedPlatform, call: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        platform.sign_quote(**call)


def test_sign_body_checks_the_size(platform: EmulatedPlatform) -> None:
    with pytest.raises(ValueError, match="648 bytes"):
        platform.sign_body(bytes(584), version=5, body_type=3)


@settings(max_examples=25, deadline=None)
@given(
    case=st.sampled_from(CASES),
    mr_td=st.binary(min_size=48, max_size=48),
    report_data=st.binary(min_size=64, max_size=64),
    attrs=st.integers(min_value=0, max_value=2**64 - 1),
    svn=st.binary(min_size=16, max_size=16),
    user=st.binary(min_size=48, max_size=48),
)
def test_round_trip_property(platform, case, mr_td, report_data, attrs, svn, user) -> None:
    version, body_type, parsed_type, _ = case
    raw = platform.sign_quote(
        version=version,
        body_type=body_type,
        mr_td=mr_td,
        report_data=report_data,
        td_attributes=attrs,
        tee_tcb_svn=svn,
        mr_service_td=user,
        init_service_td_hash=user,
    )
    b = parse_quote(raw).body
    assert (b.mr_td, b.report_data, b.td_attributes_u64, b.tee_tcb_svn) == (
        mr_td,
        report_data,
        attrs,
        svn,
    )
    if parsed_type >= 3:
        assert b.mr_service_td == user
    if parsed_type == 4:
        assert b.init_service_td_hash == user
    assert struct.unpack_from("<H", raw)[0] == version
