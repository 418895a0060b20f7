"""Make a built root filesystem tree the same on every build: what package scripts and
tools write that depends on when, where or by whom the image was built is removed or
rewritten, each for the reason given here.

Two clean builds of a recipe with the same package versions and the same epoch then give
the same tree once mtimes are clamped (:func:`tdxvm.image.rootfs.clamp_mtimes`); compare
their listings (:mod:`tdxvm.image.listing`) to check. Found by comparing two cold builds
of ``images/smoke.yaml`` (Debian 12 minbase, linux-image-cloud-amd64 from
bookworm-backports) and two pip installs by different interpreters:

* ``/var/cache/ldconfig/aux-cache``: ldconfig's record of the inode, size and ctime of
  every library it scanned, new on every build. Removed: only ldconfig reads it, to skip
  unchanged libraries, and it writes a new one when it runs (mkinitramfs removes it from
  the initramfs for the same reason, Debian #845034). The image's root is read-only.
* ``/etc/shadow`` and ``/etc/shadow-``: each account's "last password change" (field 3,
  days since 1970) is the day the build created it (debootstrap, ``useradd`` in package
  scripts). Set to the epoch's day, as shadow-utils does under ``SOURCE_DATE_EPOCH``; 0
  ("change at next login") and empty fields are kept. The image's accounts have no
  password (``*``, ``!``), so the day only feeds password aging.
* ``/etc/resolv.conf``: debootstrap copies the build host's. Emptied: the build host's
  resolvers mean nothing inside a TD, and the image would differ by builder.
* scripts pip installs (``/usr/local/bin``, ``/usr/local/lib/python3.*/dist-packages/bin``
  for ``pip install --target``): the shebang names the interpreter that ran pip, the
  builder's virtual environment, which does not exist in the guest. Rewritten to
  ``#!/usr/bin/python3`` (the guest's, the same Python version: see
  :func:`tdxvm.image.rootfs.pip_install`), and each ``*.dist-info/RECORD`` row of such a
  script to its hash and size as it is then (the old hash covers the builder's path), so
  the installed files still match their records.
* ``/var/lib/systemd/random-seed`` and ``/var/lib/systemd/credential.secret``: not written
  by today's steps; if a package script ever did, every TD of the image would share them.
  Removed: systemd makes both at first boot.

The initramfs that the kernel package's script made (without ``SOURCE_DATE_EPOCH``, and
without tdxvm's hook) differs on every build; :func:`remove_package_initramfs` removes it
from the package steps' tree, and the configure step makes the one that ships.

Nothing is followed through a symlink: every path is opened one component at a time,
relative to the folder above it, with ``O_NOFOLLOW``; a path with a symlink anywhere in
it, or one that is not a regular file, is left alone (a symlink's target is itself part
of the listing). So a tree that points outside itself (``/etc -> /host/etc``) cannot make
this module write a host file. Paths are the usr-merged ones (``/usr/lib``, not ``/lib``).
A rewritten file gets the epoch as its mtime; a folder that a file was removed from keeps
its mtime. Running :func:`normalize` again changes nothing.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import posixpath
import re
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tdxvm.errors import TdxvmError

GUEST_PYTHON = b"/usr/bin/python3"
DAY = 86400
SHADOW_FILES = ("etc/shadow", "etc/shadow-")
REMOVED = ("var/cache/ldconfig/aux-cache", "var/lib/systemd/random-seed", "var/lib/systemd/credential.secret")
EMPTIED = ("etc/resolv.conf",)
SCRIPT_FOLDERS = ("usr/local/bin",)  # and each usr/local/lib/python3.*/dist-packages/bin
_SHEBANG = re.compile(rb"\A#![ \t]*/\S*/python[0-9.]*(?=[ \t\n]|\Z)")
# distlib's (pip's) form for an interpreter path too long for a shebang or holding spaces
_SH_TRAMPOLINE = re.compile(rb"\A#!/bin/sh\n'''exec' [^\n]+ \"\$0\" \"\$@\"\n' '''\n")
_PYTHON_FOLDER = re.compile(r"\Apython3\.\d+\Z")


class NormalizeError(TdxvmError, ValueError):
    """The tree to normalize is not a folder (a symlink to one is refused)."""

    code = "normalize"


@contextmanager
def _folder(root_fd: int, rel: str) -> Iterator[int | None]:
    """A descriptor of the folder ``rel`` under ``root_fd``, opened component by component
    without following a symlink; None when it is missing or any component is not a folder."""
    fd = os.dup(root_fd)
    try:
        for part in filter(None, rel.split("/")):
            try:
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError as exc:
                if exc.errno in {errno.ENOENT, errno.ENOTDIR, errno.ELOOP}:  # missing, a file, a symlink
                    os.close(fd)
                    fd = -1
                    break
                raise
            os.close(fd)
            fd = child
        yield fd if fd >= 0 else None
    finally:
        if fd >= 0:
            os.close(fd)


def _regular(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def _rewrite(dir_fd: int, name: str, change: Callable[[bytes], bytes], *, epoch: int) -> bytes | None:
    """Replace a regular file's bytes with ``change(bytes)`` in place (owner, mode, xattrs
    and hard links kept; mtime set to ``epoch`` if that changed them); the file's bytes
    afterwards, None when it is not a regular file."""
    if _regular(dir_fd, name) is None:
        return None
    try:
        fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in {errno.ENOENT, errno.ELOOP}:  # gone, or swapped for a symlink since the lstat
            return None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        old = b"".join(chunks)
        new = change(old)
        if new != old:
            view = memoryview(new)
            written = 0
            while written < len(new):
                written += os.pwrite(fd, view[written:], written)
            os.ftruncate(fd, len(new))
            os.utime(fd, (epoch, epoch))
        return new
    finally:
        os.close(fd)


def _remove(dir_fd: int, name: str) -> bool:
    """Remove a regular file; its folder keeps its times. True when there was one."""
    if _regular(dir_fd, name) is None:
        return False
    before = os.fstat(dir_fd)
    os.unlink(name, dir_fd=dir_fd)
    os.utime(dir_fd, ns=(before.st_atime_ns, before.st_mtime_ns))
    return True


@contextmanager
def _parent(root_fd: int, rel: str) -> Iterator[tuple[int | None, str]]:
    """The folder holding ``rel`` (as :func:`_folder` opens it) and the name in it."""
    folder, _, name = rel.rpartition("/")
    with _folder(root_fd, folder) as fd:
        yield fd, name


def _shadow_days(data: bytes, day: int) -> bytes:
    """``data`` (shadow(5) lines) with every "last password change" that is a day number
    other than 0 set to ``day``."""
    out = []
    for line in data.split(b"\n"):
        fields = line.split(b":")
        if len(fields) >= 3 and fields[2].isdigit() and int(fields[2]) != 0:
            fields[2] = str(day).encode()
        out.append(b":".join(fields))
    return b"\n".join(out)


def _guest_shebang(data: bytes) -> bytes:
    """A script whose first line names a Python interpreter (or pip's ``/bin/sh``
    trampoline to one) with the guest's Python instead."""
    if _SH_TRAMPOLINE.match(data):
        return _SH_TRAMPOLINE.sub(b"#!" + GUEST_PYTHON + b"\n", data, count=1)
    return _SHEBANG.sub(b"#!" + GUEST_PYTHON, data, count=1)


def _record_hash(data: bytes) -> bytes:
    """A file's hash as a wheel's RECORD writes it (PEP 376/427: urlsafe base64, no padding)."""
    return b"sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")


def _recorded_script(
    packages: str, row_path: str, scripts: dict[str, tuple[bytes, bytes]]
) -> tuple[bytes, bytes] | None:
    """The script a RECORD row of ``packages`` (a dist-packages folder) names, if any.
    ``pip install --target`` writes the row as ``../../bin/<name>`` and then moves the
    script to ``<target>/bin``, so a ``bin/<name>`` row that resolves to no script is
    taken to be that one."""
    found = scripts.get(posixpath.normpath(f"{packages}/{row_path}"))
    if found is None:
        folder, name = posixpath.split(row_path)
        if posixpath.basename(folder) == "bin":
            found = scripts.get(f"{packages}/bin/{name}")
    return found


def _record_rows(data: bytes, packages: str, scripts: dict[str, tuple[bytes, bytes]]) -> bytes:
    """RECORD ``data`` (of a distribution in ``packages``) with the hash and size of each
    row that names one of ``scripts`` set to the script's as it is now."""
    out = []
    for line in data.split(b"\n"):
        parts = line.rsplit(b",", 2)
        if len(parts) == 3 and parts[1].startswith(b"sha256="):
            found = _recorded_script(packages, os.fsdecode(parts[0].strip(b'"')), scripts)
            if found is not None:
                line = b",".join((parts[0], *found)) + (b"\r" if parts[2].endswith(b"\r") else b"")
        out.append(line)
    return b"\n".join(out)


def _subfolders(root_fd: int, rel: str, keep: Callable[[str], bool]) -> list[str]:
    """Sorted paths of the real folders (not symlinks) in ``rel`` whose name ``keep`` accepts."""
    with _folder(root_fd, rel) as folder:
        if folder is None:
            return []
        with os.scandir(folder) as entries:
            return sorted(f"{rel}/{e.name}" for e in entries if keep(e.name) and e.is_dir(follow_symlinks=False))


def _pip_scripts(root_fd: int, *, epoch: int) -> None:
    """Give pip's scripts the guest's Python, and the RECORD rows naming them the scripts'
    hashes and sizes as they are then (also when something else rewrote the shebang)."""
    packages = [
        f"{p}/dist-packages"
        for p in _subfolders(root_fd, "usr/local/lib", lambda name: _PYTHON_FOLDER.match(name) is not None)
    ]
    scripts: dict[str, tuple[bytes, bytes]] = {}  # path in the tree -> RECORD hash and size
    for rel in (*SCRIPT_FOLDERS, *(f"{p}/bin" for p in packages)):
        with _folder(root_fd, rel) as folder:
            if folder is None:
                continue
            with os.scandir(folder) as entries:
                names = sorted(e.name for e in entries if e.is_file(follow_symlinks=False))
            for name in names:
                data = _rewrite(folder, name, _guest_shebang, epoch=epoch)
                if data is not None:
                    scripts[f"{rel}/{name}"] = (_record_hash(data), str(len(data)).encode())
    if not scripts:
        return
    for rel in packages:
        for info in _subfolders(root_fd, rel, lambda name: name.endswith(".dist-info")):
            with _folder(root_fd, info) as folder:
                if folder is not None:
                    _rewrite(folder, "RECORD", lambda data, rel=rel: _record_rows(data, rel, scripts), epoch=epoch)


def _open_root(root: Path) -> int:
    try:
        return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in {errno.ENOTDIR, errno.ELOOP}:
            raise NormalizeError(f"{root}: not a folder (a symlink is not followed)") from None
        raise


def normalize(root: Path, *, epoch: int) -> None:
    """Remove or rewrite, in the tree at ``root``, what would differ between two builds
    for any reason but the epoch (see the module); ``epoch`` is the build's SOURCE_DATE_EPOCH."""
    root_fd = _open_root(root)
    try:
        for rel in SHADOW_FILES:
            with _parent(root_fd, rel) as (folder, name):
                if folder is not None:
                    _rewrite(folder, name, lambda data: _shadow_days(data, epoch // DAY), epoch=epoch)
        for rel in EMPTIED:
            with _parent(root_fd, rel) as (folder, name):
                if folder is not None:
                    _rewrite(folder, name, lambda _: b"", epoch=epoch)
        for rel in REMOVED:
            with _parent(root_fd, rel) as (folder, name):
                if folder is not None:
                    _remove(folder, name)
        _pip_scripts(root_fd, epoch=epoch)
    finally:
        os.close(root_fd)


def remove_package_initramfs(root: Path) -> list[str]:
    """Remove ``/boot/initrd.img-*`` from a tree the package steps made (the kernel
    package's script built it without ``SOURCE_DATE_EPOCH`` or tdxvm's hook; the
    configure step makes the initramfs that ships); the paths removed."""
    root_fd = _open_root(root)
    removed = []
    try:
        with _folder(root_fd, "boot") as boot:
            if boot is None:
                return []
            with os.scandir(boot) as entries:
                names = sorted(e.name for e in entries if e.name.startswith("initrd.img-"))
            removed = [f"/boot/{name}" for name in names if _remove(boot, name)]
    finally:
        os.close(root_fd)
    return removed
