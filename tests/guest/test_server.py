"""The inference service: a real uvicorn server on 127.0.0.1 with a tiny random Llama,
driven by the official ``openai`` client, checked token for token against ``model.generate``."""

from __future__ import annotations

import http.client as http_client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.error import HTTPError

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from tdxvm.guest.engine import Done, Engine, EngineConfig, SamplingParams, Token  # noqa: E402
from tdxvm.guest.padding import PAD  # noqa: E402
from tdxvm.guest.serve import load_in_background  # noqa: E402
from tdxvm.guest.server import ModelHolder, create_app  # noqa: E402
from tdxvm.guest.text import StopMatcher  # noqa: E402

NAME = "tiny-llama"
PROMPT = "Hello, how are you today?"
CHAT = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Tell me a story."}]


class Server:
    """uvicorn in a thread, on a socket bound to a free port of 127.0.0.1."""

    def __init__(self, holder: ModelHolder) -> None:
        self.holder, self.app = holder, create_app(holder)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)

    def client(self) -> Any:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0, timeout=60)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def http(method: str, url: str, body: bytes | dict | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, raw = r.status, r.read()
    except HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()


def metrics(url: str) -> dict[tuple[str, tuple], float]:
    _, text = http("GET", url + "/metrics")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[Server]:
    holder = ModelHolder(NAME)
    holder.engine = Engine.load(EngineConfig(model_dir=tiny_model, name=NAME, threads=1))
    s = Server(holder)
    yield s
    s.stop()
    holder.engine.close()


# -- results equal direct generation -----------------------------------------------------


def test_completion_equals_generate(server, ref):
    ids = ref.tok(PROMPT)["input_ids"]
    want = ref.generate(ids, 40)
    r = server.client().completions.create(model=NAME, prompt=PROMPT, max_tokens=40, temperature=0)
    assert r.choices[0].text == ref.text(want)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        len(ids),
        len(want),
        len(ids) + len(want),
    )
    assert r.choices[0].finish_reason == ("length" if len(want) == 40 else "stop")
    assert r.model == NAME and r.object == "text_completion"
    by_ids = server.client().completions.create(model=NAME, prompt=ids, max_tokens=40, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text


def test_chat_equals_generate(server, ref):
    ids = ref.chat_ids(CHAT)
    want = ref.generate(ids, 50)
    r = server.client().chat.completions.create(model=NAME, messages=CHAT, max_tokens=50, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text(want)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(want))


def test_streamed_chat_equals_whole(server):
    client = server.client()
    whole = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=60, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=NAME, messages=CHAT, max_tokens=60, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.id for c in chunks} == {chunks[0].id} and all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 5  # really token by token


def test_streamed_completion_and_done_marker(server):
    whole = server.client().completions.create(model=NAME, prompt=PROMPT, max_tokens=30, temperature=0)
    streamed = list(
        server.client().completions.create(model=NAME, prompt=PROMPT, max_tokens=30, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    req = urllib.request.Request(
        server.url + "/v1/completions",
        data=json.dumps({"model": NAME, "prompt": PROMPT, "max_tokens": 3, "stream": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_stop_strings(server, ref):
    ids = ref.tok(PROMPT)["input_ids"]
    full = ref.text(ref.generate(ids, 40))
    stop = full[12:15]
    want = full[: full.index(stop)]
    client = server.client()
    r = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop, "never-there"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
    assert r.usage.completion_tokens < 40
    streamed = list(
        client.completions.create(model=NAME, prompt=PROMPT, max_tokens=40, temperature=0, stop=stop, stream=True)
    )
    assert "".join(c.choices[0].text for c in streamed) == want


def test_seeded_sampling_is_reproducible_and_equals_generate(server, ref):
    ids = ref.tok(PROMPT)["input_ids"]
    client = server.client()
    a, b = (
        client.completions.create(model=NAME, prompt=PROMPT, max_tokens=30, temperature=0.8, top_p=0.9, seed=1234)
        .choices[0]
        .text
        for _ in range(2)
    )
    assert a == b
    torch.manual_seed(1234)
    assert a == ref.text(ref.generate(ids, 30, do_sample=True, temperature=0.8, top_p=0.9, top_k=None))


def test_concurrent_requests_are_not_interleaved(server, ref):
    prompts = ["The quick brown fox", "Confidential computing", "Tell me a story about", "You are a helpful"]
    alone = [ref.text(ref.generate(ref.tok(p)["input_ids"], 40 + 5 * i)) for i, p in enumerate(prompts)]

    def ask(i: int) -> str:
        client = server.client()
        if i % 2:
            return "".join(
                c.choices[0].text
                for c in client.completions.create(
                    model=NAME, prompt=prompts[i], max_tokens=40 + 5 * i, temperature=0, stream=True
                )
            )
        return (
            client.completions.create(model=NAME, prompt=prompts[i], max_tokens=40 + 5 * i, temperature=0)
            .choices[0]
            .text
        )

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, [0, 1, 2, 3] * 2))
    assert got == alone * 2


def test_cancelled_request_stops_generating(server):
    engine: Engine = server.holder.engine
    events: list = []
    done = threading.Event()

    def sink(ev: Any) -> None:
        events.append(ev)
        if sum(isinstance(e, Token) for e in events) == 3:
            job.cancel()
        if not isinstance(ev, Token):
            done.set()

    job = engine.submit(engine.encode(PROMPT), SamplingParams(max_tokens=100, temperature=0), sink)
    assert done.wait(30)
    assert isinstance(events[-1], Done) and events[-1].completion_tokens == 3


def test_generation_failure_is_a_500_in_openai_shape_not_a_crash(server, monkeypatch):
    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(server.holder.engine.model, "forward", boom)
    status, body = http("POST", server.url + "/v1/completions", {"model": NAME, "prompt": "hi"})
    assert status == 500 and body["error"]["type"] == "server_error" and "out of memory" in body["error"]["message"]
    status, text = http("POST", server.url + "/v1/chat/completions", {"model": NAME, "messages": CHAT, "stream": True})
    assert status == 200 and '"server_error"' in text and text.endswith("data: [DONE]\n\n")
    monkeypatch.undo()
    assert server.client().completions.create(model=NAME, prompt="hi", max_tokens=3).usage.completion_tokens == 3


def test_serve_command(tiny_model, tmp_path):
    """``python -m tdxvm.guest.serve``: 503 while loading, 200 once ready; exit status 1 if loading fails."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "tdxvm.guest.serve",
        "--model",
        str(tiny_model),
        "--name",
        NAME,
        "--port",
        str(port),
        "--threads",
        "1",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd)
    try:
        seen, deadline = set(), time.monotonic() + 60
        while 200 not in seen:
            assert time.monotonic() < deadline and proc.poll() is None, seen
            try:
                seen.add(http("GET", f"http://127.0.0.1:{port}/health")[0])
            except OSError:
                time.sleep(0.05)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        assert client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=4).usage.completion_tokens == 4
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn shuts down, then re-raises the signal
    broken = subprocess.run([*cmd[:4], str(tmp_path), *cmd[5:]], capture_output=True, text=True, timeout=60)
    assert broken.returncode == 1 and "config.json" in broken.stderr


def test_stop_matcher_holds_back_partial_stops():
    m = StopMatcher(["END", "xyz"])
    assert [m.push("abc E"), m.push("N"), m.push("D tail"), m.push("more")] == ["abc ", "", "", ""]
    m = StopMatcher(["END"])
    assert [m.push("a EN"), m.push("x"), m.flush()] == ["a ", "ENx", ""]
    m = StopMatcher(["EN"])
    assert m.push("E") + m.flush() == "E"


# -- the other endpoints -----------------------------------------------------------------


def test_models(server):
    assert [m.id for m in server.client().models.list().data] == [NAME]
    status, body = http("GET", server.url + "/v1/models")
    assert status == 200 and body["data"][0]["max_model_len"] == 256


def test_health_503_while_loading_then_200(tiny_model, tmp_path):
    gate, holder = threading.Event(), ModelHolder(NAME)
    s = Server(holder)
    try:
        assert http("GET", s.url + "/health") == (503, {"status": "loading"})
        status, body = http("POST", s.url + "/v1/completions", {"model": NAME, "prompt": "hi"})
        assert status == 503 and "loading" in body["error"]["message"]
        threading.Thread(
            target=lambda: gate.wait() and load_in_background(holder, EngineConfig(model_dir=tiny_model, name=NAME)),
            daemon=True,
        ).start()
        assert http("GET", s.url + "/health")[0] == 503
        gate.set()
        deadline = time.monotonic() + 30
        while http("GET", s.url + "/health")[0] != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert s.client().completions.create(model=NAME, prompt="hi", max_tokens=2).usage.completion_tokens == 2
        broken = ModelHolder("broken")
        load_in_background(broken, EngineConfig(model_dir=tmp_path, name="broken")).join()
        assert broken.engine is None and "config.json" in (broken.error or "")
    finally:
        s.stop()
        if holder.engine:
            holder.engine.close()


def test_metrics_move(server):
    before = metrics(server.url)
    r = server.client().completions.create(model=NAME, prompt=PROMPT, max_tokens=7, temperature=0)
    http("POST", server.url + "/v1/completions", {"model": NAME})
    after = metrics(server.url)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    ep = "/v1/completions"
    assert delta("tdxvm_requests_total", endpoint=ep, status="200") == 1
    assert delta("tdxvm_requests_total", endpoint=ep, status="400") == 1
    assert delta("tdxvm_prompt_tokens_total", endpoint=ep) == r.usage.prompt_tokens
    assert delta("tdxvm_completion_tokens_total", endpoint=ep) == r.usage.completion_tokens == 7
    assert delta("tdxvm_time_to_first_token_seconds_count", endpoint=ep) == 1
    assert delta("tdxvm_request_duration_seconds_count", endpoint=ep) == 2
    assert ("tdxvm_requests_waiting", ()) in after and ("tdxvm_requests_running", ()) in after


def test_a_client_that_disconnects_frees_its_batch_row(server):
    """Streaming clients hang up after a few chunks: their rows leave the batch at the next
    step (far short of max_tokens), and the service goes on answering others."""
    before = metrics(server.url)
    body = json.dumps({"model": NAME, "prompt": PROMPT, "max_tokens": 200, "temperature": 0, "stream": True})
    conns = []
    for _ in range(3):
        conn = http_client.HTTPConnection("127.0.0.1", int(server.url.rsplit(":", 1)[1]), timeout=30)
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: {")
        conns.append((conn, resp))
    for conn, _ in conns:
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
    engine: Engine = server.holder.engine
    deadline = time.monotonic() + 30
    while engine.running() or engine.waiting():
        assert time.monotonic() < deadline, "the disconnected requests kept their rows"
        time.sleep(0.01)
    key = ("tdxvm_completion_tokens_total", (("endpoint", "/v1/completions"),))
    assert metrics(server.url)[key] - before.get(key, 0) < 3 * 200
    assert server.client().completions.create(model=NAME, prompt="hi", max_tokens=3).usage.completion_tokens == 3


# -- client errors -----------------------------------------------------------------------

LONG = " ".join(["confidential computing"] * 200)
COMPLETION_ERRORS = [
    (b"{bad json", 400, None),
    (b"[]", 400, None),
    ({}, 400, "model"),
    ({"model": NAME}, 400, "prompt"),
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ({"model": NAME, "prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": NAME, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": NAME, "prompt": "hi", "max_tokens": 1000}, 400, "max_tokens"),
    ({"model": NAME, "prompt": LONG}, 400, "prompt"),
    ({"model": NAME, "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"model": NAME, "prompt": "hi", "temperature": 2.5}, 400, "temperature"),
    ({"model": NAME, "prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ({"model": NAME, "prompt": "hi", "n": 2}, 400, "n"),
    ({"model": NAME, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": NAME, "prompt": "hi", "stop": [""]}, 400, "stop"),
    ({"model": NAME, "prompt": "hi", "logprobs": 2}, 400, "logprobs"),
    ({"model": NAME, "prompt": "hi", "stream": "yes"}, 400, "stream"),
    ({"model": NAME, "prompt": ["one", "two"]}, 400, "prompt"),
    ({"model": NAME, "prompt": [1, 10**9]}, 400, "prompt"),
    ({"model": NAME, "prompt": []}, 400, "prompt"),
]
CHAT_ERRORS = [
    ({"model": NAME}, 400, "messages"),
    ({"model": NAME, "messages": []}, 400, "messages"),
    ({"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    (  # two unrelated errors: the first is named, not their common prefix
        {"model": NAME, "messages": [{"role": "wizard", "content": "hi"}, {"role": "user", "content": 5}]},
        400,
        "messages.0.role",
    ),
    (
        {"model": NAME, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "messages.0.content",
    ),
    ({"model": NAME, "messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    ({"model": NAME, "messages": CHAT, "max_completion_tokens": 500}, 400, "max_tokens"),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [("/v1/completions", *e) for e in COMPLETION_ERRORS] + [("/v1/chat/completions", *e) for e in CHAT_ERRORS],
)
def test_client_errors_are_4xx_in_openai_shape(server, path, body, status, param):
    got, doc = http("POST", server.url + path, body)
    assert got == status, doc
    err = doc["error"]
    assert err["message"] and err["type"] and err["param"] == param
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json"})
    with pytest.raises(HTTPError) as answer:
        urllib.request.urlopen(req, timeout=30)
    assert len(answer.value.read()) % PAD == 0  # its size shows no count it names (tdxvm.guest.padding)


def test_client_errors_through_openai_client(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": LONG}])
    assert http("GET", server.url + "/v1/completions")[0] == 405
    assert http("GET", server.url + "/nope")[0] == 404
    assert client.completions.create(model=NAME, prompt="still fine", max_tokens=2).usage.completion_tokens == 2


def test_a_full_queue_is_a_429_with_retry_after(tiny_model):
    """Backpressure in OpenAI's shape: the engine's queue is full (here: it takes none)."""
    holder = ModelHolder(NAME)
    holder.engine = Engine.load(EngineConfig(model_dir=tiny_model, name=NAME, threads=1, max_waiting=0))
    s = Server(holder)
    try:
        req = urllib.request.Request(
            s.url + "/v1/completions",
            data=json.dumps({"model": NAME, "prompt": "hi", "max_tokens": 2}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(HTTPError) as busy:
            urllib.request.urlopen(req, timeout=30)
        assert busy.value.code == 429 and busy.value.headers["Retry-After"] == "1"
        assert json.loads(busy.value.read())["error"]["code"] == "rate_limit_exceeded"
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0).completions.create(
                model=NAME, prompt="hi"
            )
    finally:
        s.stop()
        holder.engine.close()


# -- what the host sees of a response: its size -----------------------------------------


def _raw(server: Server, path: str, body: dict) -> bytes:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.read()


def test_streamed_events_do_not_show_the_tokens_lengths(server):
    """The host sees the size of every TLS record; one event per token would show each
    token's length (enough to guess the text: Weiss et al., "What Was Your Prompt?",
    2024). Every event is padded to one size, and the JSON reads the same."""
    for path, body in (
        ("/v1/chat/completions", {"model": NAME, "messages": CHAT, "max_tokens": 40, "temperature": 0}),
        ("/v1/completions", {"model": NAME, "prompt": PROMPT, "max_tokens": 40, "temperature": 0}),
    ):
        raw = _raw(server, path, {**body, "stream": True, "stream_options": {"include_usage": True}})
        events = [e + b"\n\n" for e in raw.split(b"\n\n") if e]
        assert events[-1] == b"data: [DONE]\n\n"
        padded = events[:-1]
        texts = {json.dumps(json.loads(e[len(b"data: ") :])["choices"][:1]) for e in padded}
        assert len(padded) > 10 and len(texts) > 5  # tokens of several lengths
        assert {len(e) for e in padded} == {PAD}, sorted({len(e) for e in padded})
        whole = _raw(server, path, body)
        assert len(whole) % PAD == 0 and json.loads(whole)["choices"]
        unpadded = _raw(
            server, path, {**body, "stream": True, "stream_options": {"include_obfuscation": False}}
        )  # OpenAI's switch for its padding
        assert len({len(e) for e in unpadded.split(b"\n\n") if e}) > 2
