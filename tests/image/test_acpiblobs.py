"""QEMU's ACPI fw_cfg files over qtest: the argv sanitizer rule by rule (pure), then the
real QEMU and libvirtd of this machine with domain XML from :mod:`tdxvm.launch.domain`.

The real-QEMU tests need ``qemu-system-x86_64`` and the libvirt ones a libvirtd at
``qemu:///system`` (skipped, with the reason, where missing). The kernel is Debian
unstable's cloud kernel (the ``debian_kernel`` fixture): QEMU parses ``-kernel`` at
start, and ``-kernel`` puts the linuxboot option ROM into ``bootorder``. Nothing boots:
QEMU runs with ``-S``.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import tempfile
import uuid
from pathlib import Path

import pytest

from tdxvm.image.acpiblobs import (
    ACPI_FILES,
    AcpiBlobError,
    ArgvRefusedError,
    ExtractError,
    ExtractInfo,
    LibvirtArgvError,
    acpi_blobs,
    argv_from_cmdline,
    argv_from_command_line,
    qemu_argv_for,
    sanitize_argv,
)
from tdxvm.image.qtest import QemuStartError, QtestSession, fwcfg_directory
from tdxvm.launch.domain import DomainSpec, PortForward, domain_xml

QEMU = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")

# A libvirt 9.0 command line (shape of virConnectDomainXMLToNative's output for the
# emulated backend, plus what a running domain has: a qcow2 chain, fd passing).
LIBVIRT_LINE = (
    "LC_ALL=C PATH=/usr/bin HOME=/var/lib/libvirt/qemu/domain--1-t1 /usr/bin/qemu-system-x86_64 "
    "-name guest=t1,debug-threads=on -S "
    """-object '{"qom-type":"secret","id":"masterKey0","format":"raw","file":"/var/lib/libvirt/qemu/m.aes"}' """
    "-machine pc-q35-7.2,usb=off,smm=off,dump-guest-core=off,memory-backend=pc.ram -accel tcg "
    "-cpu Westmere,cx16=off -m 1024 "
    """-object '{"qom-type":"memory-backend-file","id":"pc.ram","mem-path":"/var/lib/libvirt/ram","share":false,"size":1073741824}' """  # noqa: E501 (libvirt's argv, verbatim)
    "-overcommit mem-lock=off -smp 2,sockets=2,cores=1,threads=1 -uuid 8b1c6a52-7a0e-4c1b-9d8e-2f3a4b5c6d7e "
    "-display none -no-user-config -nodefaults "
    "-chardev socket,id=charmonitor,fd=29,server=on,wait=off -mon chardev=charmonitor,id=monitor,mode=control "
    "-rtc base=utc -no-shutdown -boot strict=on -kernel /host/vmlinuz -initrd /host/initrd -append 'console=ttyS0 quiet' "  # noqa: E501 (libvirt's argv, verbatim)
    """-blockdev '{"driver":"file","filename":"/pool/base.img","node-name":"libvirt-2-storage"}' """
    """-blockdev '{"node-name":"libvirt-2-format","read-only":true,"driver":"raw","file":"libvirt-2-storage"}' """
    """-blockdev '{"driver":"file","filename":"/pool/vm.qcow2","node-name":"libvirt-1-storage"}' """
    """-blockdev '{"node-name":"libvirt-1-format","read-only":false,"driver":"qcow2","file":"libvirt-1-storage","backing":"libvirt-2-format"}' """  # noqa: E501 (libvirt's argv, verbatim)
    """-device '{"driver":"virtio-blk-pci","bus":"pcie.0","addr":"0x3","drive":"libvirt-1-format","id":"virtio-disk0","bootindex":1}' """  # noqa: E501 (libvirt's argv, verbatim)
    "-add-fd set=0,fd=30,opaque=serial0-source -chardev file,id=charserial0,path=/dev/fdset/0,append=on "
    """-device '{"driver":"isa-serial","chardev":"charserial0","id":"serial0","index":0}' """
    """-audiodev '{"id":"audio1","driver":"none"}' """
    "-netdev user,id=tdxvm0,hostfwd=tcp:127.0.0.1:2222-:22 -device virtio-net-pci,netdev=tdxvm0,bus=pcie.0,addr=0x10 "
    "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny -msg timestamp=on"
)


def _opt_values(argv: list[str], opt: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == opt]


# -- the sanitizer (pure) ------------------------------------------------------------


def test_command_line_split_drops_environment():
    argv = argv_from_command_line(LIBVIRT_LINE)
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    assert "console=ttyS0 quiet" in argv
    with pytest.raises(LibvirtArgvError):
        argv_from_command_line("A=b -S")


def test_sanitize_keeps_the_machine_and_nulls_the_host():
    out = sanitize_argv(argv_from_command_line(LIBVIRT_LINE), tdx=False, path_map={"/host/vmlinuz": "/local/k"})
    assert out[-1] == "-S" and out.count("-S") == 1
    assert _opt_values(out, "-machine") == ["pc-q35-7.2,usb=off,smm=off,memory-backend=pc.ram"]
    assert _opt_values(out, "-smp") == ["2,sockets=2,cores=1,threads=1"]
    assert _opt_values(out, "-kernel") == ["/local/k"] and _opt_values(out, "-initrd") == ["/host/initrd"]
    # every -device is kept as given, in order
    assert _opt_values(out, "-device") == _opt_values(argv_from_command_line(LIBVIRT_LINE), "-device")
    # the qcow2-over-raw chain is one null node under the name the device uses
    assert [json.loads(b) for b in _opt_values(out, "-blockdev")] == [
        {"driver": "null-co", "node-name": "libvirt-1-format", "read-only": False}
    ]
    assert _opt_values(out, "-netdev") == ["hubport,id=tdxvm0,hubid=0"]  # no hostfwd listener on the controller
    assert _opt_values(out, "-chardev") == ["null,id=charserial0"]  # monitor chardev gone with -mon
    assert [json.loads(o) for o in _opt_values(out, "-object")] == [
        {"qom-type": "memory-backend-ram", "id": "pc.ram", "size": 1073741824}
    ]
    for gone in ("-accel", "-mon", "-add-fd", "-sandbox", "-msg", "-overcommit", "-name", "-display", "-no-shutdown"):
        assert gone not in out, gone
    assert not any("/var/lib/libvirt" in a or "/pool/" in a or "fd=" in a for a in out)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["-drive", "file=/x.img,if=virtio"], "-drive"),
        (["-object", "sev-guest,id=s0"], "sev-guest"),
        (["-fw_cfg", "name=opt/x,file=/etc/passwd"], "string="),
        (["-unknown-option"], "-unknown-option"),
        (["-object", '{"qom-type":"tdx-guest","id":"lsec0"}'], "not TDX"),
        (["-machine", "q35,confidential-guest-support=lsec0"], "not TDX"),
    ],
)
def test_sanitize_refuses_what_it_has_no_rule_for(extra, needle):
    with pytest.raises(ArgvRefusedError, match=re.escape(needle)):
        sanitize_argv([*argv_from_command_line(LIBVIRT_LINE), *extra], tdx=False)


def _tdx_argv(
    machine: str = "pc-q35-10.1,usb=off,smm=off,kernel_irqchip=split,confidential-guest-support=lsec0",
) -> list[str]:
    """The shape of a TDX-aware libvirt's argv (tdx-guest object,
    confidential-guest-support on -machine, KVM, -cpu host), for the rules only."""
    return [
        "qemu-system-x86_64",
        "-machine",
        machine,
        "-accel",
        "kvm",
        "-cpu",
        "host,migratable=on",
        "-object",
        '{"qom-type":"tdx-guest","id":"lsec0","attributes":268435456}',
        "-m",
        "1024",
        "-bios",
        "/fw.fd",
    ]


def test_sanitize_tdx_forces_what_qemu_forces_for_a_td():
    out = sanitize_argv(_tdx_argv(), tdx=True)
    assert _opt_values(out, "-machine") == ["pc-q35-10.1,usb=off,smm=off,pic=off"]
    assert _opt_values(out, "-cpu") == ["max,migratable=on"]
    assert "-object" not in out and "-accel" not in out


@pytest.mark.parametrize(
    ("machine", "needle"),
    [("q35,smm=on", "smm=on"), ("q35,pic=on", "pic=on"), ("q35,kernel_irqchip=on", "kernel_irqchip=split")],
)
def test_sanitize_tdx_refuses_what_qemu_refuses(machine, needle):
    with pytest.raises(ArgvRefusedError, match=re.escape(needle)):
        sanitize_argv(_tdx_argv(machine), tdx=True)


NEWER_LIBVIRT = json.loads((Path(__file__).parent / "data" / "libvirt-argv.json").read_text())  # see data/README.md


@pytest.mark.parametrize(("made_by", "tdx"), [("libvirt-11.3.0-emulated", False), ("libvirt-12.9.0-tdx", True)])
def test_sanitize_takes_what_newer_libvirt_writes(made_by, tdx):
    """Newer libvirt releases write a watchdog action (11.3, Debian 13's) and the QMP
    monitor as an -object (12.9): host-side options, dropped with the monitor's chardev;
    the machine's devices are kept as they are."""
    argv = NEWER_LIBVIRT[made_by]
    assert "-watchdog-action" in argv and ("-mon" in argv) != any("monitor-qmp" in a for a in argv)
    out = sanitize_argv(argv, tdx=tdx)
    assert "-watchdog-action" not in out and "-mon" not in out and "-sandbox" not in out
    assert not any("monitor" in a for a in out)  # the monitor and its chardev
    assert _opt_values(out, "-chardev") == ["null,id=charserial0"]
    assert _opt_values(out, "-device") == _opt_values(argv, "-device")
    assert _opt_values(out, "-smp") == ["2,sockets=2,cores=1,threads=1"] and out[-1] == "-S"
    if tdx:
        assert _opt_values(out, "-machine") == ["pc-q35-11.1,usb=off,memory-backend=pc.ram,acpi=on,smm=off,pic=off"]
        assert not any("tdx-guest" in a or "confidential-guest-support" in a for a in out)


def test_a_tdx_argv_is_the_machine_of_the_xml_without_launch_security():
    """libvirt 12.9's argv for tdxvm's TDX XML and for the same XML without
    <launchSecurity> sanitize (as a TD) to the same machine: a controller whose libvirt
    cannot convert TDX XML (no TDX hardware) converts the XML without it."""
    with_tdx = sanitize_argv(NEWER_LIBVIRT["libvirt-12.9.0-tdx"], tdx=True)
    assert with_tdx == sanitize_argv(NEWER_LIBVIRT["libvirt-12.9.0-tdx-without-launchSecurity"], tdx=True)


# -- real QEMU -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def boot_files(debian_kernel):
    """Kernel, initrd and disk that libvirt's QEMU user can read (pytest's own temporary
    folders are private to root), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="tdxvm-acpi-", dir="/var/tmp"))
    folder.chmod(0o755)
    kernel, initrd, disk = folder / "vmlinuz", folder / "initrd.img", folder / "disk.img"
    shutil.copyfile(debian_kernel, kernel)
    initrd.write_bytes(b"\x00" * 4096)
    disk.write_bytes(b"\x00" * (1 << 20))
    for p in (kernel, initrd, disk):
        p.chmod(0o644)
    yield {"kernel": str(kernel), "initrd": str(initrd), "disk": str(disk)}
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def conn():
    libvirt = pytest.importorskip("libvirt")
    import tdxvm.launch.connection  # noqa: F401  (quiet libvirt's error printing)

    try:
        c = libvirt.open("qemu:///system")
    except libvirt.libvirtError as exc:
        pytest.skip(f"no libvirtd at qemu:///system: {exc.get_error_message()}")
    yield c
    c.close()


def _spec(files: dict[str, str], **kw) -> DomainSpec:
    base = dict(
        name="tdxvm-acpi-test",
        uuid="8b1c6a52-7a0e-4c1b-9d8e-2f3a4b5c6d7e",
        backend="emulated",
        vcpus=2,
        memory_mib=1024,
        kernel=files["kernel"],
        initrd=files["initrd"],
        cmdline="console=ttyS0",
        disk=files["disk"],
        port_forwards=(PortForward(host_port=2222, guest_port=22),),
    )
    base.update(kw)
    return DomainSpec(**base)


def _blobs(conn, xml: str, *, tdx: bool = False, info: list | None = None, **kw) -> dict[str, bytes]:
    assert QEMU is not None
    return acpi_blobs(QEMU, sanitize_argv(qemu_argv_for(conn, xml), tdx=tdx), info=info, **kw)


def _tables(tables: bytes) -> list[bytes]:
    """Signatures of the ACPI tables laid end to end in etc/acpi/tables (FACS has no checksum but a length)."""
    sigs, at = [], 0
    while at + 8 <= len(tables) and tables[at : at + 4].isalnum():
        length = struct.unpack_from("<I", tables, at + 4)[0]
        if length < 36 and tables[at : at + 4] != b"FACS":
            break
        sigs.append(tables[at : at + 4])
        at += length
    return sigs


@needs_qemu
def test_blobs_are_deterministic_and_well_formed(conn, boot_files):
    xml = domain_xml(_spec(boot_files))
    info: list[ExtractInfo] = []
    first = _blobs(conn, xml, info=info)
    second = _blobs(conn, xml, info=info)
    assert first == second
    assert set(ACPI_FILES) <= set(first)
    assert first["etc/acpi/rsdp"][:8] == b"RSD PTR "
    loader = first["etc/table-loader"]
    assert len(loader) % 128 == 0
    commands = [struct.unpack_from("<I", loader, at)[0] for at in range(0, len(loader), 128)]
    used = [c for c in commands if c]
    assert used[:2] == [1, 1] and set(used) <= {1, 2, 3}  # ALLOCATE rsdp/tables, then ADD_POINTER / ADD_CHECKSUM
    assert loader[4 : 4 + 13] == b"etc/acpi/rsdp"
    sigs = _tables(first["etc/acpi/tables"])
    assert {b"FACP", b"DSDT", b"APIC", b"MCFG"} <= set(sigs), sigs
    assert first["bootorder"].startswith(b"/rom@genroms/linuxboot_dma.bin\n")  # -kernel, boot index 0
    print(
        f"\none extraction: {', '.join(f'{i.seconds:.3f} s' for i in info)} (accel {info[0].accel}, DMA {info[0].dma})"
    )


@needs_qemu
def test_an_argv_of_libvirt_11_runs_under_qtest(boot_files):
    """libvirt 11.3's argv (made with this machine's QEMU 7.2, data/README.md) runs here,
    its kernel and initrd mapped to this machine's copies."""
    argv = NEWER_LIBVIRT["libvirt-11.3.0-emulated"]
    files = {
        _opt_values(argv, "-kernel")[0]: boot_files["kernel"],
        _opt_values(argv, "-initrd")[0]: boot_files["initrd"],
    }
    assert QEMU is not None
    blobs = acpi_blobs(QEMU, sanitize_argv(argv, tdx=False, path_map=files))
    assert set(ACPI_FILES) <= set(blobs) and blobs["etc/acpi/rsdp"][:8] == b"RSD PTR "
    assert b"FACP" in _tables(blobs["etc/acpi/tables"])


@needs_qemu
def test_blobs_change_with_vcpus_and_memory(conn, boot_files):
    base = _blobs(conn, domain_xml(_spec(boot_files)))
    more_cpus = _blobs(conn, domain_xml(_spec(boot_files, vcpus=3)))
    assert more_cpus["etc/acpi/tables"] != base["etc/acpi/tables"]  # MADT and the DSDT's CPU objects
    bigger = _blobs(conn, domain_xml(_spec(boot_files, memory_mib=2048)))
    assert bigger["etc/acpi/tables"] != base["etc/acpi/tables"]
    # above the 2 GiB low-memory split the 64-bit PCI hole moves too
    big = _blobs(conn, domain_xml(_spec(boot_files, memory_mib=4096)))
    assert big["etc/acpi/tables"] != base["etc/acpi/tables"]


@needs_qemu
def test_an_added_device_changes_the_blobs(conn, boot_files):
    """The attack the controller must see: the host adds a disk or a NIC to the domain."""
    base_xml = domain_xml(_spec(boot_files))
    base = _blobs(conn, base_xml)
    scratch = _blobs(conn, domain_xml(_spec(boot_files, scratch=boot_files["disk"])))
    assert scratch["etc/acpi/tables"] != base["etc/acpi/tables"]
    nic = "<interface type='user'><model type='virtio'/></interface>"
    with_nic = _blobs(conn, base_xml.replace("</devices>", nic + "</devices>"))
    assert with_nic["etc/acpi/tables"] != base["etc/acpi/tables"]


@needs_qemu
def test_chipset_programming_reaches_the_tables(conn, boot_files):
    """The tables are rebuilt when the firmware first selects them, from the chipset
    registers it programmed: PCIEXBAR (MCFG) and the PM base (FADT) both show."""
    xml = domain_xml(_spec(boot_files))
    base = _blobs(conn, xml)
    assert _blobs(conn, xml, pciexbar=0xB0000000)["etc/acpi/tables"] != base["etc/acpi/tables"]
    assert _blobs(conn, xml, pmbase=0xB000)["etc/acpi/tables"] != base["etc/acpi/tables"]


@needs_qemu
def test_tdx_backend_xml(conn, boot_files, tdvf_path):
    """libvirt 9.0 cannot convert <launchSecurity type='tdx'>. Where it cannot, the
    domain is converted without it and a TDX-aware libvirt's additions are put in."""
    spec = _spec(boot_files, backend="tdx", firmware=str(tdvf_path), port_forwards=())
    xml = domain_xml(spec)
    try:
        argv = qemu_argv_for(conn, xml)
    except LibvirtArgvError as exc:
        assert "launchSecurity" in str(exc) and "convert the XML without <launchSecurity>" in str(exc)
        argv = qemu_argv_for(conn, re.sub(r"\s*<launchSecurity.*</launchSecurity>", "", xml, flags=re.S))
        at = argv.index("-machine") + 1
        assert "kernel_irqchip=split" in argv[at]  # from <ioapic driver='qemu'/>
        argv[at] += ",confidential-guest-support=lsec0"
        argv += ["-object", '{"qom-type":"tdx-guest","id":"lsec0","attributes":268435456}']
    clean = sanitize_argv(argv, tdx=True)
    assert "smm=off" in _opt_values(clean, "-machine")[0] and "pic=off" in _opt_values(clean, "-machine")[0]
    td = acpi_blobs(QEMU, clean)
    assert td == acpi_blobs(QEMU, clean)
    assert {b"FACP", b"DSDT", b"APIC"} <= set(_tables(td["etc/acpi/tables"]))
    # what TDX forces reaches the tables: SMM on would change them (pic=off changes the
    # MADT's PCAT_COMPAT flag only from QEMU 9.1 on, see docs/measurements.md)
    smm_on = [a.replace("smm=off", "smm=on") if a.startswith("pc-q35") else a for a in clean]
    assert acpi_blobs(QEMU, smm_on)["etc/acpi/tables"] != td["etc/acpi/tables"]


@needs_qemu
def test_failures_are_typed_and_carry_qemus_stderr(conn, boot_files):
    argv = sanitize_argv(qemu_argv_for(conn, domain_xml(_spec(boot_files))), tdx=False)
    bad = [*argv[:-1], "-device", "no-such-device-model", "-S"]
    with pytest.raises(ExtractError) as info:
        acpi_blobs(QEMU, bad)
    assert "no-such-device-model" in str(info.value)  # QEMU's own message
    with pytest.raises(ArgvRefusedError, match="-S"):
        acpi_blobs(QEMU, argv[:-1])
    with pytest.raises(AcpiBlobError):
        acpi_blobs("/nonexistent/qemu-system-x86_64", argv)
    with pytest.raises(QemuStartError):
        QtestSession(QEMU, ["-machine", "q35", "-S", "-kernel", "/nonexistent/vmlinuz"], timeout=20)


@needs_qemu
def test_qtest_directory_matches_by_dma_and_by_port(boot_files):
    with QtestSession(QEMU, ["-machine", "q35", "-nodefaults", "-S", "-m", "256"]) as session:
        assert fwcfg_directory(session, dma=True) == fwcfg_directory(session, dma=False)


@needs_qemu
def test_running_domain_argv_gives_the_same_blobs(conn, boot_files):
    """A domain started paused by libvirtd: its real QEMU argv (/proc/PID/cmdline, with
    fd passing and the monitor socket) and libvirt's XMLToNative of its live XML give the
    same blobs as the XML tdxvm wrote."""
    import libvirt

    name = f"tdxvm-acpi-{uuid.uuid4().hex[:8]}"
    xml = domain_xml(_spec(boot_files, name=name, uuid=str(uuid.uuid4()), port_forwards=()))
    expected = _blobs(conn, xml)
    try:
        dom = conn.createXML(xml, libvirt.VIR_DOMAIN_START_PAUSED)
    except libvirt.libvirtError as exc:
        pytest.skip(f"libvirtd cannot start a paused domain here: {exc.get_error_message()}")
    try:
        pid = int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())
        live = argv_from_cmdline(Path(f"/proc/{pid}/cmdline").read_bytes())
        assert any(a.startswith("-S") for a in live)
        from_proc = acpi_blobs(QEMU, sanitize_argv(live, tdx=False))
        from_live_xml = _blobs(conn, dom.XMLDesc(0))
    finally:
        dom.destroy()
    assert from_proc == expected
    assert from_live_xml == expected
