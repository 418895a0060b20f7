"""The root filesystem's dm-verity hash tree, computed offline on the disk file.

The tree follows the ext4 filesystem in the disk file, so that one encrypted payload
holds both, and the guest maps data and tree from the same decrypted device
(:mod:`tdxvm.guest.rootdisk`, whose constants fix the parameters: SHA-256, 4 KiB data
and hash blocks, no salt, no superblock). The root hash and the data size go on the
kernel command line (``tdxvm.verity=<data blocks>:<root hash>``), so they are in RTMR2:
another root filesystem means another quote.

The filesystem sits at the payload offset of the disk file (after the room for the LUKS2
header), where ``veritysetup format`` cannot hash it: it takes no data offset. So the
tree is computed here with :mod:`hashlib` ([VERITY], format 1), only where the file holds
data: a hole (a block mke2fs never wrote) reads as zeros, and its digest is the zero
block's, without reading it. The tests check every byte of the tree against
``veritysetup format``'s.

Reproducible: the tree is a function of the filesystem's bytes alone (no salt, no UUID).

[VERITY] cryptsetup's ``lib/verity/verity_hashes.c`` and the kernel's
``Documentation/admin-guide/device-mapper/verity.rst``: each level hashes the blocks of
the one below (the data, at the bottom), its digests packed into zero-padded blocks
(128 SHA-256 digests each); the levels are stored from the top one (a single block,
whose digest is the root hash) down; with no salt a digest is SHA-256 of the block alone.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tdxvm.guest.rootdisk import CMDLINE_KEY, VERITY_BLOCK, VERITY_HASH, VerityRoot
from tdxvm.image.ext4 import ImageStepError
from tdxvm.image.sparse import data_ranges

_sha256 = getattr(hashlib, VERITY_HASH)
_DIGEST = _sha256().digest_size  # a power of two (32): format 1 pads digests to one
_ZERO_DIGEST = _sha256(bytes(VERITY_BLOCK)).digest()
_READ_BYTES = 1 << 20  # read and hashed at a time


@dataclass(frozen=True, slots=True)
class VerityTree:
    """A formatted hash tree: what the manifest records and the command line pins."""

    root: VerityRoot
    hash_bytes: int  # size of the tree after the data

    def to_dict(self) -> dict[str, Any]:
        return {
            "root_hash": self.root.root_hash,
            "hash_algorithm": VERITY_HASH,
            "data_block_size": VERITY_BLOCK,
            "hash_block_size": VERITY_BLOCK,
            "data_blocks": self.root.data_blocks,
            "data_bytes": self.root.hash_offset,
            "hash_offset": self.root.hash_offset,
            "hash_bytes": self.hash_bytes,
            "salt": None,
            "cmdline": self.root.arg(),
        }


def format_tree(image: Path, *, offset: int = 0) -> VerityTree:
    """Append the hash tree of the filesystem at ``offset`` in ``image`` (to the end of
    the file, a whole number of 4 KiB blocks) to it; returns the root hash and sizes."""
    with open(image, "r+b") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size - offset
        if size <= 0 or size % VERITY_BLOCK or offset % VERITY_BLOCK:
            raise ImageStepError(
                "verity",
                [],
                f"{image} holds {size} bytes at offset {offset}, not a whole number of {VERITY_BLOCK}-byte blocks",
            )
        blocks = size // VERITY_BLOCK
        if blocks < 2:
            raise ImageStepError("verity", [], f"{image}: a hash tree needs at least 2 data blocks, not {blocks}")
        levels = [_data_digests(fd, offset, blocks)]
        while len(levels[-1]) > VERITY_BLOCK:
            levels.append(_digests(levels[-1]))
        tree = b"".join(reversed(levels))  # the top level first
        at = offset + size
        while at < offset + size + len(tree):
            at += os.pwrite(fd, memoryview(tree)[at - offset - size :], at)
    return VerityTree(
        root=VerityRoot(data_blocks=blocks, root_hash=hashlib.sha256(levels[-1]).hexdigest()), hash_bytes=len(tree)
    )


def _padded(digests: bytes | bytearray) -> bytes | bytearray:
    """A level's digests, zero-padded to whole hash blocks."""
    return digests + bytes(-len(digests) % VERITY_BLOCK)


def _digests(level: bytes | bytearray) -> bytes:
    """The next level up: the digests of ``level``'s blocks, padded."""
    view = memoryview(level)
    return _padded(b"".join(_sha256(view[i : i + VERITY_BLOCK]).digest() for i in range(0, len(view), VERITY_BLOCK)))


def _data_digests(fd: int, offset: int, blocks: int) -> bytes | bytearray:
    """The bottom level: the digests of the ``blocks`` data blocks at ``offset``, padded;
    the blocks in holes are not read (each has the zero block's digest)."""
    digests = bytearray(_ZERO_DIGEST * blocks)
    buffer = bytearray(_READ_BYTES)
    done = 0  # data blocks hashed or known to be zero so far
    for start, end in data_ranges(fd, offset, offset + blocks * VERITY_BLOCK):
        first = max((start - offset) // VERITY_BLOCK, done)  # ranges in the host's blocks: round out
        stop = -(-(end - offset) // VERITY_BLOCK)
        for at in range(first, stop, _READ_BYTES // VERITY_BLOCK):
            count = min(_READ_BYTES // VERITY_BLOCK, stop - at)
            view = memoryview(buffer)[: count * VERITY_BLOCK]
            if os.preadv(fd, [view], offset + at * VERITY_BLOCK) != len(view):
                raise ImageStepError("verity", [], "the filesystem image changed while it was being hashed")
            digests[_DIGEST * at : _DIGEST * (at + count)] = b"".join(
                _sha256(view[i : i + VERITY_BLOCK]).digest() for i in range(0, len(view), VERITY_BLOCK)
            )
        done = max(done, stop)
    return _padded(digests)


def pinned_cmdline(cmdline: str, tree: VerityTree) -> str:
    """The recipe's command line with the tree's ``tdxvm.verity=`` argument appended (a
    recipe may not set one itself)."""
    if any(word.startswith(CMDLINE_KEY + "=") for word in cmdline.split()):
        raise ImageStepError("verity", [], f"the recipe's command line already has {CMDLINE_KEY}=; the build sets it")
    return f"{cmdline} {tree.root.arg()}"
