"""The random Llama the serving benchmarks share: Llama 2's proportions (64-wide heads,
SwiGLU intermediate 8/3 of hidden) at a size given by hidden width and layer count, a
4096-token context and a small vocabulary; built offline by the tests' builder."""

from __future__ import annotations

from pathlib import Path

from tdxvm.emulate.tinyllama import build_tiny_model


def build(folder: Path, *, hidden: int, layers: int) -> Path:
    return build_tiny_model(
        folder, hidden=hidden, layers=layers, heads=hidden // 64, intermediate=hidden * 8 // 3, context=4096, vocab=1000
    )
