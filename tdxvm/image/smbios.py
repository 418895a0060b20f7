"""The SMBIOS structure table TDVF publishes, built from QEMU's fw_cfg SMBIOS files.

edk2 (``OvmfPkg/IntelTdx/IntelTdxX64.dsc``: SmbiosDxe with DetectSmbiosVersionLib,
SmbiosPlatformDxe; no other driver adds SMBIOS records) does, in order:

1. ``OvmfPkg/Library/SmbiosVersionLib/DetectSmbiosVersionLib.c``: accept QEMU's
   ``etc/smbios/smbios-anchor`` only if it is a 31-byte SMBIOS 2.x entry point
   (major 2, ``_SM_`` and ``_DMI_``, TableLength = size of ``etc/smbios/smbios-tables``)
   or a 24-byte 3.x one (major 3, ``_SM3_``, TableMaximumSize = that size); its version
   becomes SmbiosDxe's. Otherwise the firmware installs none of QEMU's structures and
   publishes no table (refused here: :class:`SmbiosError`).
2. ``OvmfPkg/SmbiosPlatformDxe`` (``GetQemuSmbiosTables``, ``InstallAllStructures``):
   add each structure of ``etc/smbios/smbios-tables`` before the first type 127, in
   order, with its own handle; then, if none was type 0, the OVMF default BIOS
   information (``mOvmfDefaultType0``, 26 bytes) with the strings PcdFirmwareVendor,
   PcdFirmwareVersionString, PcdFirmwareReleaseDateString (one shorter than 3
   characters becomes "unknown", "unknown", "02/02/2022") and handle 0xFFFE, for which
   SmbiosDxe picks the lowest handle not in use (``GetAvailableSmbiosHandle``).
3. ``MdeModulePkg/Universal/SmbiosDxe/SmbiosDxe.c`` (``SmbiosAdd``,
   ``SmbiosCreateTable``/``SmbiosCreate64BitTable``): the records in the order added,
   then its own end structure: type 127, length 4, handle 0xFEFF (``GetMaxSmbiosHandle``
   for any version but 2.0), two NULs. The 2.x and 3.x tables hold the same bytes.

:func:`published_table` returns that table; ``SmbiosMeasurementDxe`` hashes it after
:func:`tdxvm.image.smbiosfilter.filter_smbios_table` (``rtmr0.smbios_event``).

QEMU's type 4 ProcessorId (offset 8, 8 bytes: CPUID leaf 1 EAX and EDX of the first
vCPU, ``hw/i386/fw_cfg.c`` ``smbios_set_cpuid``) is not filtered by the measurement, so
with ``-cpu host`` it is the host CPU's; :func:`set_processor_id` puts in a known value.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from tdxvm.image.measureerrors import MeasureError

ANCHOR_FILE = "etc/smbios/smbios-anchor"
TABLES_FILE = "etc/smbios/smbios-tables"
ANCHOR_V2_SIZE = 31  # SMBIOS_TABLE_ENTRY_POINT
ANCHOR_V3_SIZE = 24  # SMBIOS_TABLE_3_0_ENTRY_POINT
BIOS_INFORMATION = 0
PROCESSOR_INFORMATION = 4
END_OF_TABLE = 127
HANDLE_PI_RESERVED = 0xFFFE
MAX_HANDLE = 0xFEFF  # GetMaxSmbiosHandle, SMBIOS version other than 2.0
TABLE_2X_MAX = 0xFFFF  # SMBIOS_TABLE_MAX_LENGTH: a 2.x table's u16 TableLength
PROCESSOR_ID_OFFSET, PROCESSOR_ID_SIZE = 0x08, 8
# mOvmfDefaultType0 (SmbiosPlatformDxe.c) as SMBIOS_TABLE_TYPE0 (SmBios.h, 3.1+: 26 bytes):
# Vendor 1, BiosVersion 2, BiosSegment 0xE800, BiosReleaseDate 3, BiosSize 0,
# BiosCharacteristics bit 3 (not supported), extension bytes 0x00 0x1C, releases 0 0,
# embedded controller 0xFF 0xFF, ExtendedBiosSize 0.
OVMF_TYPE0 = struct.pack(
    "<BBHBBHBBQBBBBBBH",
    BIOS_INFORMATION,
    26,
    HANDLE_PI_RESERVED,
    1,
    2,
    0xE800,
    3,
    0,
    1 << 3,
    0,
    0x1C,
    0,
    0,
    0xFF,
    0xFF,
    0,
)


class SmbiosError(MeasureError):
    """QEMU's SMBIOS files are not ones from which the published table can be predicted."""

    code = "smbios"


@dataclass(frozen=True)
class BiosStrings:
    """A firmware build's PcdFirmwareVendor, PcdFirmwareVersionString and
    PcdFirmwareReleaseDateString (fixed at build time; as compiled into SmbiosPlatformDxe)."""

    vendor: str
    version: str
    release_date: str


def _fail(message: str, offset: int | None = None) -> SmbiosError:
    return SmbiosError(message, offset=offset)


def qemu_structures(anchor: bytes, tables: bytes) -> bytes:
    """``tables`` if edk2's DetectSmbiosVersionLib accepts ``anchor`` for it, else
    :class:`SmbiosError` (the firmware would then publish no SMBIOS table). Also refused:
    a version before 2.7 (string length limit) or a 2.x table over 64 KiB."""
    if not tables:
        raise _fail(f"QEMU's {TABLES_FILE} is missing or empty: the firmware publishes no SMBIOS table")
    if len(anchor) == ANCHOR_V2_SIZE:
        major, minor = anchor[6], anchor[7]
        (length,) = struct.unpack_from("<H", anchor, 0x16)
        if anchor[:4] != b"_SM_" or anchor[0x10:0x15] != b"_DMI_" or major != 2 or length != len(tables):
            raise _fail(
                f"QEMU's 2.x SMBIOS anchor ({anchor[:4]!r}, version {major}.{minor}, table length {length}, "
                f"tables {len(tables)} bytes) is not one edk2 accepts",
                0,
            )
        if minor < 7:
            raise _fail(f"SMBIOS version 2.{minor}: edk2 limits strings to 64 characters before 2.7; not predicted", 7)
        if len(tables) > TABLE_2X_MAX:
            raise _fail(f"SMBIOS 2.x tables of {len(tables)} bytes exceed the 2.x table limit; not predicted")
    elif len(anchor) == ANCHOR_V3_SIZE:
        major = anchor[7]
        (size,) = struct.unpack_from("<I", anchor, 0x0C)
        if anchor[:5] != b"_SM3_" or major != 3 or size != len(tables):
            raise _fail(
                f"QEMU's 3.x SMBIOS anchor ({anchor[:5]!r}, major {major}, maximum size {size}, tables "
                f"{len(tables)} bytes) is not one edk2 accepts",
                0,
            )
    else:
        raise _fail(
            f"QEMU's {ANCHOR_FILE} has {len(anchor)} bytes, neither a 2.x ({ANCHOR_V2_SIZE}) nor a 3.x "
            f"({ANCHOR_V3_SIZE}) entry point: the firmware publishes no SMBIOS table"
        )
    return tables


def structure_end(tables: bytes, at: int) -> int:
    """End of the structure at ``at``: formatted area, strings, double NUL
    (``SmbiosTableLength``)."""
    if at + 4 > len(tables):
        raise _fail("structure header runs past the end of the tables (no type 127?)", at)
    length = tables[at + 1]
    if length < 4 or at + length > len(tables):
        raise _fail(f"structure length {length} does not fit the tables", at + 1)
    end = tables.find(b"\x00\x00", at + length)
    if end < 0:
        raise _fail("structure strings have no double-NUL terminator", at + length)
    return end + 2


def structures(tables: bytes) -> list[tuple[int, bytes]]:
    """The structures SmbiosPlatformDxe adds: (offset, bytes) of each one before the first
    type 127, which must be there."""
    out, at = [], 0
    while True:
        end = structure_end(tables, at)
        if tables[at] == END_OF_TABLE:
            return out
        out.append((at, tables[at:end]))
        at = end


def bios_information(strings: BiosStrings) -> bytes:
    """The OVMF default type 0 record, handle 0xFFFE (to be assigned), strings as
    ``InstallAllStructures`` writes them."""
    vendor = strings.vendor if len(strings.vendor) >= 3 else "unknown"
    version = strings.version if len(strings.version) >= 3 else "unknown"
    date = strings.release_date if len(strings.release_date) >= 3 else "02/02/2022"
    text = b"".join(s.encode("ascii") + b"\x00" for s in (vendor, version, date))
    return OVMF_TYPE0 + text + b"\x00"


def published_table(tables: bytes, *, bios: BiosStrings) -> bytes:
    """The table the firmware publishes for QEMU's ``tables`` (checked by
    :func:`qemu_structures`): QEMU's structures in order, the OVMF type 0 when QEMU gave
    none, SmbiosDxe's end structure. Refuses handles SmbiosAdd would reject (repeated,
    above 0xFEFF) instead of dropping the structure as a release build would."""
    records, used = [], set()
    for at, record in structures(tables):
        (handle,) = struct.unpack_from("<H", record, 2)
        if handle in used or handle > MAX_HANDLE:
            raise _fail(
                f"structure type {record[0]} has handle {handle:#06x}, repeated or above {MAX_HANDLE:#06x}: "
                "SmbiosAdd rejects it",
                at + 2,
            )
        used.add(handle)
        records.append(record)
    if not any(r[0] == BIOS_INFORMATION for r in records):
        handle = next(h for h in range(MAX_HANDLE) if h not in used)
        type0 = bytearray(bios_information(bios))
        struct.pack_into("<H", type0, 2, handle)
        records.append(bytes(type0))
    end = struct.pack("<BBH", END_OF_TABLE, 4, MAX_HANDLE) + b"\x00\x00"
    return b"".join(records) + end


def set_processor_id(tables: bytes, processor_id: bytes) -> bytes:
    """``tables`` with the ProcessorId of every type 4 structure set to ``processor_id``
    (8 bytes: CPUID leaf 1 EAX, then EDX, little-endian)."""
    if len(processor_id) != PROCESSOR_ID_SIZE:
        raise _fail(f"a processor ID has {PROCESSOR_ID_SIZE} bytes (CPUID.1 EAX, EDX), got {len(processor_id)}")
    out = bytearray(tables)
    found = False
    for at, record in structures(tables):
        if record[0] == PROCESSOR_INFORMATION:
            if record[1] < PROCESSOR_ID_OFFSET + PROCESSOR_ID_SIZE:
                raise _fail(f"type 4 structure of length {record[1]} has no ProcessorId", at + 1)
            out[at + PROCESSOR_ID_OFFSET : at + PROCESSOR_ID_OFFSET + PROCESSOR_ID_SIZE] = processor_id
            found = True
    if not found:
        raise _fail("no type 4 (processor) structure to set the processor ID in")
    return bytes(out)
