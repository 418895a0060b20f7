"""End-to-end fixtures: a tiny Llama model made here, encrypted, its key in the model-smoke
build's secret store (what a user does with ``tdxvm emulate tiny-llama`` and ``tdxvm weights
encrypt``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tdxvm.guest.weights import encrypt_model, generate_model_key
from tdxvm.launch.connection import open_connection
from tdxvm.secretstore import SecretStore

TINY_KEY = "tiny-e2e"  # weights/tiny-e2e
URI = "qemu:///system"


@pytest.fixture(scope="module")
def conn():
    """The real libvirtd (CI starts it)."""
    try:
        c = open_connection(URI)
    except Exception as exc:  # noqa: BLE001 - say why, then fail
        pytest.fail(f"the real libvirtd is needed ({URI}): {exc}")
    yield c
    c.close()


@pytest.fixture(scope="session")
def tiny_encrypted(tmp_path_factory, model_smoke_build) -> tuple[Path, Path]:
    """(the plain model folder, its encrypted folder)."""
    pytest.importorskip("transformers")
    from tdxvm.emulate.tinyllama import build_tiny_model

    base = tmp_path_factory.mktemp("model")
    plain = build_tiny_model(base / "tiny")
    key = generate_model_key()
    encrypt_model(plain, base / "tiny.enc", key)
    SecretStore(directory=model_smoke_build.secrets).put(f"weights/{TINY_KEY}", key)
    return plain, base / "tiny.enc"
