"""The released API key set: its form, what the parser refuses (naming the field), and
:class:`KeyFile` reading it again when the file changes."""

from __future__ import annotations

import json
import re

import pytest

from tdxvm.fileio import write_atomic
from tdxvm.guest.apikeys import ApiKeysError, KeyFile, check_key, document, generate, key_hash, parse


def test_keys_are_256_random_bits_in_one_form():
    keys = {generate() for _ in range(100)}
    assert len(keys) == 100 and all(re.fullmatch(r"tdxvm-[A-Za-z0-9_-]{43}", k) for k in keys)
    with pytest.raises(ApiKeysError, match="where: not a tdxvm API key"):
        check_key("sk-" + "a" * 40, "where")


def test_the_document_holds_names_and_hashes_never_keys():
    a, b = generate(), generate()
    data = document({"b": b, "a": a})
    assert a not in data.decode() and b not in data.decode()
    assert parse(data, "f") == {key_hash(a): "a", key_hash(b): "b"}
    assert json.loads(data)["keys"][0]["name"] == "a"  # sorted: the same set gives the same bytes
    with pytest.raises(ApiKeysError, match="at least one"):
        document({})
    with pytest.raises(ApiKeysError, match="API key name 'bad name'"):
        document({"bad name": a})


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"format": "tdxvm-api-keys/2", "keys": []}, "format"),
        ({"format": "tdxvm-api-keys/1", "keys": []}, "keys"),
        ({"format": "tdxvm-api-keys/1", "keys": [{"name": "a", "sha256": "AB" * 32}]}, "keys.0"),
        ({"format": "tdxvm-api-keys/1", "keys": [{"name": "a", "sha256": "ab" * 31}]}, "keys.0"),
        ({"format": "tdxvm-api-keys/1", "keys": [{"name": "a", "sha256": "ab" * 32, "key": "x"}]}, "keys.0"),
        ({"format": "tdxvm-api-keys/1", "keys": [{"name": "a", "sha256": "ab" * 32}], "extra": 1}, "keys"),
    ],
)
def test_a_malformed_set_is_refused_naming_the_field(doc, field):
    with pytest.raises(ApiKeysError, match=rf"^released: {re.escape(field)}: "):
        parse(json.dumps(doc).encode(), "released")


def test_the_key_file_is_read_again_when_it_changes(tmp_path):
    path, a, b = tmp_path / "api-keys", generate(), generate()
    keys = KeyFile(path)
    assert keys.check(a) is None and "no API keys released yet" in keys.problem
    write_atomic(path, document({"a": a}), mode=0o600)
    assert keys.check(a) == "a" and keys.check(b) is None and keys.problem is None
    write_atomic(path, document({"b": b}), mode=0o600)
    assert keys.check(a) is None and keys.check(b) == "b"
    path.write_bytes(b"{")  # broken in place: nothing accepted, and why
    assert keys.check(b) is None and "not JSON" in keys.problem
    path.unlink()
    assert keys.check(b) is None
