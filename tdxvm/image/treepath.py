"""Paths inside a guest's root folder, looked up as a chroot would: no symlink leads out.

A rootfs folder on the build host holds the guest's symlinks, and they mean what they
mean inside the guest: ``/lib -> usr/lib`` (Debian 12 is usr-merged) and
``/var/lib/dbus/machine-id -> /etc/machine-id`` name other files of the guest. Opened
from the host, an absolute target would name a file of the host, and ``..`` could climb
out of the folder. :func:`resolve` walks a path one component at a time, the way the
kernel does under ``chroot``: an absolute target restarts at the root folder, ``..``
stops there, and after 40 symlinks (Linux's ``MAXSYMLINKS``) the lookup fails. What it
returns has no symlink in it, so the host path stays inside the root folder.

The writers build on it. They never follow a symlink in the last component: a symlink
(or a device node, a FIFO, a socket, a hard-linked file) where a file or link is written
is removed first, and a file is opened with ``O_NOFOLLOW`` and checked to be a regular
file before it is written. Removal walks no symlink (:func:`shutil.rmtree` unlinks them).

The root folder itself is trusted: the build made it, in its own work folder.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import stat
from collections import deque
from pathlib import Path

from tdxvm.errors import TdxvmError

MAX_SYMLINKS = 40  # Linux's MAXSYMLINKS: more in one lookup is ELOOP


class TreePathError(TdxvmError):
    """A path in the rootfs cannot be used as asked: a symlink loop, or a folder where a file goes."""

    code = "tree-path"


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


def _last(root: Path, path: str) -> tuple[Path, str]:
    """The host folder that holds the guest's ``path`` (made if missing), and its name."""
    parts = _parts(path)
    if not parts or parts[-1] == "..":
        raise TreePathError(f"{root}: {path!r} names no file")
    return make_dirs(root, "/".join(parts[:-1])), parts[-1]


def resolve(root: Path, path: str, *, follow_last: bool = True) -> Path:
    """The host path of the guest's ``path`` (absolute or not) under ``root``.

    Every existing component but the last is a real folder; the last one is followed
    too unless ``follow_last`` is false. Missing components are kept as named (whatever
    creates them creates them inside ``root``)."""
    root = Path(root)
    todo = deque(_parts(path))
    done: list[str] = []
    links = 0
    while todo:
        name = todo.popleft()
        if name == "..":
            if done:
                done.pop()
            continue
        if not todo and not follow_last:
            done.append(name)
            continue
        host = root.joinpath(*done, name)
        try:
            mode = os.lstat(host).st_mode
        except (FileNotFoundError, NotADirectoryError):
            done.append(name)
            continue
        if not stat.S_ISLNK(mode):
            done.append(name)
            continue
        links += 1
        if links > MAX_SYMLINKS:
            raise TreePathError(f"{root}: /{path.lstrip('/')} has more than {MAX_SYMLINKS} symlinks in a row (a loop?)")
        target = os.readlink(host)
        if target.startswith("/"):
            done = []
        todo.extendleft(reversed(_parts(target)))
    return root.joinpath(*done)


def _clear(host: Path, root: Path, path: str) -> None:
    """Remove what stands where a file or symlink will be written, unless it is a regular
    file with no other hard link (one with links is replaced, not written through)."""
    try:
        st = os.lstat(host)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise TreePathError(f"{root}: /{path.lstrip('/')} is a folder, not a file")
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
        host.unlink()


def make_dirs(root: Path, path: str, *, mode: int = 0o755) -> Path:
    """The guest's folder ``path``, made with its missing parents inside ``root``; its host path."""
    host = resolve(root, path)
    host.mkdir(mode=mode, parents=True, exist_ok=True)
    return host


def write_file(root: Path, path: str, data: bytes, *, mode: int | None = None) -> Path:
    """Write the guest's file ``path``, replacing a symlink or special file there; with
    ``mode``, set it (else a new file gets 0644 less the umask, an existing one keeps its own)."""
    parent, name = _last(root, path)
    host = parent / name
    _clear(host, root, path)
    fd = os.open(host, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise TreePathError(f"{root}: /{path.lstrip('/')} is not a regular file")
        os.set_blocking(fd, True)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if mode is not None:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return host


def symlink(root: Path, path: str, target: str) -> Path:
    """Make the guest's ``path`` a symlink to ``target``, replacing a file or symlink there."""
    parent, name = _last(root, path)
    host = parent / name
    _clear(host, root, path)
    host.unlink(missing_ok=True)
    host.symlink_to(target)
    return host


def remove_entry(host: Path) -> None:
    """Remove one entry that :func:`matches` or :func:`resolve` (``follow_last=False``)
    gave: a folder with everything in it, anything else by unlinking it (a symlink, not
    what it points to); nothing if it does not exist."""
    try:
        mode = os.lstat(host).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(host)
    else:
        host.unlink()


def matches(root: Path, folder: str, pattern: str) -> list[Path]:
    """Host paths of the entries of the guest's ``folder`` whose names match ``pattern``
    (:func:`fnmatch.fnmatchcase`, dot files included), sorted; none if it is no folder.
    Entries are not followed: a match may be a symlink."""
    host = resolve(root, folder)
    try:
        names = os.listdir(host)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [host / name for name in sorted(names) if fnmatch.fnmatchcase(name, pattern)]


def regular_file(root: Path, path: str) -> Path:
    """The host path of the guest's regular file ``path`` (symlinks followed inside ``root``);
    :class:`TreePathError` if it is missing or something else (a device node, say)."""
    host = resolve(root, path)
    try:
        mode = os.lstat(host).st_mode
    except FileNotFoundError:
        raise TreePathError(f"{root}: /{path.lstrip('/')} does not exist") from None
    if not stat.S_ISREG(mode):
        raise TreePathError(f"{root}: /{path.lstrip('/')} is not a regular file")
    return host
