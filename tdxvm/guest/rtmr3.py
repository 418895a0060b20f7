"""The guest's RTMR3 event log, and measuring the served model into RTMR3.

Before the inference service serves, it extends RTMR3 with one *model event* naming
what it is about to serve, and keeps every event it extended in a JSON log that
``GET /v1/attestation`` returns with the quote. Each event has dstack's runtime-event
form, which :func:`tdxvm.attest.eventlog.parse_json_event_log` parses::

    {"imr": 3, "event_type": 134217729 (0x08000001), "event": "tdxvm.model",
     "event_payload": "<hex>", "digest": "<96 hex>"}

    digest  = SHA-384(u32 LE event_type ‖ ":" ‖ event ‖ ":" ‖ payload)
    RTMR3   = SHA-384(RTMR3 ‖ digest), from 48 zero bytes, for each event in order

The model event's payload is canonical JSON (sorted keys, no spaces)::

    {"digest":"sha256:<model digest>","dtype":"float32","name":"<served name>","quantization":"none"}

where the model digest is that of the bytes the service loads (the model folder's digest,
:mod:`tdxvm.guest.modeldigest`, taken as the service copies the folder into the TD's
memory, from where it loads it: :mod:`tdxvm.guest.inmemory`). A client replays the log, compares the
result with the quote's RTMR3 and reads the *latest* model event (the log keeps the
history of a TD that served several models).

:func:`measure` does the extend under a lock file beside the log. The log is written
(atomically) before the register is extended; a later run that finds the register one
event behind the log (interrupted between the two) extends that event, and a register
the log does not explain at all is refused. Measuring what the latest model event
already names does nothing: re-provisioning the same model, or restarting the service,
adds no event. The log lives under ``/run`` (TD memory), so a reboot clears it with
RTMR3.

Providers (:mod:`tdxvm.guest.tdquote`) have ``extend_rtmr(index, digest)`` and
``read_rtmr(index)``. Standard library only: this runs in the guest.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tdxvm.errors import TdxvmError
from tdxvm.fileio import lock_exclusive, write_atomic
from tdxvm.guest.modeldigest import show

RTMR_INDEX = 3
RTMR_SIZE = 48
EV_RUNTIME_EVENT = 0x08000001  # dstack's runtime event type (tdxvm.attest.eventlog.EV_RUNTIME_EVENT)
MODEL_EVENT = "tdxvm.model"
DEFAULT_LOG = Path("/run/tdxvm/rtmr3.json")
LOCK_TIMEOUT = 60.0
QUANTIZATION_NONE = "none"
MAX_LOG_BYTES = 1 << 20


class Rtmr3Error(TdxvmError):
    """RTMR3 could not be measured, or the log does not explain it; the service must not serve."""

    code = "rtmr3"


class Extender(Protocol):
    """What measures: a quote provider that can extend and read an RTMR."""

    name: str

    def extend_rtmr(self, index: int, digest: bytes) -> None: ...

    def read_rtmr(self, index: int) -> bytes: ...


def event_digest(name: str, payload: bytes, event_type: int = EV_RUNTIME_EVENT) -> bytes:
    """SHA-384(u32le(type) ‖ ":" ‖ name ‖ ":" ‖ payload): what one runtime event extends."""
    return hashlib.sha384(struct.pack("<I", event_type) + b":" + name.encode("utf-8") + b":" + payload).digest()


def make_event(name: str, payload: bytes) -> dict[str, Any]:
    """One RTMR3 runtime event in the log's JSON form."""
    return {
        "imr": RTMR_INDEX,
        "event_type": EV_RUNTIME_EVENT,
        "digest": event_digest(name, payload).hex(),
        "event": name,
        "event_payload": payload.hex(),
    }


def model_payload(digest: bytes, *, name: str, dtype: str, quantization: str = QUANTIZATION_NONE) -> bytes:
    """The model event's payload: what is served and the settings that change its outputs."""
    doc = {"digest": show(digest), "dtype": dtype, "name": name, "quantization": quantization}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def replay(events: Sequence[dict[str, Any]]) -> bytes:
    """RTMR3 after extending each event's digest in order, from 48 zero bytes."""
    value = bytes(RTMR_SIZE)
    for ev in events:
        value = hashlib.sha384(value + bytes.fromhex(ev["digest"])).digest()
    return value


def load_log(path: Path) -> list[dict[str, Any]]:
    """The events of the log at ``path`` (none if it does not exist), each checked: RTMR3, a
    runtime event whose digest is that of its name and payload."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_LOG_BYTES + 1)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise Rtmr3Error(f"RTMR3 log {path}: {exc.strerror or exc}", code="rtmr3-log") from None
    try:
        events = json.loads(raw) if len(raw) <= MAX_LOG_BYTES else None
        if not isinstance(events, list):
            raise ValueError("not a JSON list of events")
        for i, ev in enumerate(events):
            if not isinstance(ev, dict) or ev.get("imr") != RTMR_INDEX or ev.get("event_type") != EV_RUNTIME_EVENT:
                raise ValueError(f"event {i} is not an RTMR3 runtime event")
            if (
                ev.get("digest")
                != event_digest(str(ev.get("event")), bytes.fromhex(str(ev.get("event_payload")))).hex()
            ):
                raise ValueError(f"event {i}: its digest is not that of its name and payload")
    except ValueError as exc:
        raise Rtmr3Error(f"RTMR3 log {path} is damaged: {exc}", code="rtmr3-log") from None
    return events


def _write_log(path: Path, events: list[dict[str, Any]]) -> None:
    write_atomic(path, json.dumps(events, indent=1).encode() + b"\n", mode=0o644)


@dataclass(frozen=True, slots=True)
class Measured:
    """The outcome of :func:`measure`: ``extended`` False when the latest model event already named it."""

    extended: bool
    events: int  # how many events the log now holds
    rtmr3: bytes
    payload: bytes


def _read(provider: Extender) -> bytes:
    value = provider.read_rtmr(RTMR_INDEX)
    if len(value) != RTMR_SIZE:
        raise Rtmr3Error(
            f"{provider.name}: RTMR3 read back as {len(value)} bytes, expected {RTMR_SIZE}", code="rtmr3-read"
        )
    return value


def measure(
    provider: Extender,
    payload: bytes,
    *,
    log_path: Path = DEFAULT_LOG,
    name: str = MODEL_EVENT,
    lock_timeout: float = LOCK_TIMEOUT,
) -> Measured:
    """Extend RTMR3 with the event ``name``/``payload`` unless the latest such event already
    is it; keep the log in step (see the module doc). :class:`Rtmr3Error` if RTMR3 cannot
    be extended or holds a value the log does not explain; the provider's own error if it fails."""
    log_path = Path(log_path)
    log_path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        lock = lock_exclusive(log_path.with_name(f".{log_path.name}.lock"), lock_timeout)
    except TimeoutError as exc:
        raise Rtmr3Error(f"RTMR3 log {log_path}: {exc}", code="rtmr3-busy") from None
    try:
        events = load_log(log_path)
        current, logged = _read(provider), replay(events)
        if current != logged:
            if events and current == replay(events[:-1]):  # logged, then interrupted before the extend
                provider.extend_rtmr(RTMR_INDEX, bytes.fromhex(events[-1]["digest"]))
                current = _read(provider)
            if current != logged:
                raise Rtmr3Error(
                    f"RTMR3 is {current.hex()} but the {len(events)} events of {log_path} replay to {logged.hex()}: "
                    "something else extended RTMR3, so no client could check what is served; reboot the TD "
                    "(which resets RTMR3 and the log)",
                    code="rtmr3-unexplained",
                )
        latest = next((ev for ev in reversed(events) if ev.get("event") == name), None)
        if latest is not None and bytes.fromhex(latest["event_payload"]) == payload:
            return Measured(extended=False, events=len(events), rtmr3=current, payload=payload)
        event = make_event(name, payload)
        events.append(event)
        _write_log(log_path, events)
        provider.extend_rtmr(RTMR_INDEX, bytes.fromhex(event["digest"]))
        after, expected = _read(provider), replay(events)
        if after != expected:
            raise Rtmr3Error(
                f"{provider.name}: RTMR3 reads {after.hex()} after the extend, but the log replays to {expected.hex()}",
                code="rtmr3-unexplained",
            )
        return Measured(extended=True, events=len(events), rtmr3=after, payload=payload)
    finally:
        os.close(lock)


def measure_model(
    provider: Extender,
    digest: bytes,
    *,
    name: str,
    dtype: str,
    quantization: str = QUANTIZATION_NONE,
    log_path: Path = DEFAULT_LOG,
) -> Measured:
    """Measure the model event naming the model ``digest`` (of the bytes the service loads:
    :func:`tdxvm.guest.inmemory.copy_into_memory`, or
    :func:`~tdxvm.guest.modeldigest.folder_digest` of the folder it loads), ``name`` and
    the output-changing settings."""
    return measure(
        provider, model_payload(digest, name=name, dtype=dtype, quantization=quantization), log_path=log_path
    )
