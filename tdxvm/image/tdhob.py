"""The TD HOB that QEMU writes for TDVF, and the bytes TDVF measures of it into RTMR0.

QEMU (``hw/i386/tdvf-hob.c``, ``tdvf_hob_create``; the same in the QEMU 8.x TDX
branches and upstream >= 10.1) fills the TDVF metadata's TD_HOB section with:

* ``EFI_HOB_HANDOFF_INFO_TABLE`` (PI spec vol. 3, 56 bytes): type 1, length 56,
  version 9, boot mode and the four memory fields 0, ``EfiEndOfHobList`` = the guest
  address just past the end-of-list HOB;
* one ``EFI_HOB_RESOURCE_DESCRIPTOR`` (48 bytes: type 3, zero owner GUID, u32 resource
  type, u32 attribute, u64 start, u64 length) per RAM entry, sorted by address
  (``tdx_finalize_vm``): ``EFI_RESOURCE_SYSTEM_MEMORY`` (0) for memory QEMU accepts
  before launch (the TD_HOB and TempMem sections, ``tdx_accept_ram_range``), the rest
  ``EFI_RESOURCE_MEMORY_UNACCEPTED`` (7); attribute PRESENT|INITIALIZED|TESTED (7);
* the end-of-list HOB (type 0xFFFF, length 8).

The RAM entries start from the e820 RAM map of the q35 machine (``pc_q35_init``):
``below_4g = 0x80000000`` if RAM >= 0xB0000000 else all of it up to 0xB0000000, the
rest at 4 GiB. An accepted range splits the RAM entry it falls in; neighbouring
accepted ranges stay separate entries.

TDVF (``OvmfPkg/IntelTdx/TdxHelperLib/SecTdxHelper.c``, ``TdxHelperMeasureTdHob``)
hashes the list from its start up to, not including, the end-of-list HOB
(:func:`measured_td_hob`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from tdxvm.image.measureerrors import MeasureError
from tdxvm.image.tdvf import SECTION_TD_HOB, SECTION_TEMP_MEM, TdvfMetadata

MIB = 1 << 20
GIB = 1 << 30
Q35_SPLIT_THRESHOLD = 0xB0000000  # RAM at or above this is split at 2 GiB
Q35_LOWMEM_SPLIT = 0x80000000
Q35_LOWMEM_MAX = 0xB0000000
ABOVE_4G_START = 4 * GIB

HOB_TYPE_HANDOFF = 0x0001
HOB_TYPE_RESOURCE_DESCRIPTOR = 0x0003
HOB_TYPE_END_OF_HOB_LIST = 0xFFFF
HANDOFF_SIZE = 56
RESOURCE_SIZE = 48
END_SIZE = 8
HANDOFF_TABLE_VERSION = 9
RESOURCE_SYSTEM_MEMORY = 0
RESOURCE_MEMORY_UNACCEPTED = 7
RESOURCE_ATTRIBUTES = 0x7  # PRESENT | INITIALIZED | TESTED (QEMU's TDVF_PRIVATE and TDVF_UNACCEPTED)


@dataclass(frozen=True)
class RamEntry:
    """One entry of QEMU's TDX RAM list: ``accepted`` before launch or not."""

    start: int
    length: int
    accepted: bool


def q35_ram_map(memory: int) -> list[tuple[int, int]]:
    """The e820 RAM ranges (start, length) of a q35 machine with ``memory`` bytes of RAM
    and no ``max-ram-below-4g`` option (``pc_q35_init``)."""
    if memory <= 0 or memory % (4 * 1024):
        raise MeasureError(f"guest memory {memory} bytes is not a positive multiple of 4 KiB", code="memory")
    lowmem = Q35_LOWMEM_SPLIT if memory >= Q35_SPLIT_THRESHOLD else Q35_LOWMEM_MAX
    if memory < lowmem:
        return [(0, memory)]
    ranges = [(0, lowmem)]
    if memory > lowmem:
        ranges.append((ABOVE_4G_START, memory - lowmem))
    return ranges


def ram_entries(meta: TdvfMetadata, memory: int) -> list[RamEntry]:
    """QEMU's RAM list for ``memory`` bytes: the q35 map with the TD_HOB and TempMem
    sections accepted (in metadata order), sorted by address."""
    entries = [RamEntry(start, length, False) for start, length in q35_ram_map(memory)]
    for s in meta.sections:
        if s.type not in (SECTION_TD_HOB, SECTION_TEMP_MEM):
            continue
        start, end = s.memory_address, s.memory_address + s.memory_data_size
        if start == end:
            continue
        for i, e in enumerate(entries):
            if e.start <= start and end <= e.start + e.length and not e.accepted:
                split = [
                    RamEntry(e.start, start - e.start, False),
                    RamEntry(start, end - start, True),
                    RamEntry(end, e.start + e.length - end, False),
                ]
                entries[i : i + 1] = [x for x in split if x.length]
                break
        else:
            raise MeasureError(
                f"TDVF section {s.index} ({s.type_name}) at {start:#x}+{s.memory_data_size:#x} is not "
                f"inside the guest RAM of {memory // MIB} MiB (QEMU refuses to start)",
                code="memory",
                offset=s.offset + 8,
            )
    return sorted(entries, key=lambda e: e.start)


def td_hob(meta: TdvfMetadata, memory: int) -> bytes:
    """The whole TD HOB list QEMU writes for ``memory`` bytes of guest RAM."""
    hob_sections = [s for s in meta.sections if s.type == SECTION_TD_HOB]
    if len(hob_sections) != 1:
        raise MeasureError(
            f"TDVF metadata has {len(hob_sections)} TD_HOB sections, expected 1", code="tdvf", offset=meta.offset
        )
    base = hob_sections[0]
    body = b"".join(
        struct.pack(
            "<HHI16sIIQQ",
            HOB_TYPE_RESOURCE_DESCRIPTOR,
            RESOURCE_SIZE,
            0,
            bytes(16),
            RESOURCE_SYSTEM_MEMORY if e.accepted else RESOURCE_MEMORY_UNACCEPTED,
            RESOURCE_ATTRIBUTES,
            e.start,
            e.length,
        )
        for e in ram_entries(meta, memory)
    )
    end_of_list = base.memory_address + HANDOFF_SIZE + len(body) + END_SIZE
    total = HANDOFF_SIZE + len(body) + END_SIZE
    if total > base.memory_data_size:
        raise MeasureError(
            f"TD HOB of {total} bytes overruns the TD_HOB section ({base.memory_data_size:#x} bytes)",
            code="tdvf",
            offset=base.offset,
        )
    handoff = struct.pack(
        "<HHIII5Q", HOB_TYPE_HANDOFF, HANDOFF_SIZE, 0, HANDOFF_TABLE_VERSION, 0, 0, 0, 0, 0, end_of_list
    )
    return handoff + body + struct.pack("<HHI", HOB_TYPE_END_OF_HOB_LIST, END_SIZE, 0)


def measured_td_hob(meta: TdvfMetadata, memory: int) -> bytes:
    """The bytes TDVF hashes into RTMR0: the HOB list without its end-of-list HOB."""
    return td_hob(meta, memory)[:-END_SIZE]
