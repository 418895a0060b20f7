"""Build and sign TDX quotes (v4, and v5 with body type 2, 3 or 4) like Intel's TD QE.

Layout: "Intel TDX DCAP Quoting Library API", appendix A.3 (quote format v4) and the v5
format of DCAP 1.19+ (``sgx_quote_5.h``); :mod:`tdxvm.attest.quote` parses the same
layout and names the same fields. Body type 4 (TD report 1.5 plus the TDX Connect
fields) follows dcap-qvl's ``TDReport15Ex``.

::

    header (48) ‖ body            v4: TD report 1.0 (584)
                                  v5: u16 type ‖ u32 size ‖ TD report (584/648/885)
    u32 signature data size
    quote signature (64, r‖s, attestation key over SHA-256 of everything above the size)
    attestation public key (64, x‖y)
    u16 6 ‖ u32 size ‖ QE report certification data:
        QE report (384, SGX report body) ‖ QE report signature (64, PCK key)
        ‖ u16 size ‖ QE authentication data
        ‖ u16 5 ‖ u32 size ‖ PCK chain (PEM: leaf, PCK CA, root)

The QE report's REPORTDATA is SHA-256(attestation key ‖ QE auth data) ‖ 32 zero bytes.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field, fields

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from tdxvm.attest.quote import (
    ATT_KEY_TYPE_ECDSA_P256,
    BODY_TD_REPORT10,
    BODY_TD_REPORT15,
    BODY_TD_REPORT15EX,
    CERT_TYPE_PCK_CHAIN,
    CERT_TYPE_QE_REPORT,
    INTEL_QE_VENDOR_ID,
    TD_ATTR_DEBUG,
    TD_ATTR_SEPT_VE_DISABLE,
    TEE_TYPE_TDX,
)
from tdxvm.emulate.tcb import DEFAULT_MR_SEAM, QeProfile

DEFAULT_TD_ATTRIBUTES = TD_ATTR_SEPT_VE_DISABLE
DEFAULT_XFAM = bytes.fromhex("e71a060000000000")
DEFAULT_QE_AUTH_DATA = bytes(range(32))
_ECDSA = ec.ECDSA(hashes.SHA256(), deterministic_signing=True)

# (name, size) of the TD report fields in order; 1.5 and 1.5-ex append to 1.0.
_TD10 = (
    ("tee_tcb_svn", 16),
    ("mr_seam", 48),
    ("mr_signer_seam", 48),
    ("seam_attributes", 8),
    ("td_attributes", 8),
    ("xfam", 8),
    ("mr_td", 48),
    ("mr_config_id", 48),
    ("mr_owner", 48),
    ("mr_owner_config", 48),
    ("rtmr0", 48),
    ("rtmr1", 48),
    ("rtmr2", 48),
    ("rtmr3", 48),
    ("report_data", 64),
)
_TD15 = (("tee_tcb_svn2", 16), ("mr_service_td", 48))
_TD15EX = (
    ("vmid", 1),
    ("td_id", 32),
    ("dev_info", 48),
    ("init_service_td_hash", 48),
    ("init_service_td_attributes", 8),
    ("init_cpu_svn", 16),
    ("init_tee_tcb_svn", 16),
    ("init_tee_fmspc", 12),
    ("cur_service_td_hash", 48),
    ("cur_service_td_attributes", 8),
)
_LAYOUTS = {
    BODY_TD_REPORT10: _TD10,
    BODY_TD_REPORT15: _TD10 + _TD15,
    BODY_TD_REPORT15EX: _TD10 + _TD15 + _TD15EX,
}
# Byte sizes of the bytes-valued fields (rtmrs, vmid and tee_tcb_svn2 are checked apart).
_SIZES = {name: size for name, size in _LAYOUTS[BODY_TD_REPORT15EX]}
for _name in ("vmid", "tee_tcb_svn2"):
    del _SIZES[_name]


def _raw_sig(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, _ECDSA))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def raw_public_key(key: ec.EllipticCurvePublicKey) -> bytes:
    """x‖y (64 bytes), the quote's encoding of a P-256 public key."""
    nums = key.public_numbers()
    return nums.x.to_bytes(32, "big") + nums.y.to_bytes(32, "big")


@dataclass(frozen=True, slots=True, kw_only=True)
class TdReportFields:
    """The TD report fields a quote carries (TDX module ABI ``TDREPORT_STRUCT`` /
    TDINFO). Every field has its exact size; ``td_attributes`` may be given as the
    little-endian u64 (``TD_ATTR_*``). Defaults: SEPT_VE_DISABLE set, DEBUG clear, XFAM
    0x61ae7, zero measurements, an all-zero TDX module signer (Intel's)."""

    tee_tcb_svn: bytes = bytes(16)
    mr_seam: bytes = DEFAULT_MR_SEAM
    mr_signer_seam: bytes = bytes(48)
    seam_attributes: bytes = bytes(8)
    td_attributes: bytes | int = DEFAULT_TD_ATTRIBUTES
    xfam: bytes = DEFAULT_XFAM
    mr_td: bytes = bytes(48)
    mr_config_id: bytes = bytes(48)
    mr_owner: bytes = bytes(48)
    mr_owner_config: bytes = bytes(48)
    rtmrs: tuple[bytes, bytes, bytes, bytes] = field(default=(bytes(48),) * 4)
    report_data: bytes = bytes(64)
    tee_tcb_svn2: bytes | None = None
    mr_service_td: bytes = bytes(48)
    vmid: int = 0
    td_id: bytes = bytes(32)
    dev_info: bytes = bytes(48)
    init_service_td_hash: bytes = bytes(48)
    init_service_td_attributes: bytes = bytes(8)
    init_cpu_svn: bytes = bytes(16)
    init_tee_tcb_svn: bytes = bytes(16)
    init_tee_fmspc: bytes = bytes(12)
    cur_service_td_hash: bytes = bytes(48)
    cur_service_td_attributes: bytes = bytes(8)

    def __post_init__(self) -> None:
        if isinstance(self.td_attributes, int):
            object.__setattr__(self, "td_attributes", self.td_attributes.to_bytes(8, "little"))
        rtmrs = tuple(bytes(r) for r in self.rtmrs)
        if len(rtmrs) != 4 or any(len(r) != 48 for r in rtmrs):
            raise ValueError("rtmrs must be four 48-byte values")
        object.__setattr__(self, "rtmrs", rtmrs)
        if not 0 <= self.vmid <= 255:
            raise ValueError(f"vmid {self.vmid} is not a u8")
        for f in fields(self):
            value = getattr(self, f.name)
            size = _SIZES.get(f.name)
            if isinstance(value, (bytearray, memoryview)):
                value = bytes(value)
                object.__setattr__(self, f.name, value)
            if size is not None and len(value) != size:
                raise ValueError(f"TD report field {f.name} must be {size} bytes, got {len(value)}")
        if self.tee_tcb_svn2 is not None and len(self.tee_tcb_svn2) != 16:
            raise ValueError(f"TD report field tee_tcb_svn2 must be 16 bytes, got {len(self.tee_tcb_svn2)}")

    @property
    def debug(self) -> bool:
        return bool(int.from_bytes(self.td_attributes, "little") & TD_ATTR_DEBUG)  # type: ignore[arg-type]

    def encode(self, body_type: int = BODY_TD_REPORT10) -> bytes:
        """The TD report body of ``body_type`` (2: 584, 3: 648, 4: 885 bytes)."""
        layout = _LAYOUTS.get(body_type)
        if layout is None:
            raise ValueError(f"unsupported TD report body type {body_type} (expected 2, 3 or 4)")
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update({f"rtmr{i}": r for i, r in enumerate(self.rtmrs)})
        values["vmid"] = bytes([self.vmid])
        values["tee_tcb_svn2"] = self.tee_tcb_svn2 if self.tee_tcb_svn2 is not None else self.tee_tcb_svn
        return b"".join(values[name] for name, _ in layout)


def qe_report_body(*, qe: QeProfile, cpu_svn: bytes, report_data: bytes) -> bytes:
    """A 384-byte SGX report body (``sgx_report_body_t``) for the TD Quoting Enclave."""
    return b"".join(
        [
            cpu_svn,
            struct.pack("<I", qe.misc_select),
            bytes(28),
            qe.attributes,
            qe.mrenclave,
            bytes(32),
            qe.mrsigner,
            bytes(96),
            struct.pack("<HH", qe.isv_prod_id, qe.isv_svn),
            bytes(60),
            report_data,
        ]
    )


class QuoteSigner:
    """The emulated TD Quoting Enclave: signs TD report bodies into complete quotes.

    The QE report (and the PCK key's signature on it) depends only on the attestation
    key and the QE, so it is made once here.
    """

    def __init__(
        self,
        *,
        attestation_key: ec.EllipticCurvePrivateKey,
        pck_key: ec.EllipticCurvePrivateKey,
        pck_chain_pem: bytes,
        qe: QeProfile,
        cpu_svn: bytes,
        pce_svn: int,
        qe_auth_data: bytes = DEFAULT_QE_AUTH_DATA,
        user_data: bytes = bytes(20),
    ) -> None:
        if len(user_data) != 20:
            raise ValueError(f"header user_data must be 20 bytes, got {len(user_data)}")
        if len(qe_auth_data) > 0xFFFF:
            raise ValueError("QE authentication data must fit a u16 size")
        self._key = attestation_key
        self.attestation_public_key = raw_public_key(attestation_key.public_key())
        self.qe = qe
        self.pce_svn = pce_svn
        self.user_data = bytes(user_data)
        digest = hashlib.sha256(self.attestation_public_key + qe_auth_data).digest()
        self.qe_report = qe_report_body(qe=qe, cpu_svn=qe.cpu_svn or cpu_svn, report_data=digest + bytes(32))
        qe_report_sig = _raw_sig(pck_key, self.qe_report)
        chain = struct.pack("<HI", CERT_TYPE_PCK_CHAIN, len(pck_chain_pem)) + pck_chain_pem
        qe_cert_data = self.qe_report + qe_report_sig + struct.pack("<H", len(qe_auth_data)) + qe_auth_data + chain
        self._cert_data = struct.pack("<HI", CERT_TYPE_QE_REPORT, len(qe_cert_data)) + qe_cert_data

    def header(self, version: int) -> bytes:
        return struct.pack(
            "<HHIHH16s20s",
            version,
            ATT_KEY_TYPE_ECDSA_P256,
            TEE_TYPE_TDX,
            self.qe.isv_svn,
            self.pce_svn,
            INTEL_QE_VENDOR_ID,
            self.user_data,
        )

    def sign_body(self, body: bytes, *, version: int = 4, body_type: int | None = None) -> bytes:
        """A quote around a TD report ``body`` already laid out for ``body_type``."""
        if version == 4:
            if body_type not in (None, BODY_TD_REPORT10):
                raise ValueError("a v4 quote carries TD report 1.0 (body type 2) only")
            body_type, prefix = BODY_TD_REPORT10, b""
        elif version == 5:
            body_type = BODY_TD_REPORT15 if body_type is None else body_type
            prefix = struct.pack("<HI", body_type, len(body))
        else:
            raise ValueError(f"TDX quotes are version 4 or 5, not {version}")
        expected = len(TdReportFields().encode(body_type))
        if len(body) != expected:
            raise ValueError(f"body type {body_type} is {expected} bytes, got {len(body)}")
        signed = self.header(version) + prefix + body
        sig_data = _raw_sig(self._key, signed) + self.attestation_public_key + self._cert_data
        return signed + struct.pack("<I", len(sig_data)) + sig_data

    def sign(self, report: TdReportFields, *, version: int = 4, body_type: int | None = None) -> bytes:
        """A quote over ``report`` (v5 defaults to body type 3, TD report 1.5)."""
        if version == 5 and body_type is None:
            body_type = BODY_TD_REPORT15
        return self.sign_body(report.encode(body_type or BODY_TD_REPORT10), version=version, body_type=body_type)
