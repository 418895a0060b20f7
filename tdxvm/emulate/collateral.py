"""Collateral of the emulated platform, in Intel's formats.

- TDX TCB info v3 and TDX QE identity v2 exactly as Intel's PCS serves them ("Intel SGX
  and Intel TDX PCS API v4", "Get TDX TCB Info" and "Get TDX QE Identity"): compact JSON
  (no spaces), Intel's key order, dates as ``2025-06-19T10:16:03Z``, hex in upper case;
  each signed by the TCB signing key with ECDSA P-256 / SHA-256 over the exact JSON
  bytes, the signature given as raw r‖s (64 bytes) in hex.
- CRLs (root CA CRL, PCK CRL) as DER, issued by :mod:`tdxvm.emulate.pki`.

:class:`Collateral` is laid out like dcap-qvl's ``QuoteCollateralV3`` (the
offline bundle of :mod:`tdxvm.attest.collateral`); :meth:`~Collateral.to_json`
gives what ``dcap_qvl.QuoteCollateralV3.from_json`` reads.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from tdxvm.attest.collateral import Collateral
from tdxvm.emulate.pki import Validity, issue_crl, pem_chain
from tdxvm.emulate.tcb import IsvTcbLevel, QeProfile, TcbLevel, TdxModuleIdentity

# Component descriptions Intel attaches to the first SVNs (absent keys stay absent).
_SGX_COMPONENTS: dict[int, dict[str, str]] = {
    0: {"category": "BIOS", "type": "Early Microcode Update"},
    1: {"category": "OS/VMM", "type": "SGX Late Microcode Update"},
    2: {"category": "OS/VMM", "type": "TXT SINIT"},
    3: {"category": "BIOS"},
    4: {"category": "BIOS"},
    5: {"category": "BIOS"},
    7: {"category": "OS/VMM", "type": "SEAMLDR ACM"},
}
_TDX_COMPONENTS: dict[int, dict[str, str]] = {
    0: {"category": "OS/VMM", "type": "TDX Module"},
    1: {"category": "OS/VMM", "type": "TDX Module"},
    2: {"category": "OS/VMM", "type": "TDX Late Microcode Update"},
}


def intel_time(at: datetime) -> str:
    """Intel's timestamp format, e.g. ``2025-06-19T10:16:03Z``."""
    return Validity(at, at).not_before.strftime("%Y-%m-%dT%H:%M:%SZ")


def compact_json(doc: Any) -> str:
    """Intel's serialisation: no whitespace, keys in insertion order, ASCII."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=True)


def sign_json(text: str, key: ec.EllipticCurvePrivateKey) -> bytes:
    """ECDSA P-256 / SHA-256 over the UTF-8 bytes of ``text``, as raw r‖s (64 bytes)."""
    der = key.sign(text.encode("utf-8"), ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    r, s = decode_dss_signature(der)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _default_date(issue: datetime, index: int) -> datetime:
    """Midnight a month (and a further quarter per older level) before the issue date."""
    day = issue - timedelta(days=30 + 90 * index)
    return day.replace(hour=0, minute=0, second=0, microsecond=0)


def _level_tail(level: TcbLevel | IsvTcbLevel, issue: datetime, index: int) -> dict[str, Any]:
    date = level.tcb_date if level.tcb_date is not None else _default_date(issue, index)
    out: dict[str, Any] = {"tcbDate": intel_time(date), "tcbStatus": level.status}
    if level.advisory_ids:
        out["advisoryIDs"] = list(level.advisory_ids)
    return out


def _isv_levels(levels: tuple[IsvTcbLevel, ...], issue: datetime) -> list[dict[str, Any]]:
    return [{"tcb": {"isvsvn": lv.isvsvn}, **_level_tail(lv, issue, i)} for i, lv in enumerate(levels)]


def _components(svns: tuple[int, ...], names: dict[int, dict[str, str]]) -> list[dict[str, Any]]:
    return [{"svn": svn, **names.get(i, {})} for i, svn in enumerate(svns)]


def _module_json(m: TdxModuleIdentity | None) -> dict[str, str]:
    mrsigner = m.mrsigner if m else bytes(48)
    attributes = m.attributes if m else bytes(8)
    mask = m.attributes_mask if m else b"\xff" * 8
    return {
        "mrsigner": mrsigner.hex().upper(),
        "attributes": attributes.hex().upper(),
        "attributesMask": mask.hex().upper(),
    }


def tcb_info_json(
    *,
    fmspc: bytes,
    pce_id: bytes,
    validity: Validity,
    levels: tuple[TcbLevel, ...],
    module_identities: tuple[TdxModuleIdentity, ...],
    tcb_evaluation_data_number: int,
) -> str:
    """TDX TCB info v3 (``{"id":"TDX","version":3,…}``), compact, in Intel's key order.

    ``tdxModule`` (the base module identity) takes the mrsigner and attributes of the
    first module identity, or Intel's all-zero signer when there is none.
    """
    issue = validity.not_before
    doc = {
        "id": "TDX",
        "version": 3,
        "issueDate": intel_time(issue),
        "nextUpdate": intel_time(validity.not_after),
        "fmspc": fmspc.hex().upper(),
        "pceId": pce_id.hex().upper(),
        "tcbType": 0,
        "tcbEvaluationDataNumber": tcb_evaluation_data_number,
        "tdxModule": _module_json(module_identities[0] if module_identities else None),
        "tdxModuleIdentities": [
            {"id": m.id, **_module_json(m), "tcbLevels": _isv_levels(m.tcb_levels, issue)} for m in module_identities
        ],
        "tcbLevels": [
            {
                "tcb": {
                    "sgxtcbcomponents": _components(lv.sgx_components, _SGX_COMPONENTS),
                    "pcesvn": lv.pce_svn,
                    "tdxtcbcomponents": _components(lv.tdx_components, _TDX_COMPONENTS),
                },
                **_level_tail(lv, issue, i),
            }
            for i, lv in enumerate(levels)
        ],
    }
    return compact_json(doc)


def qe_identity_json(*, qe: QeProfile, validity: Validity, tcb_evaluation_data_number: int) -> str:
    """TDX QE identity v2 (``{"id":"TD_QE","version":2,…}``), compact, in Intel's key order.

    ``miscselect`` is the little-endian bytes of the u32, as in the SGX report.
    """
    issue = validity.not_before
    misc = (qe.misc_select & qe.misc_select_mask).to_bytes(4, "little")
    doc = {
        "id": "TD_QE",
        "version": 2,
        "issueDate": intel_time(issue),
        "nextUpdate": intel_time(validity.not_after),
        "tcbEvaluationDataNumber": tcb_evaluation_data_number,
        "miscselect": misc.hex().upper(),
        "miscselectMask": qe.misc_select_mask.to_bytes(4, "little").hex().upper(),
        "attributes": qe.expected_attributes.hex().upper(),
        "attributesMask": qe.attributes_mask.hex().upper(),
        "mrsigner": qe.mrsigner.hex().upper(),
        "isvprodid": qe.isv_prod_id,
        "tcbLevels": _isv_levels(qe.tcb_levels, issue),
    }
    return compact_json(doc)


def pcs_tcb_info_body(collateral: Collateral) -> str:
    """The body of PCS "Get TDX TCB Info": ``{"tcbInfo":…,"signature":"…"}``; the chain
    goes in the ``TCB-Info-Issuer-Chain`` header (URL-encoded)."""
    return f'{{"tcbInfo":{collateral.tcb_info},"signature":"{collateral.tcb_info_signature.hex()}"}}'


def pcs_qe_identity_body(collateral: Collateral) -> str:
    """The body of PCS "Get TDX QE Identity": ``{"enclaveIdentity":…,"signature":"…"}``;
    the chain goes in ``SGX-Enclave-Identity-Issuer-Chain``."""
    sig = collateral.qe_identity_signature.hex()
    return f'{{"enclaveIdentity":{collateral.qe_identity},"signature":"{sig}"}}'


def build_collateral(
    *,
    root: x509.Certificate,
    root_key: ec.EllipticCurvePrivateKey,
    pck_ca: x509.Certificate,
    pck_ca_key: ec.EllipticCurvePrivateKey,
    tcb_signing: x509.Certificate,
    tcb_signing_key: ec.EllipticCurvePrivateKey,
    tcb_info: str,
    qe_identity: str,
    crl_validity: Validity,
    revoked_ca_serials: Sequence[int] = (),
    revoked_pck_serials: Sequence[int] = (),
) -> Collateral:
    """Sign ``tcb_info`` and ``qe_identity``, issue both CRLs and assemble the bundle.

    The root CA CRL lists ``revoked_ca_serials`` (certificates the root issued: PCK CA,
    TCB signing), the PCK CRL ``revoked_pck_serials``; both share ``crl_validity``.
    """
    signing_chain = pem_chain(tcb_signing, root)
    return Collateral(
        pck_crl_issuer_chain=pem_chain(pck_ca, root),
        root_ca_crl=issue_crl(
            issuer=root,
            issuer_key=root_key,
            validity=crl_validity,
            revoked_serials=revoked_ca_serials,
        ),
        pck_crl=issue_crl(
            issuer=pck_ca,
            issuer_key=pck_ca_key,
            validity=crl_validity,
            revoked_serials=revoked_pck_serials,
        ),
        tcb_info_issuer_chain=signing_chain,
        tcb_info=tcb_info,
        tcb_info_signature=sign_json(tcb_info, tcb_signing_key),
        qe_identity_issuer_chain=signing_chain,
        qe_identity=qe_identity,
        qe_identity_signature=sign_json(qe_identity, tcb_signing_key),
    )
