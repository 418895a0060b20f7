"""Authenticode: real signed PE files (the digest their signatures sign), a synthetic
PE checked against an explicit byte-range computation, and malformed images."""

from __future__ import annotations

import glob
import hashlib
import os
import re
import struct
from pathlib import Path

import pytest

from tdxvm.image import MeasureError
from tdxvm.image.authenticode import authenticode_digest, authenticode_ranges, parse_pe

from .conftest import build_pe

SHA256_ALGORITHM_ID = bytes.fromhex("0609608648016503040201")  # OID 2.16.840.1.101.3.4.2.1


def signed_digests(image: bytes) -> list[bytes]:
    """The SHA-256 image digests in every WIN_CERTIFICATE of an image: the DigestInfo of
    each PKCS#7 SignedData's SpcIndirectDataContent (an AlgorithmIdentifier for SHA-256
    directly followed by a 32-byte OCTET STRING), found without our PE parser."""
    lfanew = struct.unpack_from("<I", image, 0x3C)[0]
    opt = lfanew + 24
    dirs = opt + (112 if struct.unpack_from("<H", image, opt)[0] == 0x20B else 96)
    addr, size = struct.unpack_from("<II", image, dirs + 32)
    out, pos = [], addr
    while pos < addr + size:
        length = struct.unpack_from("<I", image, pos)[0]
        blob = image[pos + 8 : pos + length]
        m = re.search(re.escape(SHA256_ALGORITHM_ID) + b"(?:\x05\x00)?\x04\x20", blob)
        assert m, f"no SHA-256 DigestInfo in the certificate at {pos:#x}"
        out.append(blob[m.end() : m.end() + 32])
        pos += (length + 7) // 8 * 8
    return out


def test_shim_signed_digest_matches_both_signatures(shim_signed):
    signed = signed_digests(shim_signed)
    assert len(signed) == 2  # shim 16 carries two Microsoft signatures
    assert all(d == authenticode_digest(shim_signed, "sha256") for d in signed)


def test_grub_signed_digest_matches_its_signature(grub_signed):
    assert signed_digests(grub_signed) == [authenticode_digest(grub_signed, "sha256")]


def test_debian_signed_bzimage(debian_kernel):
    """Debian's signed kernel: a bzImage whose signature signs the digest TDVF measures
    (in SHA-256 there, SHA-384 in RTMR1)."""
    image = debian_kernel.read_bytes()
    assert parse_pe(image).cert_size
    assert signed_digests(image) == [authenticode_digest(image, "sha256")]
    assert len(authenticode_digest(image)) == 48


def _local_kernels() -> list[str]:
    extra = os.environ.get("TDXVM_TEST_KERNEL")
    return ([extra] if extra else []) + sorted(glob.glob("/boot/vmlinuz-*"))


@pytest.mark.parametrize("path", _local_kernels() or [None])
def test_local_signed_kernel(path):
    """Any other kernel at hand (/boot or $TDXVM_TEST_KERNEL); skipped where there is none."""
    if path is None:
        pytest.skip("no kernel in /boot and TDXVM_TEST_KERNEL unset")
    image = Path(path).read_bytes()
    if not parse_pe(image).cert_size:
        pytest.skip(f"{path} is not signed")
    assert authenticode_digest(image, "sha256") in signed_digests(image)


def _sample() -> tuple[bytes, bytes]:
    a, b, c = b"A" * 0x200, b"B" * 0x400, b"C" * 0x100
    image = build_pe(
        sections=[(0x800, a), (0x400, b), (0xA00, b""), (0xA00, c)], trailing=b"T" * 0x30, cert=b"S" * 0x48
    )
    return image, a + b + c


def test_synthetic_pe_against_explicit_ranges():
    image, _ = _sample()
    opt = 0x80 + 24
    checksum, cert_entry = opt + 64, opt + 112 + 32
    expected = (
        image[:checksum]
        + image[checksum + 4 : cert_entry]
        + image[cert_entry + 8 : 0x400]
        + image[0x400:0x800]
        + image[0x800:0xA00]
        + image[0xA00:0xB00]
        + b"T" * 0x30
    )
    assert authenticode_digest(image) == hashlib.sha384(expected).digest()
    assert authenticode_ranges(image)[-1] == (0xB00, 0xB30)  # trailing data, without the signature


def test_skipped_fields_do_not_matter_and_data_does():
    image, _ = _sample()
    digest = authenticode_digest(image)
    opt = 0x80 + 24
    resigned = bytearray(image)
    resigned[opt + 64 : opt + 68] = b"\x11\x22\x33\x44"  # another CheckSum
    resigned[-0x48:] = b"X" * 0x48  # another signature of the same size
    assert authenticode_digest(bytes(resigned)) == digest
    unsigned = build_pe(
        sections=[(0x800, b"A" * 0x200), (0x400, b"B" * 0x400), (0xA00, b""), (0xA00, b"C" * 0x100)],
        trailing=b"T" * 0x30,
    )
    assert authenticode_digest(unsigned) == digest  # signing does not change the digest
    tampered = bytearray(image)
    tampered[0x900] ^= 1
    assert authenticode_digest(bytes(tampered)) != digest


def test_pe32_without_certificate_entry():
    image = build_pe(sections=[(0x400, b"x" * 0x200)], magic=0x10B, rva_count=2)
    opt = 0x80 + 24
    expected = image[: opt + 64] + image[opt + 68 :]
    assert authenticode_digest(image) == hashlib.sha384(expected).digest()


def _patch(image: bytes, at: int, fmt: str, *values: int) -> bytes:
    out = bytearray(image)
    struct.pack_into(fmt, out, at, *values)
    return bytes(out)


GOOD = build_pe(sections=[(0x400, b"x" * 0x200)], cert=b"S" * 16)
OPT = 0x80 + 24


@pytest.mark.parametrize(
    ("image", "offset", "words"),
    [
        (b"\x7fELF" + GOOD[4:], 0, "no MZ signature"),
        (GOOD[:0x3E], 0x3C, "e_lfanew runs past the end"),
        (_patch(GOOD, 0x3C, "<I", 0x10000), 0x3C, "no PE signature"),
        (_patch(GOOD, 0x80, "<4s", b"NE\0\0"), 0x80, "no PE signature"),
        (_patch(GOOD, OPT, "<H", 0x107), OPT, "Magic 0x107"),
        (_patch(GOOD, 0x80 + 20, "<H", 40), 0x80 + 20, "SizeOfOptionalHeader 40"),
        (_patch(GOOD, OPT + 60, "<I", 0x10000), OPT + 60, "SizeOfHeaders"),
        (_patch(GOOD, OPT + 60, "<I", 0x100), OPT + 60, "SizeOfHeaders"),
        (_patch(GOOD, 0x80 + 6, "<H", 200), OPT + 240, "section table (200 entries)"),
        (_patch(GOOD, OPT + 240 + 16, "<I", 0x1000), OPT + 240 + 16, "section 0 raw data"),
        (_patch(GOOD, OPT + 112 + 36, "<I", 0x100), OPT + 112 + 36, "Certificate Table size 0x100"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_malformed_pe_names_the_offset(image, offset, words):
    with pytest.raises(MeasureError) as info:
        authenticode_digest(image)
    assert info.value.code == "pe"
    assert info.value.offset == offset
    assert f"byte offset {offset}:" in str(info.value)
    assert words in str(info.value)
