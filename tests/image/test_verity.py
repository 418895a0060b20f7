"""The build's dm-verity tree, computed at the payload offset of the disk file: checked
against an independent computation of the tree (dm-verity format 1, no salt) and byte for
byte against veritysetup's, holes not read, reproducible, and pinned on the command line."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess

import pytest

from tdxvm.image import verity
from tdxvm.image.ext4 import ImageStepError
from tdxvm.image.recipe import RecipeError, load_recipe
from tdxvm.image.verity import format_tree, pinned_cmdline

BLOCK = 4096


def expected_tree(data: bytes) -> tuple[str, bytes]:
    """(root hash, hash area) of dm-verity format 1 with SHA-256 and no salt: every level
    hashes 4 KiB blocks, 128 digests to a zero-padded block; levels are stored top first."""
    levels = []
    blocks = [data[i : i + BLOCK] for i in range(0, len(data), BLOCK)]
    while True:
        digests = b"".join(hashlib.sha256(b).digest() for b in blocks)
        level = [digests[i : i + BLOCK].ljust(BLOCK, b"\0") for i in range(0, len(digests), BLOCK)]
        levels.append(b"".join(level))
        if len(level) == 1:
            return hashlib.sha256(level[0]).hexdigest(), b"".join(reversed(levels))
        blocks = level


@pytest.mark.parametrize("blocks", [2, 128, 129, 16385])
def test_the_tree_follows_the_data_and_matches_an_independent_computation(tmp_path, blocks):
    data = os.urandom(BLOCK) * blocks if blocks > 200 else os.urandom(BLOCK * blocks)
    image = tmp_path / "rootfs.ext4"
    image.write_bytes(data)
    tree = format_tree(image)
    root_hash, area = expected_tree(data)
    assert tree.root.root_hash == root_hash and tree.root.data_blocks == blocks
    written = image.read_bytes()
    assert written[: len(data)] == data  # the data is untouched
    assert written[len(data) : len(data) + len(area)] == area and tree.hash_bytes >= len(area)
    d = tree.to_dict()
    assert (d["hash_algorithm"], d["data_block_size"], d["hash_offset"], d["salt"]) == ("sha256", 4096, len(data), None)
    assert d["cmdline"] == f"tdxvm.verity={blocks}:{root_hash}"


def _veritysetup_tree(data_file, blocks: int) -> tuple[str, bytes]:
    """(root hash, hash area) of ``veritysetup format`` on a file of the data alone."""
    veritysetup = shutil.which("veritysetup") or shutil.which("veritysetup", path="/usr/sbin:/sbin")
    if veritysetup is None:
        pytest.skip("needs veritysetup (cryptsetup-bin)")
    size = blocks * BLOCK
    out = subprocess.run(
        [
            veritysetup,
            "format",
            "--no-superblock",
            "--hash=sha256",
            f"--data-block-size={BLOCK}",
            f"--hash-block-size={BLOCK}",
            f"--data-blocks={blocks}",
            f"--hash-offset={size}",
            "--salt=-",
            str(data_file),
            str(data_file),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (root,) = [line.split()[-1] for line in out.splitlines() if line.startswith("Root hash:")]
    return root, data_file.read_bytes()[size:]


@pytest.mark.parametrize("blocks", [2, 128, 129, 16385])
def test_at_an_offset_of_a_sparse_file_the_tree_is_veritysetups(tmp_path, blocks, monkeypatch):
    """The disk file: junk where the LUKS2 header will go (never hashed), then a sparse
    filesystem (data blocks here and there, holes between), then the tree: its bytes and
    root hash are exactly what veritysetup writes for the same data in a file of its own;
    the holes are not read."""
    offset, size = 16 << 20, blocks * BLOCK
    written = {0, 1, blocks // 2, blocks - 1} | set(range(7, blocks, 997))
    alone, disk = tmp_path / "alone", tmp_path / "disk.img"
    with open(alone, "wb") as a, open(disk, "wb") as d:
        a.truncate(size)
        d.write(os.urandom(4096) * (offset // 4096))
        d.truncate(offset + size)
        for block in sorted(written):
            data = os.urandom(BLOCK)
            a.seek(block * BLOCK)
            a.write(data)
            d.seek(offset + block * BLOCK)
            d.write(data)
    read = []
    real_preadv = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, at: read.append(at) or real_preadv(fd, bufs, at))
    tree = format_tree(disk, offset=offset)
    monkeypatch.undo()
    root_hash, area = _veritysetup_tree(alone, blocks)
    assert tree.root.root_hash == root_hash and tree.root.data_blocks == blocks
    assert tree.hash_bytes == len(area) and disk.stat().st_size == offset + size + len(area)
    with open(disk, "rb") as d:
        d.seek(offset)
        assert d.read(size) == alone.read_bytes()[:size]  # the data is untouched
        assert d.read() == area
    assert len(read) <= len(written) and all(at >= offset for at in read)  # the data blocks, not the holes
    assert (root_hash, area) == expected_tree(alone.read_bytes()[:size])


def test_a_tree_needs_two_blocks_and_an_aligned_offset(tmp_path):
    image = tmp_path / "img"
    image.write_bytes(bytes(BLOCK * 3))
    with pytest.raises(ImageStepError, match="at least 2 data blocks"):
        format_tree(image, offset=2 * BLOCK)
    with pytest.raises(ImageStepError, match="not a whole number"):
        format_tree(image, offset=100)
    assert verity._READ_BYTES % BLOCK == 0


def test_the_same_bytes_give_the_same_root_hash(tmp_path):
    data = os.urandom(BLOCK * 300)
    roots = []
    for name in ("a", "b"):
        (tmp_path / name).write_bytes(data)
        roots.append(format_tree(tmp_path / name).root.root_hash)
    assert roots[0] == roots[1]
    changed = bytearray(data)
    changed[BLOCK * 299 + 7] ^= 1
    (tmp_path / "c").write_bytes(changed)
    assert format_tree(tmp_path / "c").root.root_hash != roots[0]


def test_an_image_that_is_not_whole_blocks_is_refused(tmp_path):
    image = tmp_path / "odd"
    image.write_bytes(bytes(BLOCK + 1))
    with pytest.raises(ImageStepError, match="not a whole number of 4096-byte blocks"):
        format_tree(image)


def test_the_command_line_gains_the_root_hash_once(tmp_path):
    image = tmp_path / "img"
    image.write_bytes(bytes(BLOCK * 2))
    tree = format_tree(image)
    assert pinned_cmdline("console=ttyS0 root=/dev/mapper/root ro panic=-1", tree).endswith(f" {tree.root.arg()}")
    with pytest.raises(ImageStepError, match="already has tdxvm.verity="):
        pinned_cmdline(f"root=/dev/mapper/root {tree.root.arg()}", tree)


def test_a_recipe_may_not_set_the_root_hash(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: r\ncmdline: console=ttyS0 root=/dev/mapper/root ro panic=-1 tdxvm.verity=1:" + "ab" * 32 + "\n"
    )
    with pytest.raises(RecipeError, match="may not set tdxvm.verity="):
        load_recipe(recipe)
