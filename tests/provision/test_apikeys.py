"""The controller's API keys: the store, the set a provision releases, the key a client
sends, and ``tdxvm apikey``."""

from __future__ import annotations

import json

import pytest

from tdxvm.guest.apikeys import ApiKeysError, key_hash, parse
from tdxvm.launch.spec import ModelRef
from tdxvm.provision import apikeys
from tdxvm.secretstore import SecretStore
from tests.clirun import run


@pytest.fixture
def store(tmp_path) -> SecretStore:
    return SecretStore(directory=tmp_path / "secrets")


def test_the_released_set_makes_default_and_refuses_other_missing_names(store):
    data, made = apikeys.release_set(store, ["default"])
    assert made == ["default"] and store.exists("api-keys/default")
    key = apikeys.get(store, "default")
    assert parse(data, "x") == {key_hash(key): "default"} and key.encode() not in data
    assert apikeys.release_set(store, ["default"]) == (data, [])  # made once
    with pytest.raises(ApiKeysError, match="API key ops is not in the secret store .*tdxvm apikey create ops"):
        apikeys.release_set(store, ["default", "ops"])
    assert not store.exists("api-keys/ops")  # a misspelt name never makes a key nobody has
    apikeys.create(store, "ops")
    assert set(parse(apikeys.release_set(store, ["default", "ops"])[0], "x").values()) == {"default", "ops"}
    assert apikeys.names(store) == ["default", "ops"]
    assert (store.directory / "api-keys" / "ops").stat().st_mode & 0o777 == 0o600


def test_a_client_key_comes_from_the_name_the_environment_or_the_record(store, monkeypatch):
    monkeypatch.delenv(apikeys.ENV, raising=False)
    assert apikeys.client_key(store, None, ["default"]) is None
    ops = apikeys.create(store, "ops")
    assert apikeys.client_key(store, None, ["gone", "ops"]) == ops
    env = apikeys.create(store, "env")
    monkeypatch.setenv(apikeys.ENV, env)
    assert apikeys.client_key(store, None, ["ops"]) == env
    assert apikeys.client_key(store, "ops", []) == ops
    monkeypatch.setenv(apikeys.ENV, "not-a-key")
    with pytest.raises(ApiKeysError, match=r"\$TDXVM_API_KEY: not a tdxvm API key"):
        apikeys.client_key(store, None, [])


def test_a_model_spec_names_its_keys_once_each(tmp_path):
    assert ModelRef(path=tmp_path / "m").api_key_names == ("default",)
    assert ModelRef(path=tmp_path / "m").model_dump(exclude_none=True).get("api_keys") is None  # old spec hashes hold
    assert ModelRef.model_validate({"path": tmp_path / "m", "api_keys": ["a", "b"]}).api_key_names == ("a", "b")
    for bad in ([], ["a", "a"], ["bad name"]):
        with pytest.raises(ValueError, match="api_keys"):
            ModelRef.model_validate({"path": tmp_path / "m", "api_keys": bad})


def test_the_apikey_commands(capsys, tmp_path):
    where = ["--secrets", tmp_path / "s"]
    code, out, err = run(capsys, "apikey", "create", "ops", *where)
    key = out.strip()
    assert code == 0 and key.startswith("tdxvm-") and "stored as api-keys/ops" in err
    code, out, err = run(capsys, "apikey", "create", "ops", *where)
    assert code == 2 and "API key ops exists" in out + err and "--replace" in out + err
    code, out, _ = run(capsys, "apikey", "show", "ops", *where)
    assert code == 0 and out.strip() == key
    code, out, _ = run(capsys, "apikey", "create", "ops", "--replace", *where, "-o", "json")
    doc = json.loads(out)
    assert code == 0 and doc["name"] == "ops" and doc["key"] != key and doc["secret"] == "api-keys/ops"
    code, out, _ = run(capsys, "apikey", "list", *where, "-o", "json")
    listed = json.loads(out)
    assert listed["keys"] == [{"name": "ops", "fingerprint": "sha256:" + key_hash(doc["key"]).hex()[:16]}]
    code, out, _ = run(capsys, "apikey", "list", *where)
    assert code == 0 and "ops" in out and doc["key"] not in out
    assert run(capsys, "apikey", "delete", "ops", *where)[0] == 0
    code, out, err = run(capsys, "apikey", "show", "ops", *where)
    assert code == 2 and "secret api-keys/ops is not in" in out + err
    code, out, err = run(capsys, "apikey", "create", "bad/name", *where)
    assert code == 2 and "API key name 'bad/name'" in out + err
