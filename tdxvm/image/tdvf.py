"""TDVF metadata and the MRTD the TDX module computes while QEMU builds the TD.

Where the metadata is (OVMF's reset-vector GUIDed table, as QEMU's
``pc_system_ovmf_table_find`` reads it): the table ends 32 bytes before the end of the
image with the footer GUID 96b582de-1fb2-45f7-baea-a366c55a082d, preceded by a u16
total table length. Going backwards from there, each entry is ``data ‖ u16 length ‖
GUID`` where the length counts the data and its 18-byte header. The entry with GUID
e47a6535-984a-4798-865e-4685a7bf8ec2 holds a u32: the metadata's distance from the end
of the image.

The metadata (TDX Virtual Firmware Design Guide, §11 "TDVF metadata", tables
"TDVF_DESCRIPTOR" and "TDVF_SECTION"): signature ``"TDVF"``, u32 length (16 + 32 per
section), u32 version (1), u32 section count, then per section u32 DataOffset, u32
RawDataSize, u64 MemoryAddress, u64 MemoryDataSize, u32 Type, u32 Attributes.

MRTD (TDX module ABI, TDH.MEM.PAGE.ADD and TDH.MR.EXTEND): one SHA-384 over, for each
4 KiB page added, a 128-byte record ``"MEM.PAGE.ADD"`` ‖ zero pad to 16 ‖ GPA (u64 LE)
‖ zeros; and for each 256-byte chunk extended, a 128-byte record ``"MR.EXTEND"`` ‖ pad
‖ GPA ‖ zeros, then the chunk. QEMU adds every section in metadata order (upstream
``tdx_init_fw_mem_region``; sections marked PAGE.AUG are added later by the guest and
are not in MRTD) and asks KVM to extend the ones marked MR.EXTEND: page by page
(``single-pass``, upstream KVM) or a section's adds first, then its extends
(``two-pass``, QEMU 8.x TDX branches). TD_HOB and TempMem pages have no image data and
are added as zero pages, which PAGE.ADD records do not cover anyway.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from dataclasses import dataclass

from tdxvm.image.measureerrors import MeasureError

TABLE_FOOTER_GUID = uuid.UUID("96b582de-1fb2-45f7-baea-a366c55a082d")
TDX_METADATA_OFFSET_GUID = uuid.UUID("e47a6535-984a-4798-865e-4685a7bf8ec2")
TDVF_SIGNATURE = b"TDVF"
DESCRIPTOR_SIZE = 16
SECTION_SIZE = 32
PAGE_SIZE = 0x1000
EXTEND_CHUNK = 0x100
RECORD_SIZE = 128
_FOOTER_FROM_END = 0x30  # footer GUID starts 48 bytes before the end of the image
_ENTRY_HEADER = 18  # u16 length + GUID

SECTION_BFV, SECTION_CFV, SECTION_TD_HOB, SECTION_TEMP_MEM, SECTION_PERM_MEM = 0, 1, 2, 3, 4
SECTION_PAYLOAD, SECTION_PAYLOAD_PARAM = 5, 6
SECTION_NAMES = {0: "BFV", 1: "CFV", 2: "TD_HOB", 3: "TempMem", 4: "PermMem", 5: "Payload", 6: "PayloadParam"}
ATTR_MR_EXTEND = 1 << 0
ATTR_PAGE_AUG = 1 << 1


@dataclass(frozen=True)
class TdvfSection:
    """One ``TDVF_SECTION``; ``offset`` is where its entry starts in the image."""

    index: int
    offset: int
    data_offset: int
    raw_data_size: int
    memory_address: int
    memory_data_size: int
    type: int
    attributes: int

    @property
    def type_name(self) -> str:
        return SECTION_NAMES.get(self.type, f"type {self.type}")

    @property
    def extended(self) -> bool:
        return bool(self.attributes & ATTR_MR_EXTEND)

    @property
    def added(self) -> bool:
        """Added with TDH.MEM.PAGE.ADD before launch (and so part of MRTD)."""
        return not self.attributes & ATTR_PAGE_AUG


@dataclass(frozen=True)
class TdvfMetadata:
    """The ``TDVF_DESCRIPTOR`` and its sections; ``offset`` is its byte offset in the image."""

    offset: int
    version: int
    sections: tuple[TdvfSection, ...]


def _fail(message: str, offset: int) -> MeasureError:
    return MeasureError(f"TDVF firmware at byte offset {offset}: {message}", code="tdvf", offset=offset)


def _metadata_offset(fw: bytes) -> int:
    """Follow the GUIDed table at the end of the image to the TDX metadata offset entry."""
    footer = len(fw) - _FOOTER_FROM_END
    if footer < 2 + 16:
        raise _fail(f"image of {len(fw)} bytes is too small for the OVMF GUIDed table", 0)
    if fw[footer : footer + 16] != TABLE_FOOTER_GUID.bytes_le:
        raise _fail(f"no OVMF table footer GUID {TABLE_FOOTER_GUID} (not an OVMF/TDVF image)", footer)
    (total,) = struct.unpack_from("<H", fw, footer - 2)
    table_start = footer + 16 - total
    if total < _ENTRY_HEADER or table_start < 0:
        raise _fail(f"GUIDed table length {total} does not fit the image", footer - 2)
    end = footer - 2  # entries run backwards from the footer entry's length field
    while end - 16 - 2 >= table_start:
        guid_at, len_at = end - 16, end - 18
        (length,) = struct.unpack_from("<H", fw, len_at)
        if length < _ENTRY_HEADER or end - length < table_start:
            raise _fail(f"GUIDed table entry length {length} does not fit the table", len_at)
        if fw[guid_at:end] == TDX_METADATA_OFFSET_GUID.bytes_le:
            data_at = end - length
            if length - _ENTRY_HEADER < 4:
                raise _fail("TDX metadata offset entry holds no u32", len_at)
            (from_end,) = struct.unpack_from("<I", fw, data_at)
            if not DESCRIPTOR_SIZE <= from_end <= len(fw):
                raise _fail(f"TDX metadata offset {from_end} from the end is outside the image", data_at)
            return len(fw) - from_end
        end -= length
    raise _fail(f"no TDX metadata offset entry {TDX_METADATA_OFFSET_GUID} in the GUIDed table (not a TDVF)", footer)


def parse_tdvf(firmware: bytes | bytearray | memoryview) -> TdvfMetadata:
    """Parse the TDVF metadata of a firmware image, checking it as QEMU does (``hw/i386/tdvf.c``)."""
    fw = bytes(firmware)
    at = _metadata_offset(fw)
    if at + DESCRIPTOR_SIZE > len(fw):
        raise _fail("TDVF descriptor runs past the end of the image", at)
    sig, length, version, count = struct.unpack_from("<4sIII", fw, at)
    if sig != TDVF_SIGNATURE:
        raise _fail(f"TDVF descriptor signature is {sig!r}, expected b'TDVF'", at)
    if version != 1:
        raise _fail(f"TDVF metadata version {version} (only 1 is defined)", at + 8)
    if length != DESCRIPTOR_SIZE + SECTION_SIZE * count:
        raise _fail(f"TDVF descriptor length {length} does not match {count} sections", at + 4)
    if at + length > len(fw):
        raise _fail(f"TDVF metadata ({length} bytes) runs past the end of the image", at)
    sections = []
    for i in range(count):
        s_at = at + DESCRIPTOR_SIZE + SECTION_SIZE * i
        s = TdvfSection(i, s_at, *struct.unpack_from("<IIQQII", fw, s_at))
        _check_section(s, len(fw))
        sections.append(s)
    return TdvfMetadata(at, version, tuple(sections))


def _check_section(s: TdvfSection, size: int) -> None:
    where = f"section {s.index} ({s.type_name})"
    if s.memory_address % PAGE_SIZE or s.memory_data_size % PAGE_SIZE:
        raise _fail(
            f"{where}: MemoryAddress {s.memory_address:#x} and MemoryDataSize {s.memory_data_size:#x} "
            "must be 4 KiB aligned",
            s.offset + 8,
        )
    if s.raw_data_size > s.memory_data_size:
        raise _fail(
            f"{where}: RawDataSize {s.raw_data_size:#x} exceeds MemoryDataSize {s.memory_data_size:#x}", s.offset + 4
        )
    if s.type in (SECTION_BFV, SECTION_CFV) and s.raw_data_size == 0:
        raise _fail(f"{where}: no image data (RawDataSize 0)", s.offset + 4)
    if s.type in (SECTION_TD_HOB, SECTION_TEMP_MEM) and s.raw_data_size:
        raise _fail(f"{where}: RawDataSize {s.raw_data_size:#x} but this type has no image data", s.offset + 4)
    if s.extended and s.type not in (SECTION_BFV, SECTION_CFV):
        raise _fail(f"{where}: MR.EXTEND of memory the VMM fills at launch; MRTD cannot be predicted", s.offset + 28)
    if s.extended and s.data_offset + s.memory_data_size > size:
        raise _fail(
            f"{where}: extended data {s.data_offset:#x}+{s.memory_data_size:#x} runs past the end of the "
            f"image ({size:#x} bytes)",
            s.offset,
        )


def _record(tag: bytes, gpa: int) -> bytes:
    return tag.ljust(16, b"\x00") + gpa.to_bytes(8, "little") + bytes(RECORD_SIZE - 24)


def mrtd(firmware: bytes | bytearray | memoryview, *, order: str = "single-pass") -> bytes:
    """MRTD of a TD built from this TDVF image (see the module docstring for ``order``)."""
    if order not in ("single-pass", "two-pass"):
        raise MeasureError(f"unknown page order {order!r} (single-pass or two-pass)", code="profile")
    fw = bytes(firmware)
    meta = parse_tdvf(fw)
    h = hashlib.sha384()
    for s in meta.sections:
        if not s.added:
            continue
        pages = range(s.memory_address, s.memory_address + s.memory_data_size, PAGE_SIZE)
        if order == "two-pass":
            for gpa in pages:
                h.update(_record(b"MEM.PAGE.ADD", gpa))
        for gpa in pages:
            if order == "single-pass":
                h.update(_record(b"MEM.PAGE.ADD", gpa))
            if s.extended:
                src = s.data_offset + (gpa - s.memory_address)
                for chunk in range(0, PAGE_SIZE, EXTEND_CHUNK):
                    h.update(_record(b"MR.EXTEND", gpa + chunk))
                    h.update(fw[src + chunk : src + chunk + EXTEND_CHUNK])
    return h.digest()


def section_bytes(firmware: bytes | bytearray | memoryview, section_type: int) -> tuple[TdvfSection, bytes]:
    """The one section of ``section_type`` and its image data (``RawDataSize`` bytes at
    ``DataOffset``), e.g. the CFV that TDVF measures into RTMR0."""
    fw = bytes(firmware)
    meta = parse_tdvf(fw)
    found = [s for s in meta.sections if s.type == section_type]
    name = SECTION_NAMES.get(section_type, f"type {section_type}")
    if len(found) != 1:
        raise _fail(f"TDVF metadata has {len(found)} {name} sections, expected 1", meta.offset)
    s = found[0]
    if s.data_offset + s.raw_data_size > len(fw):
        raise _fail(f"{name} data {s.data_offset:#x}+{s.raw_data_size:#x} runs past the end of the image", s.offset)
    return s, fw[s.data_offset : s.data_offset + s.raw_data_size]
