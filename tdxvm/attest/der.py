"""Just enough DER (X.690) to walk the few structures the verifier reads by hand:
Intel's SGX extension and the signed bodies of certificates and CRLs with the names
inside them."""

from __future__ import annotations

from tdxvm.attest.errors import CertificateError


class DerReader:
    """Reads tag-length-value elements in sequence from ``data``."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.what = what
        self.pos = 0

    def done(self) -> bool:
        return self.pos >= len(self.data)

    def _header(self) -> tuple[int, int, int]:
        d, pos = self.data, self.pos
        if pos + 2 > len(d):
            raise CertificateError(f"{self.what}: truncated DER element at offset {pos}")
        tag, length = d[pos], d[pos + 1]
        pos += 2
        if length & 0x80:
            n = length & 0x7F
            if n == 0 or n > 4 or pos + n > len(d):
                raise CertificateError(f"{self.what}: bad DER length at offset {self.pos}")
            length = int.from_bytes(d[pos : pos + n], "big")
            pos += n
        if pos + length > len(d):
            raise CertificateError(f"{self.what}: DER element at offset {self.pos} runs past its container")
        return tag, pos, length

    def read(self) -> tuple[int, bytes]:
        """The next element's tag and contents."""
        tag, start, length = self._header()
        self.pos = start + length
        return tag, self.data[start : start + length]

    def read_tlv(self) -> tuple[int, bytes]:
        """The next element's tag and its whole encoding (tag, length and contents)."""
        begin = self.pos
        tag, start, length = self._header()
        self.pos = start + length
        return tag, self.data[begin : self.pos]


def tlv_at(data: bytes, pos: int, end: int, what: str) -> tuple[int, int, int]:
    """(tag, contents start, contents end) of the element at ``pos``, which must end by ``end``."""
    if pos + 2 > end:
        raise CertificateError(f"{what}: truncated DER element at offset {pos}")
    tag, length = data[pos], data[pos + 1]
    start = pos + 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4 or start + n > end:
            raise CertificateError(f"{what}: bad DER length at offset {pos}")
        length = int.from_bytes(data[start : start + n], "big")
        start += n
    stop = start + length
    if stop > end:
        raise CertificateError(f"{what}: DER element at offset {pos} runs past its container")
    return tag, start, stop


def der_elements(data: bytes, what: str) -> list[tuple[int, bytes]]:
    """Every (tag, contents) element laid end to end in ``data``, in one pass."""
    out = []
    pos, end = 0, len(data)
    while pos < end:
        tag, start, stop = tlv_at(data, pos, end, what)
        out.append((tag, data[start:stop]))
        pos = stop
    return out


def _signed_body(der: bytes, what: str) -> tuple[int, int]:
    """(start, end) of the first element of the DER SEQUENCE ``der``: the signed body
    (TBSCertificate or TBSCertList) of a certificate or CRL, which must be a SEQUENCE."""
    tag, start, stop = tlv_at(der, 0, len(der), what)
    if tag != 0x30:
        raise CertificateError(f"{what}: not a DER SEQUENCE")
    tag, _, end = tlv_at(der, start, stop, what)
    if tag != 0x30:
        raise CertificateError(f"{what}: the signed body is not a DER SEQUENCE")
    return start, end


def certificate_parts(der: bytes, what: str) -> tuple[bytes, bytes, bytes]:
    """(TBSCertificate, issuer, subject) of a DER certificate (RFC 5280 4.1), each as its
    whole DER encoding, read in one pass."""
    begin, end = _signed_body(der, what)
    _, pos, _ = tlv_at(der, begin, end, what)  # into the TBSCertificate
    tag, _, stop = tlv_at(der, pos, end, what)
    if tag == 0xA0:  # [0] EXPLICIT version, then serialNumber
        _, _, stop = tlv_at(der, stop, end, what)
    _, _, pos = tlv_at(der, stop, end, what)  # signature AlgorithmIdentifier
    _, _, stop = tlv_at(der, pos, end, what)
    issuer = der[pos:stop]
    _, _, pos = tlv_at(der, stop, end, what)  # validity
    _, _, stop = tlv_at(der, pos, end, what)
    return der[begin:end], issuer, der[pos:stop]


def crl_parts(der: bytes, what: str) -> tuple[bytes, bytes]:
    """(TBSCertList, issuer) of a DER CRL (RFC 5280 5.1), each as its whole DER encoding."""
    begin, end = _signed_body(der, what)
    _, pos, _ = tlv_at(der, begin, end, what)  # into the TBSCertList
    tag, _, stop = tlv_at(der, pos, end, what)
    if tag == 0x02:  # version INTEGER, then the signature AlgorithmIdentifier
        _, _, stop = tlv_at(der, stop, end, what)
    _, _, end_issuer = tlv_at(der, stop, end, what)
    return der[begin:end], der[stop:end_issuer]
