"""The controller's side of the guest agent handshake: attest first, then release secrets.

:func:`attest_guest` connects to the agent (:mod:`tdxvm.guest.agent`, port 7300), sends a
fresh 32-byte nonce, and accepts the guest only if

- the quote's REPORTDATA is :func:`tdxvm.attest.binding.report_data` of that nonce and
  the keys the guest sent back (a quote replayed from another attestation, or a key a
  man in the middle swapped in, fails: reason ``report-data-binding``);
- the quote is genuine for ``trust_anchor`` and passes ``policy``
  (:func:`tdxvm.attest.appraise`);
- the policy names the image's MR_TD, RTMR1 and RTMR2 (without them any TD on a genuine
  platform, one the host built included, would pass: reason ``policy-measurements``).

Otherwise it raises :class:`AttestationRefused` with every reason and the verdict. Only
an :class:`AttestedGuest` can release secrets, each sealed (HPKE Auth mode) to the X25519
key that this attestation's quote binds and authenticated by the controller's release key;
nothing secret is sent before the verdict. Network
failures are :class:`GuestUnreachable` or :class:`HandshakeTimeout`, which name the
address and the phase (``connect``, ``attest``, ``release <name>``).
"""

from __future__ import annotations

import dataclasses
import secrets
import socket
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tdxvm.attest.binding import NONCE_SIZE, BindingError, check_report_data
from tdxvm.attest.chain import TrustAnchor
from tdxvm.attest.collateral import Collateral
from tdxvm.attest.errors import QuoteFormatError
from tdxvm.attest.policy import Policy
from tdxvm.attest.quote import parse_quote
from tdxvm.attest.result import Reason
from tdxvm.attest.verdict import CollateralFor, Verdict, appraise
from tdxvm.errors import Refused, TdxvmError, Unreachable
from tdxvm.guest import agentwire as wire
from tdxvm.guest.envelope import seal

REQUIRED_MEASUREMENTS = ("mrtd", "rtmr1", "rtmr2")  # firmware; kernel; command line and initrd
DEFAULT_TIMEOUT = 30.0


class HandshakeError(TdxvmError):
    """Base of this module's errors: ``code`` is stable; ``address`` and ``phase`` say where."""

    code = "handshake"

    def __init__(self, message: str, *, address: str, phase: str) -> None:
        super().__init__(f"guest agent {address}: {phase}: {message}")
        self.address, self.phase = address, phase


class GuestUnreachable(HandshakeError, Unreachable):
    """No connection to the agent, or it closed the connection (exit 3)."""

    code = "guest-unreachable"


class HandshakeTimeout(HandshakeError, Unreachable):
    """The agent did not answer in time (exit 3)."""

    code = "handshake-timeout"


class GuestProtocolError(HandshakeError):
    """The agent's answer is not the protocol (:mod:`tdxvm.guest.agentwire`)."""

    code = "guest-protocol"


class GuestError(HandshakeError):
    """The agent answered ``{"ok": false, "error": ...}``."""

    code = "guest-error"


class AttestationRefused(HandshakeError, Refused):
    """The guest did not prove what it runs: every reason, and the verdict where there is one (exit 1)."""

    code = "attestation-refused"

    def __init__(
        self, address: str, reasons: tuple[Reason, ...], *, verdict: Verdict | None, provider: str | None
    ) -> None:
        lines = "\n".join(f"  - [{r.code}] {r.message}" for r in reasons)
        super().__init__(f"attestation refused:\n{lines}", address=address, phase="attest")
        self.reasons, self.verdict, self.provider = reasons, verdict, provider
        self.timings: dict[str, float] = {}


def _where(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Channel:
    """One connection to the agent: a request line out, an answer line back, with a timeout."""

    def __init__(self, address: tuple[str, int], timeout: float) -> None:
        self.where, self.timeout = _where(address), timeout
        try:
            self.sock = socket.create_connection(address, timeout=timeout)
        except TimeoutError:
            raise HandshakeTimeout(f"no connection within {timeout:g} s", address=self.where, phase="connect") from None
        except OSError as exc:
            raise GuestUnreachable(exc.strerror or str(exc), address=self.where, phase="connect") from None
        self.rfile = self.sock.makefile("rb")

    def request(self, message: dict[str, Any], phase: str) -> dict[str, Any]:
        try:
            self.sock.sendall(wire.encode(message))
            line = wire.read_line(self.rfile)
        except TimeoutError:
            raise HandshakeTimeout(f"no answer within {self.timeout:g} s", address=self.where, phase=phase) from None
        except wire.WireError as exc:
            raise GuestProtocolError(str(exc), address=self.where, phase=phase) from None
        except OSError as exc:
            raise GuestUnreachable(exc.strerror or str(exc), address=self.where, phase=phase) from None
        if line is None:
            raise GuestUnreachable("the agent closed the connection without an answer", address=self.where, phase=phase)
        try:
            answer = wire.decode(line)
        except wire.WireError as exc:
            raise GuestProtocolError(str(exc), address=self.where, phase=phase) from None
        if answer.get("ok") is not True:
            error = answer.get("error")
            if answer.get("ok") is False and isinstance(error, str):
                raise GuestError(error, address=self.where, phase=phase)
            raise GuestProtocolError('the answer has neither "ok": true nor an error', address=self.where, phase=phase)
        return answer

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()


@dataclasses.dataclass(slots=True)
class AttestedGuest:
    """A guest whose quote passed; :meth:`release` seals secrets to its attested X25519 key."""

    address: str
    verdict: Verdict
    keys: Mapping[str, bytes]
    nonce: bytes
    quote: bytes
    provider: str
    event_log: bytes | None
    _channel: _Channel | None = dataclasses.field(repr=False)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)  # "quote", "verify": seconds

    def release(self, name: str, secret: bytes, *, sender: X25519PrivateKey) -> None:
        """Seal ``secret`` to this attestation's X25519 key as ``name``, authenticated by the
        controller's release key ``sender`` (:mod:`tdxvm.releasekey`), and send it; the agent
        must answer ``ok`` (it could open it: the image was built with that key)."""
        name = wire.check_secret_name(name)
        if self._channel is None:
            raise GuestUnreachable("the connection is closed", address=self.address, phase=f"release {name}")
        sealed = seal(secret, self.keys[wire.X25519_KEY], info=wire.secret_info(name, self.nonce), sender=sender)
        self._channel.request({"op": "secret", "name": name, "sealed": wire.b64(sealed)}, f"release {name}")

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def __enter__(self) -> AttestedGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def hello(address: tuple[str, int], *, timeout: float = 10.0) -> list[str]:
    """Whether the agent at ``address`` answers, and the keys an attest there would bind
    (``["x25519"]`` from the initramfs' unlock step; plus ``ssh-host`` once booted)."""
    channel = _Channel(address, timeout)
    try:
        answer = channel.request({"op": "hello"}, "hello")
    finally:
        channel.close()
    keys = answer.get("keys")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise GuestProtocolError("hello: keys must be a list of names", address=channel.where, phase="hello")
    return keys


def attest_guest(
    address: tuple[str, int],
    *,
    collateral: Collateral | CollateralFor,
    policy: Policy | None = None,
    at: datetime | None = None,
    trust_anchor: TrustAnchor | None = None,
    qgs_address: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    require_keys: Sequence[str] = (wire.X25519_KEY,),
    require_measurements: bool = True,
) -> AttestedGuest:
    """Attest the agent at ``address`` with a fresh nonce (see the module doc).

    ``collateral`` is the quote's collateral, or a function from the parsed quote to it;
    ``trust_anchor`` defaults to Intel's root; ``at`` to now; ``qgs_address`` is where an
    emulated guest asks for its quote; ``require_keys`` names the keys the guest must bind
    (``x25519`` always). Keep the returned guest open to release secrets, then close it.
    """
    channel = _Channel(address, timeout)
    try:
        return _attest(
            channel,
            collateral=collateral,
            policy=policy or Policy(),
            at=at or datetime.now(timezone.utc),
            trust_anchor=trust_anchor,
            qgs_address=qgs_address,
            require_keys=require_keys,
            require_measurements=require_measurements,
        )
    except BaseException:
        channel.close()
        raise


def _attest(
    channel: _Channel,
    *,
    collateral: Collateral | CollateralFor,
    policy: Policy,
    at: datetime,
    trust_anchor: TrustAnchor | None,
    qgs_address: str | None,
    require_keys: Sequence[str],
    require_measurements: bool,
) -> AttestedGuest:
    where = channel.where
    nonce = secrets.token_bytes(NONCE_SIZE)
    started = time.monotonic()
    answer = channel.request({"op": "attest", "nonce": nonce.hex(), "qgs": qgs_address}, "attest")
    timings = {"quote": time.monotonic() - started}
    started = time.monotonic()
    provider = answer.get("provider") if isinstance(answer.get("provider"), str) else None
    try:
        quote_bytes = wire.unb64(answer.get("quote"), "quote")
        raw_keys = answer.get("keys")
        if not isinstance(raw_keys, dict):
            raise wire.WireError("keys: expected an object of base64 strings")
        keys = {str(k): wire.unb64(v, f"keys.{k}") for k, v in raw_keys.items()}
        event_log = None if answer.get("event_log") is None else wire.unb64(answer["event_log"], "event_log")
    except wire.WireError as exc:
        raise GuestProtocolError(str(exc), address=where, phase="attest") from None

    def refuse(*reasons: Reason, verdict: Verdict | None = None) -> AttestationRefused:
        timings["verify"] = time.monotonic() - started
        refused = AttestationRefused(where, tuple(reasons), verdict=verdict, provider=provider)
        refused.timings = timings
        return refused

    try:
        quote = parse_quote(quote_bytes)
    except QuoteFormatError as exc:
        raise refuse(Reason("quote-format", f"the guest's quote is malformed: {exc}")) from None
    reasons = key_reasons(keys, require_keys)
    if not reasons:
        reasons += binding_reasons(quote.body.report_data, nonce, keys)
    if require_measurements and (missing := [k for k in REQUIRED_MEASUREMENTS if getattr(policy, k) is None]):
        reasons.append(
            Reason(
                "policy-measurements",
                f"the policy names no expected {', '.join(missing)}: any TD on a genuine "
                "platform would pass; give a policy with the image's measurements",
            )
        )
    verdict = appraise(quote, collateral, at=at, policy=policy, trust_anchor=trust_anchor)
    verdict = dataclasses.replace(verdict, reasons=(*reasons, *verdict.reasons))
    if not verdict.accepted:
        raise refuse(*(verdict.reasons or (Reason("not-genuine", "the quote was not verified"),)), verdict=verdict)
    timings["verify"] = time.monotonic() - started
    return AttestedGuest(
        address=where,
        verdict=verdict,
        keys=keys,
        nonce=nonce,
        quote=quote_bytes,
        provider=provider or "?",
        event_log=event_log,
        _channel=channel,
        timings=timings,
    )


def key_reasons(keys: Mapping[str, bytes], required: Sequence[str]) -> list[Reason]:
    """Why ``keys`` lacks what the controller relies on; empty if nothing is missing."""
    out = []
    missing = [k for k in dict.fromkeys([wire.X25519_KEY, *required]) if k not in keys]
    if missing:
        out.append(Reason("guest-keys", f"the guest bound no {', '.join(missing)} key"))
    x25519 = keys.get(wire.X25519_KEY)
    if x25519 is not None and len(x25519) != 32:
        out.append(Reason("guest-keys", f"the guest's x25519 key is {len(x25519)} bytes, not 32"))
    return out


def binding_reasons(quoted: bytes, nonce: bytes, keys: Mapping[str, bytes]) -> list[Reason]:
    """Why the quote's REPORTDATA does not bind this attestation's nonce and the keys the
    guest sent; empty if it does."""
    try:
        if check_report_data(quoted, nonce, keys):
            return []
    except BindingError as exc:
        return [Reason("report-data-binding", f"the guest's keys cannot be bound: {exc}")]
    return [
        Reason(
            "report-data-binding",
            f"the quote's REPORTDATA does not bind this attestation's nonce {nonce.hex()[:16]}… and the "
            f"keys the guest sent ({', '.join(sorted(keys))}): a quote replayed from another attestation, or a key "
            "substituted on the way",
        )
    ]
