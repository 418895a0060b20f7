"""RTMR0 for the domain a launch defines: predicted from the controller's own domain XML, or why not.

RTMR0 holds what TDVF measures before the kernel (:mod:`tdxvm.image.rtmr0`): the TD HOB
(memory layout), the firmware's variable store, QEMU's fw_cfg boot items, ACPI tables and
SMBIOS table. The host's QEMU builds the last three from the VM's devices, so RTMR0 is
how a quote shows which machine the TD runs in: a device, vCPU or memory the host adds
changes it. The controller computes it itself (:func:`predict`): libvirt's converter
gives the QEMU argv of the XML the controller wrote (never the host's domain), and the
controller's own QEMU runs that argv under qtest (:mod:`tdxvm.image.platforminputs`).

Which QEMU computes the blobs is a profile; only one exists yet:

* ``local-qemu``: emulated guests on this machine's ``qemu:///system``. libvirt runs this
  machine's QEMU, so the controller's copy is that very binary
  (``qemu-system-x86_64`` on ``PATH``, or ``$TDXVM_QEMU``).

Everything else is not predicted, and :attr:`Rtmr0Pin.reason` says why and what it
would take; the policy then lists RTMR0 as unpinned, never a guessed value: the tdx
backend needs the controller's own QEMU >= 10.1 of the host's version, a libvirt that
converts TDX domain XML (>= 11.1) and the host CPU's SMBIOS processor ID; remote hosts
and libvirt's test driver (which runs no QEMU) have no profile yet. A firmware whose
build is not known (:data:`tdxvm.image.rtmr0.KNOWN_FIRMWARE`) is not predicted either.

:func:`running_argv` is the other side, for the emulated quote service: the argv of the
QEMU libvirt actually runs for a domain on this machine (``/proc/PID/cmdline``).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import libvirt

from tdxvm.image.acpiblobs import argv_from_proc, qemu_argv_for
from tdxvm.image.measure import ExpectedEvent
from tdxvm.image.platforminputs import PREDICTION_ERRORS, predict_for_argv
from tdxvm.image.rtmr0 import UnknownFirmwareError, firmware_build
from tdxvm.launch.connection import is_local
from tdxvm.launch.errors import LaunchPolicyError

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


def profile_problem(uri: str, backend: str) -> str | None:
    """Why no RTMR0 profile covers a ``backend`` domain on ``uri``; None when ``local-qemu`` does."""
    if backend != "emulated":
        return (
            "not predicted for the tdx backend yet: that needs the controller's own QEMU >= 10.1 of the host's "
            "version (with the qtest accelerator), a libvirt >= 11.1 that converts TDX domain XML, and the host "
            "CPU's SMBIOS processor ID; pin `rtmr0:` under the VM spec's policy from a known-good boot meanwhile"
        )
    if not _local_system(uri):
        return (
            f"not predicted on {uri}: the controller predicts RTMR0 with its own QEMU only for emulated guests on "
            "this machine's qemu:///system, whose QEMU it is"
        )
    return None


def predict(conn: libvirt.virConnect, domain_xml: str, *, backend: str, firmware: bytes | None) -> Rtmr0Pin:
    """RTMR0 of ``domain_xml`` (the XML the controller wrote) booting ``firmware``.

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
    try:
        argv = qemu_argv_for(conn, domain_xml)
        value, events = predict_for_argv(firmware, qemu, argv, tdx=False)
    except PREDICTION_ERRORS as exc:
        raise LaunchPolicyError(
            f"cannot predict RTMR0 (the TD's ACPI tables, SMBIOS and memory layout) for this domain with {qemu}: {exc}"
        ) from None
    return Rtmr0Pin(value, tuple(events), f"predicted (profile local-qemu: {qemu}; firmware {build.name})")


def running_argv(conn: libvirt.virConnect, name: str) -> list[str] | None:
    """The argv of the QEMU libvirt runs for domain ``name`` on this machine's
    ``qemu:///system`` (from its pid file and ``/proc``); None elsewhere or when it is not running."""
    if not _local_system(conn.getURI()):
        return None
    for folder in PID_DIRS:
        try:
            pid = int((folder / f"{name}.pid").read_text().strip())
            return argv_from_proc(pid)
        except (OSError, ValueError):
            continue
    return None
