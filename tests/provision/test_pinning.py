"""Pinned ``requests`` sessions against real HTTPS servers on loopback: the pinned key
works, any other key is refused on every new connection before a byte is sent."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import requests

from tdxvm.guest.tls import TlsIdentity, ensure_identity
from tdxvm.provision.pinning import PinMismatchError, PinnedAdapter, UnpinnedRequestError, pinned_session

from .servers import HttpsServer, TlsProxy, free_port


def ok(path: str) -> tuple[int, dict[str, str], bytes]:
    return 200, {}, json.dumps({"path": path}).encode()


def pin(identity: TlsIdentity) -> bytes:
    return hashlib.sha256(identity.spki).digest()


@pytest.fixture
def keys(tmp_path: Path) -> tuple[TlsIdentity, TlsIdentity]:
    return ensure_identity(tmp_path / "a", ["127.0.0.1"]), ensure_identity(tmp_path / "b", ["127.0.0.1"])


def test_pinned_key_is_accepted_and_connections_are_reused(keys):
    a, _ = keys
    server = HttpsServer(a, ok)
    try:
        s = pinned_session(pin(a))
        assert [s.get(f"{server.url}/x{i}").json()["path"] for i in range(3)] == ["/x0", "/x1", "/x2"]
    finally:
        server.stop()


def test_other_key_is_refused_before_anything_is_sent(keys):
    a, b = keys
    server = HttpsServer(b, ok)
    try:
        with pytest.raises(PinMismatchError) as err:
            pinned_session(pin(a)).get(server.url + "/secret?token=1")
        assert err.value.code == "tls-pin-mismatch"
        assert err.value.presented == b.spki_sha256 and err.value.pinned == a.spki_sha256
        assert b.spki_sha256 in str(err.value) and "nothing sent" in str(err.value)
        assert isinstance(err.value, requests.exceptions.SSLError)  # generic handlers still catch it
        assert server.requests == []
    finally:
        server.stop()


def test_every_new_connection_is_checked(keys):
    """The pinned server goes away; another key takes its port: the reconnect is refused."""
    a, b = keys
    port = free_port()
    first = HttpsServer(a, ok, port=port)
    s = pinned_session(pin(a))
    try:
        assert s.get(first.url + "/one").status_code == 200
    finally:
        first.stop()
    second = HttpsServer(b, ok, port=port)
    try:
        with pytest.raises(PinMismatchError):
            s.get(second.url + "/two")
        assert second.requests == []
    finally:
        second.stop()


def test_redirect_to_another_key_is_refused(keys):
    a, b = keys
    other = HttpsServer(b, ok)
    bouncer = HttpsServer(a, lambda path: (302, {"Location": other.url + "/stolen"}, b""))
    try:
        with pytest.raises(PinMismatchError):
            pinned_session(pin(a)).get(bouncer.url + "/start")
        assert bouncer.requests == ["/start"] and other.requests == []
    finally:
        other.stop()
        bouncer.stop()


def test_man_in_the_middle_is_refused(keys):
    a, b = keys
    real = HttpsServer(a, ok)
    proxy = TlsProxy(b, ("127.0.0.1", real.port))
    try:
        assert pinned_session(pin(b)).get(proxy.url + "/via").json() == {"path": "/via"}  # the relay works
        before = len(real.requests)
        with pytest.raises(PinMismatchError):
            pinned_session(pin(a)).get(proxy.url + "/secret")
        assert len(real.requests) == before
    finally:
        proxy.stop()
        real.stop()


def test_plain_http_and_proxies_are_refused(keys):
    a, _ = keys
    s = pinned_session(pin(a))
    with pytest.raises(UnpinnedRequestError, match="HTTPS only"):
        s.get("http://127.0.0.1:1/")
    with pytest.raises(UnpinnedRequestError, match="proxies"):
        s.get("https://127.0.0.1:1/", proxies={"https": "http://127.0.0.1:3128"})
    assert s.trust_env is False
    with pytest.raises(ValueError, match="32-byte"):
        PinnedAdapter(b"short")


def test_a_certificate_only_openssl_can_read_is_a_pin_mismatch_not_a_crash(tmp_path):
    """A man in the middle presents a certificate OpenSSL accepts and cryptography cannot
    parse (basicConstraints' critical flag BER-encoded as 0x01): refused as any other key,
    nothing sent; before, a ValueError escaped the session (exit 4, a traceback)."""
    import datetime
    import socket
    import ssl
    import threading

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1234567)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    der = bytearray(cert.public_bytes(serialization.Encoding.DER))
    der[der.find(b"\x01\x01\xff", der.find(bytes.fromhex("0603551d13"))) + 2] = 0x01
    with pytest.raises(ValueError):
        x509.load_der_x509_certificate(bytes(der))
    (tmp_path / "c.pem").write_text(ssl.DER_cert_to_PEM_cert(bytes(der)))
    (tmp_path / "k.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    server = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []

    def serve() -> None:
        conn, _ = server.accept()
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls:
                tls.settimeout(2)
                received.append(tls.recv(65536))
        except OSError:
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    session = pinned_session(hashlib.sha256(b"the attested key").digest(), timeout=(5, 5))
    with pytest.raises(PinMismatchError, match=r"presented TLS key SPKI SHA-256 \(none\)"):
        session.post(f"https://127.0.0.1:{server.getsockname()[1]}/v1/completions", json={"prompt": "secret"})
    thread.join(5)
    server.close()
    assert received in ([], [b""])  # nothing was sent
