"""Collateral bundles: round trips on the real collateral, dcap-qvl interop, broken bundles."""

from __future__ import annotations

import json
import re
import stat
from dataclasses import replace

import dcap_qvl
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tdxvm.attest.collateral import Collateral, load_bundle, raw_members, save_bundle, validity
from tdxvm.attest.errors import CollateralError
from tests.conftest import utc

BUNDLES = ["dcap-qvl-v4", "go-tdx-guest-v5", "dcap-qvl-v5-no-tcb-level"]
HEX_KEYS = ["root_ca_crl", "pck_crl", "tcb_info_signature", "qe_identity_signature"]
TEXT_KEYS = ["pck_crl_issuer_chain", "tcb_info_issuer_chain", "tcb_info", "qe_identity_issuer_chain", "qe_identity"]


@pytest.fixture(params=BUNDLES)
def bundle(request, testdata):
    return testdata / request.param / "collateral.json"


def test_fields_are_the_bundle_bytes(bundle):
    doc = json.loads(bundle.read_text())
    c = load_bundle(bundle)
    for key in TEXT_KEYS:
        assert getattr(c, key) == doc[key]
    for key in HEX_KEYS:
        assert getattr(c, key) == bytes.fromhex(doc[key])
    assert len(c.tcb_info_signature) == len(c.qe_identity_signature) == 64


def test_round_trip(bundle, tmp_path):
    c = load_bundle(bundle)
    assert Collateral.from_json(c.to_json()) == c
    out = tmp_path / "bundle.json"
    save_bundle(c, out)
    assert load_bundle(out) == c
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["bundle.json"]  # no temporary file left


def test_dcap_qvl_reads_our_output(bundle):
    c = load_bundle(bundle)
    ref = dcap_qvl.QuoteCollateralV3.from_json(c.to_json())
    for key in TEXT_KEYS + HEX_KEYS:
        assert getattr(ref, key) == getattr(c, key), key
    assert Collateral.from_json(ref.to_json()) == c


def test_output_matches_dcap_qvl_layout(testdata):
    # The dcap-qvl-v4 bundle is dcap-qvl's own output: ours is byte for byte the same.
    path = testdata / "dcap-qvl-v4" / "collateral.json"
    assert load_bundle(path).to_json() == path.read_text()


def test_bytes_input_and_ignored_pck_chain(testdata):
    doc = json.loads((testdata / "dcap-qvl-v4" / "collateral.json").read_text())
    doc["pck_certificate_chain"] = "-----BEGIN CERTIFICATE-----"
    c = Collateral.from_json(json.dumps(doc).encode())
    assert c == load_bundle(testdata / "dcap-qvl-v4" / "collateral.json")


def _broken(testdata, tmp_path, edit):
    doc = json.loads((testdata / "dcap-qvl-v4" / "collateral.json").read_text())
    edit(doc)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("key", TEXT_KEYS + HEX_KEYS)
def test_missing_key(testdata, tmp_path, key):
    path = _broken(testdata, tmp_path, lambda d: d.pop(key))
    with pytest.raises(CollateralError, match=f"{path}: key '{key}' is missing"):
        load_bundle(path)


@pytest.mark.parametrize("key", TEXT_KEYS + HEX_KEYS)
@pytest.mark.parametrize("value", [None, 12, ["x"], {"a": 1}])
def test_mistyped_key(testdata, tmp_path, key, value):
    path = _broken(testdata, tmp_path, lambda d: d.__setitem__(key, value))
    with pytest.raises(CollateralError, match=f"{path}: key '{key}' must be a string"):
        load_bundle(path)


@pytest.mark.parametrize("key", HEX_KEYS)
@pytest.mark.parametrize("value", ["zz" * 64, "abc", "0x" + "00" * 64, "00 " * 64, "é" * 128])
def test_not_hex(testdata, tmp_path, key, value):
    path = _broken(testdata, tmp_path, lambda d: d.__setitem__(key, value))
    with pytest.raises(CollateralError, match=f"{path}: key '{key}' is not hex"):
        load_bundle(path)


@pytest.mark.parametrize("key", ["tcb_info_signature", "qe_identity_signature"])
def test_signature_size(testdata, tmp_path, key):
    path = _broken(testdata, tmp_path, lambda d: d.__setitem__(key, "00" * 63))
    with pytest.raises(CollateralError, match=f"{path}: key '{key}' must be a 64-byte ECDSA signature.*63"):
        load_bundle(path)


def test_unknown_key(testdata, tmp_path):
    path = _broken(testdata, tmp_path, lambda d: d.__setitem__("tcbinfo", "x"))
    with pytest.raises(CollateralError, match=f"{path}: unknown key 'tcbinfo'"):
        load_bundle(path)


def test_json_syntax_error_names_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "pck_crl": "00",\n  "tcb_info" "x"\n}')
    with pytest.raises(CollateralError, match=rf"{path}: not valid JSON: Expecting ':' delimiter at line 3, column 14"):
        load_bundle(path)


@pytest.mark.parametrize("text", ["[]", '"x"', "null", "3"])
def test_not_an_object(text):
    with pytest.raises(CollateralError, match="b.json: expected a JSON object"):
        Collateral.from_json(text, source="b.json")


def test_not_utf8():
    with pytest.raises(CollateralError, match=r"b.json: not UTF-8 text \(byte 1\)"):
        Collateral.from_json(b"{\xff}", source="b.json")


def test_unreadable_file(tmp_path):
    with pytest.raises(CollateralError, match="missing.json: cannot read collateral bundle"):
        load_bundle(tmp_path / "missing.json")


def test_save_into_missing_folder(testdata, tmp_path):
    c = load_bundle(testdata / "dcap-qvl-v4" / "collateral.json")
    with pytest.raises(CollateralError, match="cannot write collateral bundle"):
        save_bundle(c, tmp_path / "nope" / "b.json")


def test_save_replaces_atomically(testdata, tmp_path):
    a = load_bundle(testdata / "dcap-qvl-v4" / "collateral.json")
    b = load_bundle(testdata / "go-tdx-guest-v5" / "collateral.json")
    out = tmp_path / "b.json"
    save_bundle(a, out)
    save_bundle(b, out)
    assert load_bundle(out) == b


# The windows are those of ../shared/testdata/tdx/README.md.
@pytest.mark.parametrize(
    "name, start, end",
    [
        ("dcap-qvl-v4", "2025-06-19T10:32:27Z", "2025-07-19T10:00:35Z"),
        ("go-tdx-guest-v5", "2026-02-18T10:58:51Z", "2026-03-20T10:41:15Z"),
        ("dcap-qvl-v5-no-tcb-level", "2026-02-18T10:58:51Z", "2026-03-20T10:41:15Z"),
    ],
)
def test_validity_window(testdata, name, start, end):
    w = validity(load_bundle(testdata / name / "collateral.json"))
    assert (w.not_before, w.not_after) == (utc(start), utc(end))
    assert w.expires_first == "PCK CRL"
    assert w.contains(utc(start)) and not w.contains(utc(end))
    assert w.contains(w.not_after.replace(tzinfo=None) - (w.not_after - w.not_before) / 2)  # naive = UTC


def test_validity_errors_name_the_item(testdata):
    c = load_bundle(testdata / "dcap-qvl-v4" / "collateral.json")
    tcb = json.loads(c.tcb_info)
    del tcb["nextUpdate"]
    with pytest.raises(CollateralError, match=r"tcb_info\.nextUpdate: missing"):
        validity(replace(c, tcb_info=json.dumps(tcb)))
    with pytest.raises(CollateralError, match=r"qe_identity\.issueDate: 'yesterday' is not an RFC 3339 date"):
        validity(replace(c, qe_identity=c.qe_identity.replace('"2025-06-19T10:32:27Z"', '"yesterday"', 1)))
    for when in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "1969-12-31T23:59:59Z"):
        with pytest.raises(CollateralError, match=rf"qe_identity\.issueDate: '{re.escape(when)}' is out of range"):
            validity(replace(c, qe_identity=c.qe_identity.replace("2025-06-19T10:32:27Z", when, 1)))
    with pytest.raises(CollateralError, match="pck_crl: not a usable DER CRL"):
        validity(replace(c, pck_crl=b"\x30\x00"))
    with pytest.raises(CollateralError, match="qe_identity: expected a JSON object"):
        validity(replace(c, qe_identity="[]"))


def test_raw_members_keep_the_source_text():
    text = ' { "b" : {"x": 1.50,  "y":[ ]} ,"a":"\\u0041" }\n'
    assert raw_members(text) == {"b": '{"x": 1.50,  "y":[ ]}', "a": '"\\u0041"'}
    assert raw_members("{}") == {}


@pytest.mark.parametrize(
    "text, message",
    [
        ("[]", "expected '{' at offset 0"),
        ('{"a":1,"a":2}', "member 'a' appears twice"),
        ('{"a":1} x', "extra data after the object at offset 8"),
        ('{"a" 1}', "expected ':' at offset 5"),
        ('{"a":1 "b":2}', "expected ',' or '}' at offset 7"),
        ('{"a":}', "Expecting value at offset 5"),
        ('{"a":1,}', "expected a member name at offset 7"),
        ('{"a":1', "expected ',' or '}' at offset 6"),
    ],
)
def test_raw_members_refuse(text, message):
    with pytest.raises(ValueError, match=message):
        raw_members(text)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(st.dictionaries(st.text(), _json, max_size=5), st.sampled_from([(",", ":"), (", ", ": "), (" ,\n", " :\t")]))
def test_raw_members_match_json(doc, separators):
    text = json.dumps(doc, separators=separators)
    members = raw_members(text)
    assert list(members) == list(doc)
    for key, raw in members.items():
        assert json.loads(raw) == doc[key]
        assert raw == json.dumps(doc[key], separators=separators)
