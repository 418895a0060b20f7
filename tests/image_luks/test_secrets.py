"""Volume keys in the controller's secret store: fresh, private, atomic, never overwritten."""

from __future__ import annotations

import os
import stat

import pytest

from tdxvm.image import secrets as volume_keys
from tdxvm.image.secrets import SecretStoreError, generate_volume_key, load, store


def test_generated_keys_are_64_fresh_bytes():
    keys = {generate_volume_key() for _ in range(8)}
    assert len(keys) == 8 and {len(k) for k in keys} == {64}


def test_store_and_load_with_private_modes_even_under_a_lax_umask(tmp_path):
    key = generate_volume_key()
    old = os.umask(0)
    try:
        path = store("smoke", key, directory=tmp_path / "secrets")
    finally:
        os.umask(old)
    assert path == tmp_path / "secrets" / "disk" / "smoke"
    assert load("smoke", directory=tmp_path / "secrets") == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for folder in (tmp_path / "secrets", tmp_path / "secrets" / "disk"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert sorted(p.name for p in path.parent.iterdir()) == ["smoke"]  # no temp file left


def test_default_folder_follows_xdg_data_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    path = store("llama2", generate_volume_key())
    assert path == tmp_path / "data" / "tdxvm" / "secrets" / "disk" / "llama2"


def test_refuses_overwrite_wrong_lengths_and_readable_files(tmp_path):
    key = generate_volume_key()
    store("a", key, directory=tmp_path)
    with pytest.raises(SecretStoreError, match="already exists"):
        store("a", generate_volume_key(), directory=tmp_path)
    assert load("a", directory=tmp_path) == key
    with pytest.raises(SecretStoreError, match="expected 64") as info:
        store("b", key[:32], directory=tmp_path)
    assert key[:32].hex() not in str(info.value)
    os.chmod(tmp_path / "disk" / "a", 0o644)
    with pytest.raises(SecretStoreError, match="private"):
        load("a", directory=tmp_path)
    with pytest.raises(SecretStoreError, match="not in"):
        load("missing", directory=tmp_path)
    assert volume_keys.VOLUME_KEY_BYTES == 64
