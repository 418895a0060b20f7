"""Tests of the encrypted root filesystem: ext4 from a folder, LUKS2 offline, the key store."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

EPOCH = 1_700_000_000
FS_UUID = "0b3f6a52-7c1e-4f7e-9a55-2d3c4b5a6978"
LUKS_UUID = "5e0c2f8a-91b4-4d3e-8c7a-6b5a4f3e2d1c"
# Tools and the Debian packages that ship them.
TOOLS = {
    "mkfs.ext4": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "dumpe2fs": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "cryptsetup": "cryptsetup-bin",
}


def which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def require_tools(*names: str) -> None:
    missing = [f"{n} ({TOOLS[n]})" for n in names if which(n) is None]
    if missing:
        message = f"needs {', '.join(missing)}: apt-get install e2fsprogs cryptsetup-bin"
        if os.environ.get("CI"):  # .ci/setup installs them: a CI run must not skip silently
            pytest.fail(message)
        pytest.skip(message)


def make_tree(root: Path) -> Path:
    """A small folder with the kinds of entries a rootfs has, mtimes fixed."""
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("tdx-guest\n")
    (root / "usr" / "bin").mkdir(parents=True)
    tool = root / "usr" / "bin" / "tool"
    tool.write_bytes(b"\x7fELF" + bytes(range(256)) * 64)
    tool.chmod(0o755)
    (root / "usr" / "bin" / "tool-link").symlink_to("tool")
    os.link(tool, root / "usr" / "bin" / "tool-hard")
    (root / "var" / "empty").mkdir(parents=True)
    (root / "secret-free").write_bytes(os.urandom(300_000))
    for path in sorted(root.rglob("*"), reverse=True):
        os.utime(path, (EPOCH - 50, EPOCH - 100), follow_symlinks=False)
    os.utime(root, (EPOCH - 50, EPOCH - 100))
    return root
