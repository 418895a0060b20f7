"""ext4 images from a folder: byte-identical rebuilds, pinned metadata, clean failures."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path

import pytest

from tdxvm.image.ext4 import ImageStepError, hash_seed_for, make_ext4, used_inodes
from tests.image_luks import EPOCH, FS_UUID, make_tree, require_tools, which

SIZE = 16 << 20


@pytest.fixture(autouse=True)
def _tools():
    require_tools("mkfs.ext4", "debugfs", "dumpe2fs", "e2fsck")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def debugfs(image: Path, request: str) -> str:
    return subprocess.run(
        [which("debugfs"), "-R", request, str(image)], capture_output=True, text=True, check=True
    ).stdout


def build(source: Path, output: Path, **kw) -> Path:
    make_ext4(
        source=source,
        output=output,
        size_bytes=kw.pop("size_bytes", SIZE),
        uuid=kw.pop("uuid", FS_UUID),
        epoch=kw.pop("epoch", EPOCH),
        **kw,
    )
    return output


def test_two_builds_are_byte_identical(tmp_path):
    first = make_tree(tmp_path / "tree")
    # A re-extracted copy: same contents, modes, links and mtimes; new inodes, ctimes and
    # atimes (cp -a keeps hard links, which shutil.copytree does not).
    second = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(first), str(second)], check=True)
    for path in [second, *second.rglob("*")]:
        st = os.lstat(path)
        os.utime(path, ns=(12345, st.st_mtime_ns), follow_symlinks=False)
    a = build(first, tmp_path / "out" / "a.ext4")
    b = build(second, tmp_path / "out" / "b.ext4")
    assert sha256(a) == sha256(b)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.ext4", "b.ext4"]
    # Another UUID or epoch is another image.
    assert sha256(build(first, tmp_path / "c.ext4", uuid="0b3f6a52-7c1e-4f7e-9a55-2d3c4b5a6979")) != sha256(a)
    assert sha256(build(first, tmp_path / "d.ext4", epoch=EPOCH + 1)) != sha256(a)


def test_image_is_a_clean_debian_ext4_with_pinned_metadata(tmp_path):
    image = build(make_tree(tmp_path / "tree"), tmp_path / "root.ext4", label="smoke-root")
    assert image.stat().st_size == SIZE
    subprocess.run([which("e2fsck"), "-fn", str(image)], capture_output=True, check=True)
    header = subprocess.run([which("dumpe2fs"), "-h", str(image)], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"^([^:\n]+):\s+(.*)$", header, re.M))
    assert fields["Filesystem UUID"] == FS_UUID
    assert fields["Directory Hash Seed"] == hash_seed_for(FS_UUID)
    assert fields["Filesystem volume name"] == "smoke-root"
    assert fields["Block size"] == "4096" and fields["Inode size"] == "256"
    assert set(fields["Filesystem features"].split()) == {
        "has_journal",
        "ext_attr",
        "resize_inode",
        "dir_index",
        "filetype",
        "extent",
        "64bit",
        "flex_bg",
        "sparse_super",
        "large_file",
        "huge_file",
        "dir_nlink",
        "extra_isize",
        "metadata_csum",
    }
    stat = debugfs(image, "stat /usr/bin/tool")
    times = dict(re.findall(r"^\s*(\w+): (0x[0-9a-f]+):", stat, re.M))
    assert {k: int(v, 16) for k, v in times.items()} == {
        "ctime": EPOCH,
        "atime": EPOCH,
        "mtime": EPOCH - 100,
        "crtime": EPOCH,
    }
    assert re.search(r"Mode:\s+0755", stat) and "Links: 2" in stat
    assert debugfs(image, "cat /etc/hostname") == "tdx-guest\n"
    root = debugfs(image, "stat /")
    assert re.search(r"User:\s+0\s+Group:\s+0", root)


def test_missing_source_names_the_step_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ImageStepError) as info:
        build(tmp_path / "nope", out / "root.ext4")
    err = info.value
    assert err.step == "mkfs.ext4" and err.code == "image-step"
    assert "-d" in err.command and str(tmp_path / "nope") in err.command
    assert "No such file" in err.stderr and "mkfs.ext4" in str(err)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("size", [64 << 10, 1 << 20])
def test_too_small_fails_and_leaves_nothing(tmp_path, size):
    tree = make_tree(tmp_path / "tree")
    (tree / "big").write_bytes(os.urandom(2 << 20))
    out = tmp_path / "out"
    out.mkdir()
    (out / "root.ext4").write_bytes(b"old image")  # an earlier image stays untouched
    with pytest.raises(ImageStepError) as info:
        build(tree, out / "root.ext4", size_bytes=size)
    assert info.value.step == "mkfs.ext4" and info.value.stderr
    assert [p.name for p in out.iterdir()] == ["root.ext4"]
    assert (out / "root.ext4").read_bytes() == b"old image"


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="multiple of 4096"):
        build(tmp_path, tmp_path / "x", size_bytes=SIZE + 512)
    with pytest.raises(ValueError):
        build(tmp_path, tmp_path / "x", uuid="not-a-uuid")
    with pytest.raises(ValueError, match="16 bytes"):
        build(tmp_path, tmp_path / "x", label="a-label-that-is-too-long")
    assert not (tmp_path / "x").exists()


def test_used_inodes_is_the_complement_of_free_ranges():
    text = (
        "Inode count:              40\n"
        "Group 0: (Blocks 0-1)\n  Free inodes: 14-16, 18-20\n"
        "Group 1: (Blocks 2-3)\n  Free inodes: 21-39\n"
    )
    assert used_inodes(text) == [2, 11, 12, 13, 17, 40]


def test_creation_order_of_the_source_does_not_matter(tmp_path):
    names = [f"f{i:02d}" for i in range(40)]
    for tree, order in ((tmp_path / "fwd", names), (tmp_path / "rev", names[::-1])):
        tree.mkdir()
        for name in order:
            (tree / name).write_text(name)
            os.utime(tree / name, (EPOCH, EPOCH))
        os.utime(tree, (EPOCH, EPOCH))
    assert sha256(build(tmp_path / "fwd", tmp_path / "a")) == sha256(build(tmp_path / "rev", tmp_path / "b"))


def test_at_an_offset_the_same_filesystem_follows_a_hole(tmp_path):
    """The build writes the filesystem straight at the LUKS2 payload offset of the disk
    file: the same bytes as at 0 (debugfs's atime and ctime pass included), and a hole
    before them, where the header goes."""
    tree = make_tree(tmp_path / "tree")
    plain = build(tree, tmp_path / "plain.ext4")
    offset = 16 << 20
    placed = build(tree, tmp_path / "disk.img", offset=offset)
    assert placed.stat().st_size == offset + SIZE
    with open(placed, "rb") as f:
        assert os.lseek(f.fileno(), 0, os.SEEK_DATA) >= offset  # nothing written before the filesystem
        f.seek(offset)
        assert f.read() == plain.read_bytes()
    assert placed.stat().st_blocks * 512 < SIZE  # sparse: only what mke2fs wrote
    with pytest.raises(ValueError, match="offset"):
        build(tree, tmp_path / "odd.img", offset=1000)
