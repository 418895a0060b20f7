"""TDX quote parsing: bytes in, typed structures out, no I/O and no verification.

Layouts follow Intel's "TDX DCAP Quoting Library API" (quote format v4, appendix A.3)
and the quote format v5 of DCAP 1.19+ (``sgx_quote_5.h``): a 48-byte header, a TD
report body (v4: always TD report 1.0; v5: a type/size descriptor, then the body), a
4-byte signature-data length and the ECDSA signature data. Body type 4 (TD report 1.5
with the TDX Connect fields) follows dcap-qvl's ``TDReport15Ex``.

Every length field is checked against what remains; a short or inconsistent quote is a
:class:`QuoteFormatError` naming the field and its byte offset. Bytes after the
signature data (padding added by some quote providers) are allowed and ignored. A
well-formed quote is read with a few ``struct`` unpacks; anything unexpected is read
again field by field to name what is wrong (``tests/attest/test_quote_layout.py``
checks that both ways agree).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from tdxvm.attest.errors import QuoteFormatError

HEADER_SIZE = 48
TD_REPORT10_SIZE = 584
TD_REPORT15_SIZE = 648
TD_REPORT15EX_SIZE = 885
ENCLAVE_REPORT_SIZE = 384
ECDSA_SIGNATURE_SIZE = 64
ECDSA_KEY_SIZE = 64

TEE_TYPE_TDX = 0x81
ATT_KEY_TYPE_ECDSA_P256 = 2
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")

BODY_TD_REPORT10 = 2
BODY_TD_REPORT15 = 3
BODY_TD_REPORT15EX = 4
_BODY_SIZES = {
    BODY_TD_REPORT10: TD_REPORT10_SIZE,
    BODY_TD_REPORT15: TD_REPORT15_SIZE,
    BODY_TD_REPORT15EX: TD_REPORT15EX_SIZE,
}

CERT_TYPE_PCK_CHAIN = 5
CERT_TYPE_QE_REPORT = 6

# TD attributes (TDX module ABI, TDINFO_STRUCT.ATTRIBUTES), as a little-endian u64; bit
# numbers as Linux names them (arch/x86/include/asm/shared/tdx.h, TDX_ATTR_*).
TD_ATTR_DEBUG = 1 << 0
TD_ATTR_HGS_PLUS = 1 << 4
TD_ATTR_PERF_PROF = 1 << 5
TD_ATTR_PMT_PROF = 1 << 6
# The TUD ("TD under debug") group, bits 7:0: a TD with any of them set is untrusted (TDX
# module ABI, ATTRIBUTES): DEBUG, the profiling bits, and bits reserved for more of them.
TD_ATTR_TUD_MASK = 0xFF
TD_ATTR_ICSSD = 1 << 16
TD_ATTR_LASS = 1 << 27
TD_ATTR_SEPT_VE_DISABLE = 1 << 28
TD_ATTR_MIGRATABLE = 1 << 29
TD_ATTR_PKS = 1 << 30
TD_ATTR_KL = 1 << 31
TD_ATTR_TPA = 1 << 62
TD_ATTR_PERFMON = 1 << 63
TD_ATTR_NAMES = {
    TD_ATTR_DEBUG: "DEBUG",
    TD_ATTR_HGS_PLUS: "HGS_PLUS",
    TD_ATTR_PERF_PROF: "PERF_PROF",
    TD_ATTR_PMT_PROF: "PMT_PROF",
    TD_ATTR_ICSSD: "ICSSD",
    TD_ATTR_LASS: "LASS",
    TD_ATTR_SEPT_VE_DISABLE: "SEPT_VE_DISABLE",
    TD_ATTR_MIGRATABLE: "MIGRATABLE",
    TD_ATTR_PKS: "PKS",
    TD_ATTR_KL: "KL",
    TD_ATTR_TPA: "TPA",
    TD_ATTR_PERFMON: "PERFMON",
}
# What every tdxvm launch asks for: the tdx backend's libvirt <launchSecurity><policy>,
# and what the emulated quote service signs for an emulated TD. SEPT_VE_DISABLE, no DEBUG.
LAUNCH_TD_ATTRIBUTES = TD_ATTR_SEPT_VE_DISABLE


def td_attribute_names(bits: int) -> list[str]:
    """The names of the TD attribute bits set in ``bits``, low bit first ("bit 5" if unnamed)."""
    return [TD_ATTR_NAMES.get(1 << i, f"bit {i}") for i in range(64) if bits >> i & 1]


class _Reader:
    """Sequential reader over a bytes object that reports fields by name and offset."""

    def __init__(self, data: bytes, base: int = 0, end: int | None = None) -> None:
        self._data = data
        self.pos = base
        self.end = len(data) if end is None else end

    def take(self, size: int, field: str) -> bytes:
        if size < 0 or self.pos + size > self.end:
            raise QuoteFormatError(
                f"needs {size} bytes but only {max(self.end - self.pos, 0)} remain",
                field=field,
                offset=self.pos,
            )
        out = self._data[self.pos : self.pos + size]
        self.pos += size
        return out

    def u16(self, field: str) -> int:
        return int.from_bytes(self.take(2, field), "little")

    def u32(self, field: str) -> int:
        return int.from_bytes(self.take(4, field), "little")

    def sub(self, size: int, field: str) -> _Reader:
        """A reader over the next ``size`` bytes; this reader skips past them."""
        start = self.pos
        self.take(size, field)
        return _Reader(self._data, start, start + size)


class _Layout:
    """Fixed-size fields (``struct`` codes, little-endian) read with one ``unpack_from``
    when all of them are present; when some are not, the fields are taken one by one so
    that the error names the first missing field and its offset."""

    def __init__(self, *fields: tuple[str, str]) -> None:
        self.fields = tuple((name, code, struct.calcsize("<" + code)) for name, code in fields)
        self.struct = struct.Struct("<" + "".join(code for _, code in fields))

    def read(self, r: _Reader, prefix: str) -> tuple:
        pos = r.pos
        if pos + self.struct.size <= r.end:
            r.pos = pos + self.struct.size
            return self.struct.unpack_from(r._data, pos)
        for name, _, size in self.fields:
            r.take(size, prefix + name)
        raise AssertionError("unreachable: a field of the layout is short")  # pragma: no cover


@dataclass(frozen=True, slots=True)
class QuoteHeader:
    version: int
    attestation_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes


@dataclass(frozen=True, slots=True)
class TdReport:
    """The TD report body of a quote (TD report 1.0, 1.5 or 1.5 with TDX Connect fields).

    Fields that a body type lacks are ``None``.
    """

    body_type: int
    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    report_data: bytes
    tee_tcb_svn2: bytes | None = None
    mr_service_td: bytes | None = None
    vmid: int | None = None
    td_id: bytes | None = None
    dev_info: bytes | None = None
    init_service_td_hash: bytes | None = None
    init_service_td_attributes: bytes | None = None
    init_cpu_svn: bytes | None = None
    init_tee_tcb_svn: bytes | None = None
    init_tee_fmspc: bytes | None = None
    cur_service_td_hash: bytes | None = None
    cur_service_td_attributes: bytes | None = None

    @property
    def td_attributes_u64(self) -> int:
        return int.from_bytes(self.td_attributes, "little")

    @property
    def debug(self) -> bool:
        return bool(self.td_attributes_u64 & TD_ATTR_DEBUG)

    @property
    def sept_ve_disable(self) -> bool:
        return bool(self.td_attributes_u64 & TD_ATTR_SEPT_VE_DISABLE)

    @property
    def migratable(self) -> bool:
        return bool(self.td_attributes_u64 & TD_ATTR_MIGRATABLE)


@dataclass(frozen=True, slots=True)
class EnclaveReport:
    """SGX REPORT body (the Quoting Enclave's report inside the signature data)."""

    raw: bytes
    cpu_svn: bytes
    misc_select: int
    attributes: bytes
    mr_enclave: bytes
    mr_signer: bytes
    isv_prod_id: int
    isv_svn: int
    report_data: bytes


@dataclass(frozen=True, slots=True)
class QuoteSignature:
    """ECDSA quote signature data with QE report certification data (type 6)."""

    signature: bytes
    attestation_key: bytes
    qe_report: EnclaveReport
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_chain_pem: bytes


@dataclass(frozen=True, slots=True)
class Quote:
    """A parsed TDX quote. ``signed_data`` is the byte range the attestation key signed."""

    header: QuoteHeader
    body: TdReport
    signature: QuoteSignature
    signed_data: bytes
    raw: bytes

    @property
    def version(self) -> int:
        return self.header.version


_HEADER = struct.Struct("<HHIHH16s20s")


def _regular_header(r: _Reader) -> QuoteHeader | None:
    """The header in one unpack when it is whole and of a kind tdxvm reads (None
    otherwise: :func:`_parse_header` then reads it field by field and says what is wrong)."""
    if r.pos + HEADER_SIZE > r.end:
        return None
    version, key_type, tee_type, *rest = _HEADER.unpack_from(r._data, r.pos)
    if version not in (4, 5) or key_type != ATT_KEY_TYPE_ECDSA_P256 or tee_type != TEE_TYPE_TDX:
        return None
    r.pos += HEADER_SIZE
    return QuoteHeader(version, key_type, tee_type, *rest)


def _parse_header(r: _Reader) -> QuoteHeader:
    regular = _regular_header(r)
    if regular is not None:
        return regular
    version = r.u16("header.version")
    if version not in (4, 5):
        sgx = " (an SGX enclave quote)" if version in (2, 3) else ""
        raise QuoteFormatError(
            f"unsupported quote version {version}{sgx} (tdxvm reads TDX quotes v4 and v5)",
            field="header.version",
            offset=0,
        )
    key_type = r.u16("header.attestation_key_type")
    if key_type != ATT_KEY_TYPE_ECDSA_P256:
        raise QuoteFormatError(
            f"attestation key type {key_type} is not ECDSA-256-with-P-256 (2)",
            field="header.attestation_key_type",
            offset=2,
        )
    tee_type = r.u32("header.tee_type")
    if tee_type != TEE_TYPE_TDX:
        sgx = " (SGX)" if tee_type == 0 else ""
        raise QuoteFormatError(f"TEE type {tee_type:#x}{sgx} is not TDX (0x81)", field="header.tee_type", offset=4)
    return QuoteHeader(
        version=version,
        attestation_key_type=key_type,
        tee_type=tee_type,
        qe_svn=r.u16("header.qe_svn"),
        pce_svn=r.u16("header.pce_svn"),
        qe_vendor_id=r.take(16, "header.qe_vendor_id"),
        user_data=r.take(20, "header.user_data"),
    )


_TD_REPORT10 = _Layout(
    ("tee_tcb_svn", "16s"),
    ("mr_seam", "48s"),
    ("mr_signer_seam", "48s"),
    ("seam_attributes", "8s"),
    ("td_attributes", "8s"),
    ("xfam", "8s"),
    ("mr_td", "48s"),
    ("mr_config_id", "48s"),
    ("mr_owner", "48s"),
    ("mr_owner_config", "48s"),
    ("rtmr0", "48s"),
    ("rtmr1", "48s"),
    ("rtmr2", "48s"),
    ("rtmr3", "48s"),
    ("report_data", "64s"),
)
_TD_REPORT15 = _Layout(("tee_tcb_svn2", "16s"), ("mr_service_td", "48s"))  # after the 1.0 fields
_TD_REPORT15EX = _Layout(
    ("vmid", "B"),
    ("td_id", "32s"),
    ("dev_info", "48s"),
    ("init_service_td_hash", "48s"),
    ("init_service_td_attributes", "8s"),
    ("init_cpu_svn", "16s"),
    ("init_tee_tcb_svn", "16s"),
    ("init_tee_fmspc", "12s"),
    ("cur_service_td_hash", "48s"),
    ("cur_service_td_attributes", "8s"),
)  # after the 1.5 fields
_ENCLAVE_REPORT = _Layout(
    ("cpu_svn", "16s"),
    ("misc_select", "I"),
    ("reserved1", "28x"),
    ("attributes", "16s"),
    ("mr_enclave", "32s"),
    ("reserved2", "32x"),
    ("mr_signer", "32s"),
    ("reserved3", "96x"),
    ("isv_prod_id", "H"),
    ("isv_svn", "H"),
    ("reserved4", "60x"),
    ("report_data", "64s"),
)


def _parse_td_report(r: _Reader, body_type: int) -> TdReport:
    v = _TD_REPORT10.read(r, "body.")
    rtmrs = v[10:14]
    if body_type < BODY_TD_REPORT15:
        return TdReport(body_type, *v[:10], rtmrs, v[14])  # type: ignore[arg-type]
    v15 = _TD_REPORT15.read(r, "body.")
    if body_type < BODY_TD_REPORT15EX:
        return TdReport(body_type, *v[:10], rtmrs, v[14], *v15)  # type: ignore[arg-type]
    return TdReport(body_type, *v[:10], rtmrs, v[14], *v15, *_TD_REPORT15EX.read(r, "body."))  # type: ignore[arg-type]


def parse_enclave_report(raw: bytes, field: str = "qe_report") -> EnclaveReport:
    """Parse a 384-byte SGX REPORT body (Intel SGX SDK ``sgx_report_body_t``)."""
    return EnclaveReport(raw, *_ENCLAVE_REPORT.read(_Reader(raw), field + "."))


_SIGNATURE_HEAD = struct.Struct("<64s64sHI")  # quote signature, attestation key, certification data type and size
_QE_CERTIFICATION_HEAD = struct.Struct("<384s64sH")  # QE report, its signature, QE auth data size
_PCK_CERTIFICATION_HEAD = struct.Struct("<HI")  # certification data type and size


def _regular_signature(r: _Reader) -> QuoteSignature | None:
    """The signature data in a few unpacks when every type and size is as expected
    (None otherwise: :func:`_parse_signature` then reads it field by field and says what
    is wrong)."""
    data, pos = r._data, r.pos
    if pos + _SIGNATURE_HEAD.size > r.end:
        return None
    signature, attestation_key, cert_type, size = _SIGNATURE_HEAD.unpack_from(data, pos)
    start = pos + _SIGNATURE_HEAD.size
    end = start + size
    auth = start + _QE_CERTIFICATION_HEAD.size
    if cert_type != CERT_TYPE_QE_REPORT or end > r.end or auth > end:
        return None
    qe_report, qe_report_signature, auth_size = _QE_CERTIFICATION_HEAD.unpack_from(data, start)
    inner = auth + auth_size
    if inner + _PCK_CERTIFICATION_HEAD.size > end:
        return None
    inner_type, chain_size = _PCK_CERTIFICATION_HEAD.unpack_from(data, inner)
    chain = inner + _PCK_CERTIFICATION_HEAD.size
    if inner_type != CERT_TYPE_PCK_CHAIN or chain + chain_size != end:
        return None
    r.pos = end
    return QuoteSignature(
        signature,
        attestation_key,
        parse_enclave_report(qe_report),
        qe_report_signature,
        data[auth:inner],
        data[chain:end],
    )


def _parse_signature(r: _Reader) -> QuoteSignature:
    regular = _regular_signature(r)
    if regular is not None:
        return regular
    s = "signature_data."
    signature = r.take(ECDSA_SIGNATURE_SIZE, s + "quote_signature")
    attestation_key = r.take(ECDSA_KEY_SIZE, s + "attestation_key")
    cert_type_offset = r.pos
    cert_type = r.u16(s + "certification_data.type")
    if cert_type != CERT_TYPE_QE_REPORT:
        raise QuoteFormatError(
            f"certification data type {cert_type} is not QE report certification data (6)",
            field=s + "certification_data.type",
            offset=cert_type_offset,
        )
    size = r.u32(s + "certification_data.size")
    c = r.sub(size, s + "certification_data")
    q = "qe_report_certification_data."
    qe_report = parse_enclave_report(c.take(ENCLAVE_REPORT_SIZE, q + "qe_report"))
    qe_report_signature = c.take(ECDSA_SIGNATURE_SIZE, q + "qe_report_signature")
    auth_size = c.u16(q + "qe_auth_data.size")
    qe_auth_data = c.take(auth_size, q + "qe_auth_data")
    inner_type_offset = c.pos
    inner_type = c.u16(q + "certification_data.type")
    if inner_type != CERT_TYPE_PCK_CHAIN:
        raise QuoteFormatError(
            f"certification data type {inner_type} is not a PCK certificate chain (5)",
            field=q + "certification_data.type",
            offset=inner_type_offset,
        )
    chain_size = c.u32(q + "certification_data.size")
    pck_chain = c.take(chain_size, q + "certification_data.pck_chain")
    if c.pos != c.end:
        raise QuoteFormatError(
            f"{c.end - c.pos} bytes left over after the PCK chain",
            field=s + "certification_data.size",
            offset=c.pos,
        )
    return QuoteSignature(
        signature=signature,
        attestation_key=attestation_key,
        qe_report=qe_report,
        qe_report_signature=qe_report_signature,
        qe_auth_data=qe_auth_data,
        pck_chain_pem=pck_chain,
    )


def parse_quote(data: bytes | bytearray | memoryview) -> Quote:
    """Parse a TDX quote (v4 or v5). Raises :class:`QuoteFormatError` on malformed input."""
    raw = bytes(data)
    r = _Reader(raw)
    header = _parse_header(r)
    if header.version == 4:
        body = _parse_td_report(r, BODY_TD_REPORT10)
    else:
        type_offset = r.pos
        body_type = r.u16("body.type")
        size_offset = r.pos
        body_size = r.u32("body.size")
        expected = _BODY_SIZES.get(body_type)
        if expected is None:
            raise QuoteFormatError(
                f"unsupported TD report body type {body_type} (expected 2, 3 or 4)",
                field="body.type",
                offset=type_offset,
            )
        if body_size != expected:
            raise QuoteFormatError(
                f"body size {body_size} does not match body type {body_type} ({expected})",
                field="body.size",
                offset=size_offset,
            )
        body = _parse_td_report(r, body_type)
    signed_data = raw[: r.pos]
    sig_size = r.u32("signature_data.size")
    sig = _parse_signature(r.sub(sig_size, "signature_data"))
    return Quote(header=header, body=body, signature=sig, signed_data=signed_data, raw=raw)


def read_quote_bytes(data: bytes) -> bytes:
    """Accept a quote file as binary or as hex text (whitespace and a 0x prefix allowed)."""
    stripped = data.strip()
    if stripped[:2].lower() == b"0x":
        stripped = stripped[2:]
    if stripped and all(c in b"0123456789abcdefABCDEF \t\r\n" for c in stripped):
        try:
            return bytes.fromhex(stripped.decode("ascii"))
        except ValueError:
            pass
    return bytes(data)
