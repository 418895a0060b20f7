"""Guest fixtures: a tiny random Llama-architecture model built at test time (no download;
:mod:`tdxvm.emulate.tinyllama`). torch and transformers are imported only inside the
fixtures: the other guest tests (the weight format) run without them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tdxvm.emulate.tinyllama import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


class Reference:
    """Direct ``model.generate`` on a copy of a model loaded apart from the service's."""

    DECODE = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).eval()

    def generate(self, ids: list[int], n: int, **kw: Any) -> list[int]:
        t = self.torch.tensor([ids])
        kw = kw or {"do_sample": False}
        with self.torch.inference_mode():
            out = self.model.generate(t, attention_mask=self.torch.ones_like(t), max_new_tokens=n, **kw)
        return list(out[0, len(ids) :].tolist())

    def text(self, new: list[int]) -> str:
        return str(self.tok.decode(new, **self.DECODE))

    def chat_ids(self, messages: list[dict]) -> list[int]:
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.tok(text, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="session")
def ref(tiny_model: Path) -> Reference:
    """``model.generate`` on the tiny model, the peer the service's output is checked against."""
    return Reference(tiny_model)
