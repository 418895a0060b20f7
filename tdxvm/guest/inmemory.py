"""The model a service serves, copied from the scratch disk into the TD's memory first.

The scratch disk is authenticated (AES-GCM over dm-integrity) but not fresh: the host can
put back any earlier version of a sector written in the same boot, and every sector has
one, the zeros of the format (docs/threat-model.md). Files measured on that disk and then
read from it again, by the loader or page by page through a memory map while serving,
could be other bytes than the ones measured. So the service copies the folder into a
tmpfs (the TD's private memory, which the host can neither read nor change), takes the
model digest of the bytes as it copies them (:func:`tdxvm.guest.modeldigest.folder_entries`),
measures that digest, and loads the copy only.

Memory: the copy's files are deleted once the model is loaded (:func:`release`). In the
stored dtype the loader maps them, so their pages are the weights and stay; for another
dtype they are freed then. A model larger than the memory the TD has available is
refused before anything is copied.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tdxvm.errors import TdxvmError
from tdxvm.guest.meminfo import available_memory
from tdxvm.guest.modeldigest import digest_of_entries, folder_entries

MEMORY_FILESYSTEMS = ("tmpfs", "ramfs")
MOUNTINFO = Path("/proc/self/mountinfo")


class InMemoryError(TdxvmError):
    """The model cannot be copied into memory: the folder is not a tmpfs, or the model does not fit."""

    code = "model-in-memory"


def filesystem_of(path: Path, mountinfo: str | None = None) -> str:
    """The type of the filesystem ``path`` is on (``tmpfs``, ``ext4``…), from ``/proc/self/mountinfo``."""
    text = MOUNTINFO.read_text() if mountinfo is None else mountinfo
    real = os.path.realpath(path)
    best, kind = "", "unknown"
    for line in text.splitlines():
        fields, _, rest = line.partition(" - ")
        parts = fields.split()
        if len(parts) < 5 or not rest:
            continue
        point = parts[4].replace("\\040", " ")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, rest.split()[0]
    return kind


def _folder_size(folder: Path) -> int:
    return sum(p.lstat().st_size for p in Path(folder).rglob("*") if p.is_file() and not p.is_symlink())


def copy_into_memory(source: Path, target: Path) -> bytes:
    """Copy the model folder ``source`` into ``target`` (a folder on a tmpfs, emptied first)
    and return the model digest of the bytes copied, which are the bytes the copy holds."""
    kind = filesystem_of(target)
    if kind not in MEMORY_FILESYSTEMS:
        raise InMemoryError(
            f"{target} is on a {kind} filesystem, not in memory (tmpfs): the model would be read again from "
            "storage the host can roll back after it was measured"
        )
    size, available = _folder_size(source), available_memory()
    if available is not None and size > available:
        raise InMemoryError(
            f"the model in {source} is {size / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB of memory "
            "the TD has available: give the VM more memory"
        )
    release(target)
    return digest_of_entries(folder_entries(source, copy_to=Path(target)))


def release(target: Path) -> None:
    """Delete what ``target`` holds (the copy, once loaded: mapped pages stay while mapped)."""
    for child in Path(target).iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
