"""Guest fixtures: a tiny random Llama-architecture model built at test time (no download;
:mod:`tdxvm.emulate.tinyllama`). torch and transformers are imported only inside the
fixtures: the other guest tests (the weight format) run without them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tdxvm.emulate.tinyllama import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))
