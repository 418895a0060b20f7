"""Predicted RTMR0 of a TD that TDVF (edk2 ``OvmfPkg/IntelTdx``) boots with QEMU's
direct kernel boot: the firmware's own events, in the order they are extended.

1. TD HOB, ``EV_EFI_HANDOFF_TABLES2`` "TdxTable" (SEC, ``TdxHelperMeasureTdHob``;
   bytes from :mod:`tdxvm.image.tdhob`).
2. CFV, ``EV_EFI_PLATFORM_FIRMWARE_BLOB2`` (SEC, ``TdxHelperMeasureCfvImage``): the
   TDVF metadata's CFV section data.
3. edk2 >= stable202505: QEMU fw_cfg items cached at start-up,
   ``EV_PLATFORM_CONFIG_FLAGS`` "QEMU FW CFG" + name, digest over the item's bytes
   (``OvmfPkg/Library/QemuFwCfgLib/QemuFwCfgCacheInit.c``, ``mCacheFwCfgList``): those
   marked for measurement, in that list's order, each only when QEMU has it.
4. ``EV_EFI_VARIABLE_DRIVER_CONFIG`` SecureBoot, PK, KEK, db, dbx, then dbt only if
   present (``TdTcg2Dxe.c``, ``MeasureAllSecureVariables``); data from the CFV variable
   store, SecureBoot 1 when PK is enrolled and SecureBootEnable is absent or 1
   (``AuthVariableLib.c``, ``AuthVariableLibInitialize``), else 0; a missing
   variable is measured with no data.
5. ``EV_SEPARATOR`` (``MeasureSecureBootPolicy``, PCR 7).
6. ``EV_PLATFORM_CONFIG_FLAGS`` "ACPI DATA": ``etc/table-loader``, then every file it
   ALLOCATEs, in command order, as read from fw_cfg before patching
   (``OvmfPkg/Library/AcpiPlatformLib/QemuFwCfgAcpi.c``).
7. ``EV_EFI_VARIABLE_AUTHORITY`` for each db entry that verified an image loaded before
   ReadyToBoot (``DxeImageVerificationLib/Measurement.c``), when secure boot is on.
8. edk2 >= stable202505: the filtered SMBIOS table, ``EV_EFI_HANDOFF_TABLES2``
   "SmbiosTable" (:mod:`tdxvm.image.smbiosfilter`), at ReadyToBoot before TdTcg2Dxe's
   handler (see ``docs/measurements.md`` on why that order).
9. ``EV_EFI_VARIABLE_BOOT`` BootOrder and each Boot#### it lists, digest over the data
   only (``MeasureAllBootVariables``). With direct kernel boot ReadyToBoot comes from
   ``TryRunningQemuKernel`` before BDS creates device boot options, so only the boot
   manager menu option exists: Boot0000, BootOrder = 0000.

What differs between firmware builds is in :data:`KNOWN_FIRMWARE`, keyed by the
firmware file's SHA-256; any other file is refused (:class:`UnknownFirmwareError`).
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tdxvm.image.measure import EV_SEPARATOR, SEPARATOR_DATA, ExpectedEvent, replay, sha384
from tdxvm.image.measureerrors import MeasureError
from tdxvm.image.smbios import BiosStrings
from tdxvm.image.smbiosfilter import filter_smbios_table
from tdxvm.image.tdhob import MIB, measured_td_hob
from tdxvm.image.tdvf import SECTION_CFV, parse_tdvf, section_bytes
from tdxvm.image.uefivars import (
    EFI_GLOBAL_VARIABLE,
    EFI_IMAGE_SECURITY_DATABASE,
    LOAD_OPTION_ACTIVE,
    LOAD_OPTION_CATEGORY_APP,
    LOAD_OPTION_HIDDEN,
    fv_file_path,
    load_option,
    parse_variable_store,
    variable_data,
)

EV_PLATFORM_CONFIG_FLAGS = 0xA
EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
EV_EFI_VARIABLE_BOOT = 0x80000002
EV_EFI_PLATFORM_FIRMWARE_BLOB2 = 0x8000000A
EV_EFI_HANDOFF_TABLES2 = 0x8000000B
EV_EFI_VARIABLE_AUTHORITY = 0x800000E0

SECURE_BOOT_VARIABLES = (
    (EFI_GLOBAL_VARIABLE, "SecureBoot"),
    (EFI_GLOBAL_VARIABLE, "PK"),
    (EFI_GLOBAL_VARIABLE, "KEK"),
    (EFI_IMAGE_SECURITY_DATABASE, "db"),
    (EFI_IMAGE_SECURITY_DATABASE, "dbx"),
)
DBT = (EFI_IMAGE_SECURITY_DATABASE, "dbt")
SECURE_BOOT_ENABLE = (uuid.UUID("f0a30bc7-af08-4556-99c4-001009c93a44"), "SecureBootEnable")
TABLE_LOADER = "etc/table-loader"
LOADER_ENTRY_SIZE = 128
LOADER_ALLOCATE = 1
LOADER_FNAME_SIZE = 56
# QemuFwCfgCacheInit.c mCacheFwCfgList entries with NeedMeasure = TRUE, in list order.
FW_CFG_MEASURED_202505 = (
    "etc/extra-pci-roots",
    "BootMenu",
    "etc/boot-menu-wait",
    "etc/reserved-memory-end",
    "opt/ovmf/X-PciMmio64Mb",
    "bootorder",
)
FW_CFG_FIXED_SIZES = {"etc/extra-pci-roots": 8, "BootMenu": 2, "etc/boot-menu-wait": 2, "etc/reserved-memory-end": 8}
DXEFV = uuid.UUID("7cb8bdc9-f8eb-4f34-aaea-3ee4af6516a1")
UI_APP = uuid.UUID("462caa21-7614-4503-836e-8ab6f4662331")
BOOT_MANAGER_MENU_APP = uuid.UUID("eec25bdc-67f2-4d95-b1d5-f81b2039d11d")
MENU_ATTRIBUTES = LOAD_OPTION_CATEGORY_APP | LOAD_OPTION_ACTIVE | LOAD_OPTION_HIDDEN


class Rtmr0Error(MeasureError):
    """Input from which RTMR0 cannot be predicted (missing fw_cfg file, bad loader script)."""

    code = "rtmr0"


class UnknownFirmwareError(Rtmr0Error):
    """A firmware file whose build is not in :data:`KNOWN_FIRMWARE`: its RTMR0 events are not known."""

    code = "firmware-unknown"


@dataclass(frozen=True)
class FirmwareBuild:
    """What a TDVF build measures into RTMR0 beyond what its file holds.

    ``fw_cfg_measured``: fw_cfg items measured at start-up, in order (empty before
    edk2-stable202505). ``measures_smbios``: SmbiosMeasurementDxe is in the DXE FV.
    ``boot_menu``: (description, FV name, file) of the boot manager menu option Boot0000.
    ``verified``: whether a real quote from this build has confirmed the sequence.
    ``smbios_bios``: the strings of the type 0 structure SmbiosPlatformDxe adds when
    QEMU gives none (:func:`tdxvm.image.smbios.published_table`).
    """

    name: str
    edk2: str
    fw_cfg_measured: tuple[str, ...]
    measures_smbios: bool
    boot_menu: tuple[str, uuid.UUID, uuid.UUID]
    verified: bool
    evidence: str
    smbios_bios: BiosStrings | None = None


DEBIAN_2026_08 = FirmwareBuild(
    name="Debian ovmf-inteltdx 2026.08+ds-2, OVMF.inteltdx.ms.fd",
    edk2="edk2-stable202608",
    fw_cfg_measured=FW_CFG_MEASURED_202505,
    measures_smbios=True,
    boot_menu=("BootManagerMenuApp", DXEFV, BOOT_MANAGER_MENU_APP),
    verified=False,
    evidence="DXE FV (7cb8bdc9) of the file holds TdTcg2Dxe, SmbiosMeasurementDxe and BootManagerMenuApp "
    "(UI section 'BootManagerMenuApp'), no UiApp; CFV holds PK, KEK, db, dbx; SmbiosPlatformDxe "
    "(4110465d) holds the UCS-2 PCD strings of smbios_bios next to mOvmfDefaultType0",
    smbios_bios=BiosStrings(vendor="Debian distribution of EDK II", version="2026.08+ds-2", release_date="09/26/2026"),
)
# The pre-stable202505 builds the real logs in tests come from (Google Cloud, dstack 0.6).
PRE_202505 = FirmwareBuild(
    name="edk2 <= stable202502 IntelTdx (e.g. dstack 0.6 'pre202505')",
    edk2="<= edk2-stable202502",
    fw_cfg_measured=(),
    measures_smbios=False,
    boot_menu=("UiApp", DXEFV, UI_APP),
    verified=True,
    evidence="dstack and Google Cloud CCEL logs",
)
KNOWN_FIRMWARE: dict[str, FirmwareBuild] = {
    "a265075b4147a096109e501e76196df1ec8a18659c26f7401492c597ec88f312": DEBIAN_2026_08,
}


def firmware_build(firmware: bytes) -> FirmwareBuild:
    """The known build of ``firmware`` (by SHA-256), or :class:`UnknownFirmwareError`."""
    digest = hashlib.sha256(firmware).hexdigest()
    try:
        return KNOWN_FIRMWARE[digest]
    except KeyError:
        raise UnknownFirmwareError(
            f"firmware with SHA-256 {digest} is not a known TDVF build, so its RTMR0 events "
            f"are not known (known: {', '.join(b.name for b in KNOWN_FIRMWARE.values())})",
            offset=0,
        ) from None


def _event(event_type: int, data: bytes, what: str) -> ExpectedEvent:
    return ExpectedEvent("rtmr0", event_type, sha384(data).hex(), what)


def td_hob_event(firmware: bytes, memory_mib: int) -> ExpectedEvent:
    meta = parse_tdvf(firmware)
    return _event(
        EV_EFI_HANDOFF_TABLES2, measured_td_hob(meta, memory_mib * MIB), f"TD HOB for {memory_mib} MiB (TdxTable)"
    )


def cfv_event(firmware: bytes) -> ExpectedEvent:
    section, data = section_bytes(firmware, SECTION_CFV)
    return _event(EV_EFI_PLATFORM_FIRMWARE_BLOB2, data, f"CFV at {section.memory_address:#x}, {len(data):#x} bytes")


def fw_cfg_events(build: FirmwareBuild, fw_cfg: Mapping[str, bytes]) -> list[ExpectedEvent]:
    """One event per measured fw_cfg item QEMU has (``fw_cfg`` maps name to contents;
    "BootMenu" is the fixed item 0x000e, always there)."""
    unknown = sorted(set(fw_cfg) - set(build.fw_cfg_measured))
    if unknown:
        raise Rtmr0Error(
            f"fw_cfg items {unknown} are not measured by {build.name} (it measures "
            f"{list(build.fw_cfg_measured) or 'none'})"
        )
    if build.fw_cfg_measured and "BootMenu" not in fw_cfg:
        raise Rtmr0Error("fw_cfg item 'BootMenu' (0x000e, u16 boot menu flag) is missing; QEMU always provides it")
    events = []
    for name in build.fw_cfg_measured:
        data = fw_cfg.get(name, b"")
        size = FW_CFG_FIXED_SIZES.get(name)
        if not data or (size is not None and len(data) != size):
            continue  # QemuFwCfgCacheInit skips absent, empty and wrongly sized items
        events.append(_event(EV_PLATFORM_CONFIG_FLAGS, data, f"QEMU FW CFG {name}"))
    return events


def secure_boot_values(firmware: bytes) -> list[tuple[uuid.UUID, str, bytes]]:
    """SecureBoot, PK, KEK, db, dbx (and dbt when present) as the firmware reads them."""
    section, cfv = section_bytes(firmware, SECTION_CFV)
    store = parse_variable_store(cfv, base=section.data_offset)
    enrolled = (EFI_GLOBAL_VARIABLE, "PK") in store
    if enrolled and SECURE_BOOT_ENABLE in store:
        enrolled = store[SECURE_BOOT_ENABLE].data[:1] == b"\x01"
    values = []
    for key in SECURE_BOOT_VARIABLES:
        if key[1] == "SecureBoot":
            values.append((*key, b"\x01" if enrolled else b"\x00"))
        else:
            values.append((*key, store[key].data if key in store else b""))
    if DBT in store:
        values.append((*DBT, store[DBT].data))
    return values


def variable_events(values: Sequence[tuple[uuid.UUID, str, bytes]]) -> list[ExpectedEvent]:
    return [
        _event(EV_EFI_VARIABLE_DRIVER_CONFIG, variable_data(g, n, d), f"{n} ({len(d)} bytes)") for g, n, d in values
    ]


def separator_event() -> ExpectedEvent:
    return ExpectedEvent("rtmr0", EV_SEPARATOR, sha384(SEPARATOR_DATA).hex(), "separator")


def loader_allocations(loader: bytes) -> list[str]:
    """The files ``etc/table-loader`` ALLOCATEs, in command order."""
    if len(loader) % LOADER_ENTRY_SIZE:
        raise Rtmr0Error(
            f"{TABLE_LOADER}: size {len(loader)} is not a multiple of {LOADER_ENTRY_SIZE}",
            offset=len(loader) - len(loader) % LOADER_ENTRY_SIZE,
        )
    files = []
    for at in range(0, len(loader), LOADER_ENTRY_SIZE):
        (command,) = struct.unpack_from("<I", loader, at)
        if command != LOADER_ALLOCATE:
            continue
        raw = loader[at + 4 : at + 4 + LOADER_FNAME_SIZE]
        if b"\x00" not in raw:
            raise Rtmr0Error(f"{TABLE_LOADER}: ALLOCATE file name not NUL-terminated", offset=at + 4)
        name = raw.split(b"\x00", 1)[0].decode("ascii", "replace")
        if name in files:
            raise Rtmr0Error(f"{TABLE_LOADER}: file {name!r} allocated twice (the firmware refuses)", offset=at + 4)
        files.append(name)
    return files


def acpi_events(acpi: Mapping[str, bytes]) -> list[ExpectedEvent]:
    """The loader script, then every blob it allocates, hashed as QEMU serves them."""
    if TABLE_LOADER not in acpi:
        raise Rtmr0Error(f"ACPI fw_cfg file {TABLE_LOADER!r} is missing (given: {sorted(acpi)})")
    files = loader_allocations(acpi[TABLE_LOADER])
    missing = [f for f in files if f not in acpi]
    if missing:
        raise Rtmr0Error(f"{TABLE_LOADER} allocates {missing}, not among the given fw_cfg files {sorted(acpi)}")
    return [_event(EV_PLATFORM_CONFIG_FLAGS, acpi[name], f"ACPI DATA {name}") for name in (TABLE_LOADER, *files)]


def authority_events(authorities: Sequence[bytes]) -> list[ExpectedEvent]:
    """``EV_EFI_VARIABLE_AUTHORITY``: each db ``EFI_SIGNATURE_DATA`` (owner GUID ‖
    certificate) that verified an image, once each, in first-use order."""
    seen: list[bytes] = []
    for a in authorities:
        if a not in seen:
            seen.append(a)
    return [
        _event(
            EV_EFI_VARIABLE_AUTHORITY,
            variable_data(EFI_IMAGE_SECURITY_DATABASE, "db", a),
            f"db entry ({len(a)} bytes) that verified an image",
        )
        for a in seen
    ]


def smbios_event(table: bytes) -> ExpectedEvent:
    return _event(EV_EFI_HANDOFF_TABLES2, filter_smbios_table(table), "SMBIOS table, filtered (SmbiosTable)")


def boot_events(build: FirmwareBuild) -> list[ExpectedEvent]:
    """BootOrder = 0000 and Boot0000 = the boot manager menu."""
    description, fv, app = build.boot_menu
    boot0000 = load_option(MENU_ATTRIBUTES, description, fv_file_path(fv, app))
    return [
        _event(EV_EFI_VARIABLE_BOOT, struct.pack("<H", 0), "BootOrder 0000"),
        _event(EV_EFI_VARIABLE_BOOT, boot0000, f"Boot0000 {description}"),
    ]


def rtmr0_events(
    firmware: bytes,
    *,
    memory_mib: int,
    acpi: Mapping[str, bytes],
    fw_cfg: Mapping[str, bytes],
    smbios: bytes | None,
    authorities: Sequence[bytes] = (),
) -> list[ExpectedEvent]:
    """RTMR0 events of a direct kernel boot of ``firmware`` (a known build) on a q35 TD
    with ``memory_mib`` MiB of RAM.

    ``acpi``: QEMU's ``etc/table-loader`` and the files it allocates (raw fw_cfg
    contents). ``fw_cfg``: the measured start-up items QEMU has ("BootMenu" always, see
    :data:`FW_CFG_MEASURED_202505`). ``smbios``: the SMBIOS structure table the firmware
    publishes (required when the build measures it). ``authorities``: db entries that
    verified loaded images (secure boot).
    """
    build = firmware_build(firmware)
    if build.measures_smbios and smbios is None:
        raise Rtmr0Error(f"{build.name} measures the SMBIOS table: pass the table (smbios=...)")
    events = [
        td_hob_event(firmware, memory_mib),
        cfv_event(firmware),
        *fw_cfg_events(build, fw_cfg),
        *variable_events(secure_boot_values(firmware)),
        separator_event(),
        *acpi_events(acpi),
        *authority_events(authorities),
    ]
    if build.measures_smbios and smbios is not None:
        events.append(smbios_event(smbios))
    return events + boot_events(build)


def predict_rtmr0(
    firmware: bytes,
    *,
    memory_mib: int,
    acpi: Mapping[str, bytes],
    fw_cfg: Mapping[str, bytes],
    smbios: bytes | None,
    authorities: Sequence[bytes] = (),
) -> str:
    """RTMR0 (hex) from replaying :func:`rtmr0_events`."""
    events = rtmr0_events(
        firmware, memory_mib=memory_mib, acpi=acpi, fw_cfg=fw_cfg, smbios=smbios, authorities=authorities
    )
    return replay(bytes.fromhex(e.digest) for e in events).hex()
