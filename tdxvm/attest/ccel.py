"""The CCEL ACPI table: where a TD's firmware put its confidential-computing event log.

Layout (ACPI 6.5, "CC Event Log ACPI Table", signature ``CCEL``; the 36-byte header is
the System Description Table Header of ACPI 6.5 §5.2.6)::

    offset size field
         0    4 Signature         "CCEL"
         4    4 Length            56 for this revision
         8    1 Revision
         9    1 Checksum          all bytes of the table sum to 0 (mod 256)
        10    6 OEMID
        16    8 OEM Table ID
        24    4 OEM Revision
        28    4 Creator ID
        32    4 Creator Revision
        36    1 CC Type           2 = Intel TDX
        37    1 CC Subtype
        38    2 Reserved
        40    8 LAML              log area minimum length
        48    8 LASA              log area start address (guest physical)

The guest reads the table from ``/sys/firmware/acpi/tables/CCEL`` and the log itself
from ``/sys/firmware/acpi/tables/data/CCEL`` (``LAML`` bytes at ``LASA``); parse the
log with :func:`tdxvm.attest.eventlog.parse_tcg_event_log`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from tdxvm.attest.errors import EventLogError

CCEL_SIGNATURE = b"CCEL"
CCEL_TABLE_SIZE = 56
ACPI_HEADER_SIZE = 36
CC_TYPE_SEV = 1
CC_TYPE_TDX = 2

_LAYOUT = struct.Struct("<4sIBB6s8sI4sIBBHQQ")
assert _LAYOUT.size == CCEL_TABLE_SIZE


@dataclass(frozen=True, slots=True)
class CcelTable:
    """The fields of a CCEL ACPI table."""

    revision: int
    checksum: int
    oem_id: bytes
    oem_table_id: bytes
    oem_revision: int
    creator_id: bytes
    creator_revision: int
    cc_type: int
    cc_subtype: int
    log_area_minimum_length: int
    log_area_start_address: int

    @property
    def is_tdx(self) -> bool:
        return self.cc_type == CC_TYPE_TDX


def parse_ccel_table(data: bytes | bytearray | memoryview) -> CcelTable:
    """Parse and check a CCEL table: signature, length field, size and ACPI checksum.

    Raises :class:`EventLogError` (naming the byte offset) for a malformed table.
    Bytes after the declared length are not allowed: a table file holds one table.
    """
    raw = bytes(data)
    if len(raw) < 8:
        raise EventLogError(f"CCEL table at byte offset {len(raw)}: truncated header ({len(raw)} of 8 bytes)")
    if raw[:4] != CCEL_SIGNATURE:
        raise EventLogError(f"CCEL table signature at byte offset 0: {raw[:4]!r}, expected b'CCEL'")
    length = struct.unpack_from("<I", raw, 4)[0]
    if length != CCEL_TABLE_SIZE:
        raise EventLogError(f"CCEL table length at byte offset 4: {length}, expected {CCEL_TABLE_SIZE}")
    if len(raw) != CCEL_TABLE_SIZE:
        raise EventLogError(
            f"CCEL table at byte offset {min(len(raw), CCEL_TABLE_SIZE)}: "
            f"{len(raw)} bytes, the length field says {CCEL_TABLE_SIZE}"
        )
    if sum(raw) % 256 != 0:
        raise EventLogError(
            f"CCEL table checksum at byte offset 9: bytes sum to {sum(raw) % 256:#04x} (mod 256), expected 0"
        )
    (_, _, rev, csum, oem, oem_tid, oem_rev, creator, creator_rev, cc_type, cc_sub, _, laml, lasa) = _LAYOUT.unpack(raw)
    return CcelTable(
        revision=rev,
        checksum=csum,
        oem_id=oem,
        oem_table_id=oem_tid,
        oem_revision=oem_rev,
        creator_id=creator,
        creator_revision=creator_rev,
        cc_type=cc_type,
        cc_subtype=cc_sub,
        log_area_minimum_length=laml,
        log_area_start_address=lasa,
    )
