"""The SMBIOS table as edk2's SmbiosMeasurementDxe measures it into RTMR0.

``MdeModulePkg/Universal/SmbiosMeasurementDxe/SmbiosMeasurementDxe.c``
(``MeasureSmbiosTable`` at ReadyToBoot, PCR 1, ``EV_EFI_HANDOFF_TABLES2``
"SmbiosTable"): copy the structure table the SMBIOS 3.0 entry point points at, up to and
including the type-127 end structure (``GetSmbiosTableLength``), blank the fields that
differ between otherwise identical machines (``FilterSmbiosTable``) and hash the
result. Per structure (``FilterSmbiosEntry``):

* OEM types (>= 128) and types 11, 15, 18, 31, 33: every byte after the 4-byte header
  is zeroed (formatted area and strings);
* types 1, 2, 3, 4, 17, 22, 23, 27, 39: the listed fields are zeroed when the
  structure is long enough to hold them; a string field first has the characters of
  the string it names replaced by spaces, then its index byte zeroed.

Offsets are those of the SMBIOS 3.x structure definitions
(``MdePkg/Include/IndustryStandard/SmBios.h``), given here as (offset, size, is_string).
"""

from __future__ import annotations

from tdxvm.image.smbios import SmbiosError, structure_end

END_OF_TABLE = 127
OEM_BEGIN = 128
ZEROED_TYPES = frozenset({11, 15, 18, 31, 33})
FILTERS: dict[int, tuple[tuple[int, int, bool], ...]] = {
    1: ((0x07, 1, True), (0x08, 16, False), (0x18, 1, False)),  # SerialNumber, Uuid, WakeUpType
    2: ((0x07, 1, True), (0x0A, 1, True)),  # SerialNumber, LocationInChassis
    3: ((0x07, 1, True), (0x08, 1, True)),  # SerialNumber, AssetTag
    4: (
        (0x20, 1, True),
        (0x21, 1, True),
        (0x22, 1, True),  # SerialNumber, AssetTag, PartNumber
        (0x23, 1, False),
        (0x24, 1, False),
        (0x25, 1, False),  # CoreCount, EnabledCoreCount, ThreadCount
        (0x2A, 2, False),
        (0x2C, 2, False),
        (0x2E, 2, False),  # CoreCount2, EnabledCoreCount2, ThreadCount2
        (0x11, 1, False),
        (0x16, 2, False),
    ),  # Voltage, CurrentSpeed
    17: ((0x18, 1, True), (0x19, 1, True), (0x1A, 1, True)),  # SerialNumber, AssetTag, PartNumber
    22: ((0x07, 1, True), (0x10, 2, False), (0x12, 2, False)),  # SerialNumber, SBDSSerialNumber, SBDSManufactureDate
    23: ((0x05, 2, False),),  # ResetCount
    27: ((0x0C, 2, False),),  # NominalSpeed
    39: ((0x08, 1, True), (0x09, 1, True), (0x0A, 1, True)),  # SerialNumber, AssetTagNumber, ModelPartNumber
}


def _fail(message: str, offset: int) -> SmbiosError:
    return SmbiosError(f"SMBIOS table at byte offset {offset}: {message}", offset=offset)


def _blank_string(table: bytearray, at: int, length: int, end: int, string_id: int) -> None:
    """Replace the characters of string ``string_id`` with spaces (``GetSmbiosStringById``:
    an index past the last string names the last string)."""
    strings, pos = [], at + length
    while table[pos] != 0 or table[pos + 1] != 0:
        if table[pos] == 0:
            pos += 1
        stop = table.index(0, pos)
        strings.append((pos, stop))
        pos = stop
        if len(strings) == string_id:
            break
    if not strings:
        raise _fail(f"string field names string {string_id} but the structure has none", at)
    start, stop = strings[-1]
    table[start:stop] = b" " * (stop - start)


def filter_smbios_table(table: bytes) -> bytes:
    """The structure table as SmbiosMeasurementDxe hashes it: up to and including the
    end structure, filtered (see the module docstring)."""
    out, at = bytearray(table), 0
    while True:
        end = structure_end(out, at)
        kind, length = out[at], out[at + 1]
        if kind >= OEM_BEGIN or kind in ZEROED_TYPES:
            out[at + 4 : end] = bytes(end - at - 4)
        for offset, size, is_string in FILTERS.get(kind, ()):
            if length < offset + size:
                continue
            if is_string and out[at + offset]:
                _blank_string(out, at, length, end, out[at + offset])
            out[at + offset : at + offset + size] = bytes(size)
        at = end
        if kind == END_OF_TABLE:
            return bytes(out[:at])
        if at >= len(out):
            raise _fail("no end-of-table structure (type 127)", at)
