"""The inference service's gate, on a real uvicorn server (no model loaded: the gate
answers before the API does): API keys from the released set, rotation by replacing the
file, failing closed, the body cap, the bound on requests in flight, and TLS versions
and ciphers on the attested key. Tried as a client on the host's network would."""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from tdxvm.fileio import write_atomic  # noqa: E402
from tdxvm.guest.apikeys import KeyFile, document, generate  # noqa: E402
from tdxvm.guest.gate import Limits  # noqa: E402
from tdxvm.guest.server import ModelHolder, create_app  # noqa: E402
from tdxvm.guest.tls import ensure_identity  # noqa: E402

from .uvserver import Served  # noqa: E402

NAME = "m"


class Running(Served):
    """The gate's service, as the service configures uvicorn; with ``tls_dir``, on a key made there."""

    def __init__(self, app: Any, *, tls_dir: Path | None = None, max_requests: int = 128) -> None:
        super().__init__(app, ensure_identity(tls_dir, ["127.0.0.1"]) if tls_dir else None, max_requests=max_requests)


def raw(port: int, request: bytes, *, read: bool = True) -> tuple[int, dict[str, str], dict[str, Any] | str]:
    """Send ``request`` as it is; the status, headers and (JSON) body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while read and b"\r\n\r\n" not in data:
            data += s.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        while len(body) < int(headers.get("content-length", 0)):
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
    try:
        return int(lines[0].split()[1]), headers, json.loads(body)
    except ValueError:
        return int(lines[0].split()[1]), headers, body.decode()


def get(port: int, path: str, key: str | None = None) -> tuple[int, dict[str, str], Any]:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return raw(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n".encode())


@pytest.fixture
def keyed(tmp_path: Path) -> Iterator[tuple[Running, Path, str]]:
    """A service that takes API keys from ``tmp_path/api-keys``, released with one key."""
    key, path = generate(), tmp_path / "api-keys"
    write_atomic(path, document({"alice": key}), mode=0o600)
    running = Running(create_app(ModelHolder(NAME), keys=KeyFile(path), limits=Limits(max_body=4096)))
    yield running, path, key
    running.stop()


def test_every_route_but_health_and_attestation_needs_a_key(keyed):
    running, _, key = keyed
    for path in ("/v1/models", f"/v1/models/{NAME}", "/metrics", "/v1/completions", "/nope"):
        status, headers, body = get(running.port, path)
        assert status == 401 and body["error"]["code"] == "missing_api_key", (path, body)
        assert headers["www-authenticate"] == "Bearer"
        status, _, body = get(running.port, path, generate())
        assert status == 401 and body["error"]["code"] == "invalid_api_key", (path, body)
        assert "alice" not in json.dumps(body)  # no name, no count of the keys
    assert get(running.port, "/health")[0] == 503  # open: says only that the model is loading
    assert get(running.port, "/v1/attestation")[2]["error"]["code"] == "attestation_unavailable"  # open (no attester)
    status, _, body = get(running.port, "/v1/models", key)
    assert status == 200 and body["data"][0]["id"] == NAME
    assert get(running.port, "/metrics", key)[0] == 200
    assert get(running.port, f"/v1/models/{NAME}", key)[2]["id"] == NAME
    assert get(running.port, "/v1/models", f"{key}x")[0] == 401
    lower = raw(running.port, f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: bearer {key}\r\n\r\n".encode())
    assert lower[0] == 200  # the scheme is case-insensitive (RFC 9110)


def test_the_openai_client_is_refused_without_the_key_and_served_with_it(keyed):
    running, _, key = keyed
    url = f"http://127.0.0.1:{running.port}/v1"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key=generate(), max_retries=0).models.list()
    assert [m.id for m in openai.OpenAI(base_url=url, api_key=key, max_retries=0).models.list()] == [NAME]


def test_a_new_key_set_takes_effect_without_a_restart(keyed):
    """Re-provisioning replaces the file (atomically, as the agent writes secrets): the old key is refused at once."""
    running, path, alice = keyed
    bob = generate()
    write_atomic(path, document({"bob": bob}), mode=0o600)
    assert get(running.port, "/v1/models", alice)[0] == 401
    assert get(running.port, "/v1/models", bob)[0] == 200
    carol = generate()
    write_atomic(path, document({"bob": bob, "carol": carol}), mode=0o600)
    assert [get(running.port, "/v1/models", k)[0] for k in (alice, bob, carol)] == [401, 200, 200]


@pytest.mark.parametrize(
    "content",
    [None, b"", b"not json", b'{"format": "tdxvm-api-keys/1", "keys": []}', b'{"format": "other", "keys": []}'],
    ids=["missing", "empty", "not-json", "no-keys", "other-format"],
)
def test_without_a_usable_key_set_nothing_is_accepted(tmp_path, content):
    path = tmp_path / "api-keys"
    if content is not None:
        path.write_bytes(content)
    keys = KeyFile(path)
    running = Running(create_app(ModelHolder(NAME), keys=keys))
    try:
        assert get(running.port, "/v1/models", generate())[0] == 401
        assert get(running.port, "/health")[0] == 503 and keys.problem
        key = generate()
        write_atomic(path, document({"k": key}), mode=0o600)  # released now: accepted from the next request
        assert get(running.port, "/v1/models", key)[0] == 200 and keys.problem is None
    finally:
        running.stop()


def test_a_large_body_is_refused_before_it_is_read(keyed):
    running, _, key = keyed
    auth = f"Authorization: Bearer {key}\r\n"
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n"
    # a declared 400 MiB: refused at the header, nothing sent after it
    status, _, body = raw(running.port, f"{head}Content-Length: {400 * 2**20}\r\n\r\n".encode())
    assert status == 413 and body["error"]["code"] == "request_too_large"
    # chunked, without a length: read up to the cap, then refused
    chunk = b"x" * 3000
    chunked = f"{head}Transfer-Encoding: chunked\r\n\r\n".encode() + (b"bb8\r\n" + chunk + b"\r\n") * 2 + b"0\r\n\r\n"
    assert raw(running.port, chunked)[0] == 413
    # within the cap: on to the API (no model loaded: 503)
    small = json.dumps({"model": NAME, "prompt": "hi"}).encode()
    status, _, body = raw(running.port, f"{head}Content-Length: {len(small)}\r\n\r\n".encode() + small)
    assert status == 503 and "still loading" in body["error"]["message"]
    # an unauthenticated huge body is refused for its key first, unread
    status, _, _ = raw(running.port, f"POST /v1/completions HTTP/1.1\r\nContent-Length: {2**30}\r\n\r\n".encode())
    assert status == 401
    # and the routes open to anyone take GET only: no body of a client without a key is ever read
    for path in ("/health", "/v1/attestation"):
        status, headers, body = raw(running.port, f"POST {path} HTTP/1.1\r\nContent-Length: 2000\r\n\r\n".encode())
        assert status == 405 and headers["allow"] == "GET" and body["error"]["code"] == "method_not_allowed"


def test_requests_beyond_the_bound_get_429_with_retry_after(tmp_path):
    """Two requests held open (their bodies half sent); the third is answered 429 at once."""
    running = Running(create_app(ModelHolder(NAME), limits=Limits(max_requests=2)), max_requests=2)
    held = []
    try:
        for _ in range(2):
            s = socket.create_connection(("127.0.0.1", running.port), timeout=10)
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            held.append(s)
        deadline = time.monotonic() + 10
        while True:
            status, headers, body = get(running.port, "/v1/models")
            if status == 429 or time.monotonic() > deadline:
                break
            time.sleep(0.05)  # the held requests reach the gate
        assert status == 429 and headers["retry-after"] == "1" and body["error"]["code"] == "rate_limit_exceeded"
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 10
    while get(running.port, "/v1/models")[0] != 200:  # the slots come back when those clients leave
        assert time.monotonic() < deadline
        time.sleep(0.05)
    running.stop()


def _handshake(port: int, **context: Any) -> str:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.minimum_version = context.get("minimum", ssl.TLSVersion.MINIMUM_SUPPORTED)
    ctx.maximum_version = context.get("maximum", ssl.TLSVersion.MAXIMUM_SUPPORTED)
    if "ciphers" in context:
        ctx.set_ciphers(context["ciphers"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s, ctx.wrap_socket(s) as tls:
        return f"{tls.version()} {tls.cipher()[0]}"


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_is_1_3_or_1_2_with_ecdhe_and_aead_only(tmp_path):
    running = Running(create_app(ModelHolder(NAME)), tls_dir=tmp_path / "tls")
    try:
        assert _handshake(running.port).startswith("TLSv1.3 ")
        tls12 = _handshake(running.port, maximum=ssl.TLSVersion.TLSv1_2)
        assert tls12.startswith("TLSv1.2 ECDHE-ECDSA-") and ("GCM" in tls12 or "CHACHA20" in tls12)
        for refused in ("ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384", "AES128-SHA", "AES128-GCM-SHA256"):
            with pytest.raises(ssl.SSLError):  # CBC, or no forward secrecy: no shared cipher
                _handshake(running.port, maximum=ssl.TLSVersion.TLSv1_2, ciphers=f"{refused}:@SECLEVEL=0")
        with pytest.raises(ssl.SSLError):
            _handshake(running.port, maximum=ssl.TLSVersion.TLSv1_1, ciphers="ALL:@SECLEVEL=0")
    finally:
        running.stop()
