"""Human-readable views of TDX event-log events: type names, tagged events, text.

Kept apart from :mod:`tdxvm.attest.eventlog` (parsing and replay), which does not need
any of this to compute RTMRs.
"""

from __future__ import annotations

import struct

from tdxvm.attest.eventlog import (
    EV_ACTION,
    EV_EFI_ACTION,
    EV_EVENT_TAG,
    EV_IPL,
    EV_NO_ACTION,
    EV_PLATFORM_CONFIG_FLAGS,
    EV_POST_CODE,
    EV_RUNTIME_EVENT,
    EV_S_CRTM_VERSION,
    Event,
)

# Event types (PFP, "Event Types" table), plus dstack's runtime event (not a TCG type).
EVENT_TYPE_NAMES = {
    0x0: "EV_PREBOOT_CERT",
    0x1: "EV_POST_CODE",
    0x3: "EV_NO_ACTION",
    0x4: "EV_SEPARATOR",
    0x5: "EV_ACTION",
    0x6: "EV_EVENT_TAG",
    0x7: "EV_S_CRTM_CONTENTS",
    0x8: "EV_S_CRTM_VERSION",
    0x9: "EV_CPU_MICROCODE",
    0xA: "EV_PLATFORM_CONFIG_FLAGS",
    0xB: "EV_TABLE_OF_DEVICES",
    0xC: "EV_COMPACT_HASH",
    0xD: "EV_IPL",
    0xE: "EV_IPL_PARTITION_DATA",
    0xF: "EV_NONHOST_CODE",
    0x10: "EV_NONHOST_CONFIG",
    0x11: "EV_NONHOST_INFO",
    0x12: "EV_OMIT_BOOT_DEVICE_EVENTS",
    0x13: "EV_POST_CODE2",
    0x80000001: "EV_EFI_VARIABLE_DRIVER_CONFIG",
    0x80000002: "EV_EFI_VARIABLE_BOOT",
    0x80000003: "EV_EFI_BOOT_SERVICES_APPLICATION",
    0x80000004: "EV_EFI_BOOT_SERVICES_DRIVER",
    0x80000005: "EV_EFI_RUNTIME_SERVICES_DRIVER",
    0x80000006: "EV_EFI_GPT_EVENT",
    0x80000007: "EV_EFI_ACTION",
    0x80000008: "EV_EFI_PLATFORM_FIRMWARE_BLOB",
    0x80000009: "EV_EFI_HANDOFF_TABLES",
    0x8000000A: "EV_EFI_PLATFORM_FIRMWARE_BLOB2",
    0x8000000B: "EV_EFI_HANDOFF_TABLES2",
    0x8000000C: "EV_EFI_VARIABLE_BOOT2",
    0x8000000D: "EV_EFI_GPT_EVENT2",
    0x80000010: "EV_EFI_HCRTM_EVENT",
    0x800000E0: "EV_EFI_VARIABLE_AUTHORITY",
    0x800000E1: "EV_EFI_SPDM_FIRMWARE_BLOB",
    0x800000E2: "EV_EFI_SPDM_FIRMWARE_CONFIG",
    0x08000001: "EV_RUNTIME_EVENT",
}


def event_type_name(event_type: int) -> str:
    """``EV_*`` name of an event type, or its hex value when unknown."""
    return EVENT_TYPE_NAMES.get(event_type, f"{event_type:#x}")


def tagged_event(event: Event) -> tuple[int, bytes] | None:
    """(taggedEventID, taggedEventData) of an EV_EVENT_TAG event (PFP's
    ``TCG_PCClientTaggedEvent``), or None when the data does not have that shape."""
    if event.event_type != EV_EVENT_TAG or len(event.data) < 8:
        return None
    tag, size = struct.unpack_from("<II", event.data)
    if size > len(event.data) - 8:
        return None
    return tag, event.data[8 : 8 + size]


def _decode_text(data: bytes) -> str | None:
    """Decode UTF-16LE or ASCII/UTF-8 text (NUL-terminated or not); None if not text."""
    if not data:
        return None
    candidates = []
    if len(data) >= 2 and len(data) % 2 == 0 and data[1] == 0:
        candidates.append("utf-16-le")
    candidates.append("utf-8")
    for enc in candidates:
        try:
            text = data.decode(enc).rstrip("\x00")
        except UnicodeDecodeError:
            continue
        if text and all(c.isprintable() or c in "\t\r\n" for c in text):
            return text
    return None


_TEXT_TYPES = {EV_IPL, EV_ACTION, EV_EFI_ACTION, EV_S_CRTM_VERSION, EV_POST_CODE, EV_PLATFORM_CONFIG_FLAGS}


def event_text(event: Event) -> str | None:
    """The text an event carries, where it carries text; otherwise None.

    EV_EVENT_TAG: the tagged data decoded (the Linux EFI stub tags the initrd and the
    load options with ``LINUX_INITRD_TAG_ID`` / ``LINUX_LOAD_OPTIONS_TAG_ID``);
    EV_IPL, EV_ACTION, EV_EFI_ACTION and similar: the data as UTF-16LE or UTF-8 text;
    dstack runtime events: ``name: payload`` (the payload as text when it is text).
    """
    if event.event_type == EV_EVENT_TAG:
        tagged = tagged_event(event)
        return _decode_text(tagged[1]) if tagged else _decode_text(event.data)
    if event.event_type == EV_RUNTIME_EVENT and event.name is not None:
        payload = _decode_text(event.data) if event.data else ""
        return f"{event.name}: {payload if payload is not None else event.data.hex()}"
    if event.event_type in _TEXT_TYPES:
        return _decode_text(event.data)
    return None


def describe_event(event: Event) -> str:
    """One line for humans: register, type name and value, and the text if any."""
    if event.mr_index is not None:
        reg = f"RTMR{event.mr_index}"
    elif event.event_type == EV_NO_ACTION:
        reg = "-"
    else:
        reg = "MRTD"
    line = f"#{event.index} {reg} {event_type_name(event.event_type)} ({event.event_type:#x})"
    tagged = tagged_event(event)
    if tagged:
        line += f" tag {tagged[0]:#x}"
    text = event_text(event)
    return f"{line} {text!r}" if text is not None else line
