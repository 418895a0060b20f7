"""Collateral in Intel's JSON layouts and dcap-qvl's QuoteCollateralV3 bundle layout."""

from __future__ import annotations

import json
import re
from typing import Any

import dcap_qvl
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from tdxvm.attest.collateral import Collateral
from tdxvm.attest.pck import parse_pem_chain
from tdxvm.emulate import EmulatedPlatform, TcbLevel
from tdxvm.emulate.collateral import pcs_qe_identity_body, pcs_tcb_info_body

from .conftest import AT

_INTEL_DATE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def _shape(value: Any) -> Any:
    """The keys (in order) and value types of a JSON document, lists by first element."""
    if isinstance(value, dict):
        return [(k, _shape(v)) for k, v in value.items()]
    if isinstance(value, list):
        return ["list", _shape(value[0]) if value else None]
    return type(value).__name__


def _real(testdata) -> dict[str, str]:
    return json.loads((testdata / "dcap-qvl-v4" / "collateral.json").read_text())


def test_bundle_has_dcap_qvl_layout(platform: EmulatedPlatform, testdata) -> None:
    ours = json.loads(platform.collateral().to_json())
    assert list(ours) == list(_real(testdata))
    assert all(isinstance(v, str) for v in ours.values())
    parsed = dcap_qvl.QuoteCollateralV3.from_json(platform.collateral().to_json())
    assert parsed.tcb_info == ours["tcb_info"]
    assert parsed.root_ca_crl == bytes.fromhex(ours["root_ca_crl"])
    # The project's own offline bundle reader takes it as is.
    assert Collateral.from_json(platform.collateral().to_json()).tcb_info == ours["tcb_info"]


def test_tcb_info_and_qe_identity_shapes_match_intels(platform: EmulatedPlatform, testdata) -> None:
    real = _real(testdata)
    coll = platform.collateral()
    assert _shape(json.loads(coll.tcb_info)) == _shape(json.loads(real["tcb_info"]))
    assert _shape(json.loads(coll.qe_identity)) == _shape(json.loads(real["qe_identity"]))
    for text in (coll.tcb_info, coll.qe_identity):  # compact, as Intel serves it
        assert text == json.dumps(json.loads(text), separators=(",", ":"))
    tcb = json.loads(coll.tcb_info)
    assert tcb["id"] == "TDX" and tcb["version"] == 3 and tcb["tcbType"] == 0
    assert tcb["fmspc"] == platform.fmspc.hex().upper()
    assert [lv["tcbStatus"] for lv in tcb["tcbLevels"]] == ["UpToDate", "OutOfDate"]
    assert "advisoryIDs" not in tcb["tcbLevels"][0] and tcb["tcbLevels"][1]["advisoryIDs"]
    assert all(len(lv["tcb"][k]) == 16 for lv in tcb["tcbLevels"] for k in ("sgxtcbcomponents", "tdxtcbcomponents"))
    assert [m["id"] for m in tcb["tdxModuleIdentities"]] == ["TDX_01"]
    qe = json.loads(coll.qe_identity)
    assert qe["id"] == "TD_QE" and qe["version"] == 2
    assert qe["mrsigner"] == platform.qe.mrsigner.hex().upper()
    for doc in (tcb, qe):
        assert doc["issueDate"] == "2025-06-30T12:00:00Z" and doc["nextUpdate"] == "2025-07-30T12:00:00Z"
        assert all(_INTEL_DATE.match(lv["tcbDate"]) for lv in doc["tcbLevels"])


def test_signatures_cover_the_exact_json_bytes(platform: EmulatedPlatform) -> None:
    coll = platform.collateral()
    signer = parse_pem_chain(coll.tcb_info_issuer_chain)[0]
    assert signer == platform.tcb_signing_cert
    assert [c.subject for c in parse_pem_chain(coll.pck_crl_issuer_chain)] == [
        platform.pck_ca_cert.subject,
        platform.root_ca_cert.subject,
    ]
    for text, sig in (
        (coll.tcb_info, coll.tcb_info_signature),
        (coll.qe_identity, coll.qe_identity_signature),
    ):
        assert len(sig) == 64
        der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
        signer.public_key().verify(der, text.encode(), ec.ECDSA(hashes.SHA256()))


def test_pcs_bodies_wrap_the_signed_text(platform: EmulatedPlatform) -> None:
    coll = platform.collateral()
    body = json.loads(pcs_tcb_info_body(coll))
    assert body["signature"] == coll.tcb_info_signature.hex()
    assert pcs_tcb_info_body(coll).startswith('{"tcbInfo":' + coll.tcb_info)
    assert json.loads(pcs_qe_identity_body(coll))["enclaveIdentity"]["id"] == "TD_QE"


def test_levels_with_explicit_dates_and_advisories(platform: EmulatedPlatform) -> None:
    level = TcbLevel(
        sgx_components=(1,) * 16,
        pce_svn=1,
        tdx_components=(1, 1) + (0,) * 14,
        status="ConfigurationNeeded",
        tcb_date=AT.replace(day=2, hour=0),
        advisory_ids=("INTEL-SA-00001",),
    )
    tcb = json.loads(platform.variant(tcb_levels=(level,)).collateral().tcb_info)
    assert tcb["tcbLevels"][0]["tcbDate"] == "2025-07-02T00:00:00Z"
    assert tcb["tcbLevels"][0]["advisoryIDs"] == ["INTEL-SA-00001"]
    # Module identity levels only know UpToDate/OutOfDate/Revoked.
    assert tcb["tdxModuleIdentities"][0]["tcbLevels"][0]["tcbStatus"] == "UpToDate"
