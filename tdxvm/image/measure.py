"""Predicted TDX measurements of a TD that TDVF boots straight into a Linux kernel.

What lands in each register, for QEMU's direct kernel boot (``-kernel/-initrd/-append``
through fw_cfg) and edk2's TDVF (``OvmfPkg/IntelTdx``):

* **MRTD**: the TDX module's hash of the TDVF pages QEMU adds before the TD starts
  (:mod:`tdxvm.image.tdvf`).
* **RTMR1** (CC MR index 2, PCR 4/5), in order: ``EV_EFI_BOOT_SERVICES_APPLICATION``
  with the kernel's PE/COFF Authenticode SHA-384 (``LoadImage`` measures it before
  ReadyToBoot; ``OvmfPkg/Library/PlatformBootManagerLib/QemuKernel.c``), then at
  ReadyToBoot ``EV_EFI_ACTION "Calling EFI Application from Boot Option"`` and an
  ``EV_SEPARATOR`` (``OvmfPkg/Tcg/TdTcg2Dxe/TdTcg2Dxe.c``, OnReadyToBoot), then at
  ExitBootServices ``EV_EFI_ACTION "Exit Boot Services Invocation"`` and
  ``"Exit Boot Services Returned with Success"``. EV_EFI_ACTION digests are SHA-384 of
  the ASCII text (no NUL), the separator's of four zero bytes (TCG PC Client PFP,
  event types EV_EFI_ACTION and EV_SEPARATOR).
* **RTMR2** (PCR 9): the Linux EFI stub's two ``EV_EVENT_TAG`` events
  (``drivers/firmware/efi/libstub/efi-stub-helper.c``): first the LoadOptions (tag
  0x8F3B22ED; digest SHA-384 of the UCS-2 load options exactly as the firmware hands
  them over, NUL included), then the initrd (tag 0x8F3B22EC; SHA-384 of its bytes). The
  load options are QEMU's command line with ``initrd=initrd`` added by
  ``X86QemuLoadImageLib`` when there is an initrd: prefixed since edk2-stable202508,
  appended before. Only a stub that knows the CC measurement protocol measures in a
  TD (mainline 6.9, "efi/libstub: Measure into CC protocol if TCG2 protocol is
  absent"); an older stub measures nothing there and RTMR2 stays zero, leaving the
  command line and initrd unmeasured. :func:`efi_stub_measures_cc` tells them apart by
  the protocol GUIDs in the image; :func:`require_measuring_kernel` refuses such a kernel
  (``tdxvm image build`` calls it, and a launch refuses a manifest that records one).
* **RTMR0** is not predicted: it holds the TD HOB (memory layout), the CFV variable
  store, QEMU's ACPI tables and the boot variables. **RTMR3** is not extended by the
  firmware; guest software may extend it at run time.

Each register replays as ``RTMR = SHA-384(RTMR ‖ digest)`` from 48 zero bytes. What
the host stack adds differs between QEMU and edk2 versions; :data:`PROFILES` names the
known combinations. ``docs/measurements.md`` gives the evidence behind every rule.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from tdxvm.image import authenticode, tdvf
from tdxvm.image.measureerrors import MeasureError, UnmeasuredKernelError

REGISTERS = ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3")
RTMR_SIZE = 48

EV_SEPARATOR = 0x4
EV_EVENT_TAG = 0x6
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
EV_EFI_ACTION = 0x80000007
CALLING_EFI_APPLICATION = b"Calling EFI Application from Boot Option"
EXIT_BOOT_SERVICES_INVOCATION = b"Exit Boot Services Invocation"
EXIT_BOOT_SERVICES_SUCCEEDED = b"Exit Boot Services Returned with Success"
SEPARATOR_DATA = b"\x00\x00\x00\x00"
LINUX_INITRD_TAG_ID = 0x8F3B22EC
LINUX_LOAD_OPTIONS_TAG_ID = 0x8F3B22ED
EFI_CC_MEASUREMENT_PROTOCOL_GUID = uuid.UUID("96751a3d-72f4-41a6-a794-ed5d0e67ae6b")
EFI_TCG2_PROTOCOL_GUID = uuid.UUID("607f766c-7455-42be-930b-e4d76db2720f")


# What to do about such a kernel, in the words of a recipe (images/*.yaml).
MEASURING_KERNEL_FIX = (
    "use a Linux >= 6.9 kernel, e.g. `kernel: {package: linux-image-cloud-amd64, suite: "
    "bookworm-backports}` in the recipe"
)


@dataclass(frozen=True)
class Profile:
    """What the host stack (QEMU, KVM, edk2) adds to the measurements.

    ``mrtd_order``: ``single-pass`` adds and extends each page in turn (upstream KVM);
    ``two-pass`` adds a section's pages, then extends them (QEMU 8.x TDX branches).
    ``initrd_option``: where ``X86QemuLoadImageLib`` puts ``initrd=initrd``.
    ``kernel_as_file``: the firmware measures the kernel file unchanged; False where
    QEMU patches the setup header with memory-dependent values first.
    """

    name: str
    description: str
    mrtd_order: Literal["single-pass", "two-pass"]
    initrd_option: Literal["prefix", "append"]
    kernel_as_file: bool


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            "upstream",
            "QEMU >= 10.1 and KVM >= 6.16 (upstream TDX) with edk2 >= stable202508, e.g. Debian's "
            "ovmf-inteltdx 2026.08",
            "single-pass",
            "prefix",
            True,
        ),
        Profile("edk2-202505", "QEMU >= 10.1 with edk2-stable202505", "single-pass", "append", True),
        Profile("qemu9", "QEMU 9.x TDX builds with edk2 <= stable202502", "single-pass", "append", False),
        Profile(
            "qemu8", "QEMU 8.x TDX builds with edk2 <= stable202502 (e.g. dstack <= 0.6)", "two-pass", "append", False
        ),
    )
}
DEFAULT_PROFILE = "upstream"


@dataclass(frozen=True)
class ExpectedEvent:
    """One event the firmware or the EFI stub logs and extends (hex SHA-384 digest)."""

    register: str
    event_type: int
    digest: str
    what: str


@dataclass(frozen=True)
class Measurements:
    """Predicted MRTD and RTMR0..3 (hex), None where not predicted; ``notes`` says why."""

    mrtd: str | None
    rtmr0: str | None
    rtmr1: str | None
    rtmr2: str | None
    rtmr3: str | None
    predicted: dict[str, bool]
    notes: dict[str, str]
    profile: str
    events: tuple[ExpectedEvent, ...] = ()
    inputs: dict[str, str] = field(default_factory=dict)

    def value(self, register: str) -> str | None:
        return {"mrtd": self.mrtd, "rtmr0": self.rtmr0, "rtmr1": self.rtmr1, "rtmr2": self.rtmr2, "rtmr3": self.rtmr3}[
            register
        ]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the build manifest's ``measurements`` section)."""
        return {
            "profile": self.profile,
            **{r: self.value(r) for r in REGISTERS},
            "predicted": dict(self.predicted),
            "notes": dict(self.notes),
            "inputs": dict(self.inputs),
            "events": [
                {"register": e.register, "event_type": e.event_type, "digest": e.digest, "what": e.what}
                for e in self.events
            ],
        }


def sha384(data: bytes) -> bytes:
    return hashlib.sha384(data).digest()


def replay(digests: Iterable[bytes]) -> bytes:
    """Extend a 48-byte zero register with each digest in turn (TDG.MR.RTMR.EXTEND)."""
    value = bytes(RTMR_SIZE)
    for d in digests:
        if len(d) != RTMR_SIZE:
            raise ValueError(f"RTMR digests are {RTMR_SIZE} bytes, got {len(d)}")
        value = sha384(value + d)
    return value


def load_options(cmdline: str, *, has_initrd: bool, initrd_option: str = "prefix") -> bytes:
    """The kernel's LoadOptions as ``X86QemuLoadImageLib`` builds them (UCS-2, NUL-terminated).

    QEMU hands over the command line's bytes; each byte becomes one CHAR16
    (``UnicodeSPrintAsciiFormat``). Empty options (no command line, no initrd) are
    NULL, which the stub does not measure: the result is then ``b""``.
    """
    raw = cmdline.encode("utf-8", "surrogateescape")  # a command-line argument's bytes as they were given
    if b"\x00" in raw:
        raise MeasureError(
            "kernel command line contains a NUL byte (QEMU would cut it there)",
            code="cmdline",
            offset=raw.index(b"\x00"),
        )
    if has_initrd:
        raw = b"initrd=initrd " + raw if initrd_option == "prefix" else raw + b" initrd=initrd"
    if not raw:
        return b""
    return raw.decode("latin-1").encode("utf-16-le") + b"\x00\x00"


def _has_guid(image: bytes, guid: uuid.UUID) -> bool:
    # Compilers build an on-stack efi_guid_t from 8- or 4-byte immediates or copy it
    # from .rodata; either way each 4-byte quarter appears in the image.
    raw = guid.bytes_le
    return all(raw[i : i + 4] in image for i in range(0, 16, 4))


def efi_stub_measures_cc(kernel: bytes) -> bool | None:
    """Whether the kernel's EFI stub can measure through EFI_CC_MEASUREMENT_PROTOCOL.

    True: the CC protocol GUID is in the image. False: only the TCG2 protocol GUID is
    (a pre-6.9 stub, which measures nothing in a TD). None: neither was found.
    """
    if _has_guid(kernel, EFI_CC_MEASUREMENT_PROTOCOL_GUID):
        return True
    return False if _has_guid(kernel, EFI_TCG2_PROTOCOL_GUID) else None


StubVerdict = Literal["yes", "no", "unknown"]
_VERDICTS: dict[bool | None, StubVerdict] = {True: "yes", False: "no", None: "unknown"}


def efi_stub_verdict(kernel: bytes) -> StubVerdict:
    """:func:`efi_stub_measures_cc` as the manifest records it (``efi_stub_cc_measurement``)."""
    return _VERDICTS[efi_stub_measures_cc(kernel)]


def require_measuring_kernel(kernel: bytes, *, source: str = "kernel") -> None:
    """Refuse (:class:`UnmeasuredKernelError`) a kernel whose EFI stub does not measure
    the command line and initrd into RTMR2, or whose stub cannot be recognised.

    Such a kernel boots with RTMR2 = 0 whatever command line and initrd the host passes:
    pinning that zero would let the host choose both. ``source`` names the kernel in the
    message (a path, or the rootfs file it came from).
    """
    verdict = efi_stub_verdict(kernel)
    if verdict == "yes":
        return
    if verdict == "no":
        why = (
            "its EFI stub predates CC measurement (Linux < 6.9: only the TPM's TCG2 protocol GUID is in the "
            "image), so in a TD it measures nothing"
        )
    else:
        why = (
            "its EFI stub cannot be told to measure in a TD (neither the CC measurement nor the TCG2 protocol "
            "GUID is in the image)"
        )
    raise UnmeasuredKernelError(
        f"{source}: {why}: RTMR2 would stay zero and the command line and initrd would not "
        "be covered by the quote, so the host could replace them unnoticed; "
        f"{MEASURING_KERNEL_FIX}"
    )


def rtmr1_events(kernel_authenticode: bytes) -> list[ExpectedEvent]:
    """RTMR1 of a direct kernel boot, given the kernel's Authenticode SHA-384."""
    return [
        ExpectedEvent(
            "rtmr1",
            EV_EFI_BOOT_SERVICES_APPLICATION,
            kernel_authenticode.hex(),
            "kernel image (PE/COFF Authenticode SHA-384)",
        ),
        ExpectedEvent("rtmr1", EV_EFI_ACTION, sha384(CALLING_EFI_APPLICATION).hex(), CALLING_EFI_APPLICATION.decode()),
        ExpectedEvent("rtmr1", EV_SEPARATOR, sha384(SEPARATOR_DATA).hex(), "separator"),
        ExpectedEvent(
            "rtmr1", EV_EFI_ACTION, sha384(EXIT_BOOT_SERVICES_INVOCATION).hex(), EXIT_BOOT_SERVICES_INVOCATION.decode()
        ),
        ExpectedEvent(
            "rtmr1", EV_EFI_ACTION, sha384(EXIT_BOOT_SERVICES_SUCCEEDED).hex(), EXIT_BOOT_SERVICES_SUCCEEDED.decode()
        ),
    ]


def rtmr2_events(options: bytes, initrd: bytes) -> list[ExpectedEvent]:
    """RTMR2 from the Linux EFI stub: LoadOptions first (when any), then the initrd (when any)."""
    events = []
    if options:
        events.append(
            ExpectedEvent(
                "rtmr2",
                EV_EVENT_TAG,
                sha384(options).hex(),
                f"LOADED_IMAGE::LoadOptions (tag {LINUX_LOAD_OPTIONS_TAG_ID:#x})",
            )
        )
    if initrd:
        events.append(
            ExpectedEvent("rtmr2", EV_EVENT_TAG, sha384(initrd).hex(), f"Linux initrd (tag {LINUX_INITRD_TAG_ID:#x})")
        )
    return events


def _replay_hex(events: list[ExpectedEvent]) -> str:
    return replay(bytes.fromhex(e.digest) for e in events).hex()


def predict(
    *, firmware: bytes | None, kernel: bytes, initrd: bytes, cmdline: str, profile: str | Profile = DEFAULT_PROFILE
) -> Measurements:
    """Predict MRTD and RTMR0..3 for a direct kernel boot under ``profile``.

    ``firmware`` is the TDVF image (None: MRTD is not predicted); ``initrd`` may be
    empty (no ``-initrd``). Unusable input raises :class:`MeasureError` with the offset.
    """
    prof = profile if isinstance(profile, Profile) else _profile(profile)
    values: dict[str, str | None] = dict.fromkeys(REGISTERS)
    notes = {
        "rtmr0": "not predicted: holds the TD HOB (memory layout), the firmware's variable store and QEMU's "
        "ACPI tables and boot variables",
        "rtmr3": "not predicted: the firmware never extends it; guest software may at run time",
    }
    inputs = {
        "kernel_sha256": hashlib.sha256(kernel).hexdigest(),
        "initrd_sha256": hashlib.sha256(initrd).hexdigest() if initrd else "",
    }
    if firmware is None:
        notes["mrtd"] = "not predicted: no firmware given"
    else:
        inputs["firmware_sha256"] = hashlib.sha256(firmware).hexdigest()
        values["mrtd"] = tdvf.mrtd(firmware, order=prof.mrtd_order).hex()
        notes["mrtd"] = f"TDVF metadata sections, {prof.mrtd_order} page add/extend"

    kernel_digest = authenticode.authenticode_digest(kernel, "sha384")
    inputs["kernel_authenticode_sha384"] = kernel_digest.hex()
    events: list[ExpectedEvent] = []
    if prof.kernel_as_file:
        events += rtmr1_events(kernel_digest)
        values["rtmr1"] = _replay_hex(events)
        notes["rtmr1"] = "kernel Authenticode, boot-option action, separator, ExitBootServices actions"
    else:
        notes["rtmr1"] = (
            "not predicted: this QEMU patches the kernel's setup header (initrd address from the "
            "guest memory size) before the firmware measures it"
        )

    options = load_options(cmdline, has_initrd=bool(initrd), initrd_option=prof.initrd_option)
    inputs["load_options_sha384"] = sha384(options).hex() if options else ""
    stub = efi_stub_measures_cc(kernel)
    inputs["efi_stub_cc_measurement"] = _VERDICTS[stub]
    if stub is None:
        notes["rtmr2"] = (
            "not predicted: cannot tell whether the kernel's EFI stub measures into RTMRs (neither the "
            "CC measurement nor the TCG2 protocol GUID is in the image)"
        )
    elif not stub:
        values["rtmr2"] = replay([]).hex()
        notes["rtmr2"] = (
            "zero: this kernel's EFI stub predates CC measurement (Linux < 6.9), so the command line "
            "and initrd are NOT measured"
        )
    else:
        tagged = rtmr2_events(options, initrd)
        events += tagged
        values["rtmr2"] = _replay_hex(tagged)
        notes["rtmr2"] = "Linux EFI stub: load options (UCS-2), then initrd"
    predicted = {r: values[r] is not None for r in REGISTERS}
    return Measurements(
        values["mrtd"],
        values["rtmr0"],
        values["rtmr1"],
        values["rtmr2"],
        values["rtmr3"],
        predicted,
        {r: notes[r] for r in REGISTERS},
        prof.name,
        tuple(events),
        inputs,
    )


def _profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise MeasureError(f"unknown profile {name!r} (known: {', '.join(PROFILES)})", code="profile") from None
