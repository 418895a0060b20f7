"""The OpenAI-compatible HTTP API over one :class:`~tdxvm.guest.engine.Engine`.

Endpoints, as vLLM and llama.cpp's server have them: ``POST /v1/completions``,
``POST /v1/chat/completions`` (``stream: true`` gives server-sent events in OpenAI's
chunk format, ending with ``data: [DONE]``), ``GET /v1/models`` and
``GET /v1/models/{id}``, ``GET /health`` (503 until the model is loaded), ``GET
/metrics`` (Prometheus text) and, on an attested TLS key, ``GET
/v1/attestation?nonce=HEX`` (:mod:`tdxvm.guest.attestation`).

Every client error is a 4xx in OpenAI's shape, ``{"error": {"message", "type", "param",
"code"}}``: bad JSON, missing or ill-typed fields, out-of-range or unsupported values
(400), an unknown model (404), a prompt plus ``max_tokens`` beyond the context (400,
``context_length_exceeded``). Bodies are validated strictly (no ``"5"`` for 5).

Every parameter of OpenAI's API reference is honoured, or ignored because it cannot
change what is generated (:data:`_IGNORED`), or refused with a 400 naming it unless it
is sent at the value that turns its feature off (:data:`_OFF_CHAT`,
:data:`_OFF_COMPLETION`: ``logprobs: false``, ``response_format: {"type": "text"}``);
an unknown parameter is a 400 too, as OpenAI answers it. Nothing a client asks for is
silently dropped where it would change the output.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tdxvm.guest.apikeys import KeyFile
from tdxvm.guest.attestation import Attester
from tdxvm.guest.engine import Done, Engine, Event, Failed, RequestError, SamplingParams, Token
from tdxvm.guest.gate import Gate, Limits, error
from tdxvm.guest.padding import padded

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/attestation", "/health", "/metrics")
# OpenAI parameters accepted and ignored: none of them changes what is generated
_IGNORED = frozenset(
    {
        "user",
        "safety_identifier",
        "store",
        "metadata",
        "service_tier",
        "prompt_cache_key",
        "prediction",  # a latency hint: the output is the model's own either way
        "parallel_tool_calls",  # no tools, so no calls
    }
)
# features this server does not have, each with the values that turn it off (a client may
# send those); any other value is a 400 that names the parameter
_OFF_COMMON: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
    # vLLM's and transformers serve's sampling extensions
    "top_k": (None, 0, -1),
    "min_p": (None, 0),
    "repetition_penalty": (None, 1),
    "min_tokens": (None, 0),
    "ignore_eos": (None, False),
}
_OFF_CHAT: dict[str, tuple[Any, ...]] = {
    **_OFF_COMMON,
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "web_search_options": (None,),
}
_OFF_COMPLETION: dict[str, tuple[Any, ...]] = {
    **_OFF_COMMON,
    "logprobs": (None,),  # 0 asks for the chosen tokens' log probabilities
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
}
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

# -- request bodies ----------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")  # vLLM's continuous_usage_stats: not done here
    include_usage: bool | None = None
    include_obfuscation: bool | None = (
        None  # false: events not padded (tdxvm.guest.padding); OpenAI's switch for its own
    )


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    n: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None


class CompletionRequest(_Body):
    prompt: str | list[int] | list[str] | list[list[int]]


_TEMPLATE_KEYS = ("name", "tool_call_id")  # message keys a chat template may read, passed on as they come


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # name, tool_call_id: the template may use them
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


# -- errors ------------------------------------------------------------------------------


def _validation_error(_: Request, exc: Exception) -> Response:
    errs = exc.errors() if isinstance(exc, RequestValidationError) else []
    first = errs[0] if errs else {"loc": (), "msg": str(exc), "type": ""}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx")
        return error(
            400,
            f"request body is not valid JSON: {ctx.get('error') if isinstance(ctx, dict) else first['msg']}",
            code="invalid_json",
        )
    if not loc:
        return error(400, "request body must be a JSON object", code="invalid_body")
    msgs = [first["msg"]]
    base = tuple(first["loc"])[:-1]  # the field, when the first error is under a union member's tag
    union = [e for e in errs[1:] if len(base) >= 2 and tuple(e.get("loc", ()))[: len(base)] == base]
    if union:  # a value that fits no member of a union: one error per member, under the member's name
        prefix = tuple(first["loc"])
        for e in union:
            prefix = _common_prefix(prefix, tuple(e["loc"]))
            msgs += [] if e["msg"] in msgs else [e["msg"]]
        loc = [str(x) for x in prefix if x != "body"]
    field = ".".join(loc)
    return error(
        400,
        f"{field}: {' or '.join(msgs)}",
        param=field,
        code="missing_field" if first.get("type") == "missing" else "invalid_value",
    )


def _common_prefix(a: tuple[Any, ...], b: tuple[Any, ...]) -> tuple[Any, ...]:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _handlers() -> dict[type[Exception], Callable[[Request, Any], Response]]:
    return {
        RequestValidationError: _validation_error,
        RequestError: lambda _, e: error(e.status, e.message, type=e.type, param=e.param, code=e.code),
        HTTPException: lambda _, e: error(
            e.status_code, str(e.detail), type="not_found_error" if e.status_code == 404 else "invalid_request_error"
        ),
        Exception: lambda _, e: error(500, f"internal error: {type(e).__name__}", type="server_error"),
    }


# -- metrics -----------------------------------------------------------------------------


class Metrics:
    """Prometheus metrics in a registry of their own (several apps may live in one process)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, waiting: Callable[[], int], running: Callable[[], int]) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "tdxvm_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "tdxvm_request_duration_seconds",
            "Time from request to end of response",
            ["endpoint"],
            buckets=_LATENCY,
            registry=r,
        )
        self.ttft = Histogram(
            "tdxvm_time_to_first_token_seconds",
            "Time from request to first generated token",
            ["endpoint"],
            buckets=_LATENCY,
            registry=r,
        )
        self.tpot = Histogram(
            "tdxvm_time_per_output_token_seconds",
            "Mean time per generated token after the first",
            ["endpoint"],
            buckets=_PER_TOKEN,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "tdxvm_prompt_tokens", "Prompt tokens of finished requests", ["endpoint"], registry=r
        )
        self.completion_tokens = Counter(
            "tdxvm_completion_tokens", "Generated tokens of finished requests", ["endpoint"], registry=r
        )
        Gauge("tdxvm_requests_waiting", "Requests queued for a place in the running batch", registry=r).set_function(
            waiting
        )
        Gauge("tdxvm_requests_running", "Requests decoding in the running batch", registry=r).set_function(running)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def generation(self, endpoint: str, prompt_tokens: int) -> Callable[[Event], None]:
        """An observer for one request's events: TTFT, time per token, token counts."""
        t0, first = time.perf_counter(), 0.0

        def observe(ev: Event) -> None:
            nonlocal first
            now = time.perf_counter()
            if isinstance(ev, Token) and not first:
                first = now
                self.ttft.labels(endpoint).observe(now - t0)
            elif isinstance(ev, Done):
                self.prompt_tokens.labels(endpoint).inc(prompt_tokens)
                self.completion_tokens.labels(endpoint).inc(ev.completion_tokens)
                if ev.completion_tokens > 1:
                    self.tpot.labels(endpoint).observe((now - first) / (ev.completion_tokens - 1))

        return observe

    def middleware(self, app: ASGIApp) -> ASGIApp:
        """ASGI middleware counting every HTTP request by endpoint and status, with its duration."""

        async def counted(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                return await app(scope, receive, send)
            t0, status, endpoint = time.perf_counter(), 500, scope["path"] if scope["path"] in ENDPOINTS else "other"

            async def watch(msg: Message) -> None:
                nonlocal status
                status = msg["status"] if msg["type"] == "http.response.start" else status
                await send(msg)

            try:
                await app(scope, receive, watch)
            finally:
                self.requests.labels(endpoint, str(status)).inc()
                self.latency.labels(endpoint).observe(time.perf_counter() - t0)

        return counted


# -- the app -----------------------------------------------------------------------------


class ModelHolder:
    """The served model's name, and its engine once loaded (``/health`` reports which)."""

    def __init__(self, name: str) -> None:
        self.name, self.created = name, int(time.time())
        self.engine: Engine | None = None
        self.error: str | None = None

    def require(self, body: _Body, off: dict[str, tuple[Any, ...]]) -> Engine:
        if self.engine is None:
            raise RequestError(
                f"model {self.name} is {'not loaded: ' + self.error if self.error else 'still loading'}",
                status=503,
                type="service_unavailable",
            )
        if body.model != self.name:
            raise RequestError(
                f"The model `{body.model}` does not exist.",
                status=404,
                param="model",
                code="model_not_found",
                type="not_found_error",
            )
        _check_parameters(body, off)
        return self.engine


def _check_parameters(body: _Body, off: dict[str, tuple[Any, ...]]) -> None:
    """Refuse what this server cannot do: ``n`` > 1, a feature of ``off`` turned on, an unknown parameter."""
    if body.n not in (None, 1):
        raise RequestError("n: only one choice per request is supported (n=1)", param="n", code="unsupported_parameter")
    extra = body.model_extra or {}
    for name, values in off.items():
        if name in extra and not any(_same(extra[name], v) for v in values):
            alt = " or ".join(json.dumps(v) for v in values if v is not None)
            raise RequestError(
                f"{name} is not supported by this server; leave it out{f' or send {alt}' if alt else ''}",
                param=name,
                code="unsupported_parameter",
            )
    for name in extra:
        if name not in off and name not in _IGNORED:
            raise RequestError(f"Unrecognized request argument supplied: {name}", param=name, code="unknown_parameter")


def _same(value: Any, off: Any) -> bool:
    """``value`` equals ``off`` as JSON values do: ``0`` is ``0.0``, but ``false`` is not ``0``."""
    if isinstance(value, bool) or isinstance(off, bool):
        return value is off
    return bool(value == off)


def _params(body: _Body, engine: Engine, prompt: list[int], max_tokens: int | None, param: str) -> SamplingParams:
    stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
    if len(stops) > 4 or not all(stops):
        raise RequestError("stop: up to 4 non-empty strings", param="stop")
    t, p = body.temperature, body.top_p
    return SamplingParams(
        max_tokens=engine.check_length(prompt, max_tokens, param=param),
        temperature=1.0 if t is None else t,
        top_p=1.0 if p is None else p,
        stop=tuple(stops),
        seed=body.seed,
    )


def _completion_ids(engine: Engine, prompt: str | list[int] | list[str] | list[list[int]]) -> list[int]:
    """One prompt's token ids: a string, token ids, or a batch of one of either."""
    if isinstance(prompt, str):
        return engine.encode(prompt)
    ids: list[Any] = prompt
    if prompt and all(isinstance(x, (str, list)) for x in prompt):
        if len(prompt) != 1:
            raise RequestError("prompt: batched prompts are not supported; send one prompt per request", param="prompt")
        if isinstance(one := prompt[0], str):
            return engine.encode(one)
        ids = one
    if not ids or not all(isinstance(t, int) and 0 <= t < len(engine.tokenizer) for t in ids):
        raise RequestError("prompt: token ids must be a non-empty list of ids in the vocabulary", param="prompt")
    return [int(t) for t in ids]


def _chat_messages(body: ChatRequest) -> list[dict[str, str]]:
    out = []
    for i, m in enumerate(body.messages):
        for name in ("tool_calls", "function_call"):
            if (m.model_extra or {}).get(name):
                raise RequestError(
                    f"messages.{i}.{name}: tool calls are not supported by this server", param=f"messages.{i}.{name}"
                )
        content = m.content
        if content is None:
            raise RequestError(
                f"messages.{i}.content: Field required", param=f"messages.{i}.content", code="missing_field"
            )
        if isinstance(content, list):
            if not all(part.get("type") == "text" and isinstance(part.get("text"), str) for part in content):
                raise RequestError(
                    f"messages.{i}.content: only text parts are supported", param=f"messages.{i}.content"
                )
            content = "".join(part["text"] for part in content)
        extra = {k: v for k, v in (m.model_extra or {}).items() if k in _TEMPLATE_KEYS and isinstance(v, str)}
        out.append({"role": m.role, "content": content, **extra})  # what the model's chat template may read
    return out


def create_app(
    holder: ModelHolder, *, attester: Attester | None = None, keys: KeyFile | None = None, limits: Limits | None = None
) -> FastAPI:
    """The API for ``holder``'s model; whoever loads the model sets ``holder.engine``.

    With ``attester`` (a service on an attested TLS key) ``GET /v1/attestation`` answers
    quotes; without, it is a 404 that says so. Every request passes
    :class:`~tdxvm.guest.gate.Gate` first: ``limits``, and with ``keys`` an API key on
    every route but ``/health`` and ``/v1/attestation``."""
    metrics = Metrics(
        waiting=lambda: holder.engine.waiting() if holder.engine else 0,
        running=lambda: holder.engine.running() if holder.engine else 0,
    )
    app = FastAPI(title="tdxvm inference", docs_url=None, redoc_url=None)
    for kind, handler in _handlers().items():
        app.add_exception_handler(kind, handler)
    app.add_middleware(Gate, keys=keys, limits=limits or Limits())  # type: ignore[arg-type]
    app.add_middleware(metrics.middleware)  # type: ignore[arg-type]  # outermost: counts what the gate refuses

    @app.get("/health")
    def health() -> JSONResponse:
        if holder.engine is not None:
            return JSONResponse({"status": "ok"})
        return JSONResponse(
            {"status": "error", "message": holder.error} if holder.error else {"status": "loading"}, status_code=503
        )

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/attestation")
    def attestation(nonce: str | None = None) -> JSONResponse:  # sync: FastAPI runs it on a worker thread
        if attester is None:
            raise RequestError(
                "this server has no attested TLS key (start it with --tls-dir)",
                status=404,
                type="not_found_error",
                code="attestation_unavailable",
            )
        return JSONResponse(attester.attest(nonce), headers={"Cache-Control": "no-store"})

    def model_card() -> dict[str, Any]:
        ctx = holder.engine.context_length if holder.engine else None
        return {
            "id": holder.name,
            "object": "model",
            "created": holder.created,
            "owned_by": "tdxvm",
            "max_model_len": ctx,
        }

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    def model(model: str) -> dict[str, Any]:
        if model != holder.name:
            raise RequestError(
                f"The model `{model}` does not exist.",
                status=404,
                param="model",
                code="model_not_found",
                type="not_found_error",
            )
        return model_card()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Response:
        engine = holder.require(body, _OFF_COMPLETION)
        ids = _completion_ids(engine, body.prompt)
        params = _params(body, engine, ids, 16 if body.max_tokens is None else body.max_tokens, "prompt")
        return await _respond(engine, body, ids, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest) -> Response:
        engine = holder.require(body, _OFF_CHAT)
        ids = engine.encode_chat(_chat_messages(body))
        params = _params(body, engine, ids, body.max_completion_tokens or body.max_tokens, "messages")
        return await _respond(engine, body, ids, params, chat=True)

    async def _respond(engine: Engine, body: _Body, ids: list[int], params: SamplingParams, *, chat: bool) -> Response:
        observe = metrics.generation("/v1/chat/completions" if chat else "/v1/completions", len(ids))
        gen = _Generation(engine, ids, params, chat=chat, observe=observe)  # refused here if the queue is full
        if not body.stream:
            return await gen.whole()
        usage = bool(body.stream_options and body.stream_options.include_usage)
        gen.pad = not (body.stream_options and body.stream_options.include_obfuscation is False)
        return StreamingResponse(
            gen.sse(usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return app


class _Generation:
    """One request on the event loop: the engine's events in, OpenAI's response objects out."""

    def __init__(
        self, engine: Engine, ids: list[int], params: SamplingParams, *, chat: bool, observe: Callable[[Event], None]
    ) -> None:
        self.chat, self.prompt_tokens, self.stream_usage, self.pad = chat, len(ids), False, True
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.head = {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": engine.name,
            "system_fingerprint": engine.fingerprint,
        }
        loop, self.queue = asyncio.get_running_loop(), asyncio.Queue[Event]()

        def sink(ev: Event) -> None:  # on the engine's worker thread: counted even if the client left
            observe(ev)
            loop.call_soon_threadsafe(self.queue.put_nowait, ev)

        self.job = engine.submit(ids, params, sink)

    async def events(self) -> AsyncIterator[Event]:
        """Token events, then one Done or Failed; the job is cancelled if the consumer leaves."""
        try:
            while True:
                ev = await self.queue.get()
                yield ev
                if not isinstance(ev, Token):
                    return
        finally:
            self.job.cancel()

    def usage(self, completion: int) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    async def whole(self) -> Response:
        parts: list[str] = []
        async for ev in self.events():
            if isinstance(ev, Failed):
                return error(500, ev.message, type="server_error")
            parts.append(ev.text)
            if isinstance(ev, Done):
                text = "".join(parts)
                choice = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
                doc = {
                    **self.head,
                    "choices": [{"index": 0, **choice, "logprobs": None, "finish_reason": ev.finish_reason}],
                    "usage": self.usage(ev.completion_tokens),
                }
                return Response(padded(json.dumps(doc, ensure_ascii=False).encode()), media_type="application/json")
        return error(500, "generation ended without a result", type="server_error")

    def _chunk(
        self, text: str | None, finish: str | None = None, *, role: bool = False, usage: int | None = None
    ) -> bytes:
        head = {**self.head, "object": "chat.completion.chunk"} if self.chat else self.head
        if usage is not None:
            return self._data({**head, "choices": [], "usage": self.usage(usage)})
        if self.stream_usage:  # OpenAI: with include_usage every other chunk has "usage": null
            head = {**head, "usage": None}
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            return self._data(
                {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            )
        return self._data(
            {**head, "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}
        )

    def _data(self, obj: dict[str, Any]) -> bytes:
        """One server-sent event, ``data: JSON``, padded (:mod:`tdxvm.guest.padding`) unless turned off."""
        event = b"data: " + json.dumps(obj, ensure_ascii=False).encode()
        return (padded(event, end=b"\n\n") if self.pad else event) + b"\n\n"

    async def sse(self, usage: bool) -> AsyncIterator[bytes]:
        self.stream_usage = usage
        if self.chat:
            yield self._chunk(None, role=True)
        async for ev in self.events():
            if isinstance(ev, Failed):
                yield self._data(
                    {"error": {"message": ev.message, "type": "server_error", "param": None, "code": None}}
                )
            elif ev.text:
                yield self._chunk(ev.text)
            if isinstance(ev, Done):
                yield self._chunk(None, ev.finish_reason)
                if usage:
                    yield self._chunk(None, usage=ev.completion_tokens)
        yield b"data: [DONE]\n\n"
