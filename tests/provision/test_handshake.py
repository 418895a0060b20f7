"""The controller's handshake against the real agent and the real emulated quote service,
with men in the middle that replay, swap keys or forge, and guests that hang."""

from __future__ import annotations

import json
import socket
import threading

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tdxvm.attest import Policy, Quote
from tdxvm.emulate.qgs import QuoteService
from tdxvm.guest import agentwire as wire
from tdxvm.provision.handshake import (
    AttestationRefused,
    GuestProtocolError,
    GuestUnreachable,
    HandshakeTimeout,
    attest_guest,
)

from ..attested_guest import (
    AT,
    CONTROLLER,
    LineProxy,
    agent_thread,
    anchor,
    artifacts,
    forger,
    platform,
    policy_for,
    silent_server,
)


@pytest.fixture(scope="module")
def qgs():
    with QuoteService(platform(), artifacts()) as service:
        yield service


@pytest.fixture
def guest(tmp_path):
    (tmp_path / "root").mkdir()
    with agent_thread(tmp_path / "secrets", tmp_path / "root") as server:
        yield ("127.0.0.1", server.port)


def attest(address, qgs, **kw):
    options = {
        "collateral": platform().collateral(),
        "policy": policy_for(artifacts()),
        "at": AT,
        "trust_anchor": anchor(),
        "qgs_address": qgs.address,
        "timeout": 10,
        **kw,
    }
    return attest_guest(address, **options)


def codes(exc: pytest.ExceptionInfo[AttestationRefused]) -> list[str]:
    return [r.code for r in exc.value.reasons]


def secrets_sent(proxy: LineProxy) -> list[bytes]:
    return [line for line in proxy.sent if json.loads(line).get("op") == "secret"]


def test_accepted_then_secret_released(guest, qgs, tmp_path):
    with attest(guest, qgs) as g:
        assert g.verdict.accepted and g.verdict.reasons == ()
        assert g.verdict.result.measurements.rtmr2 == policy_for(artifacts()).rtmr2[0]
        assert len(g.nonce) == 32 and set(g.keys) == {"x25519"} and g.provider == "emulated"
        g.release("disk", b"volume key passphrase", sender=CONTROLLER)
    secret = tmp_path / "secrets/disk"
    assert secret.read_bytes() == b"volume key passphrase" and secret.stat().st_mode & 0o777 == 0o600
    with pytest.raises(GuestUnreachable, match="release disk: the connection is closed"):
        g.release("disk", b"again", sender=CONTROLLER)


def test_fresh_nonce_per_attestation(guest, qgs):
    with attest(guest, qgs) as a, attest(guest, qgs) as b:
        assert a.nonce != b.nonce and a.keys["x25519"] != b.keys["x25519"]


def test_collateral_may_be_fetched_for_the_quote(guest, qgs):
    seen: list[Quote] = []

    def fetch(quote: Quote):
        seen.append(quote)
        return platform().collateral()

    with attest(guest, qgs, collateral=fetch) as g:
        assert g.verdict.accepted
    assert len(seen) == 1 and seen[0].body.report_data == g.verdict.result.quote.body.report_data


def test_wrong_mrtd_is_refused_before_any_secret(guest, qgs):
    proxy = LineProxy(guest)
    try:
        with pytest.raises(AttestationRefused) as exc:
            attest(proxy.address, qgs, policy=policy_for(artifacts(), mrtd="ab" * 48))
    finally:
        proxy.close()
    assert codes(exc) == ["measurement-mismatch"] and "quote field MR_TD is " in exc.value.reasons[0].message
    assert exc.value.verdict is not None and not exc.value.verdict.accepted
    assert exc.value.code == "attestation-refused" and exc.value.address == f"127.0.0.1:{proxy.port}"
    assert len(proxy.sent) == 1 and not secrets_sent(proxy)


def test_changed_initrd_shows_in_rtmr2(guest):
    with (
        QuoteService(platform(), artifacts(initrd=b"070701 another initrd")) as booted,
        pytest.raises(AttestationRefused) as exc,
    ):
        attest(guest, booted)
    assert codes(exc) == ["measurement-mismatch"]
    assert exc.value.reasons[0].message.startswith("quote field RTMR2 is ")


def test_replayed_answer_is_refused(guest, qgs):
    recorded: list[bytes] = []

    def replay(line: bytes) -> bytes:
        if b'"quote"' not in line:
            return line
        if not recorded:
            recorded.append(line)
            return line
        return recorded[0]  # every later attest gets the first one's answer

    proxy = LineProxy(guest, replay)
    try:
        with attest(proxy.address, qgs) as first:
            assert first.verdict.accepted
        with pytest.raises(AttestationRefused) as exc:
            attest(proxy.address, qgs)
    finally:
        proxy.close()
    assert codes(exc) == ["report-data-binding"]  # genuine and measured right, but not for this nonce
    assert "replayed" in exc.value.reasons[0].message
    assert not secrets_sent(proxy)


def test_swapped_key_is_refused(guest, qgs):
    mitm = X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def swap(line: bytes) -> bytes:
        answer = json.loads(line)
        if "keys" in answer:
            answer["keys"]["x25519"] = wire.b64(mitm)
        return wire.encode(answer)

    proxy = LineProxy(guest, swap)
    try:
        with pytest.raises(AttestationRefused) as exc:
            attest(proxy.address, qgs)
    finally:
        proxy.close()
    assert codes(exc) == ["report-data-binding"] and "substituted" in exc.value.reasons[0].message
    assert not secrets_sent(proxy)


def test_forged_quote_is_refused(guest):
    """Signed by another platform's keys: refused whether the forger's collateral or the real one comes with it."""
    with QuoteService(forger(), artifacts()) as forged:
        for collateral in (platform().collateral(), forger().collateral()):
            with pytest.raises(AttestationRefused) as exc:
                attest(guest, forged, collateral=collateral)
            assert exc.value.verdict is not None and not exc.value.verdict.result.genuine
            assert "untrusted-root" in codes(exc)
            assert "report-data-binding" not in codes(exc) and "measurement-mismatch" not in codes(exc)


def test_policy_without_measurements_is_refused(guest, qgs):
    with pytest.raises(AttestationRefused) as exc:
        attest(guest, qgs, policy=Policy())
    assert codes(exc) == ["policy-measurements"] and "mrtd, rtmr1, rtmr2" in exc.value.reasons[0].message
    with attest(guest, qgs, policy=Policy(), require_measurements=False) as g:
        assert g.verdict.accepted


def test_required_keys(guest, qgs):
    with pytest.raises(AttestationRefused) as exc:
        attest(guest, qgs, require_keys=("x25519", "ssh-host"))
    assert codes(exc) == ["guest-keys"] and "no ssh-host key" in exc.value.reasons[0].message


def test_guest_that_never_answers_times_out():
    with silent_server() as address, pytest.raises(HandshakeTimeout) as exc:
        attest_guest(
            address,
            collateral=platform().collateral(),
            policy=policy_for(artifacts()),
            at=AT,
            trust_anchor=anchor(),
            timeout=0.3,
        )
    assert exc.value.phase == "attest" and exc.value.address == f"127.0.0.1:{address[1]}"
    assert exc.value.code == "handshake-timeout"
    assert str(exc.value) == f"guest agent 127.0.0.1:{address[1]}: attest: no answer within 0.3 s"


def test_no_guest_listening():
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    with pytest.raises(GuestUnreachable) as exc:
        attest_guest(("127.0.0.1", port), collateral=platform().collateral(), at=AT, timeout=2)
    assert exc.value.phase == "connect" and exc.value.code == "guest-unreachable"


def test_guest_speaking_something_else(qgs):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b'{"ok": true, "quote": "AAAA", "keys": "x"}\n')

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        with pytest.raises(GuestProtocolError, match="keys: expected an object"):
            attest(("127.0.0.1", port), qgs)
        t.join(5)
