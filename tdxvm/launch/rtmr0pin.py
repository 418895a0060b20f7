"""RTMR0 for the domain a launch defines: predicted from the controller's own domain XML, or why not.

RTMR0 holds what TDVF measures before the kernel (:mod:`tdxvm.image.rtmr0`): the TD HOB
(memory layout), the firmware's variable store, QEMU's fw_cfg boot items, ACPI tables and
SMBIOS table. The host's QEMU builds the last three from the VM's devices, so RTMR0 is
how a quote shows which machine the TD runs in: a device, vCPU or memory the host adds
changes it. The controller computes it itself (:func:`predict`): libvirt's converter
gives the QEMU argv of the XML the controller wrote (never the host's domain), and the
controller's own QEMU runs that argv under qtest (:mod:`tdxvm.image.platforminputs`).

Which QEMU and libvirt compute the blobs is a profile; the host's answers never do (the
versions it reports only select a profile: a lie only causes a mismatch, and the launch
is refused at the first quote):

* ``local-qemu``: emulated guests on this machine's ``qemu:///system``. libvirt runs this
  machine's QEMU, so the controller's copy is that very binary
  (``qemu-system-x86_64`` on ``PATH``, or ``$TDXVM_QEMU``).
* ``same-versions``: emulated guests on a remote host (``qemu+ssh://.../system``) whose
  libvirt and QEMU report the versions of this machine's own. The controller converts the
  XML it wrote with its own ``qemu:///system`` (never the host's converter, whose answer
  the host chooses) and runs its own QEMU.

Everything else is not predicted, and :attr:`Rtmr0Pin.reason` says why and what it
would take; the policy then lists RTMR0 as unpinned, never a guessed value: the tdx
backend needs the controller's own QEMU and libvirt of the host's versions (TDX is in
upstream QEMU since 10.1; the XML converts without ``<launchSecurity>`` to the same
machine, measured with libvirt 12.9), the SMBIOS processor ID the TD's vCPUs report, and
a predicted value checked against a real TD's RTMR0 (docs/measurements.md); other remote
versions and transports, and libvirt's test driver (which runs no QEMU), have no profile.
A firmware whose build is not known (:data:`tdxvm.image.rtmr0.KNOWN_FIRMWARE`) is not
predicted either.

:func:`running_argv` is the other side, for the emulated quote service: the argv of the
QEMU libvirt actually runs for a domain (``/proc/PID/cmdline``, read over the host's SSH
session for a remote host).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import libvirt

from tdxvm.image.acpiblobs import argv_from_cmdline, qemu_argv_for
from tdxvm.image.measure import ExpectedEvent
from tdxvm.image.platforminputs import PREDICTION_ERRORS, predict_for_argv
from tdxvm.image.rtmr0 import UnknownFirmwareError, firmware_build
from tdxvm.launch import sshhost
from tdxvm.launch.connection import is_local, libvirt_message
from tdxvm.launch.errors import LaunchPolicyError
from tdxvm.launch.sshtarget import HostSshError, ssh_target

LOCAL_SYSTEM = "qemu:///system"
QEMU_ENV = "TDXVM_QEMU"
QEMU_BINARY = "qemu-system-x86_64"
PID_DIRS = (Path("/run/libvirt/qemu"), Path("/var/run/libvirt/qemu"))


@dataclass(frozen=True)
class Rtmr0Pin:
    """RTMR0 (hex) a launch pins and the events behind it, or None; ``reason`` says how it
    was predicted (profile, QEMU, firmware) or why it is not."""

    value: str | None
    events: tuple[ExpectedEvent, ...]
    reason: str

    def to_dict(self) -> dict:
        return {
            "value": self.value,
            "reason": self.reason,
            "events": [{"type": e.event_type, "digest": e.digest, "what": e.what} for e in self.events],
        }


def controller_qemu() -> str | None:
    """The controller's QEMU: ``$TDXVM_QEMU``, else ``qemu-system-x86_64`` on ``PATH``."""
    return os.environ.get(QEMU_ENV) or shutil.which(QEMU_BINARY)


def _local_system(uri: str) -> bool:
    return uri.split(":", 1)[0] == "qemu" and uri.rstrip("/").endswith("/system") and is_local(uri)


def _ssh_system(uri: str) -> bool:
    parts = urlsplit(uri)
    return parts.scheme == "qemu+ssh" and parts.path.rstrip("/") == "/system" and not is_local(uri)


def profile_problem(uri: str, backend: str) -> str | None:
    """Why no RTMR0 profile can cover a ``backend`` domain on ``uri``; None when one may
    (``local-qemu``, or ``same-versions`` once the versions match: :func:`predict`)."""
    if backend != "emulated":
        return (
            "not predicted for the tdx backend yet: that needs the controller's own QEMU and libvirt of the host's "
            "versions (QEMU >= 10.1, with the qtest accelerator), the SMBIOS processor ID the TD's vCPUs report, "
            "and a prediction checked against a real TD's RTMR0; pin `rtmr0:` under the VM spec's policy from a "
            "known-good boot meanwhile"
        )
    if not _local_system(uri) and not _ssh_system(uri):
        return (
            f"not predicted on {uri}: the controller predicts RTMR0 for emulated guests on this machine's "
            f"{LOCAL_SYSTEM} and on remote qemu+ssh://HOST/system hosts only"
        )
    return None


def _version(number: int) -> str:
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


def qemu_version(binary: str) -> int | None:
    """``binary --version`` as libvirt numbers versions (major * 1000000 + minor * 1000 +
    micro), or None when it does not say."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
    if found is None:
        return None
    major, minor, micro = (int(x) for x in found.groups())
    return major * 1_000_000 + minor * 1000 + micro


def _converter(conn: libvirt.virConnect, qemu: str) -> tuple[libvirt.virConnect | None, str]:
    """The libvirt connection that converts the domain XML to an argv, and the profile's
    name; (None, why not) when no profile covers ``conn``'s host."""
    uri = conn.getURI()
    if _local_system(uri):
        return conn, "local-qemu"
    try:
        local = libvirt.open(LOCAL_SYSTEM)
    except libvirt.libvirtError as exc:
        return None, (
            f"not predicted on {uri}: the controller converts the domain XML with its own libvirt, and "
            f"{LOCAL_SYSTEM} does not answer here ({libvirt_message(exc)})"
        )
    host = {"libvirt": conn.getLibVersion(), "QEMU": conn.getVersion()}
    mine = {"libvirt": local.getLibVersion(), "QEMU": local.getVersion()}
    own_qemu = qemu_version(qemu)
    if host != mine or own_qemu != host["QEMU"]:
        local.close()
        said = ", ".join(f"{k} {_version(v)}" for k, v in host.items())
        have = ", ".join(f"{k} {_version(v)}" for k, v in mine.items())
        return None, (
            f"not predicted on {uri}: the host reports {said}; this machine has {have} ({qemu}: "
            f"{_version(own_qemu) if own_qemu else 'no version'}). The controller predicts RTMR0 only with its own "
            "libvirt and QEMU of the host's versions: install those here (Debian's packages of the host's release)"
        )
    return local, "same-versions"


def predict(
    conn: libvirt.virConnect,
    domain_xml: str,
    *,
    backend: str,
    firmware: bytes | None,
    files: Mapping[str, str] | None = None,
) -> Rtmr0Pin:
    """RTMR0 of ``domain_xml`` (the XML the controller wrote) booting ``firmware``.
    ``files``: a host path the XML names -> this machine's copy of the same file (the
    image's kernel and initrd, which QEMU reads under qtest; a remote host's pool paths
    are not here).

    Not predicted (``value`` None, ``reason`` why): no profile for the backend or host, no
    firmware or an unknown firmware build, no QEMU here. A prediction that fails once a
    profile applies (libvirt cannot convert the XML, QEMU fails, an argv the extraction
    refuses) raises :class:`LaunchPolicyError`: the launch stops rather than pin nothing.
    """
    problem = profile_problem(conn.getURI(), backend)
    if problem is not None:
        return Rtmr0Pin(None, (), problem)
    if firmware is None:
        return Rtmr0Pin(None, (), "not predicted: the image names no TDVF (build it with firmware: in the recipe)")
    try:
        build = firmware_build(firmware)
    except UnknownFirmwareError as exc:
        return Rtmr0Pin(None, (), f"not predicted: {exc}")
    qemu = controller_qemu()
    if qemu is None:
        return Rtmr0Pin(
            None,
            (),
            f"not predicted: no {QEMU_BINARY} on PATH (apt-get install qemu-system-x86, or set "
            f"{QEMU_ENV} to the QEMU libvirt runs)",
        )
    converter, profile = _converter(conn, qemu)
    if converter is None:
        return Rtmr0Pin(None, (), profile)
    try:
        argv = qemu_argv_for(converter, domain_xml)
        value, events = predict_for_argv(firmware, qemu, argv, tdx=False, path_map=files)
    except PREDICTION_ERRORS as exc:
        raise LaunchPolicyError(
            f"cannot predict RTMR0 (the TD's ACPI tables, SMBIOS and memory layout) for this domain with {qemu}: {exc}"
        ) from None
    finally:
        if converter is not conn:
            with suppress(libvirt.libvirtError):
                converter.close()
    return Rtmr0Pin(value, tuple(events), f"predicted (profile {profile}: {qemu}; firmware {build.name})")


def running_argv(conn: libvirt.virConnect, name: str) -> list[str] | None:
    """The argv of the QEMU libvirt runs for domain ``name``, from its pid file and
    ``/proc``: on this machine's ``qemu:///system`` directly, on a remote
    ``qemu+ssh://HOST/system`` host over the host's SSH session; None elsewhere, when it is
    not running, or when the host does not let it be read."""
    uri = conn.getURI()
    if _local_system(uri):
        read = _read_local
    elif _ssh_system(uri):
        read = sshhost.session(ssh_target(uri)).read_file
    else:
        return None
    for folder in PID_DIRS:
        try:
            pid = int(read(str(folder / f"{name}.pid")).strip())
            return argv_from_cmdline(read(f"/proc/{pid}/cmdline")) or None
        except (OSError, ValueError, HostSshError):
            continue
    return None


def _read_local(path: str) -> bytes:
    return Path(path).read_bytes()


def running_machine(conn: libvirt.virConnect, name: str) -> tuple[list[str] | None, str | None]:
    """``(argv, qemu)`` for the emulated quote service to read a running domain's tables:
    on this machine, the argv of the QEMU libvirt runs and None (run that argv's own
    binary); on a remote host, its argv and the controller's own QEMU (the
    ``same-versions`` profile's copy), or ``(None, None)`` when the controller has none
    (RTMR0 is then not computed). The host's argv names a binary only on this machine:
    on a remote host it is the host's answer, and running it would run what the host
    chose."""
    if _local_system(conn.getURI()):
        return running_argv(conn, name), None
    qemu = controller_qemu()
    if qemu is None:
        return None, None
    return running_argv(conn, name), qemu
