"""The inference engine: one causal LM serving many requests at once (continuous batching).

The engine loads a Hugging Face model folder with ``local_files_only`` (the guest never
reaches a model hub). One worker thread runs every request: it prefills each new prompt
alone (its first token is exactly the one ``model.generate`` would give), then decodes
all running requests together, one token each per forward pass, over a shared padded KV
cache (:mod:`tdxvm.guest.kvcache`). Requests join and leave between steps; a request
that ends (EOS, a stop string, ``max_tokens``, its client gone) frees its row at once.
Decoding on a CPU is bound by reading the weights, so decoding 16 requests together
costs little more than decoding one, and the service's aggregate tokens/s grows with the
clients while each greedy request stays token for token what it would be alone.

Bounds: at most ``max_batch`` running requests, a KV cache whose worst case (every
running request to its ``max_tokens``) fits ``kv_cache_mib``, and ``max_waiting`` queued
requests; beyond that :meth:`Engine.submit` refuses with a 429. Each new token becomes
text (:class:`~tdxvm.guest.text.Detokenizer`), passes the stop strings
(:class:`~tdxvm.guest.text.StopMatcher`) and goes to the request's sink as it is made.
torch and transformers are imported on first use, so the HTTP server (which imports
this module) already listens, and answers 503 on ``/health``, while they load.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tdxvm import __version__
from tdxvm.errors import TdxvmError
from tdxvm.guest import int8
from tdxvm.guest.kvcache import BatchKV
from tdxvm.guest.meminfo import available_memory
from tdxvm.guest.sampling import Sampler, SamplingParams, choose_all
from tdxvm.guest.text import Detokenizer, StopMatcher

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads its settings

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "int8")
# what each dtype does to the weights, as the model event in RTMR3 names it
QUANTIZATION = {"float32": "none", "bfloat16": "none", "int8": int8.NAME}
# the bounds a spec, provision and install accept for max_batch and kv_cache_mib
MAX_BATCH, MAX_KV_CACHE_MIB = 256, 1 << 20
__all__ = [
    "DTYPES",
    "QUANTIZATION",
    "Done",
    "Engine",
    "EngineConfig",
    "Failed",
    "RequestError",
    "SamplingParams",
    "Token",
]


class RequestError(TdxvmError):
    """A request the engine refuses; the server answers it with ``status`` and OpenAI's error shape."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    model_dir: Path
    name: str
    dtype: Literal["float32", "bfloat16", "int8"] = "float32"
    threads: int | None = None  # torch intra-op threads; None keeps torch's default
    max_batch: int = 16  # requests decoding together
    kv_cache_mib: int | None = None  # None: max_batch full contexts, at most half the memory free after loading
    max_waiting: int = 64  # queued requests beyond the running ones; more are refused (429)


@dataclass(frozen=True, slots=True)
class Token:
    """One generated token; ``text`` is what it adds to the output (may be empty)."""

    text: str


@dataclass(frozen=True, slots=True)
class Done:
    """The request is finished: ``finish_reason`` is ``stop`` (EOS or a stop string) or ``length``."""

    finish_reason: str
    completion_tokens: int
    text: str  # what the output ends with beyond the last Token (held-back text)


@dataclass(frozen=True, slots=True)
class Failed:
    message: str


Event = Token | Done | Failed
Sink = Callable[[Event], None]  # called from the worker thread


@dataclass(eq=False)
class Job:
    prompt: list[int]
    params: SamplingParams
    sink: Sink
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop generating for this request (a client went away); its row is freed at the next step."""
        self.cancelled.set()


class _Running:
    """A request in the running batch: its sampler, text state and the token it feeds next."""

    def __init__(self, job: Job, tokenizer: Any, eos: set[int]) -> None:
        self.job, self.eos = job, eos
        self.sampler = Sampler(job.params)
        self.detok, self.stops = Detokenizer(tokenizer, job.prompt), StopMatcher(job.params.stop)
        self.generated, self.last, self.finished = 0, -1, False

    def emit(self, token: int) -> None:
        """Take the next token: text to the sink; finished on EOS, a stop string, the length or a cancel."""
        self.generated, self.last = self.generated + 1, token
        self.job.sink(Token(self.stops.push(self.detok.push(token))))
        self.finished = (
            token in self.eos
            or self.stops.hit
            or self.generated >= self.job.params.max_tokens
            or self.job.cancelled.is_set()
        )

    def done(self) -> Done:
        tail = self.stops.push(self.detok.flush())
        tail += "" if self.stops.hit else self.stops.flush()
        length = self.generated >= self.job.params.max_tokens and not self.stops.hit and self.last not in self.eos
        return Done("length" if length else "stop", self.generated, tail)


def _load(config: EngineConfig) -> tuple[Any, Any]:
    """The model and tokenizer from ``config.model_dir`` (no network)."""
    if config.dtype not in DTYPES:
        raise ValueError(f"dtype {config.dtype!r} is not one of {', '.join(DTYPES)}")
    if not (Path(config.model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{config.model_dir}: not a Hugging Face model folder (no config.json)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if config.threads:
        torch.set_num_threads(config.threads)
    path = str(config.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    weights = "auto" if config.dtype == "int8" else getattr(torch, config.dtype)  # int8: as stored, then quantized
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=weights).eval()
    if config.dtype == "int8":
        model = int8.quantize(model)
    log.info("loaded %s from %s (%s, %d threads)", config.name, path, config.dtype, torch.get_num_threads())
    return model, tokenizer


class Engine:
    """A loaded model and its worker thread. Thread-safe: :meth:`submit` from any thread.

    All torch work happens on one thread, which loads the model and then serves: with
    torch's OpenMP (libgomp) every thread that runs parallel ops keeps a thread team of its
    own, and once two teams exist on a small machine libgomp throttles its spin-waits and
    generation runs at about half speed.
    """

    def __init__(self, config: EngineConfig, model: Any, tokenizer: Any) -> None:
        """Called on the worker thread by :meth:`spawn`."""
        import torch
        import transformers

        self.config, self.model, self.tokenizer = config, model, tokenizer
        self.name = config.name
        # OpenAI's system_fingerprint: what decides the numbers, so a seeded client sees when they may change
        backend = (__version__, torch.__version__, transformers.__version__, config.dtype, torch.get_num_threads())
        self.fingerprint = "fp_" + hashlib.sha256(repr(backend).encode()).hexdigest()[:12]
        c = model.config
        self.context_length = int(getattr(c, "max_position_embeddings", 0) or tokenizer.model_max_length)
        eos = model.generation_config.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if getattr(c, "sliding_window", None) or any(
            t != "full_attention" for t in getattr(c, "layer_types", None) or []
        ):
            raise ValueError(f"{c.model_type}: only full-attention decoder models (the Llama family) can be batched")
        heads = c.num_attention_heads
        kv_heads, head_dim = getattr(c, "num_key_value_heads", None) or heads, getattr(c, "head_dim", None)
        head_dim = head_dim or c.hidden_size // heads
        dtype = model.get_input_embeddings().weight.dtype
        self._batch: BatchKV[_Running] = BatchKV(c.num_hidden_layers, kv_heads, head_dim, dtype, config.max_batch)
        self.token_bytes = 2 * c.num_hidden_layers * kv_heads * head_dim * dtype.itemsize
        self.kv_tokens = self._kv_budget()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._held: Job | None = None  # taken from the queue, waiting for room in the batch
        self._closing = False
        self._worker = threading.current_thread()

    def _kv_budget(self) -> int:
        """Tokens the batch's KV cache may hold at its worst: never less than one full context."""
        if self.config.kv_cache_mib is not None:
            tokens = self.config.kv_cache_mib * 2**20 // self.token_bytes
            if tokens < self.context_length:
                raise ValueError(
                    f"kv_cache_mib {self.config.kv_cache_mib} holds {tokens} tokens, fewer than one context "
                    f"({self.context_length} tokens, {self.token_bytes} bytes each)"
                )
            return int(tokens)
        tokens = self.config.max_batch * self.context_length
        if (free := available_memory()) is not None:
            tokens = min(tokens, free // 2 // self.token_bytes)
        return max(tokens, self.context_length)

    @classmethod
    def load(cls, config: EngineConfig) -> Engine:
        """Load the model on a new worker thread and wait for it; raise what loading raised."""
        result: queue.Queue[Engine | Exception] = queue.Queue()
        cls.spawn(config, result.put, result.put)
        if isinstance(engine := result.get(), Exception):
            raise engine
        return engine

    @classmethod
    def spawn(
        cls, config: EngineConfig, ready: Callable[[Engine], None], failed: Callable[[Exception], None]
    ) -> threading.Thread:
        """Load the model on a new thread that then serves the requests; call ``ready`` or ``failed``."""

        def main() -> None:
            try:
                engine = cls(config, *_load(config))
            except Exception as exc:
                log.exception("loading %s failed", config.model_dir)
                failed(exc)
                return
            log.info(
                "batching up to %d requests, KV cache for %d tokens (%d MiB at most)",
                config.max_batch,
                engine.kv_tokens,
                engine.kv_tokens * engine.token_bytes // 2**20,
            )
            ready(engine)
            engine.run()

        thread = threading.Thread(target=main, name="tdxvm-engine", daemon=True)
        thread.start()
        return thread

    # -- prompts ------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of a completion prompt, with the tokenizer's special tokens (BOS)."""
        return list(self.tokenizer(text)["input_ids"])

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation rendered by the tokenizer's chat template."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError(f"model {self.name} has no chat template; use /v1/completions", param="messages")
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja2's TemplateError and the template's raise_exception
            raise RequestError(f"the chat template refused these messages: {exc}", param="messages") from None
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def check_length(self, prompt: list[int], max_tokens: int | None, *, param: str) -> int:
        """Return ``max_tokens`` (or what is left of the context) after checking the context length."""
        n, ctx = len(prompt), self.context_length
        if n >= ctx:
            raise RequestError(
                f"This model's maximum context length is {ctx} tokens. However, your {param} has {n} tokens.",
                param=param,
                code="context_length_exceeded",
            )
        if max_tokens is None:
            return ctx - n
        if n + max_tokens > ctx:
            msg = (
                f"However, you requested {n + max_tokens} tokens ({n} in the {param}, {max_tokens} in the completion). "
                f"Please reduce the length of the {param} or the completion."
            )
            raise RequestError(
                f"This model's maximum context length is {ctx} tokens. {msg}",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return max_tokens

    # -- requests -----------------------------------------------------------------------

    def waiting(self) -> int:
        """Requests accepted but not yet running."""
        return self._queue.qsize() + (self._held is not None)

    def running(self) -> int:
        """Requests in the running batch."""
        return self._batch.rows

    def submit(self, prompt: list[int], params: SamplingParams, sink: Sink) -> Job:
        """Queue a request; ``sink`` then receives its Token events, and one Done or Failed."""
        if self.waiting() >= self.config.max_waiting:
            raise RequestError(
                f"server busy: {self.config.max_waiting} requests are already waiting; retry later",
                status=429,
                type="requests",
                code="rate_limit_exceeded",
            )
        job = Job(prompt, params, sink)
        self._queue.put(job)
        return job

    def close(self) -> None:
        """Finish the queued and running requests, then stop the worker."""
        self._queue.put(None)
        if self._worker is not threading.current_thread():
            self._worker.join(timeout=60)

    # -- the worker ---------------------------------------------------------------------

    def run(self) -> None:
        """The worker loop: admit what fits, decode one step for the batch, until :meth:`close`."""
        import torch

        with torch.inference_mode():
            while True:
                self._admit()
                if not self._batch.rows:
                    if self._closing and self._held is None:
                        return
                    continue
                try:
                    self._step()
                except Exception as exc:
                    log.exception("a decoding step failed")
                    for r in self._batch.leave(lambda _: True):
                        r.job.sink(Failed(f"generation failed: {type(exc).__name__}: {exc}"))

    def _next_job(self, block: bool) -> Job | None:
        if self._held is not None:
            job, self._held = self._held, None
            return job
        try:
            job = self._queue.get(block=block and not self._closing)
        except queue.Empty:
            return None
        if job is None:
            self._closing = True
        return job

    def _fits(self, job: Job) -> bool:
        """Whether the batch's KV cache stays within budget with ``job`` added, at its worst."""
        b = self._batch
        if not b.rows:
            return True
        if b.rows >= self.config.max_batch:
            return False
        left = [r.job.params.max_tokens - r.generated for r in b.items]
        width = max(b.width, len(job.prompt)) + max(*left, job.params.max_tokens)
        return (b.rows + 1) * width <= self.kv_tokens

    def _admit(self) -> None:
        """Prefill queued requests into the batch while they fit; wait for one if the batch is idle."""
        while (job := self._next_job(block=not self._batch.rows)) is not None:
            if job.cancelled.is_set():
                continue
            if not self._fits(job):
                self._held = job
                return
            try:
                self._prefill(job)
            except Exception as exc:
                log.exception("prefill failed")
                job.sink(Failed(f"generation failed: {type(exc).__name__}: {exc}"))

    def _prefill(self, job: Job) -> None:
        """Run the prompt alone; its first token, then its cache joins the batch (unless it is done)."""
        import torch
        from transformers import DynamicCache

        running = _Running(job, self.tokenizer, self._eos)
        ids = torch.tensor([job.prompt], dtype=torch.long)
        cache = DynamicCache()
        out = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        running.emit(running.sampler.choose(out.logits[0, -1].float()))
        if running.finished:
            job.sink(running.done())
            return
        self._batch.join([(layer.keys, layer.values) for layer in cache.layers], running)

    def _step(self) -> None:
        """One forward pass for every running request: one more token each."""
        import torch

        b = self._batch
        for r in b.leave(lambda r: r.job.cancelled.is_set()):
            r.job.sink(r.done())
        if not b.rows:
            return
        mask, positions = b.step_inputs()
        ids = torch.tensor([[r.last] for r in b.items], dtype=torch.long)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=b.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        b.advance()
        for r, token in zip(b.items, choose_all([r.sampler for r in b.items], out.logits[:, -1].float()), strict=True):
            r.emit(token)
        for r in b.leave(lambda r: r.finished):
            r.job.sink(r.done())
