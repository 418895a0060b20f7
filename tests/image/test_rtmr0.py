"""RTMR0 prediction against the real event logs in ../shared/testdata/tdx and the
real Debian TDVF.

The dstack log (QEMU 8.2.2, 2 GiB, edk2 "pre202505") and the Google Cloud CCEL log
carry real RTMR0 events: the TD HOB digest, UEFI_VARIABLE_DATA, separators and boot
variables computed here must equal theirs, and for dstack replaying our events (with
only the CFV and ACPI digests, whose inputs are not published, taken from the log)
must give the quote's RTMR0.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import uuid
from pathlib import Path

import pytest

from tdxvm.attest.eventlog import parse_json_event_log, parse_tcg_event_log
from tdxvm.attest.quote import parse_quote
from tdxvm.image import rtmr0 as r
from tdxvm.image.measure import replay
from tdxvm.image.smbiosfilter import filter_smbios_table
from tdxvm.image.tdhob import measured_td_hob, q35_ram_map, ram_entries
from tdxvm.image.tdvf import SECTION_TD_HOB, SECTION_TEMP_MEM, parse_tdvf
from tdxvm.image.uefivars import EFI_GLOBAL_VARIABLE, EFI_IMAGE_SECURITY_DATABASE, variable_data
from tests.conftest import TESTDATA

GIB = 1 << 30


def _testdata(*parts: str) -> Path:
    path = TESTDATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real test vector {path} is not present")
    return path


@pytest.fixture(scope="module")
def dstack() -> dict:
    return json.loads(_testdata("dstack-eventlog", "getquote.json").read_text())


@pytest.fixture(scope="module")
def dstack_rtmr0(dstack: dict) -> list:
    return [e for e in parse_json_event_log(dstack) if e.mr_index == 0]


@pytest.fixture(scope="module")
def ccel_rtmr0() -> list:
    events = parse_tcg_event_log(_testdata("go-tdx-guest-ccel", "ccel_data.bin").read_bytes())
    return [e for e in events if e.mr_index == 0]


def _witness_ranges(witness: bytes) -> tuple[int, list[tuple[int, int]]]:
    """Decode dstack-mr's TdHobWitnessV1 (LEB128 pages: base, TD_HOB delta, count, ranges)."""
    values, acc, shift = [], 0, 0
    for b in witness:
        acc |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            values.append(acc)
            acc, shift = 0, 0
    base, hob, count = values[:3]
    pairs = values[3:]
    ranges = [((base + pairs[2 * i]) * 0x1000, pairs[2 * i + 1] * 0x1000) for i in range(count)]
    return (base + hob) * 0x1000, ranges


def test_dstack_td_hob_layout_is_the_debian_firmware_layout(dstack: dict, tdvf_image: bytes) -> None:
    """dstack records its firmware's TD_HOB/TempMem ranges; the Debian TDVF has the same."""
    measurement = base64.b64decode(json.loads(dstack["vm_config"])["tdx_measurement"]["measurement"])
    at = measurement.index(b"td_hob") + len(b"td_hob")
    assert measurement[at] & 0xE0 == 0x40  # CBOR byte string, short length
    witness = measurement[at + 1 : at + 1 + (measurement[at] & 0x1F)]
    hob_at, ranges = _witness_ranges(witness)
    meta = parse_tdvf(tdvf_image)
    ours = sorted(
        (s.memory_address, s.memory_data_size) for s in meta.sections if s.type in (SECTION_TD_HOB, SECTION_TEMP_MEM)
    )
    assert ours == sorted(ranges)
    assert [s.memory_address for s in meta.sections if s.type == SECTION_TD_HOB] == [hob_at]


def test_td_hob_digest_equals_the_dstack_quote_log(dstack: dict, dstack_rtmr0: list, tdvf_image: bytes) -> None:
    memory = json.loads(dstack["vm_config"])["memory_size"]
    assert memory == 2 * GIB
    digest = hashlib.sha384(measured_td_hob(parse_tdvf(tdvf_image), memory)).digest()
    assert dstack_rtmr0[0].event_type == r.EV_EFI_HANDOFF_TABLES2
    assert digest == dstack_rtmr0[0].sha384
    other = hashlib.sha384(measured_td_hob(parse_tdvf(tdvf_image), memory + GIB)).digest()
    assert other != dstack_rtmr0[0].sha384


def test_dstack_rtmr0_replays_from_our_events(dstack: dict, dstack_rtmr0: list, tdvf_image: bytes) -> None:
    """Our HOB, empty secure-boot variables, separator and boot variables, with the log's
    CFV and ACPI digests (inputs not published), replay to the quote's RTMR0."""
    log = [e.sha384 for e in dstack_rtmr0]
    ours = [
        r.td_hob_event(tdvf_image, 2048),
        None,
        *r.variable_events([(g, n, b"") for g, n in r.SECURE_BOOT_VARIABLES]),
        r.separator_event(),
        None,
        None,
        None,
        *r.boot_events(r.PRE_202505),
    ]
    assert len(ours) == len(log)
    digests = [log[i] if e is None else bytes.fromhex(e.digest) for i, e in enumerate(ours)]
    for i, (mine, theirs) in enumerate(zip(digests, log, strict=True)):
        assert mine == theirs, f"event {i}"
    assert [e.event_type for e in ours if e] == [e.event_type for e, o in zip(dstack_rtmr0, ours, strict=True) if o]
    quote = parse_quote(bytes.fromhex(dstack["quote"]))
    assert replay(digests) == quote.body.rtmrs[0]


def test_variable_events_rebuild_the_google_log(ccel_rtmr0: list) -> None:
    """UEFI_VARIABLE_DATA rebuilt from (GUID, name, data) equals the logged event data,
    and its SHA-384 the logged digest, for the five secure-boot variables."""
    driver_config = [e for e in ccel_rtmr0 if e.event_type == r.EV_EFI_VARIABLE_DRIVER_CONFIG]
    names = []
    for e in driver_config:
        guid = uuid.UUID(bytes_le=e.data[:16])
        n_chars, n_data = struct.unpack_from("<QQ", e.data, 16)
        name = e.data[32 : 32 + 2 * n_chars].decode("utf-16-le")
        data = e.data[32 + 2 * n_chars :]
        assert len(data) == n_data
        rebuilt = variable_data(guid, name, data)
        assert rebuilt == e.data
        assert hashlib.sha384(rebuilt).digest() == e.sha384
        names.append((guid, name))
    assert names == list(r.SECURE_BOOT_VARIABLES)


def test_google_event_types_and_boot0000(ccel_rtmr0: list) -> None:
    """Firmware part of the Google log: HOB, CFV, five variables, separator, three ACPI
    blobs, boot variables; Boot0000 is the UiApp option we build for pre-202505 builds."""
    types = [e.event_type for e in ccel_rtmr0][:12]
    assert types == [
        r.EV_EFI_HANDOFF_TABLES2,
        r.EV_EFI_PLATFORM_FIRMWARE_BLOB2,
        *[r.EV_EFI_VARIABLE_DRIVER_CONFIG] * 5,
        r.EV_SEPARATOR,
        *[r.EV_PLATFORM_CONFIG_FLAGS] * 3,
        r.EV_EFI_VARIABLE_BOOT,
    ]
    assert ccel_rtmr0[1].data[1:].startswith(b"Fv(")
    assert ccel_rtmr0[7].sha384.hex() == r.separator_event().digest
    assert all(e.data == b"ACPI DATA" for e in ccel_rtmr0[8:11])
    boot0000 = [e for e in ccel_rtmr0 if e.event_type == r.EV_EFI_VARIABLE_BOOT][2]
    assert r.boot_events(r.PRE_202505)[1].digest == boot0000.sha384.hex()
    assert b"U\x00i\x00A\x00p\x00p\x00" in boot0000.data


# --- the real Debian TDVF -------------------------------------------------------------


def _loader(*files: str) -> bytes:
    out = b""
    for name in files:
        out += struct.pack("<I56sIB", r.LOADER_ALLOCATE, name.encode(), 64, 2).ljust(r.LOADER_ENTRY_SIZE, b"\0")
    out += struct.pack("<I", 3).ljust(r.LOADER_ENTRY_SIZE, b"\0")  # an ADD_CHECKSUM command, not an allocation
    return out


ACPI = {
    "etc/table-loader": _loader("etc/acpi/rsdp", "etc/acpi/tables"),
    "etc/acpi/rsdp": b"RSD PTR " + bytes(28),
    "etc/acpi/tables": b"FACS" + bytes(60),
}
SMBIOS = (
    bytes([1, 27, 0x00, 0x01, 1, 2, 3, 4])
    + bytes(range(16))
    + bytes([6, 5, 6])
    + b"QEMU\0pc\0v1\0SERIAL\0\0"
    + bytes([127, 4, 0xFF, 0xFE])
    + b"\0\0"
)
FW_CFG = {"BootMenu": b"\0\0"}


def test_debian_firmware_event_sequence(tdvf_image: bytes) -> None:
    events = r.rtmr0_events(tdvf_image, memory_mib=4096, acpi=ACPI, fw_cfg=FW_CFG, smbios=SMBIOS)
    assert [e.event_type for e in events] == [
        r.EV_EFI_HANDOFF_TABLES2,
        r.EV_EFI_PLATFORM_FIRMWARE_BLOB2,
        r.EV_PLATFORM_CONFIG_FLAGS,
        *[r.EV_EFI_VARIABLE_DRIVER_CONFIG] * 5,
        r.EV_SEPARATOR,
        *[r.EV_PLATFORM_CONFIG_FLAGS] * 3,
        r.EV_EFI_HANDOFF_TABLES2,
        r.EV_EFI_VARIABLE_BOOT,
        r.EV_EFI_VARIABLE_BOOT,
    ]
    # ACPI in the loader's ALLOCATE order, each over the raw blob
    assert [e.digest for e in events[9:12]] == [
        hashlib.sha384(ACPI[k]).hexdigest() for k in ("etc/table-loader", "etc/acpi/rsdp", "etc/acpi/tables")
    ]
    # the .ms build enrolls keys: SecureBoot = 1 and PK/KEK/db/dbx carry the CFV's data
    assert events[3].digest == hashlib.sha384(variable_data(EFI_GLOBAL_VARIABLE, "SecureBoot", b"\x01")).hexdigest()
    assert events[6].digest != hashlib.sha384(variable_data(EFI_IMAGE_SECURITY_DATABASE, "db", b"")).hexdigest()
    assert "BootManagerMenuApp" in events[-1].what
    value = r.predict_rtmr0(tdvf_image, memory_mib=4096, acpi=ACPI, fw_cfg=FW_CFG, smbios=SMBIOS)
    assert value == replay(bytes.fromhex(e.digest) for e in events).hex()


def test_debian_rtmr0_depends_on_every_input(tdvf_image: bytes) -> None:
    base = r.predict_rtmr0(tdvf_image, memory_mib=4096, acpi=ACPI, fw_cfg=FW_CFG, smbios=SMBIOS)
    kw = {"memory_mib": 4096, "acpi": ACPI, "fw_cfg": FW_CFG, "smbios": SMBIOS}
    changes = [
        {"memory_mib": 8192},
        {"acpi": {**ACPI, "etc/acpi/tables": b"FACS" + bytes(61)}},
        {"fw_cfg": {**FW_CFG, "bootorder": b"/pci@i0cf8/scsi@3/disk@0,0\n\0"}},
        {"smbios": SMBIOS.replace(b"QEMU", b"QEMX")},
        {"authorities": [b"\x11" * 16 + b"cert"]},
    ]
    for change in changes:
        assert r.predict_rtmr0(tdvf_image, **{**kw, **change}) != base, change
    # the SMBIOS serial number and UUID are filtered out, so changing them changes nothing
    same = SMBIOS.replace(b"SERIAL", b"OTHERS").replace(bytes(range(16)), bytes(16))
    assert r.predict_rtmr0(tdvf_image, **{**kw, "smbios": same}) == base


def test_unknown_firmware_is_refused(tdvf_image: bytes) -> None:
    patched = bytearray(tdvf_image)
    patched[0x100000] ^= 1
    with pytest.raises(r.UnknownFirmwareError, match="not a known TDVF build") as err:
        r.rtmr0_events(bytes(patched), memory_mib=2048, acpi=ACPI, fw_cfg=FW_CFG, smbios=SMBIOS)
    assert err.value.code == "firmware-unknown"


def test_missing_inputs_are_refused(tdvf_image: bytes) -> None:
    kw = {"memory_mib": 2048, "acpi": ACPI, "fw_cfg": FW_CFG, "smbios": SMBIOS}
    with pytest.raises(r.Rtmr0Error, match="etc/acpi/tables"):
        r.rtmr0_events(tdvf_image, **{**kw, "acpi": {k: v for k, v in ACPI.items() if k != "etc/acpi/tables"}})
    with pytest.raises(r.Rtmr0Error, match="BootMenu"):
        r.rtmr0_events(tdvf_image, **{**kw, "fw_cfg": {}})
    with pytest.raises(r.Rtmr0Error, match="SMBIOS"):
        r.rtmr0_events(tdvf_image, **{**kw, "smbios": None})
    with pytest.raises(r.Rtmr0Error, match="byte offset|multiple of 128"):
        r.rtmr0_events(tdvf_image, **{**kw, "acpi": {**ACPI, "etc/table-loader": ACPI["etc/table-loader"][:-1]}})


def test_q35_split_and_accepted_ranges(tdvf_image: bytes) -> None:
    assert q35_ram_map(2 * GIB) == [(0, 2 * GIB)]
    assert q35_ram_map(0xB0000000 - 0x1000) == [(0, 0xB0000000 - 0x1000)]
    assert q35_ram_map(0xB0000000) == [(0, 0x80000000), (4 * GIB, 0x30000000)]
    entries = ram_entries(parse_tdvf(tdvf_image), 8 * GIB)
    assert [(e.start, e.accepted) for e in entries][:3] == [(0, False), (0x800000, True), (0x806000, False)]
    assert entries[-1].start == 4 * GIB and sum(e.length for e in entries) == 8 * GIB


def test_smbios_filter_blanks_serial_and_uuid() -> None:
    out = filter_smbios_table(SMBIOS)
    assert out[8:24] == bytes(16) and out[7] == 0 and b"      \0" in out and b"SERIAL" not in out
    assert out.endswith(bytes([127, 4, 0xFF, 0xFE, 0, 0]))
    with pytest.raises(r.MeasureError, match="type 127"):
        filter_smbios_table(SMBIOS[:-6])
