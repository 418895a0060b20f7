"""Domain XML: saved expected files, libvirt 12.8's schema, and plain input errors."""

from __future__ import annotations

import dataclasses
import difflib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tdxvm.launch.domain import DomainSpec, DomainSpecError, PortForward, domain_xml

from ..debian_data import unstable_package

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("TDXVM_REGEN_GOLDEN") == "1"  # rewrite the saved files

TDX = DomainSpec(
    name="llama-0",
    uuid="6a1e6c1e-8c1e-4d9b-9d7c-2f4a3b5c6d7e",
    backend="tdx",
    vcpus=4,
    memory_mib=16384,
    kernel="/var/lib/tdxvm/images/smoke/vmlinuz",
    initrd="/var/lib/tdxvm/images/smoke/initrd.img",
    cmdline="console=ttyS0 quiet",
    disk="/var/lib/tdxvm/vms/llama-0/disk.img",
    firmware="/usr/share/ovmf/OVMF.inteltdx.fd",
    vcpu_pins=("2", "3", "4", "5"),
    numa_nodeset="0",
    mr_config_id=bytes(range(48)),
    mr_owner=b"\xaa" * 48,
    owner={"fleet": "prod", "template": "llama2-7b"},
)
EMULATED = DomainSpec(
    name="smoke",
    uuid="0e9f3c2a-1b2c-4d5e-8f90-a1b2c3d4e5f6",
    backend="emulated",
    vcpus=2,
    memory_mib=1024,
    kernel="/srv/smoke/vmlinuz",
    initrd="/srv/smoke/initrd.img",
    cmdline="console=ttyS0",
    disk="/srv/smoke/disk.img",
    port_forwards=(PortForward(host_port=2222, guest_port=22), PortForward(host_port=8443, guest_port=443)),
    serial_log="/var/log/tdxvm/smoke.log",
)
# Every other part the XML may have: a qcow2 overlay, the scratch disk, all three MR
# values, forwards on another address, a TD's serial log; an emulated guest's pins,
# NUMA binding, owner labels and firmware record.
TDX_ALL = dataclasses.replace(
    TDX,
    disk_format="qcow2",
    scratch="/var/lib/tdxvm/vms/llama-0/scratch.img",
    mr_owner_config=b"\x01" * 48,
    qgs_socket="/run/qgs/qgs.socket",
    port_forwards=(PortForward(host_port=20001, guest_port=7300, host_address="0.0.0.0"),),
    serial_log="/var/log/tdxvm/llama-0.log",
)
EMULATED_ALL = dataclasses.replace(
    EMULATED,
    disk_format="qcow2",
    scratch="/srv/smoke/scratch.img",
    vcpu_pins=("0", "1"),
    numa_nodeset="0",
    owner={"fleet": "ci"},
    firmware="/srv/smoke/OVMF.inteltdx.fd",
    port_forwards=(),
    serial_log=None,
)
ALL = [(TDX, "tdx.xml"), (EMULATED, "emulated.xml"), (TDX_ALL, "tdx-all.xml"), (EMULATED_ALL, "emulated-all.xml")]


@pytest.mark.parametrize(("spec", "name"), ALL, ids=[name for _, name in ALL])
def test_matches_saved_xml(spec, name):
    got = domain_xml(spec)
    path = GOLDEN / name
    if REGEN:
        path.write_text(got)
    want = path.read_text()
    diff = "".join(difflib.unified_diff(want.splitlines(True), got.splitlines(True), f"saved {name}", "generated"))
    assert not diff, f"domain XML changed (TDXVM_REGEN_GOLDEN=1 rewrites the saved file):\n{diff}"


@pytest.fixture(scope="module")
def libvirt_12_8_schema() -> Path:
    if shutil.which("xmllint") is None:
        pytest.fail("xmllint is missing (apt-get install libxml2-utils; .ci/setup installs it)")
    root = unstable_package("libvirt-common")
    schema = root / "usr" / "share" / "libvirt" / "schemas" / "domain.rng"
    assert "launchSecurityTDX" in (schema.parent / "domaincommon.rng").read_text()
    return schema


@pytest.mark.parametrize("spec", [spec for spec, _ in ALL], ids=[name for _, name in ALL])
def test_validates_against_libvirt_schema(libvirt_12_8_schema, spec, tmp_path):
    xml = tmp_path / "domain.xml"
    xml.write_text(domain_xml(spec))
    proc = subprocess.run(
        ["xmllint", "--noout", "--relaxng", str(libvirt_12_8_schema), str(xml)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def test_schema_check_can_fail(libvirt_12_8_schema, tmp_path):
    """The validation is real: a misspelt TDX element is refused by the same schema."""
    xml = tmp_path / "domain.xml"
    xml.write_text(domain_xml(TDX).replace("mrConfigId", "mrConfigID"))
    proc = subprocess.run(
        ["xmllint", "--noout", "--relaxng", str(libvirt_12_8_schema), str(xml)], capture_output=True, text=True
    )
    assert proc.returncode != 0


def test_td_policy_never_debug():
    xml = domain_xml(TDX)
    assert "<policy>0x10000000</policy>" in xml


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"firmware": None}, "TDVF firmware"),
        ({"name": "bad name"}, "domain name"),
        ({"uuid": "nope"}, "not a UUID"),
        ({"vcpu_pins": ("1",)}, "vCPU pins"),
        ({"kernel": "vmlinuz"}, "absolute path"),
        ({"mr_owner": b"short"}, "48 bytes"),
        ({"qgs_socket": "qgs.socket"}, "QGS socket"),
        ({"memory_mib": 64}, "256 MiB"),
    ],
)
def test_bad_specs_are_explained(changes, needle):
    with pytest.raises(DomainSpecError, match=needle):
        domain_xml(dataclasses.replace(TDX, **changes))
