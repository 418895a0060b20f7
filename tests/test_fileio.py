"""Atomic writes leave nothing behind, even when their writer is killed: the temporary
file of a write that never finished is removed by the next write of the same file, and
a partial file or folder whose writer is gone by the next run that makes one."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import threading
import time

import pytest

from tdxvm.fileio import lock_exclusive, remove_abandoned, unlock_removing, write_atomic
from tests.killedwriter import Writer

_WRITER = """
import os, sys
from pathlib import Path
from tdxvm.fileio import write_atomic_with
def write(f):
    f.write(b"half of a key")
    f.flush()
    print(os.readlink(f"/proc/self/fd/{f.fileno()}"), flush=True)
    sys.stdin.readline()  # a write still at work: until the test kills it or lets it go on
    f.write(b", and the rest")
write_atomic_with(Path(sys.argv[1]), write, mode=0o600)
"""


def test_a_killed_writes_temporary_file_is_removed_by_the_next_write_of_that_file(tmp_path):
    target = tmp_path / "key"
    with Writer(_WRITER, target) as writer:
        writer.kill()
    left = writer.path
    assert left.parent == tmp_path and left.name.startswith(".key.") and left.name.endswith(".tmp")
    # What the kill left beside a secret: its bytes in the clear, as private as the secret.
    assert left.read_bytes() == b"half of a key" and stat.S_IMODE(left.stat().st_mode) == 0o600
    unrelated = tmp_path / ".other.0123456789ab.tmp"  # another file's: not this write's to judge
    unrelated.write_bytes(b"x")
    write_atomic(target, b"whole", mode=0o600)
    assert sorted(os.listdir(tmp_path)) == [unrelated.name, "key"]
    assert target.read_bytes() == b"whole"


def test_a_live_writes_temporary_file_is_kept_and_that_write_completes(tmp_path):
    target = tmp_path / "key"
    with Writer(_WRITER, target) as writer:
        write_atomic(target, b"meanwhile", mode=0o600)
        write_atomic(target, b"meanwhile, again", mode=0o600, exclusive=False)
        assert writer.path.read_bytes() == b"half of a key"  # kept: its writer holds it
        assert writer.finish()[0] == 0
    assert target.read_bytes() == b"half of a key, and the rest"
    assert os.listdir(tmp_path) == ["key"]


def test_abandoned_partials_are_removed_and_held_ones_kept(tmp_path):
    gone_file, gone_folder = tmp_path / "f.partial-1", tmp_path / "d.partial-1"
    gone_file.write_bytes(b"x")
    (gone_folder / "sub").mkdir(parents=True)
    (gone_folder / "sub" / "file").write_bytes(b"x")
    with Writer(_WRITER, tmp_path / "held") as writer:
        removed = remove_abandoned([gone_file, gone_folder, writer.path, tmp_path / "missing"])
        assert removed == [gone_file, gone_folder]
        assert sorted(os.listdir(tmp_path)) == [writer.path.name]


_MOUNTED = """
import subprocess, sys, warnings
from pathlib import Path
from tdxvm.fileio import remove_abandoned
folder = Path(sys.argv[1])
subprocess.run(["mount", "-t", "tmpfs", "tdxvm-test", str(folder / "proc")], check=True)
(folder / "proc" / "inside").write_text("what the mount holds")
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    removed = remove_abandoned([folder])
print(removed, (folder / "proc" / "inside").exists(), folder.exists())
print("|".join(f"{w.category.__name__}: {w.message}" for w in seen))
subprocess.run(["umount", str(folder / "proc")], check=True)
print(remove_abandoned([folder]) == [folder], folder.exists())
"""


@pytest.mark.skipif(
    shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode,
    reason="needs unshare -rm (a private mount namespace) to mount a tmpfs",
)
def test_an_abandoned_folder_with_a_mount_in_it_is_kept_with_a_warning(tmp_path):
    """A killed debootstrap can leave /proc mounted in its root: removing that folder would
    reach into the mounted filesystem. It stays, and the warning says what to unmount."""
    folder = tmp_path / ".floor.verify-1-0123abcd"
    (folder / "proc").mkdir(parents=True)
    done = subprocess.run(
        ["unshare", "-rm", "--propagation", "private", sys.executable, "-c", _MOUNTED, str(folder)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    first, warned, after = done.stdout.splitlines()
    assert first == "[] True True"
    assert warned == (
        f"MountedPartialWarning: {folder}: left in place: {folder / 'proc'} is mounted in it (umount -l it; "
        "the next run then removes the folder)"
    )
    assert after == "True False"


def test_a_lock_whose_file_its_holder_removed_is_taken_on_the_file_there_now(tmp_path):
    """lock_exclusive waits (calling ``waiting``), and when the holder lets go with
    unlock_removing the waiter locks the file the path names, not the removed one."""
    path = tmp_path / "x.lock"
    held = lock_exclusive(path, 1)
    calls: list[int] = []
    got: list[int] = []
    waiter = threading.Thread(target=lambda: got.append(lock_exclusive(path, 30, waiting=lambda: calls.append(1))))
    waiter.start()
    deadline = time.monotonic() + 30
    while not calls and time.monotonic() < deadline:  # it waits, and says so
        time.sleep(0.05)
    unlock_removing(path, held)
    waiter.join(30)
    assert calls and got
    assert os.fstat(got[0]).st_ino == os.stat(path).st_ino  # the lock of the file there now
    with pytest.raises(TimeoutError):
        lock_exclusive(path, 0.1)
    os.close(got[0])
