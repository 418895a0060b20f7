"""PCK certificates: PEM chains and Intel's SGX extension.

The SGX extension (OID 1.2.840.113741.1.13.1) is described in "Intel SGX PCK
Certificate and Certificate Revocation List Profile Specification", section 1.5: a
SEQUENCE of SEQUENCE { OID, value } with the PPID, the TCB (16 component SVNs, PCESVN,
CPUSVN), PCE-ID, FMSPC, SGX type and, for platform CA certificates, the platform
instance ID and configuration flags.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.x509.oid import NameOID

from tdxvm.attest.errors import CertificateError

SGX_EXTENSION_OID = "1.2.840.113741.1.13.1"
_SGX = SGX_EXTENSION_OID

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


def load_pem_block(block: bytes, what: str, index: int) -> x509.Certificate:
    """Load one certificate and every field the verifier reads from it.

    ``cryptography`` decodes some fields lazily; touching them here turns a malformed
    field into a :class:`CertificateError` now rather than a ``ValueError`` later.
    """
    try:
        cert = x509.load_pem_x509_certificate(block)
        cert.extensions, cert.subject, cert.issuer, cert.public_key()
        cert.not_valid_before_utc, cert.not_valid_after_utc
        if cert.serial_number < 0:
            raise ValueError("negative serial number (RFC 5280 4.1.2.2)")
    except (ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion) as exc:
        raise CertificateError(f"{what}: certificate {index} is malformed: {exc}") from None
    return cert


def parse_pem_chain(pem: bytes | str, what: str = "certificate chain") -> list[x509.Certificate]:
    """Parse concatenated PEM certificates, leaf first (see :func:`pem_blocks`)."""
    return [load_pem_block(b, what, i) for i, b in enumerate(pem_blocks(pem, what))]


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


class _Der:
    """Just enough DER to walk Intel's SGX extension."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def done(self) -> bool:
        return self.pos >= len(self.data)

    def read(self) -> tuple[int, bytes]:
        d = self.data
        if self.pos + 2 > len(d):
            raise CertificateError("SGX extension: truncated DER element")
        tag = d[self.pos]
        length = d[self.pos + 1]
        self.pos += 2
        if length & 0x80:
            n = length & 0x7F
            if n == 0 or n > 4 or self.pos + n > len(d):
                raise CertificateError("SGX extension: bad DER length")
            length = int.from_bytes(d[self.pos : self.pos + n], "big")
            self.pos += n
        if self.pos + length > len(d):
            raise CertificateError("SGX extension: DER element runs past its container")
        value = d[self.pos : self.pos + length]
        self.pos += length
        return tag, value


# DER content of the extension's OID; every field's OID is it plus small arcs (< 128).
_SGX_DER = bytes.fromhex("2a864886f84d010d01")


def _oid(*arcs: int) -> bytes:
    return _SGX_DER + bytes(arcs)


def _pairs(data: bytes) -> dict[bytes, tuple[int, bytes]]:
    """Decode SEQUENCE OF SEQUENCE { OID, value } into {raw OID: (tag, value)}."""
    out: dict[bytes, tuple[int, bytes]] = {}
    outer = _Der(data)
    while not outer.done():
        tag, seq = outer.read()
        if tag != 0x30:
            raise CertificateError("SGX extension: expected SEQUENCE { OID, value }")
        inner = _Der(seq)
        otag, oid = inner.read()
        if otag != 0x06:
            raise CertificateError("SGX extension: expected an OID")
        out[oid] = inner.read()
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


def _need(fields: dict[bytes, tuple[int, bytes]], name: str, *arcs: int) -> tuple[int, bytes]:
    oid = _oid(*arcs)
    if oid not in fields:
        dotted = ".".join(map(str, arcs))
        raise CertificateError(f"SGX extension: {name} ({_SGX}.{dotted}) is missing")
    return fields[oid]


def parse_pck_extension(cert: x509.Certificate) -> PckExtension:
    """Read Intel's SGX extension from a PCK leaf certificate."""
    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(_SGX))
    except x509.ExtensionNotFound:
        raise CertificateError("PCK certificate has no Intel SGX extension") from None
    raw = ext.value.value if isinstance(ext.value, x509.UnrecognizedExtension) else b""
    outer = _Der(raw)
    tag, body = outer.read()
    if tag != 0x30 or not outer.done():
        raise CertificateError("SGX extension: value is not a single SEQUENCE")
    top = _pairs(body)
    tcb = _pairs(_need(top, "TCB", 2)[1])
    components = tuple(_int(_need(tcb, f"TCB component {i}", 2, i), f"TCB component {i}") for i in range(1, 17))
    config = _pairs(top[_oid(7)][1]) if _oid(7) in top else {}

    def flag(arc: int) -> bool | None:
        tv = config.get(_oid(7, arc))
        if tv is None:
            return None
        tag, value = tv
        if tag != 0x01 or len(value) != 1:
            raise CertificateError(f"SGX extension: configuration flag {arc} is not a BOOLEAN")
        return value != b"\x00"

    pid = top.get(_oid(6))
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
    names = issuer.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(names[0].value) if names else ""
    lowered = cn.lower()
    if "platform" in lowered:
        return "platform"
    if "processor" in lowered:
        return "processor"
    raise CertificateError(f"PCK CA {cn!r} is neither a Platform nor a Processor CA")
