"""``GET /v1/attestation?nonce=HEX``: a fresh quote that binds the client's nonce and the
service's TLS key.

REPORTDATA = :func:`tdxvm.attest.binding.report_data` (nonce, ``{"tls": SPKI DER}``), so
a client that sent a fresh nonce and compares the SPKI with the certificate its TLS
connection was given knows that the TD the quote describes holds the key at the other
end of that connection (``tdxvm verify-endpoint``, :mod:`tdxvm.provision.endpoint`).

The answer is one JSON object::

    {"quote": "<b64>", "report_data": "<128 hex>", "nonce": "<64 hex>",
     "keys": {"tls": "<b64 SPKI DER>"}, "event_log": "<b64>" | null,
     "rtmr3_log": [<event>, ...] | null, "provider": "<name>"}

``event_log`` is the firmware's CC event log (``/sys/firmware/acpi/tables/data/CCEL``,
the layout :mod:`tdxvm.attest.ccel` describes) where the guest has one and the service
may read it, else null. ``rtmr3_log`` is the service's RTMR3 event log
(:mod:`tdxvm.guest.rtmr3`: the model events it extended RTMR3 with before serving, in
dstack's JSON event form), read when the quote is taken; null for a service that keeps
none. Quotes come from a provider object with ``name`` and
``quote(report_data: bytes) -> bytes`` (:mod:`tdxvm.guest.tdquote`: configfs-tsm,
``/dev/tdx_guest`` or the emulated quote service).
"""

from __future__ import annotations

import base64
import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from tdxvm.attest.binding import NONCE_SIZE, report_data
from tdxvm.guest.engine import RequestError
from tdxvm.guest.rtmr3 import Rtmr3Error, load_log

CCEL_DATA = Path("/sys/firmware/acpi/tables/data/CCEL")
_HEX = frozenset("0123456789abcdefABCDEF")

log = logging.getLogger(__name__)


class QuoteProvider(Protocol):
    """Where quotes come from: ``quote`` returns a signed quote whose REPORTDATA is ``report_data``."""

    name: str

    def quote(self, report_data: bytes) -> bytes: ...


def parse_nonce(value: str | None) -> bytes:
    """The 32-byte nonce of ``?nonce=``; a :class:`RequestError` (400) that says what is wrong."""
    want = f"{2 * NONCE_SIZE} hex digits ({NONCE_SIZE} random bytes)"
    if value is None or value == "":
        raise RequestError(f"nonce: missing; pass ?nonce=<{want}>", param="nonce", code="missing_nonce")
    if len(value) != 2 * NONCE_SIZE or not set(value) <= _HEX:
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise RequestError(
            f"nonce: expected {want}, got {len(value)} characters {shown!r}", param="nonce", code="invalid_nonce"
        )
    return bytes.fromhex(value)


class Attester:
    """Answers attestation requests for one set of service keys (name → public key bytes)."""

    def __init__(
        self,
        provider: QuoteProvider,
        keys: Mapping[str, bytes],
        *,
        event_log: Path | None = CCEL_DATA,
        rtmr3_log: Path | None = None,
    ) -> None:
        self.provider, self.keys, self.rtmr3_log = provider, dict(keys), rtmr3_log
        self._event_log_path, self._event_log, self._event_log_read = event_log, None, False
        self._lock = threading.Lock()  # one quote at a time: configfs-tsm has one report entry per process

    def event_log(self) -> bytes | None:
        """The firmware's event log, read once (it does not change after boot); None if unreadable."""
        if not self._event_log_read:
            path, self._event_log_read = self._event_log_path, True
            if path is not None and path.exists():
                try:
                    self._event_log = path.read_bytes()
                except OSError as exc:
                    log.warning("event log %s: %s; attestations carry none", path, exc.strerror or exc)
        return self._event_log

    def attest(self, nonce_hex: str | None) -> dict[str, Any]:
        """The attestation document for ``?nonce=nonce_hex`` (blocking: the provider is asked for a quote)."""
        nonce = parse_nonce(nonce_hex)
        rd = report_data(nonce, self.keys)
        name = getattr(self.provider, "name", type(self.provider).__name__)
        try:
            with self._lock:
                quote = self.provider.quote(rd)
                runtime = None if self.rtmr3_log is None else load_log(self.rtmr3_log)
        except Rtmr3Error as exc:
            log.error("%s", exc)
            raise RequestError(str(exc), status=503, type="service_unavailable", code="rtmr3_log_unavailable") from None
        except Exception as exc:  # the provider's own typed error, whatever the backend
            log.error("quote provider %s failed: %s", name, exc)
            raise RequestError(
                f"quote provider {name} failed: {exc}", status=503, type="service_unavailable", code="quote_unavailable"
            ) from None
        if not isinstance(quote, bytes | bytearray) or not quote:
            raise RequestError(
                f"quote provider {name} returned no quote",
                status=503,
                type="service_unavailable",
                code="quote_unavailable",
            )
        events = self.event_log()
        return {
            "quote": _b64(bytes(quote)),
            "report_data": rd.hex(),
            "nonce": nonce.hex(),
            "keys": {k: _b64(v) for k, v in sorted(self.keys.items())},
            "event_log": None if events is None else _b64(events),
            "rtmr3_log": runtime,
            "provider": name,
        }


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
