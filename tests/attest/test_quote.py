"""Quote parsing on the real vectors, against dcap-qvl's parser, and on broken input."""

from __future__ import annotations

import contextlib
import struct

import dcap_qvl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tdxvm.attest.errors import QuoteFormatError
from tdxvm.attest.quote import (
    BODY_TD_REPORT15,
    HEADER_SIZE,
    TD_REPORT10_SIZE,
    parse_quote,
    read_quote_bytes,
)

VECTORS = [
    "dcap-qvl-v4",
    "go-tdx-guest-v5",
    "dcap-qvl-v5-no-tcb-level",
    "go-tdx-guest-ccel",
    "trustee-debug-td",
    "cc-api-preprod-root",
]


@pytest.mark.parametrize("name", VECTORS)
def test_fields_match_dcap_qvl(testdata, name):
    raw = (testdata / name / "quote.bin").read_bytes()
    q = parse_quote(raw)
    ref = dcap_qvl.parse_quote(raw)
    assert q.header.version == ref.header.version
    assert q.header.qe_vendor_id == ref.header.qe_vendor_id
    assert q.header.user_data == ref.header.user_data
    r = ref.report
    b = q.body
    assert (b.tee_tcb_svn, b.mr_seam, b.mr_signer_seam, b.seam_attributes) == (
        r.tee_tcb_svn,
        r.mr_seam,
        r.mr_signer_seam,
        r.seam_attributes,
    )
    assert (b.td_attributes, b.xfam, b.mr_td, b.mr_config_id) == (r.td_attributes, r.xfam, r.mr_td, r.mr_config_id)
    assert (b.mr_owner, b.mr_owner_config, b.report_data) == (r.mr_owner, r.mr_owner_config, r.report_data)
    assert b.rtmrs == (r.rt_mr0, r.rt_mr1, r.rt_mr2, r.rt_mr3)
    assert q.signature.pck_chain_pem.rstrip(b"\0") == ref.cert_chain_pem_bytes().rstrip(b"\0")
    if q.version == 5:
        assert b.body_type == BODY_TD_REPORT15
        assert b.mr_service_td == r.mr_service_td and b.tee_tcb_svn2 == r.tee_tcb_svn2


def test_v4_known_values(testdata):
    q = parse_quote((testdata / "dcap-qvl-v4" / "quote.bin").read_bytes())
    assert q.version == 4 and q.body.body_type == 2
    assert len(q.signed_data) == HEADER_SIZE + TD_REPORT10_SIZE
    assert q.body.sept_ve_disable and not q.body.debug
    assert q.signature.qe_auth_data == bytes(range(32))


def test_debug_td_attribute(testdata):
    q = parse_quote((testdata / "trustee-debug-td" / "quote.bin").read_bytes())
    assert q.body.debug


def test_trailing_padding_is_allowed(testdata):
    raw = (testdata / "dcap-qvl-v4" / "quote.bin").read_bytes()
    assert parse_quote(raw + bytes(100)).body == parse_quote(raw).body


def test_hex_input(testdata):
    raw = (testdata / "dcap-qvl-v4" / "quote.bin").read_bytes()
    assert read_quote_bytes(raw.hex().encode() + b"\n") == raw
    assert read_quote_bytes(b"0x" + raw.hex().upper().encode()) == raw
    assert read_quote_bytes(raw) == raw


@pytest.mark.parametrize(
    ("mutate", "field", "offset"),
    [
        (lambda q: q[:20], "header.qe_vendor_id", 12),
        (lambda q: struct.pack("<H", 3) + q[2:], "header.version", 0),
        (lambda q: q[:2] + struct.pack("<H", 3) + q[4:], "header.attestation_key_type", 2),
        (lambda q: q[:4] + struct.pack("<I", 0) + q[8:], "header.tee_type", 4),
        (lambda q: q[:450], "body.rtmr1", 424),
        (lambda q: q[:632] + struct.pack("<I", 0xFFFFFF) + q[636:], "signature_data", 636),
        (
            lambda q: q[: 636 + 128] + struct.pack("<H", 5) + q[636 + 130 :],
            "signature_data.certification_data.type",
            764,
        ),
    ],
)
def test_malformed_quotes_name_field_and_offset(testdata, mutate, field, offset):
    raw = (testdata / "dcap-qvl-v4" / "quote.bin").read_bytes()
    with pytest.raises(QuoteFormatError) as err:
        parse_quote(mutate(raw))
    assert err.value.field == field
    assert err.value.offset == offset
    assert f"byte offset {offset}" in str(err.value)


def test_v5_body_size_must_match_type(testdata):
    raw = bytearray((testdata / "go-tdx-guest-v5" / "quote.bin").read_bytes())
    struct.pack_into("<I", raw, 50, 584)
    with pytest.raises(QuoteFormatError) as err:
        parse_quote(bytes(raw))
    assert err.value.field == "body.size" and err.value.offset == 50


def test_v5_unknown_body_type(testdata):
    raw = bytearray((testdata / "go-tdx-guest-v5" / "quote.bin").read_bytes())
    struct.pack_into("<H", raw, 48, 9)
    with pytest.raises(QuoteFormatError, match="body type 9"):
        parse_quote(bytes(raw))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=6000))
def test_random_bytes_only_raise_quote_format_error(data):
    with contextlib.suppress(QuoteFormatError):
        parse_quote(data)
