"""Verify an inference endpoint's attestation, then talk to it on its attested TLS key.

:func:`verify_endpoint` opens one TLS connection without CA checks — only to learn the
certificate the server presents on it — and on that same connection asks
``GET /v1/attestation?nonce=<fresh 32 bytes>``. It accepts the endpoint only if

- the quote's REPORTDATA is ``binding.report_data(nonce, keys)`` where ``keys["tls"]``
  is the SubjectPublicKeyInfo of the certificate presented on this connection (a man
  in the middle with another key, or a quote replayed from another request, fails);
- the quote is genuine and passes the policy (:func:`tdxvm.attest.appraise`);
- the policy names the TD's expected measurements (MR_TD, RTMR1, RTMR2): without
  them any TD on a genuine platform, one the host built included, would pass;
- the service's RTMR3 event log (``rtmr3_log``), when it returns one, replays to the
  quote's RTMR3 (:func:`tdxvm.attest.modelevent.check_rtmr3_log`); and with
  ``model_digest``, the latest model event in it names that model digest. A service that
  serves another model, or has measured none, is refused here, before any prompt is
  sent; one that serves the expected model has RTMR3 checked through the log, which the
  verdict says (``checked_by_event_log``) instead of listing RTMR3 as not pinned.

Every failed check is a :class:`~tdxvm.attest.result.Reason` of the
:class:`EndpointRefused` it raises. The :class:`AttestedEndpoint` it returns pins the
key: :meth:`AttestedEndpoint.session` is a ``requests.Session`` that checks the SPKI
SHA-256 on every new connection (:mod:`tdxvm.provision.pinning`).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import secrets
import socket
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tdxvm.attest.binding import NONCE_SIZE, BindingError, report_data
from tdxvm.attest.chain import TrustAnchor
from tdxvm.attest.collateral import Collateral
from tdxvm.attest.errors import EventLogError, QuoteFormatError
from tdxvm.attest.eventlog import compare_rtmrs, parse_json_event_log, parse_tcg_event_log, replay
from tdxvm.attest.modelevent import ModelEvent, Rtmr3Check, check_rtmr3_log, checked_verdict
from tdxvm.attest.policy import Policy
from tdxvm.attest.quote import parse_quote
from tdxvm.attest.result import Reason
from tdxvm.attest.verdict import CollateralFor, Verdict, appraise
from tdxvm.errors import Refused, TdxvmError, Unreachable
from tdxvm.guest.agentwire import unb64
from tdxvm.provision.pinning import DEFAULT_TIMEOUT, pinned_session, unverified_context

ATTESTATION_PATH = "/v1/attestation"
MAX_DOCUMENT = 8 << 20  # quote (~5 KiB) + event log (64 KiB CCEL area, base64) with room to spare
REQUIRED_MEASUREMENTS = ("mrtd", "rtmr1", "rtmr2")  # firmware, kernel, initrd + command line


class EndpointError(TdxvmError):
    """Base of this module's errors; ``code`` is stable, the message names the endpoint."""

    code = "endpoint"


class EndpointUnreachable(EndpointError, Unreachable):
    """No TLS connection, or no HTTP answer, from the endpoint (the network, not a verdict: exit 3)."""

    code = "endpoint-unreachable"


class EndpointRefused(EndpointError, Refused):
    """The endpoint did not prove what it runs: every reason, and the verdict when there is one (exit 1)."""

    code = "endpoint-refused"

    def __init__(
        self,
        url: str,
        reasons: tuple[Reason, ...],
        *,
        verdict: Verdict | None,
        tls_spki_sha256: str | None,
        provider: str | None,
    ) -> None:
        lines = "\n".join(f"  - [{r.code}] {r.message}" for r in reasons)
        super().__init__(f"{url}: attestation refused:\n{lines}")
        self.url, self.reasons, self.verdict = url, reasons, verdict
        self.tls_spki_sha256, self.provider = tls_spki_sha256, provider


@dataclass(frozen=True, slots=True)
class AttestedEndpoint:
    """An endpoint whose quote bound its TLS key; :meth:`session` talks to it on that key only."""

    url: str  # the service's base URL (``https://host:port``); the API is under ``/v1``
    tls_spki: bytes
    nonce: bytes
    quote: bytes
    provider: str
    verdict: Verdict
    event_log: bytes | None = None
    rtmr3: Rtmr3Check | None = None  # the service's RTMR3 log, replayed (None: not looked at)
    rtmr3_log: list[Any] | None = None

    @property
    def tls_spki_sha256(self) -> str:
        return hashlib.sha256(self.tls_spki).hexdigest()

    @property
    def model(self) -> ModelEvent | None:
        """The model the latest model event in the replayed RTMR3 log names (None if none)."""
        return self.rtmr3.model if self.rtmr3 is not None and self.rtmr3.replays else None

    def session(self, *, timeout: Any = DEFAULT_TIMEOUT) -> requests.Session:
        """A ``requests.Session`` that refuses any server key but the attested one (HTTPS only);
        ``timeout`` is for requests that give none (default: 30 s to connect, 600 s to read)."""
        return pinned_session(hashlib.sha256(self.tls_spki).digest(), timeout=timeout)

    def event_log_check(self) -> dict[str, Any] | None:
        """The event log replayed against the quote's RTMRs (informational: RTMR3 may be
        extended at runtime beyond the firmware's log); None without a log."""
        if self.event_log is None:
            return None
        try:
            events = parse_tcg_event_log(self.event_log)
            if self.rtmr3_log is not None and self.rtmr3 is not None and self.rtmr3.replays:
                events += parse_json_event_log(
                    self.rtmr3_log
                )  # RTMR3 is extended at run time, beyond the firmware's log
            cmp = compare_rtmrs(replay(events), self.verdict.result.quote.body.rtmrs)
        except EventLogError as exc:
            return {"bytes": len(self.event_log), "error": str(exc)}
        return {"bytes": len(self.event_log), "events": len(events), "rtmrs_match": [c.matches for c in cmp]}

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "verdict": "accept",
            "tls_spki_sha256": self.tls_spki_sha256,
            "provider": self.provider,
            "nonce": self.nonce.hex(),
            "attestation": self.verdict.to_dict(),
            "event_log": self.event_log_check(),
            "rtmr3": self.rtmr3.to_dict() if self.rtmr3 is not None else None,
            "model": self.model.to_dict() if self.model is not None else None,
        }


def base_url(url: str) -> tuple[str, str, int, str]:
    """``(base, host, port, path prefix)`` of an ``https://`` URL; a trailing ``/v1`` is dropped
    (the OpenAI client's base URL works as well as the server's)."""
    parts = urlsplit(url.strip())
    if parts.scheme.lower() != "https":
        raise EndpointError(f"{url}: the endpoint URL must be https:// (its TLS key is what the attestation binds)")
    if not parts.hostname or parts.query or parts.fragment or parts.username or parts.password:
        raise EndpointError(f"{url}: expected https://HOST[:PORT][/PATH] with no query, fragment or credentials")
    try:
        port = parts.port or 443
    except ValueError:
        raise EndpointError(f"{url}: the port is not a number in 1..65535") from None
    prefix = parts.path.rstrip("/").removesuffix("/v1")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"https://{host}:{port}{prefix}", parts.hostname, port, prefix


def fetch_attestation(url: str, nonce: bytes, *, timeout: float = 30.0) -> tuple[bytes, int, bytes]:
    """On one TLS connection: the certificate the server presents (DER), then the HTTP status
    and body of ``GET /v1/attestation?nonce=HEX`` sent on that same connection."""
    _, host, port, prefix = base_url(url)
    conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=unverified_context())
    expired = threading.Event()

    def expire() -> None:  # ``timeout`` bounds the whole exchange: a server sending a byte at a time stops here
        expired.set()
        with contextlib.suppress(OSError, AttributeError):
            conn.sock.shutdown(socket.SHUT_RDWR)

    watchdog = threading.Timer(timeout, expire)
    watchdog.daemon = True
    watchdog.start()
    try:
        conn.connect()
        sock = conn.sock
        cert = sock.getpeercert(binary_form=True) if isinstance(sock, ssl.SSLSocket) else None
        if not cert:
            raise EndpointUnreachable(f"{url}: the server presented no TLS certificate")
        conn.request("GET", f"{prefix}{ATTESTATION_PATH}?nonce={nonce.hex()}", headers={"Accept": "application/json"})
        resp = conn.getresponse()
        body = resp.read(MAX_DOCUMENT + 1)
        if expired.is_set():
            raise EndpointUnreachable(f"{url}: no complete answer within {timeout:g} s")
        return cert, resp.status, body
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if expired.is_set():
            raise EndpointUnreachable(f"{url}: no complete answer within {timeout:g} s") from None
        raise EndpointUnreachable(f"{url}: {type(exc).__name__}: {exc}") from None
    finally:
        watchdog.cancel()
        conn.close()


def verify_endpoint(
    url: str,
    *,
    collateral: Collateral | CollateralFor,
    policy: Policy | None = None,
    trust_anchor: TrustAnchor | None = None,
    at: datetime | None = None,
    timeout: float = 30.0,
    require_measurements: bool = True,
    model_digest: bytes | None = None,
) -> AttestedEndpoint:
    """Attest the endpoint at ``url`` with a fresh nonce and pin its TLS key (see the module doc).

    ``collateral`` is the quote's collateral, or a function from the parsed quote to it
    (to fetch it from a PCCS); ``trust_anchor`` defaults to Intel's root; ``at`` to now;
    ``model_digest`` (32 bytes) the model the service must serve.
    Raises :class:`EndpointRefused` with every reason, :class:`EndpointUnreachable`."""
    if model_digest is not None and len(model_digest) != 32:
        raise EndpointError(f"a model digest is a 32-byte SHA-256, got {len(model_digest)} bytes")
    base = base_url(url)[0]
    nonce = secrets.token_bytes(NONCE_SIZE)
    cert_der, status, body = fetch_attestation(base, nonce, timeout=timeout)
    try:
        presented = (
            x509.load_der_x509_certificate(cert_der)
            .public_key()
            .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
    except ValueError as exc:
        raise EndpointUnreachable(f"{base}: the server's TLS certificate is not X.509: {exc}") from None
    spki_hash = hashlib.sha256(presented).hexdigest()

    def refuse(*reasons: Reason, verdict: Verdict | None = None, provider: str | None = None) -> EndpointRefused:
        return EndpointRefused(base, tuple(reasons), verdict=verdict, tls_spki_sha256=spki_hash, provider=provider)

    doc = _document(status, body)
    if isinstance(doc, Reason):
        raise refuse(doc)
    try:
        quote = parse_quote(doc.quote)
    except QuoteFormatError as exc:
        raise refuse(
            Reason("quote-format", f"the endpoint's quote is malformed: {exc}"), provider=doc.provider
        ) from None
    reasons = binding_reasons(quote.body.report_data, nonce=nonce, presented_spki=presented, document=doc)
    policy = policy or Policy()
    if require_measurements and (missing := [k for k in REQUIRED_MEASUREMENTS if getattr(policy, k) is None]):
        reasons.append(
            Reason(
                "policy-measurements",
                f"the policy names no expected {', '.join(missing)}: any TD on a genuine platform would pass; "
                "give a policy with the image's measurements",
            )
        )
    verdict = appraise(quote, collateral, at=at or datetime.now(timezone.utc), policy=policy, trust_anchor=trust_anchor)
    rtmr3 = check_rtmr3_log(doc.rtmr3_log, quote.body.rtmrs[3], expected_digest=model_digest)
    verdict = checked_verdict(verdict, rtmr3, reasons=reasons)
    if not verdict.accepted:
        raise refuse(*verdict.reasons, verdict=verdict, provider=doc.provider)
    return AttestedEndpoint(
        url=base,
        tls_spki=presented,
        nonce=nonce,
        quote=doc.quote,
        provider=doc.provider,
        verdict=verdict,
        event_log=doc.event_log,
        rtmr3=rtmr3,
        rtmr3_log=doc.rtmr3_log,
    )


@dataclass(frozen=True, slots=True)
class AttestationDocument:
    """The decoded ``/v1/attestation`` answer (see :mod:`tdxvm.guest.attestation`)."""

    quote: bytes
    keys: Mapping[str, bytes]
    provider: str
    nonce: bytes | None
    event_log: bytes | None
    rtmr3_log: list[Any] | None = None


def _document(status: int, body: bytes) -> AttestationDocument | Reason:
    where = f"GET {ATTESTATION_PATH}"
    if len(body) > MAX_DOCUMENT:
        return Reason("attestation-format", f"{where}: answer larger than {MAX_DOCUMENT} bytes")
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: absurd nesting
        obj = None
    if status != 200:
        msg = (
            obj.get("error", {}).get("message")
            if isinstance(obj, dict) and isinstance(obj.get("error"), dict)
            else body[:200].decode(errors="replace")
        )
        return Reason("attestation-unavailable", f"{where}: HTTP {status}: {msg}")
    if not isinstance(obj, dict):
        return Reason("attestation-format", f"{where}: the answer is not a JSON object")
    try:
        keys = obj.get("keys")
        if not isinstance(keys, dict) or not all(isinstance(v, str) for v in keys.values()):
            raise ValueError("keys: expected an object of base64 strings")
        provider = obj.get("provider")
        nonce = obj.get("nonce")
        runtime = obj.get("rtmr3_log")
        if runtime is not None and not isinstance(runtime, list):
            raise ValueError("rtmr3_log: expected a JSON list of events or null")
        return AttestationDocument(
            quote=unb64(obj.get("quote"), "quote"),
            keys={str(k): unb64(v, f"keys.{k}") for k, v in keys.items()},
            provider=provider if isinstance(provider, str) else "?",
            nonce=bytes.fromhex(nonce) if isinstance(nonce, str) else None,
            event_log=None if obj.get("event_log") is None else unb64(obj["event_log"], "event_log"),
            rtmr3_log=runtime,
        )
    except ValueError as exc:
        return Reason("attestation-format", f"{where}: {exc}")


def binding_reasons(
    quoted: bytes, *, nonce: bytes, presented_spki: bytes, document: AttestationDocument
) -> list[Reason]:
    """Why ``quoted`` (REPORTDATA) does not bind this request's nonce and the TLS key of this
    connection; empty if it does. The messages tell a man in the middle from a replay."""
    reasons: list[Reason] = []
    named = document.keys.get("tls")
    want = fp(presented_spki)
    if named is None:
        reasons.append(Reason("tls-key-not-attested", "the attestation names no TLS key (keys.tls)"))
    elif named != presented_spki:
        reasons.append(
            Reason(
                "tls-key-not-attested",
                f"this connection's TLS key (SPKI SHA-256 {want}) is not the key the attestation names ({fp(named)}): "
                "another party terminates TLS",
            )
        )
    try:
        expected = report_data(nonce, {**document.keys, "tls": presented_spki})
        claimed = (
            report_data(document.nonce, document.keys)
            if document.nonce and len(document.nonce) == NONCE_SIZE and named
            else None
        )
    except BindingError as exc:
        return [*reasons, Reason("report-data-binding", f"the attestation's keys cannot be bound: {exc}")]
    if quoted == expected:
        return reasons
    if claimed is not None and quoted == claimed and document.nonce != nonce:
        why = "it binds another nonce: a replayed or stale attestation"
    elif claimed is not None and quoted == claimed:
        why = f"it binds the key the attestation names ({fp(named or b'')}), not this connection's ({want})"
    else:
        why = "it matches neither this request's nonce with this connection's key nor the attestation's own claims"
    reasons.append(
        Reason(
            "report-data-binding",
            f"the quote's REPORTDATA does not bind this request's nonce and TLS key SPKI SHA-256 {want}: {why}",
        )
    )
    return reasons


def fp(spki: bytes) -> str:
    """SHA-256 of a SubjectPublicKeyInfo, hex (what a pinned session checks)."""
    return hashlib.sha256(spki).hexdigest()
