"""Reproducible ext4 filesystem images from a folder, with no mounts and no root-only tools.

``mke2fs -d FOLDER`` (e2fsprogs' ``misc/create_inode.c``) writes the folder's files,
owners, modes, xattrs and mtimes straight into an image file. Two builds of the same
folder are byte-identical when everything else that goes into the image is pinned:

* the filesystem layout: a private ``mke2fs.conf`` (``MKE2FS_CONFIG``) with Debian 12's
  ext4 defaults (4 KiB blocks, 256-byte inodes, ``has_journal,extent,huge_file,flex_bg,
  metadata_csum,64bit,dir_nlink,extra_isize``) and ``-T default``, so neither the host's
  ``/etc/mke2fs.conf`` nor the image size (mke2fs picks "small"/"floppy" layouts for small
  sizes) changes the result; a Debian 12 kernel mounts these features;
* the filesystem UUID (``-U``) and the directory-hash seed (``-E hash_seed=``, derived
  from the UUID);
* the clock: ``E2FSPROGS_FAKE_TIME`` pins the superblock times and every inode's crtime.
  mke2fs 1.47.0 (Debian 12) ignores ``SOURCE_DATE_EPOCH`` (1.47.1 honours it); both are set;
* the root directory's owner (``-E root_owner=0:0``; it is otherwise the builder's uid);
* inode tables and journal written at build time (``lazy_itable_init=0,
  lazy_journal_init=0``), so whether the host's filesystem supports discard does not
  decide the "inode table zeroed" flags, and the guest kernel has nothing to zero later;
* atime and ctime: mke2fs copies them from ``stat()`` of the source, and a file's ctime
  changes whenever its folder is re-extracted and cannot be set back. A second pass with
  ``debugfs -w`` sets both to the epoch on every used inode. Mtimes are kept: they are part
  of the input (Python's ``.pyc`` files check them).

Every failure raises :class:`ImageStepError` with the step, the command and its stderr,
and leaves no output file behind.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import uuid as uuidlib
from collections.abc import Mapping, Sequence
from pathlib import Path

from tdxvm.errors import TdxvmError

BLOCK_SIZE = 4096
_FIRST_NON_RESERVED_INODE = 11  # EXT4_GOOD_OLD_FIRST_INO; inode 2 is the root directory
_HASH_SEED_NAMESPACE = uuidlib.UUID("6f1d9a52-2f55-4b57-9d0c-3c1f3f0d5e1a")

# Debian 12's /etc/mke2fs.conf, reduced to what an ext4 build reads; "default" is the
# usage type passed with -T so the size does not pick another one.
MKE2FS_CONF = """\
[defaults]
\tbase_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
\tdefault_mntopts = acl,user_xattr
\tenable_periodic_fsck = 0
\tblocksize = 4096
\tinode_size = 256
\tinode_ratio = 16384

[fs_types]
\text4 = {
\t\tfeatures = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
\t}
\tdefault = {
\t}
"""


class ImageStepError(TdxvmError):
    """An image build step failed: which step, the command line, and what it printed."""

    code = "image-step"

    def __init__(self, step: str, command: Sequence[str], stderr: str) -> None:
        self.step = step
        self.command = list(command)
        self.stderr = stderr
        detail = stderr.strip() or "(no output)"
        super().__init__(f"image step {step!r} failed: {' '.join(self.command)}\n{detail}")


def tool(name: str, *, step: str, package: str) -> str:
    """Absolute path of a system tool (also looked up in the sbin folders)."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if path is None:
        raise ImageStepError(step, [name], f"{name} not found; install the Debian package {package}")
    return path


def run_step(
    step: str,
    command: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
    pass_fds: Sequence[int] = (),
    cwd: Path | None = None,
) -> str:
    """Run one command; its stdout on success, :class:`ImageStepError` otherwise."""
    try:
        proc = subprocess.run(
            list(command),
            input=input,
            capture_output=True,
            env=dict(env) if env is not None else None,
            pass_fds=tuple(pass_fds),
            check=False,
            cwd=cwd,
        )
    except OSError as exc:
        raise ImageStepError(step, command, str(exc)) from None
    if proc.returncode != 0:
        raise ImageStepError(
            step, command, proc.stderr.decode(errors="replace") or proc.stdout.decode(errors="replace")
        )
    return proc.stdout.decode(errors="replace")


def hash_seed_for(fs_uuid: str) -> str:
    """The directory-hash seed pinned for a filesystem UUID (a name-based UUID of it)."""
    return str(uuidlib.uuid5(_HASH_SEED_NAMESPACE, str(uuidlib.UUID(fs_uuid))))


def used_inodes(dumpe2fs_output: str) -> list[int]:
    """Inodes in use, from ``dumpe2fs``'s per-group "Free inodes:" ranges (the complement)."""
    match = re.search(r"^Inode count:\s+(\d+)$", dumpe2fs_output, re.M)
    if match is None:
        raise ValueError("dumpe2fs output has no inode count")
    free: set[int] = set()
    for line in re.findall(r"^\s+Free inodes: (.*)$", dumpe2fs_output, re.M):
        for part in filter(None, (p.strip() for p in line.split(","))):
            first, _, last = part.partition("-")
            free.update(range(int(first), int(last or first) + 1))
    return [
        i for i in range(1, int(match.group(1)) + 1) if i not in free and (i == 2 or i >= _FIRST_NON_RESERVED_INODE)
    ]


def make_ext4(
    *, source: Path, output: Path, size_bytes: int, uuid: str, label: str = "rootfs", epoch: int, offset: int = 0
) -> None:
    """Write a reproducible ext4 image of ``source`` to ``output``: a sparse file of
    ``offset + size_bytes`` bytes, the filesystem at ``offset`` (mke2fs's ``-E offset=``,
    the same bytes as at 0) and a hole before it, where the disk's LUKS2 header goes."""
    output = Path(output)
    fs_uuid = str(uuidlib.UUID(uuid))
    if size_bytes <= 0 or size_bytes % BLOCK_SIZE:
        raise ValueError(f"ext4 image size {size_bytes} must be a positive multiple of {BLOCK_SIZE}")
    if offset < 0 or offset % BLOCK_SIZE:
        raise ValueError(f"ext4 image offset {offset} must be a multiple of {BLOCK_SIZE}")
    if len(label.encode()) > 16:
        raise ValueError(f"ext4 label {label!r} is longer than 16 bytes")
    mkfs = tool("mkfs.ext4", step="mkfs.ext4", package="e2fsprogs")
    dumpe2fs = tool("dumpe2fs", step="dumpe2fs", package="e2fsprogs")
    debugfs = tool("debugfs", step="debugfs", package="e2fsprogs")
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".partial")
    tmp = Path(tmp_name)
    at = f"{tmp}?offset={offset}"  # for dumpe2fs and debugfs: ext2fs_open2's I/O options
    try:
        with tempfile.TemporaryDirectory(prefix="tdxvm-mke2fs-") as conf_dir:
            conf = Path(conf_dir) / "mke2fs.conf"
            conf.write_text(MKE2FS_CONF)
            env = {
                **os.environ,
                "MKE2FS_CONFIG": str(conf),
                "E2FSPROGS_FAKE_TIME": str(epoch),
                "SOURCE_DATE_EPOCH": str(epoch),
                "LC_ALL": "C",
            }
            os.ftruncate(fd, offset + size_bytes)
            os.close(fd)
            fd = -1
            extended = f"hash_seed={hash_seed_for(fs_uuid)},root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0"
            run_step(
                "mkfs.ext4",
                [
                    mkfs,
                    "-q",
                    "-F",
                    "-t",
                    "ext4",
                    "-T",
                    "default",
                    "-b",
                    str(BLOCK_SIZE),
                    "-U",
                    fs_uuid,
                    "-L",
                    label,
                    "-E",
                    f"{extended},offset={offset}",
                    "-d",
                    str(source),
                    str(tmp),
                    str(size_bytes // BLOCK_SIZE),  # the filesystem's size, not the file's
                ],
                env=env,
            )
            inodes = used_inodes(run_step("dumpe2fs", [dumpe2fs, at], env=env))
            script = "".join(f"sif <{i}> atime @{epoch}\nsif <{i}> ctime @{epoch}\n" for i in inodes)
            command = [debugfs, "-w", "-f", "-", at]
            proc = subprocess.run(command, input=script.encode(), capture_output=True, env=env, check=False)
            errors = [
                line
                for line in proc.stderr.decode(errors="replace").splitlines()
                if line and not line.startswith("debugfs ")
            ]
            if proc.returncode != 0 or errors:
                raise ImageStepError("debugfs", command, "\n".join(errors) or proc.stderr.decode(errors="replace"))
        os.replace(tmp, output)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
