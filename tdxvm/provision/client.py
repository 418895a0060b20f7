"""Talk to an attested endpoint's OpenAI-compatible API through its pinned session.

    client = ApiClient.attest(url, model_digest=DIGEST, api_key=KEY, collateral=..., policy=...)
    # = ApiClient(verify_endpoint(url, model_digest=DIGEST, ...), model_digest=DIGEST, api_key=KEY)
    client.complete("Once upon a time", max_tokens=16)["choices"][0]["text"]
    for piece in client.chat_stream([{"role": "user", "content": "Hi"}]): print(piece, end="")

:func:`~tdxvm.provision.endpoint.verify_endpoint` attests the service, pins its TLS
key, replays its RTMR3 event log against the quote and, given a model digest, refuses a
service whose latest model event names another model. :class:`ApiClient` given a
``model_digest`` holds the endpoint to it too: it refuses, before any request, an
endpoint whose replayed log does not name that digest. Without a ``model`` argument
requests name the model the attested event names.

``api_key`` (a service's key, :mod:`tdxvm.provision.apikeys`) goes in every request's
``Authorization`` header, on the pinned session only: the key is never sent before the
endpoint is attested, nor to any other TLS key.

Errors the service answers (4xx/5xx with an OpenAI-style ``{"error": {...}}``) raise
:class:`ApiError` with its message; no answer at all raises :class:`ApiUnreachable`; a
connection to any other TLS key fails before a byte of the prompt is sent
(:class:`tdxvm.provision.pinning.PinMismatchError`), as does an endpoint that serves
another model than the one asked for (:class:`ApiRefused`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import requests

from tdxvm.errors import Refused, TdxvmError, Unreachable
from tdxvm.guest.padding import padded
from tdxvm.provision.endpoint import AttestedEndpoint, verify_endpoint

_JSON = {"Content-Type": "application/json"}


def request_body(doc: dict[str, Any]) -> bytes:
    """A request's JSON, padded so that its size shows the prompt's length only to within
    :data:`~tdxvm.guest.padding.PAD` bytes (the host sees each TLS record's size)."""
    return padded(json.dumps(doc, ensure_ascii=False).encode())


class ApiError(TdxvmError):
    """The service answered with an error, or with something that is not its API (exit 2)."""

    code = "api"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.status = status


class ApiRefused(ApiError, Refused):
    """The endpoint does not serve the model it was to be held to: nothing was sent (exit 1)."""


class ApiUnreachable(ApiError, Unreachable):
    """No answer from the service, or the connection broke (exit 3)."""


@contextmanager
def _answered(what: str) -> Iterator[None]:
    """``requests``' network failures as :class:`ApiUnreachable`; a pin mismatch stays the refusal it is."""
    try:
        yield
    except TdxvmError:
        raise
    except requests.RequestException as exc:
        raise ApiUnreachable(f"{what}: no answer: {exc}") from exc


def _raise_for(r: requests.Response, what: str) -> None:
    if r.status_code < 400:
        return
    try:
        err = r.json().get("error", {})
        message = err.get("message") if isinstance(err, dict) else str(err)
    except ValueError:
        message = r.text[:300]
    raise ApiError(f"{what}: HTTP {r.status_code}: {message}", status=r.status_code)


class ApiClient:
    """The API of one attested endpoint (its ``session`` is pinned to the attested TLS key)."""

    def __init__(
        self,
        endpoint: AttestedEndpoint,
        *,
        timeout: Any = (10, 600),
        model_digest: bytes | None = None,
        api_key: str | None = None,
    ) -> None:
        if model_digest is not None:
            served = endpoint.model
            if served is None or served.digest != bytes(model_digest):
                what = f"serves {served.name} {served.digest_text}" if served else "has no replayed model event"
                raise ApiRefused(
                    f"{endpoint.url} {what}, not the expected model sha256:{bytes(model_digest).hex()}: refused, "
                    "nothing sent",
                    code="model-digest",
                )
        self.endpoint = endpoint
        self.session = endpoint.session(timeout=timeout)
        if api_key is not None:  # sent only on the pinned session: never to a server that is not the attested one
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    @classmethod
    def attest(
        cls,
        url: str,
        *,
        model_digest: bytes | None = None,
        api_key: str | None = None,
        timeout: Any = (10, 600),
        **verify: Any,
    ) -> ApiClient:
        """Attest ``url`` (:func:`verify_endpoint` with ``verify``'s arguments) and talk to it pinned."""
        return cls(
            verify_endpoint(url, model_digest=model_digest, **verify),
            timeout=timeout,
            model_digest=model_digest,
            api_key=api_key,
        )

    def _url(self, path: str) -> str:
        return f"{self.endpoint.url}{path}"

    def models(self) -> list[str]:
        with _answered("GET /v1/models"):
            r = self.session.get(self._url("/v1/models"))
        _raise_for(r, "GET /v1/models")
        return [m["id"] for m in r.json().get("data", [])]

    def model(self, model: str | None) -> str:
        if model is not None:
            return model
        if self.endpoint.model is not None:  # the name the attested model event gives
            return self.endpoint.model.name
        names = self.models()
        if not names:
            raise ApiError("the endpoint serves no model yet")
        return names[0]

    def complete(self, prompt: str, *, model: str | None = None, max_tokens: int = 32, **params: Any) -> dict[str, Any]:
        body = {"model": self.model(model), "prompt": prompt, "max_tokens": max_tokens, **params}
        with _answered("POST /v1/completions"):
            r = self.session.post(self._url("/v1/completions"), data=request_body(body), headers=_JSON)
        _raise_for(r, "POST /v1/completions")
        return r.json()

    def chat_stream(
        self, messages: list[dict[str, str]], *, model: str | None = None, max_tokens: int = 32, **params: Any
    ) -> Iterator[str]:
        """The streamed chat completion's text pieces as they arrive (server-sent events)."""
        body = {"model": self.model(model), "messages": messages, "max_tokens": max_tokens, "stream": True, **params}
        url = self._url("/v1/chat/completions")
        data = request_body(body)
        with _answered("POST /v1/chat/completions"), self.session.post(url, data=data, headers=_JSON, stream=True) as r:
            _raise_for(r, "POST /v1/chat/completions")
            for raw in r.iter_lines():
                line = raw.decode("utf-8", "replace")
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise ApiError(f"stream: {event['error'].get('message', event['error'])}")
                for choice in event.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        yield piece
        raise ApiError("stream ended without [DONE]")

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
