"""Host checks before anything is defined, each failure with the fix.

First, for both backends, the image's measurement floor (:func:`measurement_floor`): a
kernel whose EFI stub does not measure the command line and initrd, or a manifest that
predicts an all-zero RTMR1 or RTMR2, is refused — pinning that zero would let the host
choose the initramfs and command line. Then for ``tdx``: TDX enabled in the host
kernel's KVM, a libvirt and QEMU that offer TDX launch security, the TDVF file, the QGS
socket, free memory. For ``emulated``: QEMU for x86_64 with TCG, the TDVF the emulated
TD stands for (if any), free memory.

What libvirt says about the host (:class:`HostFacts`, gathered once by :func:`collect`)
is kept apart from the judgement (:func:`evaluate`, pure), so tests give it saved domain
capabilities and fake sysfs folders. Sources of truth, in order:

* domain capabilities: ``<features><tdx supported='yes'/>`` (libvirt 12.x) or
  ``<launchSecurity supported='yes'>`` with ``tdx`` in its ``sectype`` enum. Since
  libvirt 11.10 these are reported only when the host kernel has TDX enabled (NEWS:
  "qemu: fix incorrect reporting of the TDX launch security type").
* versions, only to explain a missing TDX: upstream QEMU supports TDX from 10.1; libvirt
  gained ``<launchSecurity type='tdx'>`` in its 11.x series and 11.8 is the release the
  Fedora TDX host change pairs with QEMU 10.1. Canonical's TDX builds (libvirt 10.x,
  QEMU 8.2) take a different QGS element (``qgs_form: vsock``) and may not advertise
  TDX; with that form a missing advertisement is a warning, not a refusal.
* ``/sys/module/kvm_intel/parameters/tdx`` (``Y``), read only when the URI is local:
  libvirt has no call that reads a remote host's sysfs, so for a remote host the
  domain capabilities stand in for it.
"""

from __future__ import annotations

import hashlib
import stat
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import libvirt

from tdxvm.launch.connection import is_local, libvirt_message
from tdxvm.launch.domain import DEFAULT_QGS_SOCKET
from tdxvm.launch.errors import PreflightError
from tdxvm.launch.manifest import ImageManifest
from tdxvm.launch.spec import VmSpec, firmware_path

Status = Literal["ok", "warn", "fail", "skip"]
MIN_QEMU_TDX = (10, 1, 0)
MIN_LIBVIRT_TDX = (11, 8, 0)
MEMORY_OVERHEAD_MIB = 256  # QEMU itself, page tables, firmware
ZERO_RTMR = "00" * 48  # a register nothing was extended into
MEASURING_KERNEL_FIX = (
    "rebuild the image with a Linux >= 6.9 kernel, e.g. `kernel: {package: linux-image-cloud-amd64, "
    "suite: bookworm-backports}` in the recipe (the default for suite bookworm)"
)


@dataclass(frozen=True, slots=True)
class Finding:
    check: str
    status: Status
    message: str
    fix: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)

    def __str__(self) -> str:
        return self.message + (f"\n    fix: {self.fix}" if self.fix else "")


@dataclass(frozen=True)
class HostFacts:
    """What the libvirt host reports. ``domcaps[virttype]`` is the XML, or absent with ``domcaps_errors``."""

    uri: str
    driver: str
    local: bool
    libvirt_version: int | None = None
    hypervisor_version: int | None = None
    domcaps: dict[str, str] = field(default_factory=dict)
    domcaps_errors: dict[str, str] = field(default_factory=dict)
    available_memory: int | None = None  # bytes: free + buffers + page cache
    memory_source: str = ""
    kvm_device: tuple[str, int] | None = None  # /dev/kvm's group and permission bits, when the host is this machine


def kvm_device(path: Path = Path("/dev/kvm")) -> tuple[str, int] | None:
    """The name (else the number) of ``path``'s group and its permission bits; None when there is no such device."""
    import grp

    try:
        st = path.stat()
    except OSError:
        return None
    try:
        return grp.getgrgid(st.st_gid).gr_name, st.st_mode & 0o7777
    except KeyError:
        return str(st.st_gid), st.st_mode & 0o7777


def version_text(v: int | None) -> str:
    return "unknown" if v is None else f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}"


def _tuple(v: int) -> tuple[int, int, int]:
    return (v // 1_000_000, v // 1000 % 1000, v % 1000)


def collect(conn: libvirt.virConnect, *, backend: str) -> HostFacts:
    """Ask libvirt about its host (never fails: what cannot be learnt stays None/absent)."""
    uri = conn.getURI()

    def ask(call: Callable[[], Any], default: Any = None) -> Any:
        try:
            return call()
        except libvirt.libvirtError:
            return default

    driver = ask(conn.getType, "") or ""
    domcaps: dict[str, str] = {}
    errors: dict[str, str] = {}
    virttype = "kvm" if backend == "tdx" else "qemu"
    try:
        domcaps[virttype] = conn.getDomainCapabilities(None, "x86_64", "q35", virttype, 0)
    except libvirt.libvirtError as exc:
        errors[virttype] = libvirt_message(exc) if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT else "unsupported"
    memory, source = None, ""
    stats = ask(lambda: conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS, 0))
    if stats and "free" in stats:
        memory = (stats["free"] + stats.get("buffers", 0) + stats.get("cached", 0)) * 1024
        source = "free + buffers + page cache"
    elif (free := ask(conn.getFreeMemory)) is not None:
        memory, source = free, "free"
    return HostFacts(
        uri=uri,
        driver=driver,
        local=is_local(uri),
        libvirt_version=ask(conn.getLibVersion),
        hypervisor_version=ask(conn.getVersion) if driver == "QEMU" else None,
        domcaps=domcaps,
        domcaps_errors=errors,
        available_memory=memory,
        memory_source=source,
        kvm_device=kvm_device() if is_local(uri) else None,
    )


def tdx_advertised(domcaps_xml: str) -> tuple[bool, str]:
    """Whether domain capabilities offer TDX, and which element said so."""
    feats = ET.fromstring(domcaps_xml).find("features")
    if feats is None:
        return False, "no <features> in the domain capabilities"
    tdx = feats.find("tdx")
    if tdx is not None and tdx.get("supported") == "yes":
        return True, "<tdx supported='yes'/>"
    sec = feats.find("launchSecurity")
    if sec is not None and sec.get("supported") == "yes":
        types = [v.text for v in sec.findall("enum[@name='sectype']/value")]
        if "tdx" in types:
            return True, "<launchSecurity> sectype tdx"
    if tdx is not None or sec is not None:
        return False, "the domain capabilities list TDX as unsupported"
    return False, "the domain capabilities do not mention TDX (this libvirt does not know it)"


def evaluate(
    spec: VmSpec, manifest: ImageManifest, facts: HostFacts, *, sysfs_root: Path = Path("/sys")
) -> list[Finding]:
    """Every check for ``spec`` on the host ``facts`` describes, in a fixed order."""
    out: list[Finding] = [measurement_floor(spec, manifest)]
    if spec.backend == "tdx":
        out.append(_kvm_tdx(facts, sysfs_root))
        out.append(_libvirt_tdx(spec, facts))
        out.append(_firmware(spec, manifest, facts))
        out.append(_qgs(spec, facts))
    else:
        out.append(_qemu_tcg(facts))
        out.append(_kvm_device(facts))
        out.append(_firmware(spec, manifest, facts))
    out.append(_memory(spec, facts))
    return out


def measurement_floor(spec: VmSpec, manifest: ImageManifest) -> Finding:
    """Refuse an image whose quote would not cover its kernel, initrd or command line.

    The manifest's ``measurements.inputs.efi_stub_cc_measurement`` (``yes``/``no``/
    ``unknown``, written by ``tdxvm image build``) must be ``yes``: an older EFI stub
    measures nothing in a TD, so RTMR2 is zero whatever initramfs and command line the
    host passes. Older manifests without the field are judged by their predicted RTMR2.
    An RTMR1 or RTMR2 of 48 zero bytes, predicted by the manifest or pinned by the VM
    spec's policy, is refused as well: nothing was measured into it. The one way past
    is the policy's explicit ``allow_zero_rtmrs: true`` (listed in every verdict): then
    the finding is a warning that says what the host can change.
    """
    check = "measurements"
    where = f"image {manifest.name} ({manifest.path})"
    inputs = manifest.measurements.inputs
    stub = inputs.efi_stub_cc_measurement if inputs is not None else None
    problem, fix = _floor_problem(spec, manifest, stub)
    if problem is not None:
        if spec.policy is not None and getattr(spec.policy, "allow_zero_rtmrs", False):
            return Finding(
                check,
                "warn",
                f"{where}: {problem} — continuing ONLY because the VM spec's policy sets "
                "allow_zero_rtmrs: true; the quote does not protect what it names",
                fix,
            )
        return Finding(check, "fail", f"{where}: {problem}", fix)
    if stub is None:
        return Finding(
            check,
            "ok",
            f"{where}: no all-zero RTMR1 or RTMR2 predicted (the manifest, from an older "
            "tdxvm, does not record whether the kernel's EFI stub measures)",
        )
    return Finding(check, "ok", f"{where}: the kernel's EFI stub measures the command line and initrd into RTMR2")


def _floor_problem(spec: VmSpec, manifest: ImageManifest, stub: object) -> tuple[str | None, str | None]:
    if stub == "no":
        return (
            "its kernel's EFI stub predates CC measurement (Linux < 6.9) and measures nothing in a TD: RTMR2 "
            "stays zero, so the host could replace the initramfs and the command line unnoticed",
            MEASURING_KERNEL_FIX,
        )
    if stub is not None and stub != "yes":
        return (
            f"whether its kernel's EFI stub measures the command line and initrd into RTMR2 is {stub!r} (the "
            "build could not tell): the quote might not cover them",
            MEASURING_KERNEL_FIX,
        )
    for register, what in (("rtmr1", "the kernel"), ("rtmr2", "the initramfs and the command line")):
        if manifest.measurements.value(register) == ZERO_RTMR:
            return (
                f"the manifest predicts {register.upper()} = 0 (nothing measured): pinning it would let the host "
                f"choose {what}",
                MEASURING_KERNEL_FIX,
            )
        if spec.policy is not None and ZERO_RTMR in (getattr(spec.policy, register) or ()):
            return (
                f"VM {spec.name}'s policy lets {register} be 0 (nothing measured), which would let the host "
                f"choose {what}",
                f"pin the measured value of {register} under policy: in the VM spec",
            )
    return None, None


def _test_driver(facts: HostFacts) -> bool:
    return facts.driver.upper() == "TEST"


def _kvm_tdx(facts: HostFacts, sysfs_root: Path) -> Finding:
    check = "kvm-tdx"
    if _test_driver(facts):
        return Finding(check, "skip", f"{facts.uri} is libvirt's test driver: no host kernel to check")
    if not facts.local:
        return Finding(
            check,
            "skip",
            f"{facts.uri} is a remote host: its sysfs cannot be read through libvirt; the "
            "domain capabilities check covers TDX in its kernel",
        )
    module = sysfs_root / "module" / "kvm_intel"
    param = module / "parameters" / "tdx"
    if not module.is_dir():
        amd = (sysfs_root / "module" / "kvm_amd").is_dir()
        return Finding(
            check,
            "fail",
            f"kvm_intel is not loaded on this host ({module} is missing)"
            + ("; the host runs kvm_amd: TDX needs an Intel Xeon with TDX" if amd else ""),
            "on an Intel host with TDX: `modprobe kvm_intel tdx=1`; otherwise use backend: emulated",
        )
    if not param.is_file():
        return Finding(
            check,
            "fail",
            f"this kernel's KVM has no TDX support ({param} is missing)",
            "boot a kernel with KVM TDX host support (Linux >= 6.16, or a distribution TDX kernel)",
        )
    value = param.read_text().strip()
    if value != "Y":
        return Finding(
            check,
            "fail",
            f"TDX is not enabled in KVM ({param} is {value!r}, read locally)",
            "enable TDX in the BIOS, load KVM with `kvm_intel.tdx=1` (kernel command line, or `options "
            "kvm_intel tdx=1` in /etc/modprobe.d/), reboot, and look for 'module initialized' in `dmesg | "
            "grep -i tdx`",
        )
    return Finding(check, "ok", f"TDX is enabled in KVM ({param} is Y, read locally)")


def _libvirt_tdx(spec: VmSpec, facts: HostFacts) -> Finding:
    check = "libvirt-tdx"
    if _test_driver(facts):
        return Finding(check, "skip", f"{facts.uri} is libvirt's test driver: it runs no QEMU")
    lv, qv = version_text(facts.libvirt_version), version_text(facts.hypervisor_version)
    caps = facts.domcaps.get("kvm")
    if caps is None:
        err = facts.domcaps_errors.get("kvm", "no answer")
        return Finding(
            check,
            "fail",
            f"libvirt {lv} on {facts.uri} cannot run KVM guests: {err}",
            "TDX needs KVM: check /dev/kvm on the host and that QEMU (qemu-system-x86_64) is installed",
        )
    ok, how = tdx_advertised(caps)
    if ok:
        return Finding(check, "ok", f"libvirt {lv} with QEMU {qv} offers TDX launch security ({how})")
    reasons = []
    if facts.libvirt_version is not None and _tuple(facts.libvirt_version) < MIN_LIBVIRT_TDX:
        reasons.append(f"libvirt {lv} is older than {version_text(_int(MIN_LIBVIRT_TDX))}")
    if facts.hypervisor_version is not None and _tuple(facts.hypervisor_version) < MIN_QEMU_TDX:
        reasons.append(f"QEMU {qv} is older than {version_text(_int(MIN_QEMU_TDX))}, the first with TDX")
    if not reasons:
        reasons.append("libvirt and QEMU are new enough, so the host kernel's KVM does not offer TDX")
    message = f"libvirt {lv} with QEMU {qv} on {facts.uri} does not offer TDX ({how}): {'; '.join(reasons)}"
    fix = (
        f"install libvirt >= {version_text(_int(MIN_LIBVIRT_TDX))} and QEMU >= {version_text(_int(MIN_QEMU_TDX))} "
        "with a TDX-enabled host kernel (e.g. Ubuntu 25.10+, Fedora 43+), or use backend: emulated"
    )
    if spec.qgs_form == "vsock":
        return Finding(
            check,
            "warn",
            message + " — continuing: qgs_form vsock targets Canonical's TDX builds, which may not advertise TDX",
            fix,
        )
    return Finding(check, "fail", message, fix)


def _int(v: tuple[int, int, int]) -> int:
    return v[0] * 1_000_000 + v[1] * 1000 + v[2]


def _firmware(spec: VmSpec, manifest: ImageManifest, facts: HostFacts) -> Finding:
    check = "firmware"
    path = firmware_path(spec, manifest)
    if path is None and spec.backend == "emulated":
        return Finding(check, "skip", "no TDVF named: the emulated TD reports a zero MRTD")
    if path is None:
        return Finding(
            check,
            "fail",
            "no TDVF firmware: the VM spec gives no firmware: and the image manifest names none",
            "set firmware: to the TDVF on the host, e.g. "
            "/usr/share/ovmf/OVMF.inteltdx.ms.fd (Debian/Ubuntu package ovmf-inteltdx)",
        )
    # an emulated guest on a remote host: the manifest's TDVF goes into the host's pool
    # (tdxvm.launch.lifecycle.firmware_upload), so it is this machine's file that matters
    uploaded = spec.backend == "emulated" and spec.firmware is None and not facts.local and not _test_driver(facts)
    if not facts.local and spec.firmware is None and not uploaded:
        return Finding(
            check,
            "warn",
            f"firmware defaults to the image manifest's {path}, a path on the build machine; "
            f"{facts.uri} is another host",
            "set firmware: to the TDVF's path on that host",
        )
    if _test_driver(facts) or (not facts.local and not uploaded):
        return Finding(
            check,
            "skip",
            f"TDVF {path} is on {facts.uri}, which tdxvm cannot list; libvirt refuses the start if it is missing",
        )
    p = Path(path)
    if not p.is_file():
        role = "" if spec.backend == "tdx" else " (the emulated quote service computes the MRTD from it)"
        where = f"on this machine, which puts it into {facts.uri}'s pool" if uploaded else "on this host"
        return Finding(
            check,
            "fail",
            f"TDVF firmware {path} does not exist {where}{role}",
            "install the TDVF (package ovmf-inteltdx) or set firmware: to where it is",
        )
    if manifest.firmware_sha256 is not None:
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        if digest != manifest.firmware_sha256:
            return Finding(
                check,
                "fail" if uploaded else "warn",
                f"TDVF {path} is not the firmware the image's MRTD was predicted for "
                f"(sha256 {digest}, manifest {manifest.firmware_sha256}): "
                + (
                    "it cannot be put into the host's pool as the image's"
                    if uploaded
                    else "attestation will refuse the MRTD"
                ),
                f"boot the manifest's firmware, or rebuild the image with --firmware {path}",
            )
    if uploaded:
        return Finding(
            check,
            "ok",
            f"TDVF firmware {path} exists here and goes into {facts.uri}'s pool (the emulated TD stands for it)",
        )
    return Finding(check, "ok", f"TDVF firmware {path} exists")


def _qgs(spec: VmSpec, facts: HostFacts) -> Finding:
    check = "qgs"
    if spec.qgs_form == "vsock":
        return Finding(
            check,
            "skip",
            f"the quote generation service is reached over vsock (CID 2, port "
            f"{spec.qgs_vsock_port}); tdxvm cannot probe it",
        )
    path = spec.qgs_socket or DEFAULT_QGS_SOCKET
    if _test_driver(facts) or not facts.local:
        return Finding(check, "skip", f"QGS socket {path} is on {facts.uri}, which tdxvm cannot list")
    fix = (
        "install and start Intel's quote generation service (`systemctl start qgsd`, package tdx-qgs), or set "
        "qgs_socket: to where it listens"
    )
    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return Finding(check, "fail", f"QGS socket {path} does not exist: the TD could not get quotes", fix)
    if not stat.S_ISSOCK(mode):
        return Finding(check, "fail", f"{path} exists but is not a socket", fix)
    return Finding(check, "ok", f"QGS socket {path} exists")


def _qemu_tcg(facts: HostFacts) -> Finding:
    check = "qemu-tcg"
    if _test_driver(facts):
        return Finding(check, "skip", f"{facts.uri} is libvirt's test driver: it runs no QEMU")
    caps = facts.domcaps.get("qemu")
    if caps is None:
        err = facts.domcaps_errors.get("qemu", "no answer")
        return Finding(
            check,
            "fail",
            f"libvirt on {facts.uri} cannot run an emulated x86_64 q35 guest: {err}",
            "install QEMU for x86_64 on the libvirt host (Debian/Ubuntu: apt-get install "
            "qemu-system-x86) and restart libvirtd",
        )
    root = ET.fromstring(caps)
    return Finding(
        check,
        "ok",
        f"QEMU {root.findtext('path', '?')} runs emulated q35 guests (TCG, machine {root.findtext('machine', '?')})",
    )


def _kvm_device(facts: HostFacts) -> Finding:
    """The slow state: /dev/kvm that the ``kvm`` group cannot open (another group, or mode
    0600 as on some fresh machines). libvirt then finds KVM gone after each QEMU probe and
    probes again (~4 s) on every capability lookup, so a define takes a minute, and
    libvirtd was seen to hang. Emulated guests use TCG, not KVM, but libvirt still probes."""
    check = "kvm-device"
    if _test_driver(facts) or facts.kvm_device is None:
        return Finding(check, "skip", "no /dev/kvm on this machine, or the host is not this machine")
    group, mode = facts.kvm_device
    if group == "kvm" and mode & 0o060 == 0o060:
        return Finding(check, "ok", f"/dev/kvm belongs to group kvm, mode {mode:04o}")
    return Finding(
        check,
        "warn",
        f"/dev/kvm is group {group}, mode {mode:04o}, so group kvm cannot open it: libvirt probes QEMU again on "
        "every capability lookup (~4 s each; a define takes a minute, and libvirtd can hang)",
        "chgrp kvm /dev/kvm && chmod 660 /dev/kvm",
    )


def _memory(spec: VmSpec, facts: HostFacts) -> Finding:
    check = "memory"
    if _test_driver(facts) or facts.available_memory is None:
        return Finding(check, "skip", f"{facts.uri} does not report free memory")
    need = (spec.memory_mib + MEMORY_OVERHEAD_MIB) << 20
    have_mib = facts.available_memory >> 20
    if facts.available_memory < need:
        return Finding(
            check,
            "fail",
            f"{spec.name} needs {spec.memory_mib} MiB (+{MEMORY_OVERHEAD_MIB} MiB for QEMU); "
            f"{facts.uri} has {have_mib} MiB available ({facts.memory_source})",
            "lower memory: in the VM spec, or stop other guests on the host",
        )
    return Finding(check, "ok", f"{have_mib} MiB available for {spec.memory_mib} MiB (+{MEMORY_OVERHEAD_MIB} MiB)")


def run_preflight(
    conn: libvirt.virConnect, spec: VmSpec, manifest: ImageManifest, *, sysfs_root: Path = Path("/sys")
) -> list[Finding]:
    return evaluate(spec, manifest, collect(conn, backend=spec.backend), sysfs_root=sysfs_root)


def require(findings: list[Finding], *, vm: str = "") -> list[Finding]:
    """Raise :class:`PreflightError` listing every failure; return the findings otherwise."""
    failed = [f for f in findings if f.status == "fail"]
    if failed:
        head = (
            f"host preflight refused {'VM ' + vm if vm else 'the launch'} "
            f"({len(failed)} problem{'s' * (len(failed) > 1)}):"
        )
        raise PreflightError(head + "".join(f"\n  - {f}" for f in failed), failed)
    return findings
