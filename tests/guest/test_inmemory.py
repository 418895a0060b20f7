"""The model copied into the TD's memory before it is measured and loaded (tdxvm.guest.inmemory).

The scratch disk can be rolled back by the host sector by sector (authenticated, not
fresh): a service that measured the files there and then read them again (the loader,
or a memory map paging them in while it serves) could serve other bytes than it
measured. The serve test of this is in test_model_identity.py
(test_a_service_in_memory_never_reads_the_model_again).
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest

from tdxvm.guest import inmemory
from tdxvm.guest.inmemory import InMemoryError, copy_into_memory, filesystem_of, release
from tdxvm.guest.modeldigest import ModelDigestError, folder_digest

SHM = Path("/dev/shm")


@pytest.fixture
def memory_dir():
    if filesystem_of(SHM) != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm")
    path = SHM / f"tdxvm-test-{uuid.uuid4().hex[:8]}"
    path.mkdir(mode=0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _model(folder: Path) -> Path:
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 4096)
    (folder / "sub" / "tokenizer.json").write_text("{}")
    return folder


def test_the_copy_holds_what_was_hashed(tmp_path, memory_dir):
    source = _model(tmp_path / "model")
    (memory_dir / "stale.bin").write_bytes(b"a copy of an earlier start")
    digest = copy_into_memory(source, memory_dir)
    assert digest == folder_digest(source) == folder_digest(memory_dir)
    assert sorted(p.relative_to(memory_dir).as_posix() for p in memory_dir.rglob("*")) == [
        "config.json",
        "model.safetensors",
        "sub",
        "sub/tokenizer.json",
    ]  # the earlier copy went first
    assert {p.stat().st_mode & 0o777 for p in memory_dir.rglob("*")} == {0o600, 0o700}
    release(memory_dir)
    assert list(memory_dir.iterdir()) == []


def test_a_folder_that_is_not_in_memory_is_refused(tmp_path):
    source = _model(tmp_path / "model")
    target = tmp_path / "copy"
    target.mkdir()
    with pytest.raises(InMemoryError, match=r"is on a \w+ filesystem, not in memory \(tmpfs\)"):
        copy_into_memory(source, target)
    assert list(target.iterdir()) == []


def test_a_model_larger_than_the_memory_available_is_refused(tmp_path, memory_dir, monkeypatch):
    source = _model(tmp_path / "model")
    monkeypatch.setattr(inmemory, "available_memory", lambda: 4096)
    with pytest.raises(InMemoryError, match="more than the 0.0 GiB of memory the TD has available"):
        copy_into_memory(source, memory_dir)
    assert list(memory_dir.iterdir()) == []


def test_a_link_in_the_model_folder_is_refused_as_the_digest_refuses_it(tmp_path, memory_dir):
    source = _model(tmp_path / "model")
    (source / "extra").symlink_to("/etc/hostname")
    with pytest.raises(ModelDigestError, match="a symbolic link in the model folder"):
        copy_into_memory(source, memory_dir)


def test_the_filesystem_is_that_of_the_deepest_mount_point():
    mountinfo = (
        "22 1 254:1 / / rw,relatime - ext4 /dev/vda1 rw\n"
        "23 22 0:21 / /run rw,nosuid - tmpfs tmpfs rw,size=1g\n"
        "24 23 0:22 / /run/tdxvm/model\\040ram rw - tmpfs tmpfs rw\n"
        "25 22 0:23 / /runaway rw - ext4 /dev/vda2 rw\n"
    )
    assert filesystem_of(Path("/run/tdxvm/model ram/x"), mountinfo) == "tmpfs"
    assert filesystem_of(Path("/run/other"), mountinfo) == "tmpfs"
    assert filesystem_of(Path("/runaway/x"), mountinfo) == "ext4"
    assert filesystem_of(Path("/var/lib/tdxvm/model"), mountinfo) == "ext4"
