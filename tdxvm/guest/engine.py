"""The inference engine: one causal LM, one worker thread, one request at a time.

The engine loads a Hugging Face model folder with ``local_files_only`` (the guest never
reaches a model hub). Requests queue for one worker thread that runs them in order
through ``model.generate`` — the same code path, so the same tokens, as calling it
directly — so concurrent requests are never interleaved into each other's output.

Each new token passes through a stopping criterion (``Hook``), which runs synchronously
after every decoding step: it turns the token into text (:class:`Detokenizer`), applies
the stop strings (:class:`StopMatcher`) and hands the text to the request's sink, so a
stop string or a cancelled request ends generation with no extra token generated.
torch and transformers are imported on first use, so the HTTP server (which imports
this module) already listens, and answers 503 on ``/health``, while they load.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tdxvm.errors import TdxvmError

if TYPE_CHECKING:
    import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads its settings

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16")
_DECODE = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
_PROMPT_CONTEXT = 5  # prompt tokens that open the first decoding window


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
    dtype: Literal["float32", "bfloat16"] = "float32"
    threads: int | None = None  # torch intra-op threads; None keeps torch's default
    max_waiting: int = 64  # queued requests beyond the running one; more are refused (429)


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


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
        """Stop generating for this request (a client went away); harmless once done."""
        self.cancelled.set()


class Detokenizer:
    """Token ids in, text out, one token at a time, as vLLM and TGI do it.

    Decode a short window of recent tokens and emit what it adds, holding back text that
    ends in an incomplete UTF-8 sequence (U+FFFD). The first window starts inside the
    prompt, so a first token that begins with a space (SentencePiece's ``▁``) keeps it.
    """

    def __init__(self, tokenizer: Any, prompt: Sequence[int]) -> None:
        self._tok = tokenizer
        self._ids = list(prompt[-_PROMPT_CONTEXT:])
        self._prefix, self._read = 0, len(self._ids)

    def _window(self, end: int | None) -> str:
        return str(self._tok.decode(self._ids[self._prefix : end], **_DECODE))

    def push(self, token: int) -> str:
        self._ids.append(token)
        before, after = self._window(self._read), self._window(None)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        before, after = self._window(self._read), self._window(None)
        self._prefix = self._read = len(self._ids)
        return after[len(before) :]


class StopMatcher:
    """Cuts the output before the first stop string; holds back text that may start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops, self._held, self.hit = tuple(stops), "", False

    def push(self, text: str) -> str:
        if not self._stops or self.hit:
            return "" if self.hit else text
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit, self._held = True, ""
            return buf[:cut]
        keep = max(
            (k for s in self._stops for k in range(min(len(s) - 1, len(buf)), 0, -1) if buf.endswith(s[:k])), default=0
        )
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


@cache
def _hook_class() -> type:
    import torch
    from transformers import StoppingCriteria

    class Hook(StoppingCriteria):
        """Runs after every decoding step: new token → text → sink; stops on a stop string or cancel."""

        def __init__(self, job: Job, tokenizer: Any) -> None:
            self.job = job
            self.detok, self.stops = Detokenizer(tokenizer, job.prompt), StopMatcher(job.params.stop)

        def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
            self.job.sink(Token(self.stops.push(self.detok.push(int(input_ids[0, -1])))))
            stop = self.stops.hit or self.job.cancelled.is_set()
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool)  # type: ignore[return-value]

    return Hook


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
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=getattr(torch, config.dtype)).eval()
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
        self.config, self.model, self.tokenizer = config, model, tokenizer
        self.name = config.name
        self.context_length = int(getattr(model.config, "max_position_embeddings", 0) or tokenizer.model_max_length)
        eos = model.generation_config.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        pad = model.generation_config.pad_token_id
        self._pad = (
            pad
            if pad is not None
            else tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else min(self._eos, default=0)
        )
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._worker = threading.current_thread()

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
        return self._queue.qsize()

    def submit(self, prompt: list[int], params: SamplingParams, sink: Sink) -> Job:
        """Queue a request; ``sink`` then receives its Token events, and one Done or Failed."""
        if self._queue.qsize() >= self.config.max_waiting:
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
        """Finish the queued requests, then stop the worker."""
        self._queue.put(None)
        if self._worker is not threading.current_thread():
            self._worker.join(timeout=30)

    def run(self) -> None:
        """The worker loop: one request at a time, until :meth:`close`."""
        import torch

        while (job := self._queue.get()) is not None:
            if job.cancelled.is_set():
                continue
            try:
                with torch.inference_mode():
                    job.sink(self._generate(job))
            except Exception as exc:
                log.exception("generation failed")
                job.sink(Failed(f"generation failed: {type(exc).__name__}: {exc}"))

    def _generate(self, job: Job) -> Done:
        import torch
        from transformers import StoppingCriteriaList

        p = job.params
        ids = torch.tensor([job.prompt], dtype=torch.long)
        sampling: dict[str, Any] = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        if p.temperature > 0:
            sampling = {"do_sample": True, "temperature": p.temperature, "top_p": p.top_p, "top_k": None}
        if p.seed is not None:
            torch.manual_seed(p.seed)
        hook = _hook_class()(job, self.tokenizer)
        criteria = StoppingCriteriaList([hook])
        out = self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=p.max_tokens,
            stopping_criteria=criteria,
            pad_token_id=self._pad,
            **sampling,
        )
        n = out.shape[1] - ids.shape[1]
        tail = hook.stops.push(hook.detok.flush())
        tail += hook.stops.flush() if not hook.stops.hit else ""
        stopped = hook.stops.hit or (n > 0 and int(out[0, -1]) in self._eos) or n < p.max_tokens
        return Done("stop" if stopped else "length", n, tail)
