"""verify_endpoint's own checks: URLs, the REPORTDATA binding, malformed attestation answers.

The end-to-end cases (real uvicorn service, man in the middle, replay, CLI) are in
``tests/guest/test_attested_endpoint.py``; here the endpoint is a plain HTTPS server on
loopback that answers what each case needs.
"""

from __future__ import annotations

import base64
import json
import secrets

import pytest

from tdxvm.attest.binding import report_data
from tdxvm.emulate import EmulatedPlatform
from tdxvm.guest.tls import ensure_identity
from tdxvm.provision.endpoint import (
    AttestationDocument,
    EndpointError,
    EndpointRefused,
    EndpointUnreachable,
    base_url,
    binding_reasons,
    fetch_attestation,
    fp,
    verify_endpoint,
)

from ..hangs import raised_by
from .servers import HttpsServer


@pytest.mark.parametrize(
    ("url", "want"),
    [
        ("https://10.0.2.15:8443", ("https://10.0.2.15:8443", "10.0.2.15", 8443, "")),
        ("https://example.org/v1/", ("https://example.org:443", "example.org", 443, "")),
        ("https://[::1]:9/api/v1", ("https://[::1]:9/api", "::1", 9, "/api")),
    ],
)
def test_base_url(url, want):
    assert base_url(url) == want


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://h:1", "must be https://"),
        ("https://h:1/?a=b", "no query"),
        ("https://h:99999", "port"),
        ("https:///x", "HOST"),
    ],
)
def test_unusable_urls(url, words):
    with pytest.raises(EndpointError, match=words):
        base_url(url)


def doc(keys: dict[str, bytes], nonce: bytes | None) -> AttestationDocument:
    return AttestationDocument(quote=b"", keys=keys, provider="p", nonce=nonce, event_log=None)


def test_binding_reasons_tell_each_case_apart():
    ours, theirs, nonce, old = b"spki-of-the-td", b"spki-of-a-proxy", secrets.token_bytes(32), secrets.token_bytes(32)
    good = report_data(nonce, {"tls": ours})
    assert binding_reasons(good, nonce=nonce, presented_spki=ours, document=doc({"tls": ours}, nonce)) == []

    # A relay: the TD's quote and keys, but the connection ends at another key.
    got = binding_reasons(good, nonce=nonce, presented_spki=theirs, document=doc({"tls": ours}, nonce))
    assert [r.code for r in got] == ["tls-key-not-attested", "report-data-binding"]
    assert f"binds the key the attestation names ({fp(ours)}), not this connection's ({fp(theirs)})" in got[1].message

    # The relay also rewrites keys.tls to its own key: the quote still binds the TD's.
    got = binding_reasons(good, nonce=nonce, presented_spki=theirs, document=doc({"tls": theirs}, nonce))
    assert [r.code for r in got] == ["report-data-binding"] and "matches neither" in got[0].message

    # A replay: right key, a quote for an old nonce.
    got = binding_reasons(
        report_data(old, {"tls": ours}), nonce=nonce, presented_spki=ours, document=doc({"tls": ours}, old)
    )
    assert [r.code for r in got] == ["report-data-binding"] and "another nonce" in got[0].message

    # Extra attested keys are bound too; keys.tls is replaced by the presented key.
    both = {"tls": ours, "ssh-host": b"ssh"}
    assert binding_reasons(report_data(nonce, both), nonce=nonce, presented_spki=ours, document=doc(both, nonce)) == []
    got = binding_reasons(good, nonce=nonce, presented_spki=ours, document=doc({}, nonce))
    assert [r.code for r in got] == ["tls-key-not-attested"] and "names no TLS key" in got[0].message


@pytest.fixture(scope="module")
def platform() -> EmulatedPlatform:
    return EmulatedPlatform()


def answers(tmp_path_factory, body: bytes, status: int = 200) -> HttpsServer:
    ident = ensure_identity(tmp_path_factory.mktemp("k"), ["127.0.0.1"])
    return HttpsServer(ident, lambda path: (status, {}, body))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize(
    ("body", "status", "code", "words"),
    [
        (b"<html>hello</html>", 200, "attestation-format", "not a JSON object"),
        (
            b'{"error": {"message": "model still loading"}}',
            503,
            "attestation-unavailable",
            "HTTP 503: model still loading",
        ),
        (
            json.dumps({"quote": "!!", "keys": {"tls": "AA=="}}).encode(),
            200,
            "attestation-format",
            "quote: not valid base64",
        ),
        (json.dumps({"quote": "AAAA", "keys": "x"}).encode(), 200, "attestation-format", "keys: expected an object"),
        (
            json.dumps({"quote": "AAAA", "keys": {"tls": "AA=="}, "event_log": 5}).encode(),
            200,
            "attestation-format",
            "event_log",
        ),
        (
            json.dumps({"quote": "AAAA", "keys": {"tls": "AA=="}, "rtmr3_log": {"imr": 3}}).encode(),
            200,
            "attestation-format",
            "rtmr3_log: expected a JSON list",
        ),
        (
            json.dumps({"quote": b64(b"\x04\x00" + bytes(100)), "keys": {"tls": "AA=="}}).encode(),
            200,
            "quote-format",
            "malformed",
        ),
    ],
)
def test_malformed_answers_are_refusals(tmp_path_factory, platform, body, status, code, words):
    server = answers(tmp_path_factory, body, status)
    try:
        with pytest.raises(EndpointRefused) as err:
            verify_endpoint(server.url, collateral=platform.collateral(), require_measurements=False)
        assert [r.code for r in err.value.reasons] == [code] and words in str(err.value)
        assert err.value.code == "endpoint-refused" and len(err.value.tls_spki_sha256 or "") == 64
    finally:
        server.stop()


def test_a_server_answering_a_byte_at_a_time_cannot_hold_the_client_past_its_timeout(tmp_path):
    """Each byte comes within the per-read timeout, so before, the client waited on forever
    (and provision's wait for the service with it); the timeout now bounds the exchange."""
    import socket
    import ssl
    import threading
    import time

    ident = ensure_identity(tmp_path, ["127.0.0.1"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(ident.cert_path, ident.key_path)
    server = socket.create_server(("127.0.0.1", 0))

    def drip() -> None:
        conn, _ = server.accept()
        with ctx.wrap_socket(conn, server_side=True) as tls:
            tls.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n{" + b" " * 100:
                try:
                    tls.send(bytes([byte]))
                except OSError:
                    return
                time.sleep(0.3)

    threading.Thread(target=drip, daemon=True).start()
    port = server.getsockname()[1]
    error = raised_by(lambda: fetch_attestation(f"https://127.0.0.1:{port}", b"\0" * 32, timeout=1.0))
    server.close()
    assert isinstance(error, EndpointUnreachable) and "no complete answer within 1 s" in str(error)
