"""OpenAI compatibility as a demanding user checks it: the official ``openai`` client on
the real service over HTTPS (its own TLS key as the trust anchor) with an API key, a
tiny random Llama loaded. Every parameter of the API reference is either honoured, or a
no-op at the value sent, or a 400 that names it; none is silently ignored where it
would change the output. The wire format (SSE chunks, ``usage: null``, ``[DONE]``) is
checked on the raw stream too."""

from __future__ import annotations

import http.client
import json
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from tdxvm.fileio import write_atomic  # noqa: E402
from tdxvm.guest.apikeys import KeyFile, document, generate  # noqa: E402
from tdxvm.guest.engine import Engine, EngineConfig  # noqa: E402
from tdxvm.guest.gate import Limits  # noqa: E402
from tdxvm.guest.server import ModelHolder, create_app  # noqa: E402
from tdxvm.guest.tls import ensure_identity  # noqa: E402

from .uvserver import Served  # noqa: E402

NAME = "tiny-llama"
MESSAGES = [{"role": "user", "content": "Tell me a story."}]
PROMPT = "Once upon a time"


class Service:
    """The service over HTTPS with one API key; ``client()`` is what a user would build."""

    def __init__(self, root: Path, model: Path) -> None:
        self.key = generate()
        write_atomic(root / "api-keys", document({"user": self.key}), mode=0o600)
        identity = ensure_identity(root / "tls", ["127.0.0.1"])
        self.ssl = ssl.create_default_context(cafile=str(identity.cert_path))
        self.holder = ModelHolder(NAME)
        self.holder.engine = Engine.load(EngineConfig(model_dir=model, name=NAME, threads=1))
        app = create_app(self.holder, keys=KeyFile(root / "api-keys"), limits=Limits(max_body=64 * 1024))
        self.served = Served(app, identity)
        self.url = self.served.url

    def client(self, key: str | None = None) -> Any:
        return openai.OpenAI(
            base_url=self.url + "/v1",
            api_key=self.key if key is None else key,
            max_retries=0,
            timeout=60,
            http_client=openai.DefaultHttpxClient(verify=self.ssl),
        )

    def raw(self, path: str, body: dict[str, Any] | None = None, *, key: bool = True) -> tuple[int, str]:
        """POST ``body`` as JSON (GET without one); the status and the body text as sent (SSE unparsed)."""
        conn = http.client.HTTPSConnection("127.0.0.1", self.served.port, context=self.ssl, timeout=60)
        try:
            headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {self.key}"} if key else {})
            conn.request("GET" if body is None else "POST", path, None if body is None else json.dumps(body), headers)
            r = conn.getresponse()
            return r.status, r.read().decode()
        finally:
            conn.close()

    def stop(self) -> None:
        self.served.stop()
        assert self.holder.engine is not None
        self.holder.engine.close()


@pytest.fixture(scope="module")
def service(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    s = Service(tmp_path_factory.mktemp("openai-compat"), tiny_model)
    yield s
    s.stop()


def sse(text: str) -> list[Any]:
    """The events of an SSE body: parsed JSON objects, and the final ``[DONE]`` as a string."""
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), events
    return [e[6:] if e == "data: [DONE]" else json.loads(e[6:]) for e in events]


# -- the response objects ----------------------------------------------------------------


def test_models_list_and_retrieve(service):
    client = service.client()
    (model,) = client.models.list().data
    assert (model.id, model.object, model.owned_by) == (NAME, "model", "tdxvm") and isinstance(model.created, int)
    got = client.models.retrieve(NAME)
    assert (got.id, got.object, got.created) == (NAME, "model", model.created)
    with pytest.raises(openai.NotFoundError, match="gpt-4o") as missing:
        client.models.retrieve("gpt-4o")
    assert missing.value.body["code"] == "model_not_found"


def test_chat_completion_fields(service):
    before = int(time.time())
    r = service.client().chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=5, temperature=0)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == NAME
    assert before - 1 <= r.created <= time.time() + 1
    assert isinstance(r.system_fingerprint, str) and r.system_fingerprint.startswith("fp_")
    (choice,) = r.choices
    assert (choice.index, choice.message.role, choice.finish_reason) == (0, "assistant", "length")
    assert isinstance(choice.message.content, str) and choice.logprobs is None
    assert (r.usage.completion_tokens, r.usage.total_tokens) == (5, r.usage.prompt_tokens + 5)


def test_chat_stream_with_usage_on_the_wire(service):
    body = {"model": NAME, "messages": MESSAGES, "max_tokens": 4, "temperature": 0, "stream": True}
    status, text = service.raw("/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    assert status == 200
    *chunks, done = sse(text)
    assert done == "[DONE]"
    assert {(c["id"], c["created"], c["object"], c["model"], c["system_fingerprint"]) for c in chunks} == {
        (chunks[0]["id"], chunks[0]["created"], "chat.completion.chunk", NAME, chunks[0]["system_fingerprint"])
    }
    # with include_usage every chunk carries "usage": null, the last one the counts and no choices
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]][-1] == "length"
    whole = service.client().chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=4, temperature=0)
    streamed = list(service.client().chat.completions.create(**{**body, "stream": True}))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == whole.choices[0].message.content
    assert all(c.usage is None for c in streamed)  # no usage chunk unless asked for


def test_legacy_completion_and_its_stream(service):
    client = service.client()
    r = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=6, temperature=0)
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.system_fingerprint.startswith("fp_")
    streamed = list(
        client.completions.create(
            model=NAME, prompt=PROMPT, max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text
    assert streamed[-1].usage.completion_tokens == r.usage.completion_tokens == 6
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "length"
    nested = client.completions.create(model=NAME, prompt=[[1, 5, 7]], max_tokens=16, temperature=0)
    flat = client.completions.create(model=NAME, prompt=[1, 5, 7], max_tokens=16, temperature=0)
    assert nested.choices[0].text == flat.choices[0].text  # one prompt as a batch of one token list


# -- parameters ----------------------------------------------------------------------------


def test_parameters_that_change_nothing_at_the_value_sent_are_accepted(service):
    """What clients and frameworks send by default: accepted, and the output is the greedy one."""
    client = service.client()
    base = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=8, temperature=0)
    want = base.choices[0].message.content
    same = [
        {"user": "u-1", "store": False, "metadata": {"k": "v"}, "service_tier": "auto"},
        {"n": 1, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "logprobs": False},
        {"response_format": {"type": "text"}, "tool_choice": "none", "parallel_tool_calls": False},
        {"max_completion_tokens": 8, "max_tokens": None, "seed": 7, "stop": None, "top_p": 1},
        {"stream_options": None, "safety_identifier": "x", "prompt_cache_key": "x", "modalities": ["text"]},
    ]
    for extra in same:
        kw = {"max_tokens": 8, **extra}
        r = client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=0, **kw)
        assert r.choices[0].message.content == want, extra
    assert client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "hi", "name": "bob"}], max_tokens=2
    ).choices
    legacy = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    for extra in ({"best_of": 1, "echo": False, "suffix": None, "user": "u"}, {"logprobs": None, "n": 1}):
        got = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=8, temperature=0, **extra)
        assert got.choices[0].text == legacy, extra


def test_top_p_zero_is_greedy(service):
    """OpenAI takes top_p in [0, 1]; 0 keeps only the most likely token."""
    client = service.client()
    greedy = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    assert client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, top_p=0).choices[0].text == greedy


CHAT_REFUSED = [
    ({"n": 2}, "n"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": -1.0}, "frequency_penalty"),
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logit_bias": {"5": 10}}, "logit_bias"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"reasoning_effort": "low"}, "reasoning_effort"),
    ({"audio": {"voice": "alloy", "format": "wav"}, "modalities": ["text", "audio"]}, "modalities"),
    ({"seed": 2**64}, "seed"),
    ({"extra_body": {"top_k": 5}}, "top_k"),
    ({"extra_body": {"min_p": 0.1}}, "min_p"),
    ({"extra_body": {"repetition_penalty": 1.3}}, "repetition_penalty"),
    ({"extra_body": {"no_such_parameter": 1}}, "no_such_parameter"),
    ({"extra_body": {"echo": True}}, "echo"),  # a legacy-completions parameter sent to chat
    ({"stream": True, "stream_options": {"continuous_usage_stats": True}}, "stream_options.continuous_usage_stats"),
]
COMPLETION_REFUSED = [
    ({"n": 3}, "n"),
    ({"best_of": 2}, "best_of"),
    ({"logprobs": 0}, "logprobs"),  # 0 already asks for the chosen tokens' log probabilities
    ({"echo": True}, "echo"),
    ({"suffix": "end"}, "suffix"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"prompt": [[1, 2], [3, 4]]}, "prompt"),
    ({"extra_body": {"top_k": 5}}, "top_k"),
]


@pytest.mark.parametrize(("kw", "param"), CHAT_REFUSED)
def test_unsupported_chat_parameters_are_a_400_naming_them(service, kw, param):
    with pytest.raises(openai.BadRequestError) as refused:
        service.client().chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=2, **kw)
    err = refused.value
    assert err.status_code == 400 and err.body["param"] == param and param in err.message, err.body


@pytest.mark.parametrize(("kw", "param"), COMPLETION_REFUSED)
def test_unsupported_completion_parameters_are_a_400_naming_them(service, kw, param):
    with pytest.raises(openai.BadRequestError) as refused:
        service.client().completions.create(model=NAME, **{"prompt": PROMPT, "max_tokens": 2, **kw})
    err = refused.value
    assert err.status_code == 400 and err.body["param"] == param and param in err.message, err.body


def test_messages_the_service_cannot_render_are_a_400(service):
    client = service.client()
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    cases = [
        ([{"role": "user"}], "messages.0.content"),
        ([*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [call]}], "messages.1.tool_calls"),
        ([{"role": "user", "content": 5}], "messages.0.content"),
    ]
    for messages, param in cases:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=NAME, messages=messages, max_tokens=2)
        assert refused.value.body["param"] == param, refused.value.body


# -- errors as the client parses them ------------------------------------------------------


def test_errors_as_the_openai_client_raises_them(service):
    status, text = service.raw("/v1/models", key=False)  # the openai client refuses to send no key
    assert status == 401 and json.loads(text)["error"]["code"] == "missing_api_key"
    with pytest.raises(openai.AuthenticationError, match="Incorrect API key") as wrong:
        service.client(key=generate()).chat.completions.create(model=NAME, messages=MESSAGES)
    assert wrong.value.body["code"] == "invalid_api_key" and wrong.value.body["type"] == "invalid_request_error"
    client = service.client()
    with pytest.raises(openai.NotFoundError, match="does not exist") as unknown:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert unknown.value.body["param"] == "model" and unknown.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=3)
    with pytest.raises(openai.APIStatusError, match="larger than") as big:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x" * 100_000}])
    assert big.value.status_code == 413 and big.value.body["code"] == "request_too_large"
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=NAME, prompt=PROMPT, max_tokens=10_000)
