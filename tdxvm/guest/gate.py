"""The inference service's gate: what every HTTP request passes before the API sees it.

In this order (an ASGI middleware, :class:`Gate`):

1. a bound on requests in flight (``max_requests``): one more is answered 429 with
   ``Retry-After``, in OpenAI's error shape, without reading its body;
2. the API key, on every route except :data:`PUBLIC` (``/health``, which says only
   whether the model is loaded, and ``/v1/attestation``, which clients need before they
   trust the service with a key; these take GET only, so a client without a key never
   has a body read): ``Authorization: Bearer KEY``, checked against the
   released key hashes (:class:`~tdxvm.guest.apikeys.KeyFile`); no key or another key is
   a 401 that names neither the keys nor their count, and token counts, the model list and
   the metrics are never answered without one;
3. a request body cap (``max_body``): a ``Content-Length`` over it is a 413 before a
   byte is read, and a chunked body is read only up to it, so a few huge requests cannot
   run the TD out of memory.

Tried as a client on the host's network would: a 400 MiB body raised the old service's
RSS by 1.2 GiB; now it is refused at the header.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tdxvm.guest.apikeys import KeyFile
from tdxvm.guest.padding import padded

PUBLIC = frozenset({"/health", "/v1/attestation"})
DEFAULT_MAX_BODY = 2 * 2**20
DEFAULT_MAX_REQUESTS = 128
RETRY_AFTER = 1  # seconds, for 429


@dataclass(frozen=True, slots=True)
class Limits:
    max_body: int = DEFAULT_MAX_BODY  # bytes of one request body
    max_requests: int = DEFAULT_MAX_REQUESTS  # HTTP requests in flight at once


def error(
    status: int,
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """The service's error answer in OpenAI's shape, ``{"error": {message, type, param, code}}``
    (a 429 says when to retry); the gate's and the API's alike. Padded as completions are
    (:mod:`tdxvm.guest.padding`): a message may name a count, such as a prompt's tokens."""
    doc = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return Response(
        padded(json.dumps(doc, ensure_ascii=False).encode()),
        status_code=status,
        media_type="application/json",
        headers={**({"Retry-After": str(RETRY_AFTER)} if status == 429 else {}), **(headers or {})},
    )


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


class Gate:
    """ASGI middleware: the checks of the module doc; ``keys`` None serves without API keys."""

    def __init__(self, app: ASGIApp, *, keys: KeyFile | None, limits: Limits) -> None:
        self.app, self.keys, self.limits = app, keys, limits
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.in_flight >= self.limits.max_requests:
            answer = error(
                429,
                f"too many requests in flight ({self.limits.max_requests}); retry after {RETRY_AFTER} s",
                type="requests",
                code="rate_limit_exceeded",
            )
            return await answer(scope, receive, send)
        self.in_flight += 1
        try:
            await self._checked(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _checked(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] in PUBLIC and scope.get("method") not in ("GET", "HEAD"):
            answer = error(405, f"{scope['path']} takes GET only", code="method_not_allowed", headers={"Allow": "GET"})
            return await answer(scope, receive, send)
        if self.keys is not None and scope["path"] not in PUBLIC:
            token = _bearer(scope)
            if token is None:
                answer = error(
                    401,
                    "You didn't provide an API key: send it as `Authorization: Bearer KEY`.",
                    code="missing_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                return await answer(scope, receive, send)
            if self.keys.check(token) is None:
                answer = error(
                    401,
                    "Incorrect API key provided.",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
                )
                return await answer(scope, receive, send)
        length = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > self.limits.max_body):
            return await self._too_large(scope, receive, send)
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            body = await self._body(receive)
            if body is None:
                return await self._too_large(scope, receive, send)
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    async def _body(self, receive: Receive) -> bytes | None:
        """The whole request body, or None once it passes the cap (the rest is not read)."""
        parts, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return b"".join(parts)
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.limits.max_body:
                return None
            parts.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(parts)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        answer = error(413, f"request body larger than {self.limits.max_body} bytes", code="request_too_large")
        await answer(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` once, then what the connection says (a disconnect)."""
    sent = False

    async def again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again
