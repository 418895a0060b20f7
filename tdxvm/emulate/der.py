"""Minimal DER encoding (ITU-T X.690), just enough for Intel's SGX certificate extension.

The ``cryptography`` package writes standard extensions itself; Intel's SGX extension
(OID 1.2.840.113741.1.13.1) is not one of them, so its value is built here by hand and
carried as an ``UnrecognizedExtension``. Only the universal types the extension uses are
supported: BOOLEAN, INTEGER, OCTET STRING, OBJECT IDENTIFIER, ENUMERATED and SEQUENCE.
"""

from __future__ import annotations

TAG_BOOLEAN = 0x01
TAG_INTEGER = 0x02
TAG_OCTET_STRING = 0x04
TAG_OID = 0x06
TAG_ENUMERATED = 0x0A
TAG_SEQUENCE = 0x30


def tlv(tag: int, content: bytes) -> bytes:
    """One tag-length-value element with a definite, minimal length (X.690 8.1.3)."""
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def _signed_content(value: int) -> bytes:
    """Minimal two's-complement big-endian content octets (X.690 8.3.2)."""
    size = max(1, (value + (value < 0)).bit_length() // 8 + 1)
    out = value.to_bytes(size, "big", signed=True)
    # to_bytes may leave one redundant leading byte; strip it while the sign is kept.
    while len(out) > 1 and ((out[0] == 0x00 and out[1] < 0x80) or (out[0] == 0xFF and out[1] >= 0x80)):
        out = out[1:]
    return out


def integer(value: int) -> bytes:
    return tlv(TAG_INTEGER, _signed_content(value))


def enumerated(value: int) -> bytes:
    return tlv(TAG_ENUMERATED, _signed_content(value))


def boolean(value: bool) -> bytes:
    """DER BOOLEAN: TRUE is 0xFF (X.690 11.1)."""
    return tlv(TAG_BOOLEAN, b"\xff" if value else b"\x00")


def octet_string(value: bytes) -> bytes:
    return tlv(TAG_OCTET_STRING, bytes(value))


def oid(dotted: str) -> bytes:
    """OBJECT IDENTIFIER from dotted text, base-128 arcs (X.690 8.19)."""
    arcs = [int(a) for a in dotted.split(".")]
    if len(arcs) < 2 or arcs[0] > 2 or (arcs[0] < 2 and arcs[1] >= 40):
        raise ValueError(f"not a valid object identifier: {dotted!r}")
    content = bytearray()
    for arc in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        content.extend(reversed(chunk))
    return tlv(TAG_OID, bytes(content))


def sequence(*elements: bytes) -> bytes:
    return tlv(TAG_SEQUENCE, b"".join(elements))
