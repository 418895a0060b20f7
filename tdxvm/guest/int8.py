"""INT8 weights for the served model: per-channel int8 weights, per-token int8 activations.

Every ``nn.Linear`` becomes an :class:`Int8Linear` holding its weight as int8 with one
float32 scale per output channel. Each call quantizes its input per row (per token) to
int8, multiplies on torch's integer GEMM (``torch._int_mm``, exact int32 accumulation)
and scales back: the scheme torchao calls int8 dynamic activation, int8 weight, with no
dependency beyond torch. Because each token's activations have their own scale and the
integer product is exact, a token's result does not depend on the other rows in the
batch — a request decoded beside others gives the same tokens as alone, which per-tensor
dynamic quantization (``torch.ao.quantization.quantize_dynamic``, one scale per batch)
does not. Decoding reads a quarter of float32's weight bytes; ``bench/precisions.py``
measures it against float32, bfloat16 and ``quantize_dynamic``.
"""

from __future__ import annotations

from functools import cache
from typing import Any

NAME = "int8-weight-per-channel-activation-per-token"  # as the model event in RTMR3 names it
_EPS = 1e-8


@cache
def int8_linear_class() -> type:
    """The module class (built on first use: torch is imported only by the engine's worker)."""
    import torch

    class Int8Linear(torch.nn.Module):
        def __init__(self, linear: torch.nn.Linear) -> None:
            super().__init__()
            w = linear.weight.detach().float()
            scale = w.abs().amax(dim=1).clamp(min=_EPS) / 127
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
            self.register_buffer("scale", scale)
            self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().float())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            rows = x.reshape(-1, self.in_features).float()
            xs = rows.abs().amax(dim=1, keepdim=True).clamp(min=_EPS) / 127
            xq = torch.round(rows / xs).to(torch.int8)
            y = torch._int_mm(xq, self.weight.t()).float().mul_(xs).mul_(self.scale)
            if self.bias is not None:
                y.add_(self.bias)
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}, int8"

    return Int8Linear


def quantize(model: Any) -> Any:
    """Replace every ``nn.Linear`` of ``model`` in place (freeing each float weight as it goes),
    then make what stays floating point float32; return ``model``."""
    import torch

    cls = int8_linear_class()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(parent, name, cls(child))
    return model.float()
