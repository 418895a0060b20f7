"""``requests`` sessions that talk only to servers holding one pinned TLS key.

The pin is the SHA-256 of a DER SubjectPublicKeyInfo (the key an attestation bound). The
session's HTTPS adapter builds its connections from :class:`PinnedHTTPSConnection`: each
new TLS connection is made without CA or host-name checks (the certificate is
self-signed) and then refused, before any byte of the request is sent, unless the
key of the certificate the server presented has the pinned digest. Every connection is
checked, so a reconnect after a dropped keep-alive, a redirect to another host and a
retry are all held to the same key. Plain HTTP and proxies are refused outright: both
would leave the key unchecked.

Refusals are typed: :class:`PinMismatchError` (a ``requests.exceptions.SSLError`` and a
:class:`tdxvm.errors.Refused`, exit 1) for another key, :class:`UnpinnedRequestError`
(exit 2) for a request the pin cannot cover.
"""

from __future__ import annotations

import hashlib
import hmac
import ssl
from collections.abc import Mapping
from typing import Any

import requests
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPSConnection
from urllib3.connectionpool import HTTPSConnectionPool

from tdxvm.errors import Refused, TdxvmError

DEFAULT_TIMEOUT = (30.0, 600.0)  # (connect, read) seconds for requests that give none: a long generation may be slow


class PinMismatchError(requests.exceptions.SSLError, Refused):
    """The server presented a TLS key other than the pinned one; nothing was sent to it."""

    code = "tls-pin-mismatch"

    def __init__(self, message: str, *, presented: str = "", pinned: str = "", request: Any = None) -> None:
        super().__init__(message, request=request)
        self.presented, self.pinned = presented, pinned


class UnpinnedRequestError(requests.exceptions.RequestException, TdxvmError):
    """A request the pinned session cannot hold to its key (plain HTTP, a proxy)."""

    code = "tls-pin-unpinned"


def spki_sha256(cert_der: bytes) -> bytes:
    """SHA-256 of the SubjectPublicKeyInfo of a DER certificate."""
    cert = x509.load_der_x509_certificate(cert_der)
    return hashlib.sha256(
        cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    ).digest()


def unverified_context() -> ssl.SSLContext:
    """A TLS client context that checks no CA and no host name: only for keys checked by pin."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class PinnedHTTPSConnection(HTTPSConnection):
    """A urllib3 HTTPS connection that refuses any server key but :attr:`pin` (set by subclassing)."""

    pin: bytes = b""

    def connect(self) -> None:
        if len(self.pin) != 32:
            raise UnpinnedRequestError("pinned connection without a 32-byte SPKI SHA-256 pin")
        # Whatever the pool was told (requests asks for CA checks): no CA, no host name, our pin.
        self.cert_reqs, self.ca_certs, self.ca_cert_dir, self.ca_cert_data = "CERT_NONE", None, None, None
        self.assert_hostname, self.assert_fingerprint = False, None
        self.ssl_context = unverified_context()
        super().connect()
        der = self.sock.getpeercert(binary_form=True) if isinstance(self.sock, ssl.SSLSocket) else None
        try:
            presented = spki_sha256(der) if der else b""
        except (ValueError, UnsupportedAlgorithm):  # a certificate OpenSSL took but cryptography cannot read
            presented = b""
        if not hmac.compare_digest(presented, self.pin):
            self.close()
            raise PinMismatchError(
                f"https://{self.host}:{self.port} presented TLS key SPKI SHA-256 {presented.hex() or '(none)'}, "
                f"not the attested key {self.pin.hex()}: refused, nothing sent (a tdxvm service makes a new key "
                "when it starts serving another model: attest the endpoint again)",
                presented=presented.hex(),
                pinned=self.pin.hex(),
            )
        self.is_verified = True  # by the pin, which is stronger than a CA here


class PinnedAdapter(HTTPAdapter):
    """An HTTPS adapter whose every connection is held to one SPKI SHA-256; see the module doc."""

    def __init__(self, pin: bytes, *, timeout: Any = DEFAULT_TIMEOUT, **kwargs: Any) -> None:
        if len(pin) != 32:
            raise ValueError(f"the pin must be a 32-byte SHA-256, got {len(pin)} bytes")
        self.pin, self.timeout = bytes(pin), timeout
        conn_cls = type("PinnedHTTPSConnection", (PinnedHTTPSConnection,), {"pin": self.pin})
        self._pool_cls = type("PinnedHTTPSConnectionPool", (HTTPSConnectionPool,), {"ConnectionCls": conn_cls})
        super().__init__(**kwargs)

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any) -> None:
        super().init_poolmanager(connections, maxsize, block=block, **pool_kwargs)
        self.poolmanager.pool_classes_by_scheme = {"https": self._pool_cls}  # no plain-HTTP pools at all

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        raise UnpinnedRequestError(
            f"a pinned session does not go through proxies ({proxy}): the proxy's pools would not check the key"
        )

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: Any = True,
        cert: Any = None,
        proxies: Mapping[str, str] | None = None,
    ) -> requests.Response:
        if not (request.url or "").lower().startswith("https://"):
            raise UnpinnedRequestError(f"a pinned session sends HTTPS only, not {request.url}", request=request)
        try:
            return super().send(
                request,
                stream=stream,
                timeout=self.timeout if timeout is None else timeout,
                verify=verify,
                cert=cert,
                proxies=dict(proxies or {}),
            )
        except requests.RequestException as exc:
            found = _find(exc, PinMismatchError)
            if found is not None and found is not exc:
                raise PinMismatchError(
                    str(found), presented=found.presented, pinned=found.pinned, request=request
                ) from exc
            raise


def pinned_session(pin: bytes, *, timeout: Any = DEFAULT_TIMEOUT) -> requests.Session:
    """A ``requests.Session`` that only talks HTTPS to servers whose key has SHA-256 ``pin``.

    ``timeout`` (seconds, or requests' ``(connect, read)`` pair) applies to requests that give none. Proxies from the
    environment are ignored (``trust_env`` is off), and an explicit proxy is refused."""
    s = requests.Session()
    s.trust_env = False
    adapter = PinnedAdapter(pin, timeout=timeout)
    s.adapters.clear()
    s.mount("https://", adapter)
    s.mount("http://", adapter)  # refuses: HTTPS only
    return s


def _find(exc: BaseException, kind: type[BaseException]) -> Any:
    """The first ``kind`` in ``exc``'s args, causes, contexts and urllib3 ``reason`` chain."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kind):
            return e
        todo += [
            x for x in (*e.args, e.__cause__, e.__context__, getattr(e, "reason", None)) if isinstance(x, BaseException)
        ]
    return None
