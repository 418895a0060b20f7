"""Generated token ids to streamed text: incremental detokenizing and stop strings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_DECODE = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
_PROMPT_CONTEXT = 5  # prompt tokens that open the first decoding window


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
