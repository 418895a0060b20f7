"""The SMBIOS table TDVF publishes, built from the SMBIOS files of this machine's real QEMU
(``qemu-system-x86_64``, read over qtest with ``-S``: nothing runs), and the type 0
strings checked against the real Debian TDVF file.
"""

from __future__ import annotations

import lzma
import shutil
import struct
import uuid

import pytest

from tdxvm.image.qtest import QtestSession, fwcfg_directory, fwcfg_read
from tdxvm.image.rtmr0 import DEBIAN_2026_08
from tdxvm.image.smbios import (
    ANCHOR_FILE,
    OVMF_TYPE0,
    TABLES_FILE,
    BiosStrings,
    SmbiosError,
    bios_information,
    published_table,
    qemu_structures,
    set_processor_id,
    structures,
)
from tdxvm.image.smbiosfilter import filter_smbios_table

QEMU = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
BIOS = BiosStrings(vendor="Vendor Co", version="1.2.3", release_date="01/02/2030")
END = bytes([127, 4, 0xFF, 0xFE, 0, 0])
LZMA_SECTION = uuid.UUID("ee4e5898-3914-4259-9d6e-dc7bd79403cf")
SMBIOS_PLATFORM_DXE = uuid.UUID("4110465d-5ff3-4f4b-b580-24ed0d06747a")


def qemu_smbios(*extra: str, machine: str = "pc-q35-7.2") -> tuple[bytes, bytes]:
    """(anchor, tables) that the real QEMU serves for a small q35 machine."""
    assert QEMU is not None
    argv = [
        "-machine",
        machine,
        "-nodefaults",
        "-m",
        "1024",
        "-smp",
        "2",
        "-cpu",
        "Westmere",
        *extra,
        "-S",
        "-accel",
        "tcg",
    ]
    with QtestSession(QEMU, argv) as session:
        directory = fwcfg_directory(session)
        return fwcfg_read(session, directory[ANCHOR_FILE]), fwcfg_read(session, directory[TABLES_FILE])


def _types(table: bytes) -> list[int]:
    return [r[0] for _, r in structures(table + (b"" if table.endswith(END) else END))]


def _strings(record: bytes) -> list[bytes]:
    return record[record[1] :].rstrip(b"\0").split(b"\0")


@needs_qemu
def test_qemu_72_gives_no_type0_and_the_firmware_adds_its_own():
    anchor, tables = qemu_smbios()
    assert anchor[:4] == b"_SM_" and (anchor[6], anchor[7]) == (2, 8)  # pc-q35-7.2: a 2.8 32-bit entry point
    qemu = structures(qemu_structures(anchor, tables))
    assert 0 not in {r[0] for _, r in qemu} and {1, 4} <= {r[0] for _, r in qemu}
    table = published_table(tables, bios=BIOS)
    # QEMU's structures unchanged and in order, then the OVMF type 0, then SmbiosDxe's end
    assert table.startswith(b"".join(r for _, r in qemu))
    type0 = table[sum(len(r) for _, r in qemu) : -len(END)]
    assert table.endswith(END) and len(table) == sum(len(r) for _, r in qemu) + len(type0) + len(END)
    assert type0[:2] == bytes([0, 26]) and struct.unpack_from("<H", type0, 2)[0] == 0  # lowest free handle
    assert type0[4:26] == OVMF_TYPE0[4:26]
    assert _strings(type0) == [b"Vendor Co", b"1.2.3", b"01/02/2030"]
    # the filter keeps type 0 whole: its strings reach RTMR0
    assert filter_smbios_table(table) != filter_smbios_table(
        published_table(tables, bios=BiosStrings("Other", "1.2.3", "x"))
    )


@needs_qemu
def test_a_type0_from_qemu_is_kept_and_none_is_added():
    anchor, tables = qemu_smbios("-smbios", "type=0,vendor=Acme,version=9.9", "-machine", "smbios-entry-point-type=64")
    assert anchor[:5] == b"_SM3_"  # the 3.x anchor is accepted too
    table = published_table(qemu_structures(anchor, tables), bios=BIOS)
    assert _types(table).count(0) == 1 and b"Acme\x009.9\x00" in table and b"Vendor Co" not in table
    assert table == tables[: tables.index(bytes([127, 4]))] + END


@needs_qemu
def test_anchor_checks_follow_detect_smbios_version():
    anchor, tables = qemu_smbios()
    with pytest.raises(SmbiosError, match="not one edk2 accepts"):
        qemu_structures(anchor, tables + END)  # TableLength no longer matches
    with pytest.raises(SmbiosError, match="not one edk2 accepts"):
        qemu_structures(b"_XX_" + anchor[4:], tables)
    with pytest.raises(SmbiosError, match="2.6"):
        qemu_structures(anchor[:7] + b"\x06" + anchor[8:], tables)
    with pytest.raises(SmbiosError, match="neither"):
        qemu_structures(anchor[:30], tables)
    with pytest.raises(SmbiosError, match="empty") as err:
        qemu_structures(anchor, b"")
    assert err.value.code == "smbios"
    anchor3, tables3 = qemu_smbios("-machine", "smbios-entry-point-type=64")
    with pytest.raises(SmbiosError, match="3.x"):
        qemu_structures(anchor3, tables3[:-1])


@needs_qemu
def test_processor_id_is_measured_and_can_be_set():
    """Type 4 ProcessorId follows the CPU model and survives the filter; putting one
    model's ID into another's tables gives that model's tables."""
    _, westmere = qemu_smbios()
    _, skylake = qemu_smbios("-cpu", "Skylake-Client")
    assert westmere != skylake
    assert filter_smbios_table(published_table(westmere, bios=BIOS)) != filter_smbios_table(
        published_table(skylake, bios=BIOS)
    )
    at = next(at for at, r in structures(skylake) if r[0] == 4)
    assert set_processor_id(westmere, skylake[at + 8 : at + 16]) == skylake
    with pytest.raises(SmbiosError, match="8 bytes"):
        set_processor_id(westmere, b"\x00" * 4)


@needs_qemu
def test_handles_as_smbios_dxe_assigns_them():
    _, tables = qemu_smbios()
    recs = structures(tables)
    # give QEMU's first two structures handles 0 and 1: the OVMF type 0 then gets 2
    patched = bytearray(tables)
    for handle, (at, _) in enumerate(recs[:2]):
        struct.pack_into("<H", patched, at + 2, handle)
    table = published_table(bytes(patched), bios=BIOS)
    type0 = table[sum(len(r) for _, r in recs) : -len(END)]
    assert type0[0] == 0 and struct.unpack_from("<H", type0, 2)[0] == 2
    struct.pack_into("<H", patched, recs[1][0] + 2, 0)
    with pytest.raises(SmbiosError, match="repeated") as err:
        published_table(bytes(patched), bios=BIOS)
    assert err.value.offset == recs[1][0] + 2
    with pytest.raises(SmbiosError, match="type 127"):
        published_table(tables[: recs[-1][0]], bios=BIOS)


def test_short_pcd_strings_take_edk2s_defaults():
    record = bios_information(BiosStrings(vendor="", version="ab", release_date=""))
    assert _strings(record) == [b"unknown", b"unknown", b"02/02/2022"] and record.endswith(b"\0\0")


def _dxe_fv(firmware: bytes) -> bytes:
    """The first LZMA-compressed GUID-defined section of the file, decompressed (the DXE FV)."""
    at = firmware.find(LZMA_SECTION.bytes_le)
    assert at > 4, "no LZMA section in the firmware"
    header = at - 4
    size = int.from_bytes(firmware[header : header + 3], "little")
    data_offset = struct.unpack_from("<H", firmware, at + 16)[0]
    return lzma.decompress(firmware[header + data_offset : header + size], format=lzma.FORMAT_ALONE)


def test_debian_type0_strings_are_the_firmwares(tdvf_image: bytes):
    """The keyed strings are the UCS-2 PCDs compiled into the file's SmbiosPlatformDxe,
    beside the mOvmfDefaultType0 template (read from the decompressed DXE FV)."""
    fv = _dxe_fv(tdvf_image)
    at = fv.find(SMBIOS_PLATFORM_DXE.bytes_le)
    assert at >= 0 and fv.count(SMBIOS_PLATFORM_DXE.bytes_le) == 1
    module = fv[at : at + int.from_bytes(fv[at + 20 : at + 23], "little")]  # FFS file header: 24-bit size
    assert OVMF_TYPE0[:2] + b"\0\0" + OVMF_TYPE0[4:] in module  # the template, handle field 0
    bios = DEBIAN_2026_08.smbios_bios
    assert bios is not None
    for text in (bios.vendor, bios.version, bios.release_date):
        assert len(text) >= 3 and text.encode("utf-16-le") + b"\0\0" in module, text
