"""TDX event logs (CCEL and dstack JSON): parsing and RTMR replay.

Binary form: the TCG2 "crypto-agile" log of the TCG PC Client Platform Firmware Profile
(PFP) specification, version 1.06, as TDVF writes it into the CCEL log area:

* the first event is a legacy ``TCG_PCR_EVENT`` (PFP §10.2.1, SHA-1 format: u32 PCR
  index, u32 event type, 20-byte digest, u32 event size, event data) of type
  ``EV_NO_ACTION`` whose data is the ``TCG_EfiSpecIdEvent`` (PFP §10.4.5.1,
  signature ``"Spec ID Event03"``) listing each hash algorithm and its digest size;
* every later event is a ``TCG_PCR_EVENT2`` (PFP §10.2.2): u32 index, u32 event type,
  ``TPML_DIGEST_VALUES`` (u32 count, then per digest u16 ``TPM_ALG_ID`` and a digest of
  the size the spec-ID event declared), u32 event size, event data;
* after the last event the log area holds padding (0xFF, possibly 0x00) up to LAML.

In CCEL the "PCR index" is a TDX measurement-register index: 0 is MRTD (measured by the
TDX module, never replayed), 1..4 are RTMR0..3. Events of type ``EV_NO_ACTION`` are not
extended. Replay: each RTMR starts as 48 zero bytes and ``RTMR = SHA-384(RTMR ‖ d)`` for
the SHA-384 digest ``d`` of each event, in log order.

JSON form (dstack's ``event_log``): a list of ``{"imr", "event_type", "digest", "event",
"event_payload"}`` where ``imr`` is already the RTMR index. Runtime events
(``event_type`` 0x08000001) are measured as ``SHA-384(u32le(type) ‖ ":" ‖ event ‖ ":" ‖
payload)``; the parser recomputes that digest and refuses a stated one that differs.

Parsers take bytes (or decoded JSON) and return objects; they do no I/O. Every
malformed input raises :class:`~tdxvm.attest.errors.EventLogError` naming the byte
offset (binary) or list index and key (JSON).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tdxvm.attest.errors import EventLogError

# TPM_ALG_ID values (TPM 2.0 Library Part 2, Table 9) and their digest sizes.
ALG_SHA1 = 0x0004
ALG_SHA256 = 0x000B
ALG_SHA384 = 0x000C
ALG_SHA512 = 0x000D
ALG_SM3_256 = 0x0012
ALG_NAMES = {ALG_SHA1: "sha1", ALG_SHA256: "sha256", ALG_SHA384: "sha384", ALG_SHA512: "sha512", ALG_SM3_256: "sm3_256"}
_KNOWN_SIZES = {ALG_SHA1: 20, ALG_SHA256: 32, ALG_SHA384: 48, ALG_SHA512: 64, ALG_SM3_256: 32}

RTMR_SIZE = 48
RTMR_COUNT = 4
SPEC_ID_SIGNATURE = b"Spec ID Event03\x00"

EV_POST_CODE = 0x1
EV_NO_ACTION = 0x3
EV_SEPARATOR = 0x4
EV_ACTION = 0x5
EV_EVENT_TAG = 0x6
EV_S_CRTM_VERSION = 0x8
EV_PLATFORM_CONFIG_FLAGS = 0xA
EV_IPL = 0xD
EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
EV_EFI_VARIABLE_BOOT = 0x80000002
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
EV_EFI_GPT_EVENT = 0x80000006
EV_EFI_ACTION = 0x80000007
EV_EFI_PLATFORM_FIRMWARE_BLOB2 = 0x8000000A
EV_EFI_HANDOFF_TABLES2 = 0x8000000B
EV_EFI_VARIABLE_AUTHORITY = 0x800000E0
EV_RUNTIME_EVENT = 0x08000001  # dstack: runtime measurement into RTMR3

# Tagged-event IDs of the Linux EFI stub (drivers/firmware/efi/libstub/efistub.h).
LINUX_INITRD_TAG_ID = 0x8F3B22EC
LINUX_LOAD_OPTIONS_TAG_ID = 0x8F3B22ED


@dataclass(frozen=True)
class Event:
    """One event of a TDX event log.

    ``index`` is the position in the log (the spec-ID event is 0 in a binary log);
    ``mr_index`` the RTMR the event extends (0..3), or None for MRTD and EV_NO_ACTION
    events; ``offset`` the byte offset of the event in the log (the list index for
    JSON). ``log_mr_index`` is the index as the log records it (CCEL: 0 = MRTD,
    1..4 = RTMR0..3; JSON: ``imr``). ``name`` is the JSON ``event`` field (None for
    binary logs).
    """

    index: int
    mr_index: int | None
    event_type: int
    digests: dict[int, bytes]
    data: bytes
    offset: int
    log_mr_index: int | None = None
    name: str | None = None

    @property
    def sha384(self) -> bytes | None:
        return self.digests.get(ALG_SHA384)


@dataclass(frozen=True)
class SpecIdEvent:
    """The ``TCG_EfiSpecIdEvent`` (PFP §10.4.5.1): log format and digest sizes."""

    platform_class: int
    spec_version: tuple[int, int, int]  # (major, minor, errata)
    uintn_size: int
    digest_sizes: dict[int, int]  # TPM_ALG_ID -> digest size in bytes
    vendor_info: bytes


@dataclass(frozen=True)
class RtmrComparison:
    """A replayed RTMR next to the value the quote reports."""

    index: int
    replayed: bytes
    quoted: bytes
    matches: bool


class _Reader:
    """Bounded little-endian reader whose errors name the byte offset."""

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None, where: str = "") -> None:
        self.data, self.pos, self.where = data, pos, where
        self.end = len(data) if end is None else end

    def take(self, size: int, what: str) -> bytes:
        if self.pos + size > self.end:
            raise EventLogError(
                f"{self.where}{what} at byte offset {self.pos}: needs {size} bytes, only {self.end - self.pos} remain"
            )
        out = self.data[self.pos : self.pos + size]
        self.pos += size
        return out

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return int.from_bytes(self.take(2, what), "little")

    def u32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what), "little")


def _fill_starts(data: bytes) -> int:
    """Where the 0xFF/0x00 fill (the unused log area) that ends ``data`` begins."""
    return len(data.rstrip(b"\x00\xff"))


def parse_spec_id_event(data: bytes) -> SpecIdEvent:
    """Parse the data of the first event, ``TCG_EfiSpecIdEvent`` (PFP §10.4.5.1)."""
    raw = bytes(data)
    return _parse_spec_id(_Reader(raw, 0, len(raw), "Spec ID event: "))


def _parse_spec_id(r: _Reader) -> SpecIdEvent:
    """Parse ``TCG_EfiSpecIdEvent`` from ``r`` (bounded to the event data)."""

    def fail(msg: str, at: int) -> EventLogError:
        return EventLogError(f"{r.where}{msg} at byte offset {at}")

    start = r.pos
    if r.take(16, "signature") != SPEC_ID_SIGNATURE:
        raise fail('signature is not "Spec ID Event03" (not a crypto-agile TCG2 log)', start)
    platform_class = r.u32("platformClass")
    minor, major, errata = r.u8("specVersionMinor"), r.u8("specVersionMajor"), r.u8("specErrata")
    uintn = r.u8("uintnSize")
    count_at = r.pos
    count = r.u32("numberOfAlgorithms")
    if count == 0 or count * 4 > r.end - r.pos:
        raise fail(f"numberOfAlgorithms {count} does not fit the event", count_at)
    sizes: dict[int, int] = {}
    for _ in range(count):
        at = r.pos
        alg, size = r.u16("algorithmId"), r.u16("digestSize")
        if alg in sizes:
            raise fail(f"algorithm {alg:#06x} listed twice", at)
        if size == 0 or _KNOWN_SIZES.get(alg, size) != size:
            raise fail(f"algorithm {alg:#06x} declared with digest size {size}", at)
        sizes[alg] = size
    vendor = r.take(r.u8("vendorInfoSize"), "vendorInfo")
    return SpecIdEvent(platform_class, (major, minor, errata), uintn, sizes, vendor)


def _mr_of(log_index: int, event_type: int, where: str, at: int) -> int | None:
    """Map a CCEL MR index to an RTMR index (None: MRTD or not extended)."""
    if event_type == EV_NO_ACTION:
        return None
    if not 0 <= log_index <= RTMR_COUNT:
        raise EventLogError(
            f"{where}MR index {log_index} at byte offset {at} is out of range (0 = MRTD, 1..4 = RTMR0..3)"
        )
    return None if log_index == 0 else log_index - 1


def parse_tcg_event_log(data: bytes | bytearray | memoryview) -> list[Event]:
    """Parse a TCG2 crypto-agile event log (the CCEL log area) into events.

    The spec-ID event is returned as event 0 (type EV_NO_ACTION, its SHA-1 digest
    field as the only digest). Parsing stops cleanly where the rest of the data is
    0xFF/0x00 padding; anything else that does not parse is an
    :class:`EventLogError` naming the event and the byte offset.
    """
    raw = bytes(data)
    end = _fill_starts(raw)  # once: the events stop where the fill begins
    if end == 0:
        raise EventLogError("event log at byte offset 0: empty (no Spec ID event)")
    # Legacy TCG_PCR_EVENT (PFP §10.2.1) carrying TCG_EfiSpecIdEvent.
    r = _Reader(raw, where="event 0 (Spec ID event, at byte offset 0): ")
    pcr0, type0 = r.u32("PCR index"), r.u32("event type")
    sha1 = r.take(20, "SHA-1 digest")
    size_at = r.pos
    size0 = r.u32("event size")
    if type0 != EV_NO_ACTION:
        raise EventLogError(
            f"{r.where}event type {type0:#x} at byte offset 4, expected EV_NO_ACTION (not a crypto-agile TCG2 log)"
        )
    if size0 > r.end - r.pos:
        raise EventLogError(
            f"{r.where}event size {size0} at byte offset {size_at} runs past the end ({len(raw)} bytes)"
        )
    spec = _parse_spec_id(_Reader(raw, r.pos, r.pos + size0, r.where))
    events = [Event(0, None, EV_NO_ACTION, {ALG_SHA1: sha1}, r.take(size0, "event data"), 0, pcr0)]

    max_count = len(spec.digest_sizes)
    while r.pos < end:
        # TCG_PCR_EVENT2 (PFP §10.2.2).
        start, n = r.pos, len(events)
        r.where = f"event {n} (at byte offset {start}): "
        log_index, etype = r.u32("MR index"), r.u32("event type")
        mr = _mr_of(log_index, etype, r.where, start)
        count_at = r.pos
        count = r.u32("digest count")
        if not 1 <= count <= max_count:
            raise EventLogError(
                f"{r.where}digest count {count} at byte offset {count_at} is not in 1..{max_count} "
                "(the algorithms the Spec ID event declares)"
            )
        digests: dict[int, bytes] = {}
        for _ in range(count):
            alg_at = r.pos
            alg = r.u16("digest algorithm")
            if alg not in spec.digest_sizes:
                raise EventLogError(
                    f"{r.where}digest algorithm {alg:#06x} at byte offset {alg_at} has no size in the Spec ID event"
                )
            if alg in digests:
                raise EventLogError(f"{r.where}digest algorithm {alg:#06x} at byte offset {alg_at} appears twice")
            digests[alg] = r.take(spec.digest_sizes[alg], f"{ALG_NAMES.get(alg, hex(alg))} digest")
        size_at = r.pos
        size = r.u32("event size")
        if size > r.end - r.pos:
            raise EventLogError(
                f"{r.where}event size {size} at byte offset {size_at} runs past the end of the log "
                f"({r.end - r.pos} bytes remain)"
            )
        if mr is not None and ALG_SHA384 not in digests:
            raise EventLogError(
                f"{r.where}extends RTMR{mr} but has no SHA-384 digest (digests at byte offset {count_at})"
            )
        events.append(Event(n, mr, etype, digests, r.take(size, "event data"), start, log_index))
    return events


def _json_fail(i: int, key: str | None, msg: str) -> EventLogError:
    where = f"event_log[{i}]" + (f".{key}" if key else "")
    return EventLogError(f"{where}: {msg}")


def _json_int(entry: dict, i: int, key: str, lo: int, hi: int) -> int:
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _json_fail(i, key, f"expected an integer in {lo}..{hi}, got {_short(value)}")
    return value


def _json_hex(entry: dict, i: int, key: str) -> bytes:
    value = entry.get(key, "")
    if not isinstance(value, str):
        raise _json_fail(i, key, f"expected a hex string, got {type(value).__name__}")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise _json_fail(i, key, f"not hex: {_short(value)}") from None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def runtime_event_digest(name: str | bytes, payload: bytes, event_type: int = EV_RUNTIME_EVENT) -> bytes:
    """dstack's runtime measurement: SHA-384(u32le(type) ‖ ":" ‖ name ‖ ":" ‖ payload)."""
    name_b = name.encode() if isinstance(name, str) else name
    return hashlib.sha384(struct.pack("<I", event_type) + b":" + name_b + b":" + payload).digest()


def parse_json_event_log(obj: list | dict | str | bytes) -> list[Event]:
    """Parse dstack's JSON event log (a list, or its JSON text) into events.

    A dict with an ``event_log`` key (dstack's GetQuote response) is also accepted.
    ``imr`` is the RTMR index (0..3). A runtime event's digest is recomputed from its
    name and payload; an empty stated digest is filled in, a different one is an
    :class:`EventLogError` naming the list index and key.
    """
    doc: object = _json_loads(obj) if isinstance(obj, (str, bytes, bytearray)) else obj
    if isinstance(doc, dict) and "event_log" in doc:
        doc = doc["event_log"]
        if isinstance(doc, (str, bytes, bytearray)):
            doc = _json_loads(doc)
    if not isinstance(doc, list):
        raise EventLogError(f"event_log: expected a JSON list of events, got {type(doc).__name__}")
    events = []
    for i, entry in enumerate(doc):
        if not isinstance(entry, dict):
            raise _json_fail(i, None, f"expected an object, got {type(entry).__name__}")
        etype = _json_int(entry, i, "event_type", 0, 0xFFFFFFFF)
        imr = _json_int(entry, i, "imr", 0, RTMR_COUNT - 1)
        name = entry.get("event", "")
        if not isinstance(name, str):
            raise _json_fail(i, "event", f"expected a string, got {type(name).__name__}")
        try:
            name.encode()
        except UnicodeEncodeError:
            raise _json_fail(i, "event", f"not valid Unicode text: {_short(name)}") from None
        payload = _json_hex(entry, i, "event_payload")
        digest = _json_hex(entry, i, "digest")
        if etype == EV_RUNTIME_EVENT:
            computed = runtime_event_digest(name, payload, etype)
            if digest and digest != computed:
                raise _json_fail(
                    i,
                    "digest",
                    f"runtime event {_short(name)}: stated digest {digest.hex()} but SHA-384 of its type, "
                    f"name and payload is {computed.hex()}",
                )
            digest = computed
        elif len(digest) != RTMR_SIZE and etype != EV_NO_ACTION:
            raise _json_fail(i, "digest", f"expected a {RTMR_SIZE}-byte SHA-384 digest, got {len(digest)} bytes")
        mr = None if etype == EV_NO_ACTION else imr
        events.append(Event(i, mr, etype, {ALG_SHA384: digest}, payload, i, imr, name))
    return events


def _json_loads(text: str | bytes | bytearray) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise EventLogError(f"event log JSON at character offset {err.pos}: {err.msg}") from None
    except UnicodeDecodeError as err:
        raise EventLogError(f"event log JSON at byte offset {err.start}: not UTF-8/16/32 text") from None
    except (ValueError, RecursionError) as err:  # e.g. an integer too long, absurd nesting
        raise EventLogError(f"event log JSON: {err}") from None


def replay(events: Iterable[Event]) -> tuple[bytes, bytes, bytes, bytes]:
    """Replay the events: RTMRn = SHA-384(RTMRn ‖ SHA-384 digest) from 48 zero bytes."""
    rtmrs = [bytes(RTMR_SIZE)] * RTMR_COUNT
    for ev in events:
        if ev.mr_index is None or ev.event_type == EV_NO_ACTION:
            continue
        where = f"event {ev.index} at byte offset {ev.offset}"
        if not 0 <= ev.mr_index < RTMR_COUNT:
            raise EventLogError(f"{where}: RTMR index {ev.mr_index} out of range 0..3")
        digest = ev.digests.get(ALG_SHA384)
        if digest is None or len(digest) != RTMR_SIZE:
            raise EventLogError(f"{where}: no 48-byte SHA-384 digest to extend")
        rtmrs[ev.mr_index] = hashlib.sha384(rtmrs[ev.mr_index] + digest).digest()
    return (rtmrs[0], rtmrs[1], rtmrs[2], rtmrs[3])


def compare_rtmrs(replayed: Sequence[bytes], quoted_rtmrs: Sequence[bytes]) -> list[RtmrComparison]:
    """Compare all four replayed RTMRs with the quote's (``quote.body.rtmrs``)."""
    if len(replayed) != RTMR_COUNT or len(quoted_rtmrs) != RTMR_COUNT:
        raise EventLogError(f"expected {RTMR_COUNT} RTMR values, got {len(replayed)} and {len(quoted_rtmrs)}")
    return [
        RtmrComparison(i, bytes(a), bytes(b), bytes(a) == bytes(b))
        for i, (a, b) in enumerate(zip(replayed, quoted_rtmrs, strict=True))
    ]
