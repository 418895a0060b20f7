"""The continuous-batching engine, driven directly on a tiny random Llama.

Requests that decode together each give what ``model.generate`` gives them alone; they
join and leave the batch between steps (a longer prompt than the running window, a
cancel, a failed step), and the batch stays within its row and KV-memory bounds."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tdxvm.emulate.tinyllama import SENTENCES, build_tiny_model  # noqa: E402
from tdxvm.guest.engine import Done, Engine, EngineConfig, Event, Failed, SamplingParams, Token  # noqa: E402
from tdxvm.guest.int8 import int8_linear_class  # noqa: E402

NAME = "tiny"
WORDS = " ".join(SENTENCES * 4).split()


class Request:
    """One submitted request: its events, and how many requests were running at each token."""

    def __init__(self, engine: Engine, prompt: list[int], params: SamplingParams, cancel_after: int = 0) -> None:
        self.engine, self.cancel_after = engine, cancel_after
        self.texts: list[str] = []
        self.running: list[int] = []
        self.end: Event | None = None
        self.finished = threading.Event()
        self.job = engine.submit(prompt, params, self.sink)

    def sink(self, ev: Event) -> None:  # on the engine's worker thread
        if isinstance(ev, Token):
            self.texts.append(ev.text)
            self.running.append(self.engine.running())
            if len(self.texts) == self.cancel_after:
                self.job.cancel()
            return
        self.end = ev
        self.finished.set()

    def result(self, timeout: float = 120) -> Done:
        assert self.finished.wait(timeout), "request did not finish"
        assert isinstance(self.end, Done), self.end
        return self.end

    @property
    def text(self) -> str:
        end = self.result()
        return "".join(self.texts) + end.text


def prompt(engine: Engine, start: int, words: int) -> list[int]:
    return engine.encode(" ".join(WORDS[start : start + words]))


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0)


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Any:
    e = Engine.load(EngineConfig(model_dir=tiny_model, name=NAME, threads=1))
    yield e
    e.close()


def test_requests_decoding_together_each_equal_generate_alone(engine, ref):
    prompts = [prompt(engine, i * 3, 4 + 5 * i) for i in range(6)]
    sizes = [30 + 7 * i for i in range(6)]
    reqs = [Request(engine, p, greedy(n)) for p, n in zip(prompts, sizes, strict=True)]
    while not reqs[0].texts:
        time.sleep(0.001)
    # joins while the others decode, with a prompt longer than the window they run in
    late_prompt = prompt(engine, 2, 60)
    late = Request(engine, late_prompt, greedy(25))
    for r, p, n in zip([*reqs, late], [*prompts, late_prompt], [*sizes, 25], strict=True):
        assert r.text == ref.text(ref.generate(p, n))
    assert max(max(r.running) for r in reqs) > 1, "the requests never decoded together"
    assert max(late.running) > 1, "the late request never joined the running batch"
    assert engine.running() == 0 and engine.waiting() == 0


def test_a_seeded_request_samples_alike_beside_others_and_alone(engine, ref):
    ids = prompt(engine, 5, 8)
    params = SamplingParams(max_tokens=30, temperature=0.8, top_p=0.9, seed=99)
    alone = Request(engine, ids, params).text
    crowd = [Request(engine, prompt(engine, i, 6), greedy(40)) for i in range(3)]
    beside = Request(engine, ids, params)
    assert beside.text == alone
    assert [r.result().completion_tokens for r in crowd] and max(beside.running) > 1
    torch.manual_seed(99)
    assert alone == ref.text(ref.generate(ids, 30, do_sample=True, temperature=0.8, top_p=0.9, top_k=None))


def test_a_cancelled_request_leaves_the_batch_at_the_next_step(engine, ref):
    ids = prompt(engine, 0, 10)
    keep = Request(engine, ids, greedy(60))
    gone = Request(engine, prompt(engine, 9, 10), greedy(200), cancel_after=3)
    assert gone.result().completion_tokens == 3 and gone.result().finish_reason == "stop"
    assert keep.text == ref.text(ref.generate(ids, 60))
    after = keep.running[len(keep.running) - 10 :]
    assert after == [1] * 10, "the cancelled request still held a row"


def test_a_failed_step_fails_the_running_requests_and_the_engine_goes_on(engine, monkeypatch):
    calls = {"n": 0}
    forward = engine.model.forward

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if kwargs["input_ids"].shape[0] > 1:  # a decoding step of the batch, not a prefill
            raise RuntimeError("out of memory, say")
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", flaky)
    first = Request(engine, prompt(engine, 0, 5), greedy(50))
    second = Request(engine, prompt(engine, 1, 5), greedy(50))
    for r in (first, second):
        assert r.finished.wait(60)
    failed = [r for r in (first, second) if isinstance(r.end, Failed)]
    assert failed and all("out of memory" in r.end.message for r in failed)  # type: ignore[union-attr]
    monkeypatch.undo()
    assert Request(engine, prompt(engine, 2, 5), greedy(5)).result().completion_tokens == 5
    assert engine.running() == 0


def test_the_batch_holds_at_most_max_batch_requests(tiny_model, ref):
    e = Engine.load(EngineConfig(model_dir=tiny_model, name=NAME, threads=1, max_batch=2))
    try:
        prompts = [prompt(e, i, 6) for i in range(5)]
        reqs = [Request(e, p, greedy(30)) for p in prompts]
        assert [r.text for r in reqs] == [ref.text(ref.generate(p, 30)) for p in prompts]
        assert max(max(r.running) for r in reqs) == 2
    finally:
        e.close()


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a 2048-token context: 2 MiB of KV cache hold exactly one context."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-2k"), context=2048)


def test_the_kv_cache_bound_holds_back_requests_that_would_not_fit(long_context_model):
    e = Engine.load(EngineConfig(model_dir=long_context_model, name=NAME, threads=1, kv_cache_mib=2))
    try:
        assert e.kv_tokens == 2048 and e.token_bytes == 1024  # 2 layers x K,V x 4 heads x 16 dims x 4 bytes
        big = [Request(e, prompt(e, i, 5), greedy(1100)) for i in range(2)]  # two could reach 2 x 1100 tokens
        small = [Request(e, prompt(e, i, 5), greedy(20)) for i in range(2)]
        for r in (*big, *small):
            r.result(300)
        assert max(big[0].running) == 1 and max(big[1].running) == 1
        assert max(max(r.running) for r in small) == 2  # two short ones fit together
    finally:
        e.close()


def test_a_kv_cache_smaller_than_one_context_is_refused_at_load(long_context_model):
    with pytest.raises(ValueError, match=r"kv_cache_mib 1 holds 1024 tokens, fewer than one context \(2048"):
        Engine.load(EngineConfig(model_dir=long_context_model, name=NAME, threads=1, kv_cache_mib=1))


def test_an_int8_row_is_the_same_alone_and_beside_another_clients_row():
    """Activations are quantized per row (one scale per token): a row batched beside a much
    larger one (another client's request decoding with it) gives exactly what it gives
    alone. With one scale for the whole batch, the large row would set the small one's
    rounding: its output would change, and tell it what its neighbour holds."""
    torch.manual_seed(0)
    layer = int8_linear_class()(torch.nn.Linear(64, 32))
    mine, theirs = torch.randn(1, 64) * 0.01, torch.randn(1, 64) * 100
    assert torch.equal(layer(mine), layer(torch.cat([mine, theirs]))[:1])
    assert torch.equal(layer(mine), layer(torch.cat([theirs, mine, theirs * 3]))[1:2])


def test_int8_weights_serve_batched(tiny_model):
    e = Engine.load(EngineConfig(model_dir=tiny_model, name=NAME, threads=1, dtype="int8"))
    try:
        layers = {type(m) for m in e.model.modules() if isinstance(m, (torch.nn.Linear, int8_linear_class()))}
        assert layers == {int8_linear_class()}, layers  # every projection and the LM head
        prompts = [prompt(e, i, 6) for i in range(3)]
        alone = [Request(e, p, greedy(20)).text for p in prompts]
        together = [Request(e, p, greedy(20)) for p in prompts]
        assert [r.text for r in together] == alone
        assert all(r.result().completion_tokens == 20 or r.result().finish_reason == "stop" for r in together)
    finally:
        e.close()
