"""libvirt domain XML for a Trust Domain, or for the same guest emulated without TDX.

One typed description (:class:`DomainSpec`) renders to either backend:

* ``tdx``: ``<domain type='kvm'>``, q35, TDVF as the loader, direct kernel boot,
  private anonymous memory, no SMM, split IOAPIC, and upstream libvirt's
  ``<launchSecurity type='tdx'>`` (policy with SEPT_VE_DISABLE, MRCONFIGID, MROWNER,
  MROWNERCONFIG as base64 SHA-384 values, the QGS socket). Validated against the
  schema of libvirt 12.8 (Debian's ``libvirt-common``). ``qgs_form="vsock"`` writes the
  quote service the way Canonical's TDX builds of libvirt 10.x take it instead
  (``<quoteGenerationService><SocketAddress type='vsock' cid='2' port='4050'/>``, from
  canonical/tdx ``guest-tools/trust_domain.xml.template`` since commit af97a22); upstream
  libvirt's schema refuses that form.
* ``emulated``: ``<domain type='qemu'>`` (TCG: KVM is unusable on the hosts this runs
  on in CI), the same kernel, initramfs, command line and disk. Its TDVF is not booted;
  when ``firmware`` is given it is recorded as ``<tdxvm:firmware path='…'/>`` in the
  tdxvm metadata, where the emulated quote service (:mod:`tdxvm.emulate.qgs`) finds the
  firmware whose MRTD the emulated TD reports.

Both backends get QEMU user-mode networking with host port forwards through
``<qemu:commandline>`` (libvirt's own ``portForward`` needs passt; Canonical's TD
template networks its TDs the same way). The disk is raw, or a qcow2 overlay
(``disk_format="qcow2"``) whose backing file QEMU reads from the qcow2 header.

Elements are written in a fixed order, so the output for a spec is stable (the tests
compare it with saved files). Inputs are checked here with plain messages ("TDX needs a
TDVF firmware path"); the host's capabilities are checked by the launch preflight.
"""

from __future__ import annotations

import base64
import re
import uuid as uuidlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Literal

from tdxvm.attest.quote import LAUNCH_TD_ATTRIBUTES
from tdxvm.launch.errors import LaunchError

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
TDXVM_NS = "https://tdxvm.dev/xmlns/domain/1"
DEFAULT_QGS_SOCKET = "/var/run/tdx-qgs/qgs.socket"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class DomainSpecError(LaunchError, ValueError):
    code = "domain-spec"


@dataclass(frozen=True, slots=True, kw_only=True)
class PortForward:
    host_port: int
    guest_port: int
    host_address: str = "127.0.0.1"


@dataclass(frozen=True, slots=True, kw_only=True)
class DomainSpec:
    """What tdxvm asks libvirt to run. Paths are as the libvirt host sees them."""

    name: str
    uuid: str
    backend: Literal["tdx", "emulated"]
    vcpus: int
    memory_mib: int
    kernel: str
    initrd: str
    cmdline: str
    disk: str
    disk_format: Literal["raw", "qcow2"] = "raw"
    firmware: str | None = None
    vcpu_pins: tuple[str, ...] = ()  # host cpuset per vCPU, e.g. ("2", "3")
    numa_nodeset: str | None = None  # strict memory binding, e.g. "0"
    port_forwards: tuple[PortForward, ...] = ()
    mr_config_id: bytes | None = None
    mr_owner: bytes | None = None
    mr_owner_config: bytes | None = None
    qgs_socket: str = DEFAULT_QGS_SOCKET
    qgs_form: Literal["socket", "vsock"] = "socket"  # vsock: Canonical's libvirt 10.x TDX builds
    qgs_vsock_port: int = 4050  # the host's QGS vsock port (CID 2, the host)
    serial_log: str | None = None
    scratch: str | None = None  # the per-VM scratch disk (vdb), raw
    owner: dict[str, str] = field(default_factory=dict)  # tdxvm metadata (fleet, template…)

    def check(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise DomainSpecError(f"domain name {self.name!r}: use letters, digits, '.', '_' and '-' (at most 63)")
        try:
            uuidlib.UUID(self.uuid)
        except ValueError:
            raise DomainSpecError(f"domain uuid {self.uuid!r} is not a UUID") from None
        if self.vcpus < 1 or self.memory_mib < 256:
            raise DomainSpecError("a guest needs at least 1 vCPU and 256 MiB of memory")
        if self.vcpu_pins and len(self.vcpu_pins) != self.vcpus:
            raise DomainSpecError(f"{len(self.vcpu_pins)} vCPU pins given for {self.vcpus} vCPUs")
        for path in (self.kernel, self.initrd, self.disk, *([self.scratch] if self.scratch else [])):
            if not path.startswith("/"):
                raise DomainSpecError(f"{path!r} must be an absolute path on the libvirt host")
        if self.backend == "tdx" and not (self.firmware or "").startswith("/"):
            raise DomainSpecError("TDX needs the absolute path of a TDVF firmware (e.g. OVMF.inteltdx.fd) on the host")
        if self.firmware is not None and not self.firmware.startswith("/"):
            raise DomainSpecError(f"firmware {self.firmware!r} must be an absolute path on the host")
        if self.qgs_form == "socket" and not self.qgs_socket.startswith("/"):
            raise DomainSpecError(f"QGS socket {self.qgs_socket!r} must be an absolute path on the host")
        if not 0 < self.qgs_vsock_port < 1 << 32:
            raise DomainSpecError(f"QGS vsock port {self.qgs_vsock_port} is out of range")
        for name, value in (
            ("mr_config_id", self.mr_config_id),
            ("mr_owner", self.mr_owner),
            ("mr_owner_config", self.mr_owner_config),
        ):
            if value is not None and len(value) != 48:
                raise DomainSpecError(f"{name} must be 48 bytes (a SHA-384 value), got {len(value)}")
        for pf in self.port_forwards:
            if not (0 < pf.host_port < 65536 and 0 < pf.guest_port < 65536):
                raise DomainSpecError(f"port forward {pf.host_port}->{pf.guest_port} is out of range")


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    e = ET.SubElement(parent, tag, attrs)
    if text is not None:
        e.text = text
    return e


def td_policy() -> int:
    """TD attributes tdxvm launches with: SEPT_VE_DISABLE set, never DEBUG (the launch pins them)."""
    return LAUNCH_TD_ATTRIBUTES


def domain_xml(spec: DomainSpec) -> str:
    """The domain XML for ``spec`` (checked first); its parts in libvirt's usual order."""
    spec.check()
    tdx = spec.backend == "tdx"
    ET.register_namespace("qemu", QEMU_NS)
    ET.register_namespace("tdxvm", TDXVM_NS)
    dom = ET.Element("domain", {"type": "kvm" if tdx else "qemu"})
    _sub(dom, "name", spec.name)
    _sub(dom, "uuid", spec.uuid)
    _metadata(dom, spec)
    _resources(dom, spec)
    _boot(dom, spec)
    _features(dom, tdx=tdx)
    _cpu(dom, tdx=tdx)
    _events(dom)
    _devices(_sub(dom, "devices"), spec)
    if tdx:
        _launch_security(dom, spec)
    if spec.port_forwards or not tdx:
        _qemu_user_network(dom, spec.port_forwards)
    ET.indent(dom, "  ")
    return ET.tostring(dom, encoding="unicode") + "\n"


def _metadata(dom: ET.Element, spec: DomainSpec) -> None:
    """``<tdxvm:owner>``: the backend, the owner labels (sorted) and an emulated guest's firmware."""
    owner = ET.SubElement(_sub(dom, "metadata"), f"{{{TDXVM_NS}}}owner", {"backend": spec.backend})
    for key in sorted(spec.owner):
        ET.SubElement(owner, f"{{{TDXVM_NS}}}label", {"name": key}).text = spec.owner[key]
    if spec.backend != "tdx" and spec.firmware is not None:
        ET.SubElement(owner, f"{{{TDXVM_NS}}}firmware", {"path": spec.firmware})


def _resources(dom: ET.Element, spec: DomainSpec) -> None:
    """Memory (private anonymous for a TD), vCPUs, their pins and the NUMA binding."""
    _sub(dom, "memory", str(spec.memory_mib), unit="MiB")
    if spec.backend == "tdx":
        mb = _sub(dom, "memoryBacking")
        _sub(mb, "source", type="anonymous")
        _sub(mb, "access", mode="private")
    _sub(dom, "vcpu", str(spec.vcpus), placement="static")
    if spec.vcpu_pins:
        tune = _sub(dom, "cputune")
        for i, cpus in enumerate(spec.vcpu_pins):
            _sub(tune, "vcpupin", vcpu=str(i), cpuset=cpus)
    if spec.numa_nodeset is not None:
        _sub(_sub(dom, "numatune"), "memory", mode="strict", nodeset=spec.numa_nodeset)


def _boot(dom: ET.Element, spec: DomainSpec) -> None:
    """``<os>``: q35, TDVF as the loader of a TD, direct kernel boot."""
    os_ = _sub(dom, "os")
    _sub(os_, "type", "hvm", arch="x86_64", machine="q35")
    if spec.backend == "tdx":
        _sub(os_, "loader", spec.firmware)
    _sub(os_, "kernel", spec.kernel)
    _sub(os_, "initrd", spec.initrd)
    _sub(os_, "cmdline", spec.cmdline)


def _features(dom: ET.Element, *, tdx: bool) -> None:
    """ACPI and APIC; a TD's IOAPIC is split (QEMU's); never SMM."""
    feats = _sub(dom, "features")
    _sub(feats, "acpi")
    _sub(feats, "apic")
    if tdx:
        _sub(feats, "ioapic", driver="qemu")
    _sub(feats, "smm", state="off")


def _cpu(dom: ET.Element, *, tdx: bool) -> None:
    if tdx:
        _sub(dom, "cpu", mode="host-passthrough", check="none")
        return
    # TCG: Westmere has AES-NI (dm-crypt at speed) and no AVX, and CMPXCHG16B is off.
    # With "maximum" (QEMU 7.2) or plain Westmere, Linux 6.12 now and then crashed in
    # the slab allocator's cmpxchg16b fast path (double faults, NULL calls in path
    # lookups) under TCG; without CX16 the kernel takes its locked fallback.
    cpu = _sub(dom, "cpu", mode="custom", match="exact", check="none")
    _sub(cpu, "model", "Westmere", fallback="forbid")
    _sub(cpu, "feature", policy="disable", name="cx16")


def _events(dom: ET.Element) -> None:
    """UTC clock; power-off, reboot and crash all end the domain."""
    _sub(dom, "clock", offset="utc")
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "destroy")  # a guest that reboots must be attested again: it stops instead
    _sub(dom, "on_crash", "destroy")


def _devices(devs: ET.Element, spec: DomainSpec) -> None:
    """The disk (vda), the scratch disk (vdb), the serial console; no balloon."""
    cache = "none" if spec.backend == "tdx" else "unsafe"
    _disk(devs, spec.disk, fmt=spec.disk_format, cache=cache, dev="vda")
    if spec.scratch:
        _disk(devs, spec.scratch, fmt="raw", cache=cache, dev="vdb")
    _serial_console(devs, spec.serial_log)
    _sub(devs, "memballoon", model="none")


def _disk(devs: ET.Element, path: str, *, fmt: str, cache: str, dev: str) -> None:
    disk = _sub(devs, "disk", type="file", device="disk")
    _sub(disk, "driver", name="qemu", type=fmt, cache=cache)
    _sub(disk, "source", file=path)
    _sub(disk, "target", dev=dev, bus="virtio")


def _serial_console(devs: ET.Element, log: str | None) -> None:
    """Serial port 0 and the console on it: to the log file when there is one, else a pty."""
    serial = _sub(devs, "serial", type="file" if log else "pty")
    if log:
        _sub(serial, "source", path=log)
    _sub(serial, "target", port="0")
    console = _sub(devs, "console", type="file" if log else "pty")
    if log:
        _sub(console, "source", path=log)
    _sub(console, "target", type="serial", port="0")


def _launch_security(dom: ET.Element, spec: DomainSpec) -> None:
    """``<launchSecurity type='tdx'>``: policy, the owner's MR values (base64), the quote service."""
    sec = _sub(dom, "launchSecurity", type="tdx")
    _sub(sec, "policy", f"{td_policy():#x}")
    for tag, value in (
        ("mrConfigId", spec.mr_config_id),
        ("mrOwner", spec.mr_owner),
        ("mrOwnerConfig", spec.mr_owner_config),
    ):
        if value is not None:
            _sub(sec, tag, base64.b64encode(value).decode())
    if spec.qgs_form == "vsock":
        qgs = _sub(sec, "quoteGenerationService")
        _sub(qgs, "SocketAddress", type="vsock", cid="2", port=str(spec.qgs_vsock_port))
    else:
        _sub(sec, "quoteGenerationService", path=spec.qgs_socket)


def _qemu_user_network(dom: ET.Element, forwards: tuple[PortForward, ...]) -> None:
    """QEMU user-mode networking with host forwards (no passt on these hosts)."""
    netdev = "user,id=tdxvm0" + "".join(
        f",hostfwd=tcp:{pf.host_address}:{pf.host_port}-:{pf.guest_port}" for pf in forwards
    )
    cmd = ET.SubElement(dom, f"{{{QEMU_NS}}}commandline")
    for arg in ("-netdev", netdev, "-device", "virtio-net-pci,netdev=tdxvm0,bus=pcie.0,addr=0x10"):
        ET.SubElement(cmd, f"{{{QEMU_NS}}}arg", {"value": arg})
