"""Domain XML options added for launches: qcow2 overlays, TD port forwards, Canonical's QGS form."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import xml.etree.ElementTree as ET

from tdxvm.launch.domain import PortForward, domain_xml

from .test_domain import TDX, libvirt_12_8_schema  # noqa: F401 - the schema fixture

TD = dataclasses.replace(TDX, disk_format="qcow2", port_forwards=(PortForward(host_port=20001, guest_port=7300),))


def validate(schema, tmp_path, xml: str) -> subprocess.CompletedProcess:
    path = tmp_path / "domain.xml"
    path.write_text(xml)
    return subprocess.run(["xmllint", "--noout", "--relaxng", str(schema), str(path)], capture_output=True, text=True)


def test_td_with_overlay_and_forwards_fits_libvirt_12_8(libvirt_12_8_schema, tmp_path):  # noqa: F811
    xml = domain_xml(TD)
    root = ET.fromstring(xml)
    assert root.find("devices/disk/driver").get("type") == "qcow2"
    args = [a.get("value") for a in root.iter("{http://libvirt.org/schemas/domain/qemu/1.0}arg")]
    assert args == [
        "-netdev",
        "user,id=tdxvm0,hostfwd=tcp:127.0.0.1:20001-:7300",
        "-device",
        "virtio-net-pci,netdev=tdxvm0,bus=pcie.0,addr=0x10",
    ]
    proc = validate(libvirt_12_8_schema, tmp_path, xml)
    assert proc.returncode == 0, proc.stderr


def test_td_without_forwards_has_no_network():
    assert "qemu:commandline" not in domain_xml(TDX)


def test_canonical_vsock_qgs_form(libvirt_12_8_schema, tmp_path):  # noqa: F811
    """The element of canonical/tdx guest-tools/trust_domain.xml.template (commit af97a22).

    Upstream libvirt's schema takes only ``<quoteGenerationService path=.../>`` and refuses
    this form; everything else in the domain still fits it.
    """
    xml = domain_xml(dataclasses.replace(TD, qgs_form="vsock"))
    qgs = ET.fromstring(xml).find("launchSecurity/quoteGenerationService")
    assert qgs.attrib == {} and [(c.tag, c.attrib) for c in qgs] == [
        ("SocketAddress", {"type": "vsock", "cid": "2", "port": "4050"})
    ]
    assert validate(libvirt_12_8_schema, tmp_path, xml).returncode != 0
    without = re.sub(r"\s*<quoteGenerationService>.*?</quoteGenerationService>", "", xml, flags=re.S)
    proc = validate(libvirt_12_8_schema, tmp_path, without)
    assert proc.returncode == 0, proc.stderr
    assert 'port="4051"' in domain_xml(dataclasses.replace(TD, qgs_form="vsock", qgs_vsock_port=4051))


def test_emulated_firmware_record_is_what_the_emulated_quote_service_reads(libvirt_12_8_schema, tmp_path):  # noqa: F811
    from tdxvm.emulate.qgs import LaunchArtifacts

    from .test_domain import EMULATED

    xml = domain_xml(dataclasses.replace(EMULATED, firmware="/srv/smoke/OVMF.inteltdx.fd"))
    assert "<loader" not in xml  # an emulated guest does not boot the TDVF
    proc = validate(libvirt_12_8_schema, tmp_path, xml)
    assert proc.returncode == 0, proc.stderr
    files = {
        "/srv/smoke/vmlinuz": b"kernel",
        "/srv/smoke/initrd.img": b"initrd",
        "/srv/smoke/OVMF.inteltdx.fd": b"tdvf",
    }
    launch = LaunchArtifacts.from_domain_xml(xml, read=files.__getitem__)
    assert launch.firmware == b"tdvf" and launch.kernel == b"kernel" and launch.cmdline == EMULATED.cmdline
