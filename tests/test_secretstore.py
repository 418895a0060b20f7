"""The controller's secret store: private modes, atomic writes, clear errors."""

from __future__ import annotations

import os

import pytest

from tdxvm.secretstore import SecretStore, SecretStoreError, default_directory
from tests.killedwriter import Writer


def test_put_get_modes(tmp_path):
    store = SecretStore(directory=tmp_path / "s")
    path = store.put("weights/llama", b"\x01" * 32)
    assert store.get("weights/llama") == b"\x01" * 32
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "s").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "s" / "weights").stat().st_mode & 0o777 == 0o700
    assert [p.name for p in (tmp_path / "s" / "weights").iterdir()] == ["llama"]


def test_no_silent_overwrite(tmp_path):
    store = SecretStore(directory=tmp_path)
    store.put("disk/a", b"1")
    with pytest.raises(SecretStoreError, match="already exists"):
        store.put("disk/a", b"2")
    store.put("disk/a", b"2", replace=True)
    assert store.get("disk/a") == b"2"


@pytest.mark.parametrize("name", ["noslash", "../x/y", "a/../b", "a/b/c", "/abs/x", "a/", "a/.hidden", "disk/a\n"])
def test_bad_names(tmp_path, name):
    with pytest.raises(SecretStoreError, match="kind/name"):
        SecretStore(directory=tmp_path).put(name, b"x")


def test_refuses_readable_files_and_folders(tmp_path):
    store = SecretStore(directory=tmp_path / "s")
    path = store.put("disk/a", b"k")
    os.chmod(path, 0o644)
    with pytest.raises(SecretStoreError, match="chmod 600"):
        store.get("disk/a")
    os.chmod(tmp_path / "s", 0o755)
    with pytest.raises(SecretStoreError, match="chmod 700"):
        store.put("disk/b", b"k")


def test_a_folder_or_an_unwritable_store_is_a_typed_error(tmp_path):
    store = SecretStore(directory=tmp_path / "s")
    store.put("disk/a", b"k")
    (tmp_path / "s/disk/dir").mkdir()
    with pytest.raises(SecretStoreError, match="secret disk/dir: .* is not a file"):
        store.get("disk/dir")
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    if os.access(tmp_path / "ro", os.W_OK):  # root writes anywhere: nothing to refuse
        return
    with pytest.raises(SecretStoreError, match="cannot make the secret folder"):
        SecretStore(directory=tmp_path / "ro/s").put("disk/a", b"k")


def test_missing_secret_names_it_not_its_value(tmp_path):
    with pytest.raises(SecretStoreError, match="secret disk/nope is not in"):
        SecretStore(directory=tmp_path).get("disk/nope")


def test_default_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_directory() == tmp_path / "tdxvm" / "secrets"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert str(default_directory()).endswith(".local/share/tdxvm/secrets")


def test_processes_making_a_key_at_once_all_get_the_one_stored(tmp_path):
    """Two builds (or a build and a launch) on a fresh controller make the release key and
    the controller's SSH key at the same moment. Before, each kept the key it made while
    the store ended up with one of them: an image built with the other was refused on every
    later launch, and its key was lost for good."""
    import subprocess
    import sys

    code = (
        "import sys; from tdxvm.secretstore import SecretStore; from tdxvm.releasekey import release_key, public_hex;"
        "from tdxvm.sshkey import controller_id;"
        "s = SecretStore(directory=sys.argv[1]);"
        "print(public_hex(release_key(s)), controller_id(s))"
    )
    for round_ in range(6):
        store = tmp_path / f"store-{round_}"
        procs = [
            subprocess.Popen([sys.executable, "-c", code, str(store)], stdout=subprocess.PIPE, text=True)
            for _ in range(4)
        ]
        seen = {p.communicate(timeout=60)[0] for p in procs}
        assert all(p.returncode == 0 for p in procs) and len(seen) == 1, seen


_KILLED_PUT = """
import os, sys
from pathlib import Path
from tdxvm.fileio import write_atomic_with
def write(f):
    f.write(sys.argv[2].encode())
    f.flush()
    print(os.readlink(f"/proc/self/fd/{f.fileno()}"), flush=True)
    sys.stdin.readline()  # a put still at work: until the test kills it
write_atomic_with(Path(sys.argv[1]), write, mode=0o600)
"""


def test_deleting_a_secret_also_removes_the_copy_a_killed_put_of_it_left(tmp_path):
    """A put killed mid-write leaves its temporary file (the key in the clear, 0600) beside
    the secret; deleting the secret must not keep that copy of it."""
    store = SecretStore(directory=tmp_path / "s")
    store.put("disk/a", b"old key")
    with Writer(_KILLED_PUT, tmp_path / "s" / "disk" / "a", "new key") as put:
        put.kill()
    assert put.path.read_bytes() == b"new key"
    store.delete("disk/a")
    assert os.listdir(tmp_path / "s" / "disk") == []
