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
            "not predicted for the tdx backend yet: that needs the controller's own QEMU >= 10.1",
        ),
        ("test:///default", "emulated", "not predicted on test:///default"),
        ("qemu+ssh://root@host/system", "emulated", "only for emulated guests on this machine's qemu:///system"),
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


def test_running_argv_is_only_read_on_this_machines_system_libvirt():
    assert rtmr0pin.running_argv(_Uri("test:///default"), "vm") is None
    assert rtmr0pin.running_argv(_Uri("qemu+ssh://root@host/system"), "vm") is None
    assert rtmr0pin.running_argv(_Uri("qemu:///system"), "no-such-domain-running") is None
