"""PCK certificates: PEM chains and Intel's SGX extension.

The SGX extension (OID 1.2.840.113741.1.13.1) is described in "Intel SGX PCK
Certificate and Certificate Revocation List Profile Specification", section 1.5: a
SEQUENCE of SEQUENCE { OID, value } with the PPID, the TCB (16 component SVNs, PCESVN,
CPUSVN), PCE-ID, FMSPC, SGX type and, for platform CA certificates, the platform
instance ID and configuration flags.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.x509.oid import NameOID

from tdxvm.attest.der import tlv_at
from tdxvm.attest.errors import CertificateError

SGX_EXTENSION_OID = "1.2.840.113741.1.13.1"
_SGX = SGX_EXTENSION_OID
_SGX_OID = x509.ObjectIdentifier(SGX_EXTENSION_OID)

_BEGIN = b"-----BEGIN CERTIFICATE-----"
_END = b"-----END CERTIFICATE-----"


def pem_blocks(pem: bytes | str, what: str = "certificate chain") -> list[bytes]:
    """Split concatenated PEM certificates into blocks, leaf first.

    Only whitespace may stand between and after the blocks; trailing NUL padding (which
    quote providers add) is tolerated.
    """
    data = pem.encode() if isinstance(pem, str) else pem
    data = data.rstrip(b"\x00")
    blocks: list[bytes] = []
    pos = 0
    while True:
        start = data.find(_BEGIN, pos)
        gap = data[pos:] if start < 0 else data[pos:start]
        if gap.strip():
            raise CertificateError(f"{what}: unexpected bytes at offset {pos} outside the PEM blocks")
        if start < 0:
            break
        end = data.find(_END, start)
        if end < 0:
            raise CertificateError(f"{what}: certificate {len(blocks)} has no END line")
        pos = end + len(_END)
        blocks.append(data[start:pos])
    if not blocks:
        raise CertificateError(f"{what}: no PEM certificate found")
    return blocks


_WHITESPACE = b" \t\r\n\x0b\x0c"


def pem_block_der(block: bytes, what: str, index: int) -> bytes:
    """The DER inside one ``-----BEGIN CERTIFICATE-----`` block: the base64 of the lines
    between the BEGIN and END lines (whitespace ignored)."""
    first, last = block.find(b"\n"), block.rfind(b"\n")
    body = block[first + 1 : last].translate(None, _WHITESPACE) if 0 <= first < last else b""
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise CertificateError(f"{what}: certificate {index} is not valid base64") from None


def load_der_certificate(der: bytes, what: str, index: int) -> x509.Certificate:
    """Load one certificate and every field the verifier reads from it.

    ``cryptography`` decodes some fields lazily; touching them here turns a malformed
    field into a :class:`CertificateError` now rather than a ``ValueError`` later.
    Names, extensions and the public key are decoded where they are used, and those
    places handle malformed ones: decoding them here for every certificate would cost
    more than the rest of this function.
    """
    return load_dated_certificate(der, what, index)[0]


def load_dated_certificate(der: bytes, what: str, index: int) -> tuple[x509.Certificate, tuple[datetime, datetime]]:
    """:func:`load_der_certificate`, and the (notBefore, notAfter) it read (each read of
    those properties makes new datetimes)."""
    try:
        cert = x509.load_der_x509_certificate(der)
        window = (cert.not_valid_before_utc, cert.not_valid_after_utc)
        _ = (cert.signature, cert.signature_algorithm_oid)
        if cert.serial_number < 0:
            raise ValueError("negative serial number (RFC 5280 4.1.2.2)")
    except (ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion) as exc:
        raise CertificateError(f"{what}: certificate {index} is malformed: {exc}") from None
    return cert, window


def parse_pem_chain(pem: bytes | str, what: str = "certificate chain") -> list[x509.Certificate]:
    """Parse concatenated PEM certificates, leaf first (see :func:`pem_blocks`)."""
    return [load_der_certificate(pem_block_der(b, what, i), what, i) for i, b in enumerate(pem_blocks(pem, what))]


@dataclass(frozen=True, slots=True)
class PckExtension:
    """The fields of Intel's SGX extension of a PCK certificate."""

    ppid: bytes
    tcb_components: tuple[int, ...]
    pce_svn: int
    cpu_svn: bytes
    pce_id: bytes
    fmspc: bytes
    sgx_type: int
    platform_instance_id: bytes | None = None
    dynamic_platform: bool | None = None
    cached_keys: bool | None = None
    smt_enabled: bool | None = None


# DER content of the extension's OID; every field's OID is it plus small arcs (< 128).
_SGX_DER = bytes.fromhex("2a864886f84d010d01")


def _oid(*arcs: int) -> bytes:
    return _SGX_DER + bytes(arcs)


def _pairs(data: bytes) -> dict[bytes, tuple[int, bytes]]:
    """Decode SEQUENCE OF SEQUENCE { OID, value } into {raw OID: (tag, value)}."""
    out: dict[bytes, tuple[int, bytes]] = {}
    pos, end = 0, len(data)
    while pos < end:
        # Fast path: the short-form lengths Intel's certificates use throughout.
        if (
            pos + 4 <= end
            and data[pos] == 0x30
            and data[pos + 2] == 0x06
            and not (data[pos + 1] | data[pos + 3]) & 0x80
        ):
            stop, oid_stop = pos + 2 + data[pos + 1], pos + 4 + data[pos + 3]
            if (
                oid_stop + 2 <= stop <= end
                and not data[oid_stop + 1] & 0x80
                and oid_stop + 2 + data[oid_stop + 1] == stop
            ):
                out[data[pos + 4 : oid_stop]] = (data[oid_stop], data[oid_stop + 2 : stop])
                pos = stop
                continue
        tag, start, stop = tlv_at(data, pos, end, "SGX extension")
        if tag == 0x30:
            oid_tag, oid_start, oid_stop = tlv_at(data, start, stop, "SGX extension")
            if oid_tag == 0x06 and oid_stop < stop:
                value_tag, value_start, value_stop = tlv_at(data, oid_stop, stop, "SGX extension")
                if value_stop == stop:
                    out[data[oid_start:oid_stop]] = (value_tag, data[value_start:value_stop])
                    pos = stop
                    continue
        raise CertificateError("SGX extension: expected SEQUENCE { OID, value }")
    return out


def _int(tv: tuple[int, bytes], name: str) -> int:
    tag, value = tv
    if tag not in (0x02, 0x0A) or not value:
        raise CertificateError(f"SGX extension: {name} is not an INTEGER")
    return int.from_bytes(value, "big", signed=True)


def _octets(tv: tuple[int, bytes], name: str, size: int | None = None) -> bytes:
    tag, value = tv
    if tag != 0x04 or (size is not None and len(value) != size):
        want = f" of {size} bytes" if size is not None else ""
        raise CertificateError(f"SGX extension: {name} is not an OCTET STRING{want}")
    return value


_OIDS: dict[tuple[int, ...], bytes] = {}


def _need(fields: dict[bytes, tuple[int, bytes]], name: str, *arcs: int) -> tuple[int, bytes]:
    oid = _OIDS.get(arcs)
    if oid is None:
        oid = _OIDS[arcs] = _oid(*arcs)
    tv = fields.get(oid)
    if tv is None:
        dotted = ".".join(map(str, arcs))
        raise CertificateError(f"SGX extension: {name} ({_SGX}.{dotted}) is missing")
    return tv


_COMPONENTS = tuple((_oid(2, i), i, f"TCB component {i}") for i in range(1, 17))
_PLATFORM_INSTANCE_ID, _CONFIGURATION = _oid(6), _oid(7)
_FLAGS = {arc: _oid(7, arc) for arc in (1, 2, 3)}  # dynamic platform, cached keys, SMT enabled


def _components(tcb: dict[bytes, tuple[int, bytes]]) -> tuple[int, ...]:
    """The 16 TCB component SVNs (each an INTEGER; a missing or other one is refused)."""
    out = []
    for oid, i, name in _COMPONENTS:
        tv = tcb.get(oid)
        if tv is None or tv[0] not in (0x02, 0x0A) or not tv[1]:
            _int(_need(tcb, name, 2, i), name)  # raises, naming the component
        out.append(int.from_bytes(tv[1], "big", signed=True))  # type: ignore[index]
    return tuple(out)


def parse_pck_extension(cert: x509.Certificate) -> PckExtension:
    """Read Intel's SGX extension from a PCK leaf certificate."""
    try:
        ext = cert.extensions.get_extension_for_oid(_SGX_OID)
    except x509.ExtensionNotFound:
        raise CertificateError("PCK certificate has no Intel SGX extension") from None
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise CertificateError(f"PCK certificate has malformed extensions: {exc}") from None
    raw = ext.value.value if isinstance(ext.value, x509.UnrecognizedExtension) else b""
    tag, start, stop = tlv_at(raw, 0, len(raw), "SGX extension")
    if tag != 0x30 or stop != len(raw):
        raise CertificateError("SGX extension: value is not a single SEQUENCE")
    top = _pairs(raw[start:stop])
    tcb = _pairs(_need(top, "TCB", 2)[1])
    components = _components(tcb)
    config_tv = top.get(_CONFIGURATION)
    config = _pairs(config_tv[1]) if config_tv is not None else {}

    def flag(arc: int) -> bool | None:
        tv = config.get(_FLAGS[arc])
        if tv is None:
            return None
        tag, value = tv
        if tag != 0x01 or len(value) != 1:
            raise CertificateError(f"SGX extension: configuration flag {arc} is not a BOOLEAN")
        return value != b"\x00"

    pid = top.get(_PLATFORM_INSTANCE_ID)
    return PckExtension(
        ppid=_octets(_need(top, "PPID", 1), "PPID", 16),
        tcb_components=components,
        pce_svn=_int(_need(tcb, "PCESVN", 2, 17), "PCESVN"),
        cpu_svn=_octets(_need(tcb, "CPUSVN", 2, 18), "CPUSVN", 16),
        pce_id=_octets(_need(top, "PCE-ID", 3), "PCE-ID", 2),
        fmspc=_octets(_need(top, "FMSPC", 4), "FMSPC", 6),
        sgx_type=_int(_need(top, "SGX type", 5), "SGX type"),
        platform_instance_id=_octets(pid, "platform instance ID") if pid else None,
        dynamic_platform=flag(1),
        cached_keys=flag(2),
        smt_enabled=flag(3),
    )


def pck_ca_type(issuer: x509.Certificate) -> str:
    """``"platform"`` or ``"processor"``: which PCK CA issued a PCK certificate.

    PCS serves a separate PCK CRL per CA; the CA's common name says which it is.
    """
    try:
        names = issuer.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        raise CertificateError("PCK CA certificate has a malformed subject") from None
    cn = str(names[0].value) if names else ""
    lowered = cn.lower()
    if "platform" in lowered:
        return "platform"
    if "processor" in lowered:
        return "processor"
    raise CertificateError(f"PCK CA {cn!r} is neither a Platform nor a Processor CA")
