"""Normalizing a built tree: two small synthetic trees that differ the way two real builds
did (shadow days, the build host's resolv.conf, ldconfig's aux-cache, a random seed, pip
scripts naming the builder's interpreter, the package step's initramfs, build-time
mtimes) list the same after normalize and clamp; nothing outside a tree is ever written,
whatever its symlinks point at."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

import pytest

from tdxvm.image.listing import first_difference, tree_listing
from tdxvm.image.normalize import GUEST_PYTHON, NormalizeError, normalize, remove_package_initramfs
from tdxvm.image.rootfs import clamp_mtimes

EPOCH = 1_700_000_000  # day 19675
DEB_TIME = 1_600_000_000  # files as a .deb ships them, older than the epoch
PACKAGES = "usr/local/lib/python3.11/dist-packages"
INIT = b"def main(): pass\n"


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _trampoline(interpreter: str) -> bytes:
    return f"#!/bin/sh\n'''exec' \"{interpreter}\" \"$0\" \"$@\"\n' '''\nimport sys\n".encode()


def _write(root: Path, rel: str, data: bytes, mode: int = 0o644) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    return path


def build_tree(root: Path, *, day: int, host: str, interpreter: str, noise: bytes, build_time: int) -> None:
    """A tree as a build on ``day``, on a host whose resolver is ``host``, with pip run by
    ``interpreter``, would leave it; ``noise`` stands for what differs on every run."""
    _write(root, "usr/share/doc/base/copyright", b"from the .deb\n")
    _write(root, "usr/lib/python3.11/os.py", b"# the guest's Python\n")
    shadow = (f"root:*:{day}:0:99999:7:::\nforced:!:0:0:99999:7:::\nnoaging:!::::::\nsshd:!:{day}::::::\n").encode()
    _write(root, "etc/shadow", shadow, 0o640)
    _write(root, "etc/shadow-", shadow, 0o600)
    _write(root, "etc/resolv.conf", f"nameserver {host}\n".encode())
    _write(root, "var/cache/ldconfig/aux-cache", b"glibc-ld.so.auxcache-1.1" + noise)
    _write(root, "var/lib/systemd/random-seed", noise * 16, 0o600)
    tool = _write(root, f"{PACKAGES}/bin/tool", f"#!{interpreter}\nimport sys\nfrom tool import main\n".encode(), 0o755)
    long = _write(root, f"{PACKAGES}/bin/long", _trampoline(interpreter), 0o755)
    _write(root, f"{PACKAGES}/tool/__init__.py", INIT)
    record = (
        f"../../bin/long,{_record_hash(long.read_bytes())},{long.stat().st_size}\n"
        f"../../bin/tool,{_record_hash(tool.read_bytes())},{tool.stat().st_size}\n"
        f"tool/__init__.py,{_record_hash(INIT)},{len(INIT)}\n"
        "tool-1.0.dist-info/RECORD,,\n"
    )
    _write(root, f"{PACKAGES}/tool-1.0.dist-info/RECORD", record.encode())
    _write(root, "usr/local/bin/other", f"#!{interpreter} -E\nprint()\n".encode(), 0o755)
    _write(root, "boot/vmlinuz-6.12", b"kernel")
    _write(root, "boot/initrd.img-6.12", b"initramfs made at " + noise)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            path = Path(dirpath, name)
            when = DEB_TIME if path.is_relative_to(root / "usr/share") else build_time
            os.utime(path, ns=(when * 10**9 + 123, when * 10**9 + 456))


@pytest.fixture
def two_builds(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a", tmp_path / "b"
    build_tree(
        a,
        day=19_700,
        host="10.0.0.53",
        interpreter="/home/ci/.venv/bin/python",
        noise=b"\x01" * 8,
        build_time=1_710_000_000,
    )
    build_tree(
        b,
        day=19_701,
        host="192.168.1.1",
        interpreter="/opt/builder/venv/bin/python3.11",
        noise=b"\x02" * 8,
        build_time=1_710_090_000,
    )
    return a, b


def test_two_builds_list_the_same_after_normalize_and_clamp(two_builds):
    a, b = two_builds
    assert first_difference(tree_listing(a), tree_listing(b)) is not None
    for root in (a, b):
        assert remove_package_initramfs(root) == ["/boot/initrd.img-6.12"]
        normalize(root, epoch=EPOCH)
        clamp_mtimes(root, EPOCH)
    assert first_difference(tree_listing(a), tree_listing(b)) is None
    assert tree_listing(a) == tree_listing(b)


def test_what_each_rewrite_leaves(two_builds):
    root = two_builds[0]
    shadow_inode = (root / "etc/shadow").stat().st_ino
    folder_mtime = (root / "var/cache/ldconfig").stat().st_mtime_ns
    normalize(root, epoch=EPOCH)
    day = EPOCH // 86400
    assert (root / "etc/shadow").read_text() == (
        f"root:*:{day}:0:99999:7:::\nforced:!:0:0:99999:7:::\nnoaging:!::::::\nsshd:!:{day}::::::\n"
    )
    assert (root / "etc/shadow").stat().st_ino == shadow_inode  # in place: owner, mode, xattrs kept
    assert (root / "etc/shadow").stat().st_mode & 0o777 == 0o640
    assert (root / "etc/shadow").stat().st_mtime == EPOCH
    assert (root / "etc/shadow-").read_text() == (root / "etc/shadow").read_text()
    assert (root / "etc/resolv.conf").read_bytes() == b""
    assert not (root / "var/cache/ldconfig/aux-cache").exists()
    assert (root / "var/cache/ldconfig").stat().st_mtime_ns == folder_mtime
    assert not (root / "var/lib/systemd/random-seed").exists()
    tool = (root / PACKAGES / "bin/tool").read_bytes()
    long = (root / PACKAGES / "bin/long").read_bytes()
    assert tool == b"#!" + GUEST_PYTHON + b"\nimport sys\nfrom tool import main\n"
    assert long == b"#!" + GUEST_PYTHON + b"\nimport sys\n"
    assert (root / "usr/local/bin/other").read_bytes() == b"#!" + GUEST_PYTHON + b" -E\nprint()\n"
    record = (root / PACKAGES / "tool-1.0.dist-info/RECORD").read_text().splitlines()
    assert record[0] == f"../../bin/long,{_record_hash(long)},{len(long)}"
    assert record[1] == f"../../bin/tool,{_record_hash(tool)},{len(tool)}"
    assert record[2:] == [f"tool/__init__.py,{_record_hash(INIT)},{len(INIT)}", "tool-1.0.dist-info/RECORD,,"]
    assert (root / "boot/initrd.img-6.12").exists()  # only remove_package_initramfs removes it


def test_record_rows_follow_scripts_whose_shebang_was_already_rewritten(tmp_path):
    """pip_install may rewrite the shebang itself, leaving the RECORD row with the hash of
    the builder's version; a plain install records /usr/local/bin scripts as ../../../bin."""
    tool = _write(tmp_path, f"{PACKAGES}/bin/tool", b"#!/usr/bin/python3\nimport tool\n", 0o755)
    other = _write(tmp_path, "usr/local/bin/other", b"#!/home/ci/venv/bin/python\nimport other\n", 0o755)
    record = (
        f"../../bin/tool,{_record_hash(b'#!/home/ci/venv/bin/python' + tool.read_bytes()[18:])},40\n"
        f"../../../bin/other,{_record_hash(other.read_bytes())},{other.stat().st_size}\n"
        "../../bin/gone,sha256=AAAA,3\ntool/x.py,sha256=BBBB,4\ntool-1.0.dist-info/RECORD,,\n"
    )
    path = _write(tmp_path, f"{PACKAGES}/tool-1.0.dist-info/RECORD", record.encode())
    normalize(tmp_path, epoch=EPOCH)
    new_other = other.read_bytes()
    assert path.read_text().splitlines() == [
        f"../../bin/tool,{_record_hash(tool.read_bytes())},{tool.stat().st_size}",
        f"../../../bin/other,{_record_hash(new_other)},{len(new_other)}",
        "../../bin/gone,sha256=AAAA,3",
        "tool/x.py,sha256=BBBB,4",
        "tool-1.0.dist-info/RECORD,,",
    ]


def test_normalize_twice_changes_nothing(two_builds):
    root = two_builds[0]
    normalize(root, epoch=EPOCH)
    clamp_mtimes(root, EPOCH)
    once = tree_listing(root)
    normalize(root, epoch=EPOCH)
    assert tree_listing(root) == once


@pytest.mark.parametrize(
    "script",
    [b"#!/usr/bin/env python3\nprint()\n", b"#!/bin/sh\necho\n", b"\x7fELF\x02\x01\x01", b"#!/usr/bin/python3\n", b""],
)
def test_scripts_that_do_not_name_a_builder_python_are_left_alone(tmp_path, script):
    path = _write(tmp_path, "usr/local/bin/x", script, 0o755)
    os.utime(path, (5, 5))
    normalize(tmp_path, epoch=EPOCH)
    assert path.read_bytes() == script and path.stat().st_mtime == 5


def test_a_builder_shebang_is_rewritten_even_without_a_newline(tmp_path):
    path = _write(tmp_path, "usr/local/bin/x", b"#!/home/ci/venv/bin/python3.11", 0o755)
    normalize(tmp_path, epoch=EPOCH)
    assert path.read_bytes() == b"#!" + GUEST_PYTHON


def test_only_the_initramfs_leaves_boot(two_builds):
    root = two_builds[0]
    assert remove_package_initramfs(root) == ["/boot/initrd.img-6.12"]
    assert sorted(p.name for p in (root / "boot").iterdir()) == ["vmlinuz-6.12"]


def test_empty_tree_and_missing_folders(tmp_path):
    normalize(tmp_path, epoch=EPOCH)
    assert remove_package_initramfs(tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def _host(tmp_path: Path) -> dict[Path, tuple[bytes, int]]:
    """Files outside the tree that a symlink in it points at: their bytes and mtimes."""
    host = tmp_path / "host"
    files = [
        _write(host, "etc/shadow", b"root:*:19000:0:99999:7:::\n"),
        _write(host, "etc/resolv.conf", b"nameserver 10.1.1.1\n"),
        _write(host, "cache/aux-cache", b"host aux cache"),
        _write(host, "python/dist-packages/bin/tool", b"#!/host/venv/bin/python\n"),
        _write(host, "python/dist-packages/tool-1.0.dist-info/RECORD", b"../../bin/tool,sha256=x,24\n"),
        _write(host, "boot/initrd.img-1", b"host initramfs"),
        _write(host, "seed", b"host seed"),
    ]
    for path in files:
        os.utime(path, (7, 7))
    return {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in files}


def _unchanged(host: dict[Path, tuple[bytes, int]]) -> None:
    for path, (data, mtime) in host.items():
        assert path.read_bytes() == data and path.stat().st_mtime_ns == mtime, path


def test_symlinked_folders_out_of_the_tree_are_not_followed(tmp_path):
    host = _host(tmp_path)
    root = tmp_path / "root"
    (root / "var/cache").mkdir(parents=True)
    (root / "usr/local/lib").mkdir(parents=True)
    (root / "etc").symlink_to(tmp_path / "host/etc")
    (root / "var/cache/ldconfig").symlink_to(tmp_path / "host/cache")
    (root / "usr/local/lib/python3.11").symlink_to(tmp_path / "host/python")
    (root / "boot").symlink_to("../host/boot")
    normalize(root, epoch=EPOCH)
    assert remove_package_initramfs(root) == []
    _unchanged(host)


def test_symlinked_files_out_of_the_tree_are_not_written_through(tmp_path):
    host = _host(tmp_path)
    root = tmp_path / "root"
    for rel, target in (
        ("etc/shadow", "host/etc/shadow"),
        ("etc/shadow-", "host/etc/shadow"),
        ("etc/resolv.conf", "host/etc/resolv.conf"),
        ("var/cache/ldconfig/aux-cache", "host/cache/aux-cache"),
        ("var/lib/systemd/random-seed", "host/seed"),
        (f"{PACKAGES}/bin/tool", "host/python/dist-packages/bin/tool"),
        ("usr/local/bin/tool", "host/python/dist-packages/bin/tool"),
        (f"{PACKAGES}/tool-1.0.dist-info/RECORD", "host/python/dist-packages/tool-1.0.dist-info/RECORD"),
        ("boot/initrd.img-6.12", "host/boot/initrd.img-1"),
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(tmp_path / target)
    # a real script in the tree whose RECORD is a symlink out of it
    _write(root, f"{PACKAGES}/bin/real", b"#!/host/venv/bin/python\n", 0o755)
    normalize(root, epoch=EPOCH)
    assert remove_package_initramfs(root) == []
    _unchanged(host)
    assert (root / "var/cache/ldconfig/aux-cache").is_symlink()  # a symlink is itself listed, not removed
    assert (root / f"{PACKAGES}/bin/real").read_bytes() == b"#!" + GUEST_PYTHON + b"\n"


def test_a_root_that_is_a_symlink_or_a_file_is_refused(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    (tmp_path / "file").write_bytes(b"")
    for name in ("link", "file"):
        with pytest.raises(NormalizeError, match="not a folder"):
            normalize(tmp_path / name, epoch=EPOCH)
        with pytest.raises(NormalizeError):
            remove_package_initramfs(tmp_path / name)
