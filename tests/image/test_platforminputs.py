"""Everything RTMR0 needs from QEMU in one qtest run: the ``-m`` rules (pure), then the
real QEMU and libvirtd of this machine with domain XML from :mod:`tdxvm.launch.domain`,
and RTMR0 with the real Debian TDVF (skipped, with the reason, where it cannot be had).

Fixtures ``boot_files`` and ``conn`` (and the spec builder) are those of
``test_acpiblobs.py``: Debian's cloud kernel in a folder libvirt's QEMU user can read,
and ``qemu:///system``. Nothing boots: QEMU runs with ``-S``.
"""

from __future__ import annotations

import re
import shutil
import uuid
from pathlib import Path

import pytest

from tdxvm.image import rtmr0 as r
from tdxvm.image.acpiblobs import (
    ExtractInfo,
    LibvirtArgvError,
    acpi_blobs,
    argv_from_cmdline,
    qemu_argv_for,
    sanitize_argv,
)
from tdxvm.image.platforminputs import (
    HostCpuError,
    MemoryArgvError,
    PlatformInputs,
    memory_mib_from_argv,
    platform_inputs,
    predict_for_argv,
    rtmr0_for_inputs,
)
from tdxvm.image.smbios import published_table, structures
from tdxvm.launch.domain import domain_xml

from . import test_acpiblobs as acpi_tests

_spec = acpi_tests._spec
boot_files = acpi_tests.boot_files  # fixtures shared with the ACPI tests
conn = acpi_tests.conn

QEMU = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
BACKEND = '{"qom-type":"memory-backend-ram","id":"pc.ram","size":%d}'


def _argv(*opts: str) -> list[str]:
    return ["/usr/bin/qemu-system-x86_64", "-machine", "q35", *opts]


# -- -m (pure) -------------------------------------------------------------------------


def test_memory_from_the_forms_libvirt_writes():
    assert memory_mib_from_argv(_argv("-m", "1024")) == 1024
    assert memory_mib_from_argv(_argv("-m", "size=1048576k")) == 1024
    assert memory_mib_from_argv(_argv("-m", "4G")) == 4096
    assert memory_mib_from_argv(_argv("-m", "size=2048M")) == 2048
    with_backend = _argv("-machine", "pc-q35-7.2,memory-backend=pc.ram", "-m", "1024", "-object", BACKEND % (1 << 30))
    assert memory_mib_from_argv(with_backend) == 1024
    numa = _argv(
        "-m",
        "2048",
        "-object",
        "memory-backend-ram,id=n0,size=1G",
        "-object",
        "memory-backend-ram,id=n1,size=1024M",
        "-numa",
        "node,nodeid=0,memdev=n0",
        "-numa",
        "node,nodeid=1,memdev=n1",
    )
    assert memory_mib_from_argv(numa) == 2048


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ((), "0 -m options"),
        (("-m", "1024", "-m", "2048"), "2 -m options"),
        (("-m", "size=1024M,slots=4,maxmem=8G"), "hot-plug"),
        (("-m", "1.5G"), "whole number"),
        (("-m", "1536k"), "whole number of MiB"),
        (("-m", "0"), "positive"),
        (("-machine", "memory-backend=pc.ram", "-m", "1024", "-object", BACKEND % (2 << 30)), "-m says"),
        (("-machine", "memory-backend=pc.ram", "-m", "1024"), "not defined"),
        (("-m", "2048", "-object", "memory-backend-ram,id=n0,size=1G", "-numa", "node,memdev=n0"), "-m says"),
    ],
)
def test_memory_refusals(opts, message):
    with pytest.raises(MemoryArgvError, match=message) as err:
        memory_mib_from_argv(_argv(*opts))
    assert err.value.code == "platform-memory"


def test_host_cpu_needs_a_processor_id():
    """Refused before QEMU runs: the binary need not exist."""
    with pytest.raises(HostCpuError, match="processor_id") as err:
        platform_inputs("/nonexistent/qemu", _argv("-m", "1024", "-cpu", "host,migratable=on"), tdx=True)
    assert err.value.code == "platform-host-cpu"


# -- the real QEMU ---------------------------------------------------------------------


def _inputs(conn, xml: str, **kw) -> PlatformInputs:
    assert QEMU is not None
    return platform_inputs(QEMU, qemu_argv_for(conn, xml), tdx=False, **kw)


def _rtmr0(conn, xml: str, firmware: bytes) -> tuple[str, list]:
    assert QEMU is not None
    return predict_for_argv(firmware, QEMU, qemu_argv_for(conn, xml), tdx=False)


@needs_qemu
def test_inputs_are_deterministic_and_complete(conn, boot_files):
    xml = domain_xml(_spec(boot_files))
    info: list[ExtractInfo] = []
    first = _inputs(conn, xml, info=info)
    assert first == _inputs(conn, xml, info=info)
    assert first.memory_mib == 1024
    # ACPI: the loader and what it allocates, byte for byte what acpi_blobs reads
    assert list(first.acpi) == [r.TABLE_LOADER, *r.loader_allocations(first.acpi[r.TABLE_LOADER])]
    blobs = acpi_blobs(QEMU, sanitize_argv(qemu_argv_for(conn, xml), tdx=False))
    assert {k: blobs[k] for k in first.acpi} == first.acpi
    # fw_cfg: the fixed BootMenu item (menu off) and bootorder (-kernel, then the disk)
    assert set(first.fw_cfg) == {"BootMenu", "bootorder"}
    assert first.fw_cfg["BootMenu"] == b"\x00\x00" and first.fw_cfg["bootorder"] == blobs["bootorder"]
    assert first.fw_cfg["bootorder"].startswith(b"/rom@genroms/linuxboot_dma.bin\n")
    # SMBIOS: QEMU's structures with its own end structure; 2 sockets give 2 type 4
    assert first.smbios[-6:-4] == bytes([127, 4])
    assert [t for _, rec in structures(first.smbios) for t in rec[:1]].count(4) == 2
    print(
        f"\none platform_inputs call: {', '.join(f'{i.seconds:.3f} s' for i in info)} in QEMU (accel {info[0].accel})"
    )


@needs_qemu
def test_rtmr0_changes_with_memory_vcpus_and_devices(conn, boot_files, tdvf_image):
    base_xml = domain_xml(_spec(boot_files))
    base, events = _rtmr0(conn, base_xml, tdvf_image)
    assert (base, events) == _rtmr0(conn, base_xml, tdvf_image)
    assert base == r.predict_rtmr0(
        tdvf_image,
        memory_mib=1024,
        acpi=_inputs(conn, base_xml).acpi,
        fw_cfg=_inputs(conn, base_xml).fw_cfg,
        smbios=published_table(_inputs(conn, base_xml).smbios, bios=r.DEBIAN_2026_08.smbios_bios),
    )
    assert [e.what for e in events][2:4] == ["QEMU FW CFG BootMenu", "QEMU FW CFG bootorder"]
    nic = "<interface type='user'><model type='virtio'/></interface>"
    variants = {
        "memory": domain_xml(_spec(boot_files, memory_mib=2048)),
        "vcpus": domain_xml(_spec(boot_files, vcpus=3)),
        "disk": domain_xml(_spec(boot_files, scratch=boot_files["disk"])),
        "nic": base_xml.replace("</devices>", nic + "</devices>"),
    }
    values = {"base": base}
    for name, xml in variants.items():
        value, changed = _rtmr0(conn, xml, tdvf_image)
        values[name] = value
        differing = {e.what.split(" (")[0] for e, b in zip(changed, events, strict=True) if e.digest != b.digest}
        if name == "memory":  # TD HOB, the tables and SMBIOS type 16/17/19
            assert {"TD HOB for 2048 MiB", "ACPI DATA etc/acpi/tables", "SMBIOS table, filtered"} <= differing
        if name == "vcpus":  # MADT/DSDT and one more SMBIOS type 4 (one socket per vCPU)
            assert {"ACPI DATA etc/acpi/tables", "SMBIOS table, filtered"} <= differing
        if name == "disk":  # a second boot disk is in bootorder too
            assert {"ACPI DATA etc/acpi/tables"} <= differing
    assert len(set(values.values())) == len(values), values


@needs_qemu
def test_measured_fw_cfg_items_reach_rtmr0(conn, boot_files, tdvf_image):
    argv = qemu_argv_for(conn, domain_xml(_spec(boot_files)))
    base, _ = predict_for_argv(tdvf_image, QEMU, argv, tdx=False)
    at = argv.index("-boot") + 1
    menu = [*argv[:at], "menu=on,splash-time=3000,strict=on", *argv[at + 1 :]]
    inputs = platform_inputs(QEMU, menu, tdx=False)
    assert inputs.fw_cfg["BootMenu"] == b"\x01\x00" and inputs.fw_cfg["etc/boot-menu-wait"] == (3000).to_bytes(
        2, "little"
    )
    value, events = rtmr0_for_inputs(tdvf_image, inputs)
    assert value != base and "QEMU FW CFG etc/boot-menu-wait" in [e.what for e in events]
    mmio = [*argv, "-fw_cfg", "name=opt/ovmf/X-PciMmio64Mb,string=65536"]
    inputs = platform_inputs(QEMU, mmio, tdx=False)
    assert inputs.fw_cfg["opt/ovmf/X-PciMmio64Mb"] == b"65536"
    value, events = rtmr0_for_inputs(tdvf_image, inputs)
    assert value != base and [e.what for e in events][2:5] == [
        "QEMU FW CFG BootMenu",
        "QEMU FW CFG opt/ovmf/X-PciMmio64Mb",
        "QEMU FW CFG bootorder",
    ]


@needs_qemu
def test_tdx_argv_with_host_cpu(conn, boot_files, tdvf_path, tdvf_image):
    """The TDX backend's XML (host-passthrough CPU): refused without a processor ID; with
    one, deterministic, and the ID reaches RTMR0. libvirt 9.0 cannot convert
    <launchSecurity type='tdx'>; the TDX-aware additions are put in as in test_acpiblobs."""
    xml = domain_xml(_spec(boot_files, backend="tdx", firmware=str(tdvf_path), port_forwards=()))
    try:
        argv = qemu_argv_for(conn, xml)
    except LibvirtArgvError:
        argv = qemu_argv_for(conn, re.sub(r"\s*<launchSecurity.*</launchSecurity>", "", xml, flags=re.S))
        argv[argv.index("-machine") + 1] += ",confidential-guest-support=lsec0"
        argv += ["-object", '{"qom-type":"tdx-guest","id":"lsec0","attributes":268435456}']
    assert argv[argv.index("-cpu") + 1].split(",")[0] == "host"
    with pytest.raises(HostCpuError):
        predict_for_argv(tdvf_image, QEMU, argv, tdx=True)
    sapphire_rapids = bytes.fromhex("f806080000fbebbf")  # CPUID.1 EAX 0x000806f8, EDX 0xbfebfb00
    value, events = predict_for_argv(tdvf_image, QEMU, argv, tdx=True, processor_id=sapphire_rapids)
    assert (value, events) == predict_for_argv(tdvf_image, QEMU, argv, tdx=True, processor_id=sapphire_rapids)
    other, _ = predict_for_argv(tdvf_image, QEMU, argv, tdx=True, processor_id=bytes.fromhex("f806080000fbebbe"))
    assert other != value


@needs_qemu
def test_running_domain_argv_gives_the_same_rtmr0(conn, boot_files, tdvf_image):
    """A domain started paused by libvirtd: its real argv (/proc/PID/cmdline) gives the
    RTMR0 that libvirt's XMLToNative of the XML tdxvm wrote gives."""
    import libvirt

    name = f"tdxvm-rtmr0-{uuid.uuid4().hex[:8]}"
    xml = domain_xml(_spec(boot_files, name=name, uuid=str(uuid.uuid4()), port_forwards=()))
    expected = _rtmr0(conn, xml, tdvf_image)
    try:
        dom = conn.createXML(xml, libvirt.VIR_DOMAIN_START_PAUSED)
    except libvirt.libvirtError as exc:
        pytest.skip(f"libvirtd cannot start a paused domain here: {exc.get_error_message()}")
    try:
        pid = int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())
        live = argv_from_cmdline(Path(f"/proc/{pid}/cmdline").read_bytes())
        from_proc = predict_for_argv(tdvf_image, QEMU, live, tdx=False)
    finally:
        dom.destroy()
    assert from_proc == expected
