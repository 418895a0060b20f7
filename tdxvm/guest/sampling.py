"""Choosing each request's next token from its logits, as ``model.generate`` does.

Greedy requests take the argmax. Sampled ones apply the temperature, then nucleus
(top-p) filtering exactly as transformers' ``TopPLogitsWarper`` does, and draw from the
softmax with ``torch.multinomial`` — from the request's own generator when it has a
``seed``, so a seeded request gives the same text whatever else runs beside it, and the
same text as ``torch.manual_seed(seed)`` then ``model.generate`` on that request alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # 0 keeps only the most likely token: greedy
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0 or self.top_p <= 0


class Sampler:
    """One request's token choice; holds its random generator when the request is seeded."""

    def __init__(self, params: SamplingParams) -> None:
        import torch

        self.params = params
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from one row of float32 logits ``[vocab]``."""
        import torch

        p = self.params
        if p.greedy:
            return int(logits.argmax())
        scores = logits[None, :] / p.temperature
        if p.top_p < 1.0:
            ordered, order = torch.sort(scores, descending=False)
            remove = ordered.softmax(dim=-1).cumsum(dim=-1) <= (1 - p.top_p)
            remove[..., -1:] = False  # keep at least the most likely token
            scores = scores.masked_fill(remove.scatter(1, order, remove), -float("inf"))
        return int(torch.multinomial(scores.softmax(dim=-1), num_samples=1, generator=self.generator)[0, 0])


def choose_all(samplers: list[Sampler], logits: torch.Tensor) -> list[int]:
    """Next tokens for a batch: one argmax for the greedy rows, one draw per sampled row."""
    greedy = logits.argmax(dim=-1).tolist()
    return [
        g if s.params.greedy else s.choose(logits[i]) for i, (s, g) in enumerate(zip(samplers, greedy, strict=True))
    ]
