"""The root filesystem's dm-verity hash tree, computed offline on the ext4 image file.

``veritysetup format`` works on files: no device-mapper, no loop device. The tree is
appended to the ext4 image (``--hash-offset`` = the image's size), so that one
encrypted payload holds both, and the guest maps data and tree from the same decrypted
device (:mod:`tdxvm.guest.rootdisk`, whose constants fix the parameters: SHA-256,
4 KiB data and hash blocks, no salt, no superblock). The root hash and the data size go
on the kernel command line (``tdxvm.verity=<data blocks>:<root hash>``), so they are
in RTMR2: another root filesystem means another quote.

Reproducible: the tree is a function of the image's bytes alone (no salt, no UUID).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tdxvm.guest.rootdisk import CMDLINE_KEY, VERITY_BLOCK, VERITY_HASH, VerityRoot
from tdxvm.image.ext4 import ImageStepError, run_step, tool

_ROOT_HASH = re.compile(r"^Root hash:\s*([0-9a-f]{64})\s*$", re.M)


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


def format_tree(image: Path) -> VerityTree:
    """Append the hash tree of ``image`` (an ext4 image, a whole number of 4 KiB blocks)
    to it; returns the root hash and sizes."""
    size = image.stat().st_size
    if size == 0 or size % VERITY_BLOCK:
        raise ImageStepError("verity", [], f"{image} is {size} bytes, not a whole number of {VERITY_BLOCK}-byte blocks")
    blocks = size // VERITY_BLOCK
    argv = [
        tool("veritysetup", step="verity", package="cryptsetup-bin"),
        "format",
        "--no-superblock",
        f"--hash={VERITY_HASH}",
        f"--data-block-size={VERITY_BLOCK}",
        f"--hash-block-size={VERITY_BLOCK}",
        f"--data-blocks={blocks}",
        f"--hash-offset={size}",
        "--salt=-",
        str(image),
        str(image),
    ]
    out = run_step("verity", argv)
    found = _ROOT_HASH.search(out)
    if found is None:
        raise ImageStepError("verity", argv, f"veritysetup printed no root hash:\n{out}")
    grown = image.stat().st_size
    if grown <= size or grown % VERITY_BLOCK:
        raise ImageStepError("verity", argv, f"the hash tree did not follow the data ({size} -> {grown} bytes)")
    return VerityTree(root=VerityRoot(data_blocks=blocks, root_hash=found.group(1)), hash_bytes=grown - size)


def pinned_cmdline(cmdline: str, tree: VerityTree) -> str:
    """The recipe's command line with the tree's ``tdxvm.verity=`` argument appended (a
    recipe may not set one itself)."""
    if any(word.startswith(CMDLINE_KEY + "=") for word in cmdline.split()):
        raise ImageStepError("verity", [], f"the recipe's command line already has {CMDLINE_KEY}=; the build sets it")
    return f"{cmdline} {tree.root.arg()}"
