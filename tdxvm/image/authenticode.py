"""PE/COFF Authenticode digest, as TDVF computes it for EV_EFI_BOOT_SERVICES_APPLICATION.

Follows the image-hashing steps of the Microsoft PE/COFF specification (Appendix A,
"Calculating the PE Image Hash"; the Authenticode PE format document) in the variant
edk2 runs (``OvmfPkg/Tcg/TdTcg2Dxe/MeasureBootPeCoff.c``, MeasurePeImageAndExtend):

1. hash the headers from offset 0 up to the optional header's CheckSum, skip its four
   bytes, hash on up to the Certificate Table data-directory entry (index 4), skip its
   eight bytes, hash on up to SizeOfHeaders (no entry to skip when
   NumberOfRvaAndSizes <= 4);
2. hash each section's raw data (PointerToRawData, SizeOfRawData), sections sorted by
   PointerToRawData, stable for equal keys, sections with no raw data left out;
3. if the file is longer than the bytes hashed so far (SUM_OF_BYTES_HASHED), hash
   ``FileSize - SUM - CertificateTable.Size`` bytes starting at file offset SUM: the
   trailing data without the signature. No zero padding is added.

A Linux bzImage with the EFI stub is such a PE/COFF image. Parsing takes bytes and
raises :class:`~tdxvm.image.measureerrors.MeasureError` naming the byte offset.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from tdxvm.image.measureerrors import MeasureError

PE32_MAGIC = 0x10B
PE32_PLUS_MAGIC = 0x20B
_OPT_CHECKSUM = 64  # CheckSum offset inside the optional header (PE32 and PE32+)
_OPT_SIZE_OF_HEADERS = 60
_OPT_RVA_COUNT = {PE32_MAGIC: 92, PE32_PLUS_MAGIC: 108}  # NumberOfRvaAndSizes
_OPT_DATA_DIRS = {PE32_MAGIC: 96, PE32_PLUS_MAGIC: 112}
_SECURITY_DIR = 4
_SECTION_HEADER_SIZE = 40


@dataclass(frozen=True)
class PeSection:
    """A section header's file extent; ``header_offset`` is where its header is."""

    index: int
    header_offset: int
    pointer_to_raw_data: int
    size_of_raw_data: int


@dataclass(frozen=True)
class PeLayout:
    """What Authenticode needs from the headers."""

    pe_offset: int
    magic: int
    checksum_offset: int
    cert_entry_offset: int | None  # None when the image has no Certificate Table entry
    size_of_headers: int
    sections: tuple[PeSection, ...]
    cert_size: int


def _fail(message: str, offset: int) -> MeasureError:
    return MeasureError(f"PE/COFF image at byte offset {offset}: {message}", code="pe", offset=offset)


def _u16(data: bytes, at: int, what: str) -> int:
    if at + 2 > len(data):
        raise _fail(f"{what} runs past the end of the file ({len(data)} bytes)", at)
    return int.from_bytes(data[at : at + 2], "little")


def _u32(data: bytes, at: int, what: str) -> int:
    if at + 4 > len(data):
        raise _fail(f"{what} runs past the end of the file ({len(data)} bytes)", at)
    return int.from_bytes(data[at : at + 4], "little")


def parse_pe(image: bytes | bytearray | memoryview) -> PeLayout:
    """Read the DOS, COFF and optional headers and the section table."""
    data = bytes(image)
    if data[:2] != b"MZ":
        raise _fail("no MZ signature: not a PE/COFF image (a bzImage needs CONFIG_EFI_STUB)", 0)
    pe = _u32(data, 0x3C, "e_lfanew")
    if data[pe : pe + 4] != b"PE\x00\x00":
        raise _fail(f"no PE signature where e_lfanew ({pe:#x}) points", pe if pe < len(data) else 0x3C)
    count = _u16(data, pe + 6, "NumberOfSections")
    opt_size = _u16(data, pe + 20, "SizeOfOptionalHeader")
    opt = pe + 24
    magic = _u16(data, opt, "optional header Magic")
    if magic not in _OPT_RVA_COUNT:
        raise _fail(f"optional header Magic {magic:#x} is neither PE32 (0x10b) nor PE32+ (0x20b)", opt)
    if _OPT_RVA_COUNT[magic] + 4 > opt_size:
        raise _fail(
            f"SizeOfOptionalHeader {opt_size} is too small for a PE32{'+' * (magic == PE32_PLUS_MAGIC)} "
            "optional header",
            pe + 20,
        )
    rva_count = _u32(data, opt + _OPT_RVA_COUNT[magic], "NumberOfRvaAndSizes")
    headers = _u32(data, opt + _OPT_SIZE_OF_HEADERS, "SizeOfHeaders")
    cert_entry = opt + _OPT_DATA_DIRS[magic] + 8 * _SECURITY_DIR if rva_count > _SECURITY_DIR else None
    cert_size = 0
    if cert_entry is not None:
        if cert_entry + 8 > opt + opt_size:
            raise _fail("Certificate Table entry lies outside the optional header", cert_entry)
        cert_size = _u32(data, cert_entry + 4, "Certificate Table size")
    hashed_header_end = cert_entry + 8 if cert_entry is not None else opt + _OPT_CHECKSUM + 4
    if not hashed_header_end <= headers <= len(data):
        raise _fail(
            f"SizeOfHeaders {headers:#x} must lie between the end of the fields Authenticode skips "
            f"({hashed_header_end:#x}) and the end of the file ({len(data):#x})",
            opt + _OPT_SIZE_OF_HEADERS,
        )
    table = opt + opt_size
    if table + count * _SECTION_HEADER_SIZE > len(data):
        raise _fail(f"section table ({count} entries) runs past the end of the file ({len(data)} bytes)", table)
    sections = []
    for i in range(count):
        at = table + i * _SECTION_HEADER_SIZE
        size, pointer = struct.unpack_from("<II", data, at + 16)
        if size and pointer + size > len(data):
            raise _fail(
                f"section {i} raw data {pointer:#x}+{size:#x} runs past the end of the file ({len(data):#x} bytes)",
                at + 16,
            )
        sections.append(PeSection(i, at, pointer, size))
    return PeLayout(pe, magic, opt + _OPT_CHECKSUM, cert_entry, headers, tuple(sections), cert_size)


def authenticode_ranges(image: bytes | bytearray | memoryview) -> list[tuple[int, int]]:
    """The (start, end) byte ranges Authenticode hashes, in hashing order."""
    data = bytes(image)
    pe = parse_pe(data)
    skip_end = pe.checksum_offset + 4
    if pe.cert_entry_offset is None:
        ranges = [(0, pe.checksum_offset), (skip_end, pe.size_of_headers)]
    else:
        ranges = [
            (0, pe.checksum_offset),
            (skip_end, pe.cert_entry_offset),
            (pe.cert_entry_offset + 8, pe.size_of_headers),
        ]
    hashed = pe.size_of_headers
    for s in sorted((s for s in pe.sections if s.size_of_raw_data), key=lambda s: s.pointer_to_raw_data):
        ranges.append((s.pointer_to_raw_data, s.pointer_to_raw_data + s.size_of_raw_data))
        hashed += s.size_of_raw_data
    if len(data) > hashed:
        if len(data) < hashed + pe.cert_size:
            at = pe.cert_entry_offset if pe.cert_entry_offset is not None else 0
            raise _fail(
                f"Certificate Table size {pe.cert_size:#x} is larger than the {len(data) - hashed:#x} bytes "
                "after the sections",
                at + 4,
            )
        ranges.append((hashed, len(data) - pe.cert_size))
    return [(a, b) for a, b in ranges if b > a]


def authenticode_digest(image: bytes | bytearray | memoryview, algorithm: str = "sha384") -> bytes:
    """Authenticode digest of a PE/COFF image (TDVF uses SHA-384; signatures mostly SHA-256)."""
    data = bytes(image)
    h = hashlib.new(algorithm)
    view = memoryview(data)
    for a, b in authenticode_ranges(data):
        h.update(view[a:b])
    return h.digest()
