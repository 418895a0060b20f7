"""RTMR0 a launch pins (``tdxvm.launch.rtmr0pin``): predicted from the controller's XML with
this machine's QEMU and the real Debian TDVF, equal to what the emulated quote service
computes from the same machine's argv, and changed by any device, vCPU or memory the
host adds; where no profile applies, nothing is pinned and the reason says why.

The real-QEMU part needs libvirtd at ``qemu:///system``, ``qemu-system-x86_64`` and the
Debian packages the image tests download (skipped with the reason otherwise). Nothing
boots: QEMU runs under qtest, stopped.
"""

from __future__ import annotations

import re

import pytest

from tdxvm.emulate.qgs import emulated_rtmr0
from tdxvm.image.acpiblobs import qemu_argv_for
from tdxvm.launch import rtmr0pin
from tdxvm.launch.domain import domain_xml
from tests.image.conftest import debian_kernel, tdvf_image, tdvf_path  # noqa: F401  (fixtures)
from tests.image.test_acpiblobs import QEMU, _spec, boot_files, conn  # noqa: F401  (fixtures)

needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")


class _Uri:
    """Only what :func:`rtmr0pin.predict` asks before it needs a real connection."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def getURI(self) -> str:  # noqa: N802  (libvirt's name)
        return self.uri


@pytest.mark.parametrize(
    ("uri", "backend", "why"),
    [
        (
            "qemu:///system",
            "tdx",
            "not predicted for the tdx backend yet: that needs the controller's own QEMU and libvirt of the host's",
        ),
        ("test:///default", "emulated", "not predicted on test:///default"),
        ("qemu+tcp://host/system", "emulated", "and on remote qemu+ssh://HOST/system hosts only"),
        ("qemu+ssh://root@host/session", "emulated", "not predicted on qemu+ssh://root@host/session"),
        ("qemu:///session", "emulated", "not predicted on qemu:///session"),
    ],
)
def test_no_profile_pins_nothing_and_says_why(uri, backend, why):
    pin = rtmr0pin.predict(_Uri(uri), "<domain/>", backend=backend, firmware=b"any")
    assert pin.value is None and pin.events == () and why in pin.reason


def test_no_firmware_or_an_unknown_build_pins_nothing():
    local = _Uri("qemu:///system")
    assert "names no TDVF" in rtmr0pin.predict(local, "<domain/>", backend="emulated", firmware=None).reason
    unknown = rtmr0pin.predict(local, "<domain/>", backend="emulated", firmware=b"not a known TDVF build")
    assert unknown.value is None and re.search(
        r"firmware with SHA-256 [0-9a-f]{64} is not a known TDVF build", unknown.reason
    )


def test_a_missing_qemu_is_named_with_the_fix(monkeypatch, tdvf_image):  # noqa: F811
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv(rtmr0pin.QEMU_ENV, raising=False)
    pin = rtmr0pin.predict(_Uri("qemu:///system"), "<domain/>", backend="emulated", firmware=tdvf_image)
    assert pin.value is None and "apt-get install qemu-system-x86" in pin.reason


@needs_qemu
def test_the_pin_matches_the_emulated_td_and_catches_a_changed_machine(conn, boot_files, tdvf_image):  # noqa: F811
    base = domain_xml(_spec(boot_files))
    pin = rtmr0pin.predict(conn, base, backend="emulated", firmware=tdvf_image)
    assert pin.value is not None and re.fullmatch(r"[0-9a-f]{96}", pin.value) and "profile local-qemu" in pin.reason
    whats = [e.what for e in pin.events]
    assert whats[0] == "TD HOB for 1024 MiB (TdxTable)" and "ACPI DATA etc/acpi/tables" in whats
    # the emulated quote service, given the argv libvirt runs for this XML, reports exactly that
    assert emulated_rtmr0(tdvf_image, qemu_argv_for(conn, base)).hex() == pin.value
    assert rtmr0pin.predict(conn, base, backend="emulated", firmware=tdvf_image).value == pin.value  # deterministic
    changed = {
        "memory": _spec(boot_files, memory_mib=2048),
        "vcpus": _spec(boot_files, vcpus=3),
        "a second disk": _spec(boot_files, scratch=boot_files["disk"]),
    }
    values = {pin.value}
    for what, spec in changed.items():
        value = rtmr0pin.predict(conn, domain_xml(spec), backend="emulated", firmware=tdvf_image).value
        assert value not in values, what
        values.add(value)
    nic = base.replace("</devices>", "<interface type='user'><model type='virtio'/></interface></devices>")
    assert rtmr0pin.predict(conn, nic, backend="emulated", firmware=tdvf_image).value not in values


class _RemoteHost:
    """A remote ``qemu+ssh`` host as :func:`rtmr0pin.predict` asks it: the versions it reports."""

    def __init__(self, libvirt_version: int, qemu_version: int) -> None:
        self.versions = (libvirt_version, qemu_version)

    def getURI(self) -> str:  # noqa: N802
        return "qemu+ssh://root@remote.example/system"

    def getLibVersion(self) -> int:  # noqa: N802
        return self.versions[0]

    def getVersion(self) -> int:  # noqa: N802
        return self.versions[1]


@needs_qemu
def test_a_remote_host_of_this_machines_versions_is_predicted_with_the_controllers_own_tools(
    conn,  # noqa: F811
    boot_files,  # noqa: F811
    tdvf_image,  # noqa: F811
):
    xml = domain_xml(_spec(boot_files))
    local = rtmr0pin.predict(conn, xml, backend="emulated", firmware=tdvf_image)
    same = _RemoteHost(conn.getLibVersion(), conn.getVersion())
    pin = rtmr0pin.predict(same, xml, backend="emulated", firmware=tdvf_image)
    # converted by this machine's libvirt, run on this machine's QEMU: never the host's converter
    assert pin.value == local.value and "profile same-versions" in pin.reason
    assert rtmr0pin.qemu_version(QEMU) == conn.getVersion()


@needs_qemu
@pytest.mark.parametrize("which", ["libvirt", "QEMU"])
def test_a_remote_host_of_other_versions_is_not_predicted(conn, boot_files, tdvf_image, which):  # noqa: F811
    libvirt_version, qemu_version = conn.getLibVersion(), conn.getVersion()
    if which == "libvirt":
        libvirt_version += 1000  # one minor release on
    else:
        qemu_version = 11_001_003
    pin = rtmr0pin.predict(
        _RemoteHost(libvirt_version, qemu_version),
        domain_xml(_spec(boot_files)),
        backend="emulated",
        firmware=tdvf_image,
    )
    assert pin.value is None and pin.events == ()
    assert "not predicted on qemu+ssh://root@remote.example/system: the host reports libvirt" in pin.reason
    assert "only with its own libvirt and QEMU of the host's versions" in pin.reason
    if which == "QEMU":
        assert "QEMU 11.1.3" in pin.reason


def test_qemu_version_reads_the_binarys_own_word(tmp_path):
    fake = tmp_path / "qemu"
    fake.write_text("#!/bin/sh\necho 'QEMU emulator version 11.1.3 (Debian 1:11.1.3+ds-2~bpo13+1)'\n")
    fake.chmod(0o755)
    assert rtmr0pin.qemu_version(str(fake)) == 11_001_003
    fake.write_text("#!/bin/sh\necho 'no version here'\n")
    assert rtmr0pin.qemu_version(str(fake)) is None
    assert rtmr0pin.qemu_version(str(tmp_path / "missing")) is None


def test_running_argv_is_read_only_where_libvirt_runs_qemu_on_a_system_host():
    assert rtmr0pin.running_argv(_Uri("test:///default"), "vm") is None
    assert rtmr0pin.running_argv(_Uri("qemu+tcp://host/system"), "vm") is None
    assert rtmr0pin.running_argv(_Uri("qemu:///system"), "no-such-domain-running") is None
    assert rtmr0pin.running_machine(_Uri("test:///default"), "vm")[0] is None  # no argv to read there


def test_a_remote_host_never_chooses_the_program_the_controller_runs(tdvf_image, tmp_path, monkeypatch):  # noqa: F811
    """The emulated quote service reads a remote host's QEMU argv over SSH (its pid file,
    then /proc/PID/cmdline: the host's answers). With no QEMU on the controller, the
    argv's own binary was run: a host answering ``/bin/sh -rtc 'touch …'`` ran a command
    of its choice on the controller. Now a remote argv runs only with the controller's
    QEMU, and without one RTMR0 is not computed."""
    from tdxvm.emulate.qgs import LaunchArtifacts
    from tdxvm.launch import sshhost

    mark = tmp_path / "ran"
    cmdline = b"\0".join([b"/bin/sh", b"-rtc", f"touch {mark}".encode(), b"-machine", b"q35", b"-m", b"1024"]) + b"\0"
    monkeypatch.setattr(
        sshhost.HostSession, "read_file", lambda self, path, **kw: b"4242\n" if path.endswith(".pid") else cmdline
    )
    monkeypatch.setattr(sshhost.HostSession, "ensure", lambda self: None)
    monkeypatch.setattr(rtmr0pin, "controller_qemu", lambda: None)  # a controller with no QEMU of its own
    host = _Uri("qemu+ssh://root@tdx-host.example/system")
    assert rtmr0pin.running_argv(host, "vm")[0] == "/bin/sh"  # what the host says it runs
    argv, qemu = rtmr0pin.running_machine(host, "vm")
    assert (argv, qemu) == (None, None)
    xml = (
        "<domain><name>vm</name><os><kernel>/pool/k</kernel><initrd>/pool/i</initrd>"
        "<loader>/pool/fw.fd</loader></os></domain>"
    )
    files = {"/pool/k": b"K" * 64, "/pool/i": b"I" * 64, "/pool/fw.fd": tdvf_image}
    launch = LaunchArtifacts.from_domain_xml(xml, read=files.__getitem__, argv=argv, qemu=qemu)
    assert launch.rtmr0 == bytes(48) and not mark.exists()  # not computed, and nothing of the host's ran
    monkeypatch.setattr(rtmr0pin, "controller_qemu", lambda: "/usr/bin/qemu-system-x86_64")
    assert rtmr0pin.running_machine(host, "vm") == (cmdline.decode().split("\0")[:-1], "/usr/bin/qemu-system-x86_64")
