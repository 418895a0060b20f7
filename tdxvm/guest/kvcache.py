"""The key/value cache of the sequences that decode together (continuous batching).

One buffer per layer, ``[rows, kv_heads, columns, head_dim]``, holds every running
sequence right-aligned: row ``r``'s tokens fill columns ``starts[r]`` up to ``hi``, and the
columns before them are padding that the attention mask hides. A decoding step writes
column ``hi`` of every row, so the model runs the batch as one ordinary padded forward
pass (its own attention, no kernel of ours). A sequence joins with the cache of its
prompt, prefilled alone, copied into the next row; it leaves by moving the last row into
its place. Columns that only padding uses are dropped from the attended window as rows
leave. torch is imported by the caller (the engine's worker), not at import time here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
_GROW = 64  # columns added at least when the buffer is full


class BatchKV(Generic[T]):
    """The running batch: its KV buffers, one ``item`` per row (the engine's request state)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, max_rows: int) -> None:
        self._dims, self.dtype, self.max_rows = (layers, kv_heads, head_dim), dtype, max_rows
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.items: list[T] = []
        self.starts: list[int] = []
        self.lo = self.hi = 0
        self.cache = _cache_class()(self)  # what the model gets as ``past_key_values``

    @property
    def rows(self) -> int:
        return len(self.items)

    @property
    def width(self) -> int:
        """Columns one decoding step attends over, before its new token."""
        return self.hi - self.lo

    def lengths(self) -> list[int]:
        """Tokens each row holds (prompt and generated so far), in row order."""
        return [self.hi - s for s in self.starts]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    # -- joining and leaving ------------------------------------------------------------

    def join(self, prompt: Sequence[tuple[torch.Tensor, torch.Tensor]], item: T) -> None:
        """Add a row from a prompt's per-layer ``(keys, values)``, each ``[1, kv_heads, n, head_dim]``."""
        if self.rows >= self.max_rows:
            raise ValueError(f"the batch is full ({self.max_rows} rows)")
        n = prompt[0][0].shape[-2]
        if not self.items:
            self.lo = self.hi = 0
        self._reserve(rows=self.rows + 1, left=n)
        start, r = self.hi - n, self.rows
        for buf, new in zip(
            (*self.keys, *self.values), (*(k for k, _ in prompt), *(v for _, v in prompt)), strict=True
        ):
            buf[r, :, start : self.hi].copy_(new[0])
        self.items.append(item)
        self.starts.append(start)
        self.lo = min(self.lo, start)

    def leave(self, gone: Callable[[T], bool]) -> list[T]:
        """Remove the rows whose item ``gone`` accepts; return those items."""
        removed = []
        for r in reversed(range(self.rows)):
            if not gone(self.items[r]):
                continue
            removed.append(self.items[r])
            last = self.rows - 1
            if r != last:
                for buf in (*self.keys, *self.values):
                    buf[r, :, self.lo : self.hi].copy_(buf[last, :, self.lo : self.hi])
                self.items[r], self.starts[r] = self.items[last], self.starts[last]
            self.items.pop()
            self.starts.pop()
        if not self.items:
            self.keys, self.values = [], []  # an idle server gives the memory back
            self.lo = self.hi = 0
        else:
            self.lo = min(self.starts)
        removed.reverse()
        return removed

    # -- one decoding step --------------------------------------------------------------

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention mask ``[rows, width + 1]`` and position ids ``[rows, 1]`` of the next step."""
        import torch

        self._reserve(rows=self.rows, left=0)
        starts = torch.tensor(self.starts)
        mask = (torch.arange(self.lo, self.hi + 1)[None, :] >= starts[:, None]).long()
        return mask, (self.hi - starts)[:, None]

    def advance(self) -> None:
        """The step's forward pass wrote column ``hi`` of every row."""
        self.hi += 1

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's cache update for one layer: store column ``hi``, return the attended window."""
        q = keys.shape[-2]
        k, v = self.keys[layer], self.values[layer]
        k[: self.rows, :, self.hi : self.hi + q].copy_(keys)
        v[: self.rows, :, self.hi : self.hi + q].copy_(values)
        return k[: self.rows, :, self.lo : self.hi + q], v[: self.rows, :, self.lo : self.hi + q]

    # -- buffers ------------------------------------------------------------------------

    def _reserve(self, *, rows: int, left: int) -> None:
        """Make room for ``rows`` rows, ``left`` columns before ``hi`` and one after it.

        When the buffers are too small they are reallocated with the live window moved to
        where it leaves the room; padding is zero, so a masked column never holds NaN."""
        import torch

        have_rows, have_cols = (self.keys[0].shape[0], self.keys[0].shape[2]) if self.keys else (0, 0)
        shift = max(0, left - self.hi)  # a longer prompt than the window: move everything right
        if rows <= have_rows and shift == 0 and self.hi < have_cols:
            return
        width = max(self.width, left)
        cols = max(have_cols, width + max(_GROW, width // 2)) if self.hi >= have_cols or shift else have_cols
        new_rows = min(self.max_rows, max(rows, 2 * have_rows, 1)) if rows > have_rows else have_rows
        layers, heads, dim = self._dims
        lo = width - self.width  # where the live window starts in the new buffers
        fresh_k, fresh_v = [], []
        for old_k, old_v in zip(self.keys or [None] * layers, self.values or [None] * layers, strict=True):
            nk = torch.zeros(new_rows, heads, cols, dim, dtype=self.dtype)
            nv = torch.zeros(new_rows, heads, cols, dim, dtype=self.dtype)
            if old_k is not None and old_v is not None and self.rows:
                nk[: self.rows, :, lo : lo + self.width].copy_(old_k[: self.rows, :, self.lo : self.hi])
                nv[: self.rows, :, lo : lo + self.width].copy_(old_v[: self.rows, :, self.lo : self.hi])
            fresh_k.append(nk)
            fresh_v.append(nv)
        self.keys, self.values = fresh_k, fresh_v
        delta = lo - self.lo
        self.starts = [s + delta for s in self.starts]
        self.lo, self.hi = lo, lo + self.width


@cache
def _cache_class() -> type:
    """A transformers ``Cache`` whose layers read and write a :class:`BatchKV` (built on first use)."""
    from transformers.cache_utils import Cache, DynamicLayer

    class Layer(DynamicLayer):
        def __init__(self, store: BatchKV[Any], index: int) -> None:
            super().__init__()
            self.store, self.index, self.is_initialized = store, index, True

        def lazy_initialization(self, key_states: Any, value_states: Any) -> None:
            pass

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            return self.store.write(self.index, key_states, value_states)

        def get_seq_length(self) -> int:
            return self.store.width

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.store.width + query_length, 0

    class BatchCache(Cache):
        def __init__(self, store: BatchKV[Any]) -> None:
            super().__init__(layers=[Layer(store, i) for i in range(store._dims[0])])

    return BatchCache
