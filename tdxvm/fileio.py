"""Atomic file writes (a reader sees the old file or the new one, never a part of either),
an exclusive lock file taken with a deadline, and the partial files and folders of
writers that may be killed.

A partial (a file or folder written under a name of its own, then renamed into place or
removed) is made by :func:`create_locked`: its writer holds the partial's ``flock`` from
before its first byte until after the rename. The kernel drops a dead process's locks,
however it died (SIGKILL, the OOM killer; a power loss drops everything), so a partial
whose lock can be taken is one no writer will finish: :func:`claim_abandoned` takes it,
and :func:`remove_abandoned` removes such partials while holding their lock, so a writer
can never be at work in one being removed. The next run of the same writer sweeps the
partials of its own target that way (:func:`partial_folder`, :func:`write_atomic_with`).

Standard library only (and :mod:`tdxvm.errors`), so that every part of tdxvm (the
guest's included) can use it.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import os
import re
import secrets
import shutil
import stat
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

from tdxvm.errors import TdxvmError

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_TMP_HEX = 12  # hex digits in a temporary file's name: .<name>.<12 hex>.tmp


class MountedPartialWarning(TdxvmError, UserWarning):
    """An abandoned partial folder left in place because something is mounted in it (a
    killed debootstrap's ``/proc``): a warning (the CLI prints it as one ``warning:``
    line), never raised."""

    code = "partial-mounted"


def write_atomic_with(path: Path, write: Callable[[BinaryIO], object], *, mode: int, exclusive: bool = False) -> None:
    """Call ``write`` on a new temporary file beside ``path``, fsync it, rename it over ``path``.

    The temporary file (``.<name>.<12 hex>.tmp``) is created with ``O_EXCL | O_NOFOLLOW``
    and ``mode`` (set again with fchmod, so the umask cannot widen or narrow it), locked
    by :func:`create_locked` until after the rename; on any failure it is removed. Those
    of earlier writes of ``path`` whose writer was killed (the data, a secret's included,
    in the clear) are removed first (:func:`remove_abandoned_temporaries`). With
    ``exclusive``, ``path`` is made only if it does not exist (a hard link, which never
    replaces: ``FileExistsError`` if another writer made it first).
    """
    path = Path(path)
    remove_abandoned_temporaries(path)
    tmp, fd = create_locked(lambda: path.with_name(f".{path.name}.{secrets.token_hex(_TMP_HEX // 2)}.tmp"), mode=mode)
    try:
        with os.fdopen(fd, "wb") as f:  # closing it drops the lock: after the rename
            os.fchmod(f.fileno(), mode)
            write(f)
            f.flush()
            os.fsync(f.fileno())
            if exclusive:
                os.link(tmp, path)
                tmp.unlink()
            else:
                os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes, *, mode: int, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`write_atomic_with`)."""
    write_atomic_with(path, lambda f: f.write(data), mode=mode, exclusive=exclusive)


def claim_abandoned(path: Path) -> int | None:
    """An fd of ``path`` holding its exclusive ``flock``, when no other open file holds it:
    the file (or folder) of a writer that held its lock while it wrote and is gone, however
    it ended (the kernel drops a dead process's locks). None while a writer holds it, or
    when ``path`` is gone or names another file by the time the lock is taken. Closing the
    fd releases the lock. Other failures to open ``path`` raise :class:`OSError`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if _names(path, fd):
            return fd
    except BlockingIOError:
        pass
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` names the file open at ``fd`` now (not removed, nor replaced)."""
    try:
        held, named = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


def create_locked(name: Callable[[], Path], *, mode: int, folder: bool = False) -> tuple[Path, int]:
    """A new partial at ``name()``: a file (``O_EXCL``, open for writing) or, with
    ``folder``, a folder, made with ``mode`` less the umask; and an fd of it that holds
    its exclusive ``flock``. Keep the fd open until the partial is renamed or removed.

    A sweep may take the lock and remove the partial in the instant between its creation
    and this lock: then the locked one has no name left (``st_nlink`` 0), and another is
    made, at ``name()`` again. On a filesystem without ``flock`` the partial is unlocked,
    and a sweep cannot take its lock either: it stays."""
    while True:
        path = Path(name())
        if folder:
            os.mkdir(path, mode)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:  # removed before it was even opened
                continue
        else:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | os.O_CLOEXEC, mode)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # waits only while a sweep removes this very partial
            except OSError as exc:
                if exc.errno not in (
                    errno.ENOLCK,
                    errno.EOPNOTSUPP,
                    errno.ENOTSUP,
                    errno.EBADF,
                ):  # EBADF: NFS, read-only fd
                    raise
            if os.fstat(fd).st_nlink:
                return path, fd
        except BaseException:
            os.close(fd)
            _remove_made(path)
            raise
        os.close(fd)


def _remove_made(path: Path) -> None:
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            os.rmdir(path)
        else:
            path.unlink()
    except OSError:
        pass


def remove_abandoned(paths: Iterable[Path]) -> list[Path]:
    """Of ``paths`` (partials, see the module doc), remove those no writer holds, each
    while this holds its lock; the ones removed. Those a writer holds, those gone or
    renamed meanwhile, those that cannot be opened here (another user's) stay; so does a
    folder with something mounted in it (:class:`MountedPartialWarning`)."""
    removed = []
    for path in paths:
        try:
            fd = claim_abandoned(path)
        except OSError:
            continue
        if fd is None:
            continue
        try:
            if remove_partial(path):
                removed.append(Path(path))
        finally:
            os.close(fd)
    return removed


def remove_partial(path: Path) -> bool:
    """Remove the partial file or folder ``path`` (held by the caller); whether it is gone.
    A folder with something mounted at or under it is never entered: it stays, with a
    :class:`MountedPartialWarning` naming the mounts (removing it would delete in the
    mounted filesystem, or fail on it)."""
    try:
        is_folder = stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return True
    if not is_folder:
        Path(path).unlink(missing_ok=True)
        return True
    mounts = _mounts_in(Path(path))
    if mounts:
        warnings.warn(
            MountedPartialWarning(
                f"{path}: left in place: {', '.join(mounts)} {'is' if len(mounts) == 1 else 'are'} mounted in it "
                f"(umount -l {'it' if len(mounts) == 1 else 'them'}; the next run then removes the folder)"
            ),
            stacklevel=2,
        )
        return False
    shutil.rmtree(path, ignore_errors=True)
    return not os.path.lexists(path)


def _mounts_in(folder: Path) -> list[str]:
    """The mount points at or under ``folder`` this process sees (``/proc/self/mountinfo``;
    none where that cannot be read: not Linux)."""
    try:
        lines = Path("/proc/self/mountinfo").read_bytes().splitlines()
    except OSError:
        return []
    top = os.path.realpath(folder)
    inside = top.rstrip("/") + "/"
    found = []
    for line in lines:
        fields = line.split(b" ")
        if len(fields) > 4:
            point = os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), fields[4]))
            if point == top or point.startswith(inside):
                found.append(point)
    return found


@contextmanager
def partial_folder(beside: Path, prefix: str, *, mode: int = 0o700) -> Iterator[Path]:
    """A new folder ``<beside>/<prefix><pid>-<8 hex>`` (:func:`create_locked`), locked
    while the block runs and removed after it, unless the block renamed it into place.
    The partial folders ``<prefix>*`` there of earlier runs that were killed (nobody holds
    their lock) are removed first; those of runs still at work stay."""
    beside = Path(beside)
    remove_abandoned(sorted(beside.glob(glob.escape(prefix) + "*")))
    path, fd = create_locked(lambda: beside / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}", mode=mode, folder=True)
    try:
        yield path
    finally:
        try:
            remove_partial(path)  # gone already when renamed
        finally:
            os.close(fd)


def remove_abandoned_temporaries(path: Path) -> list[Path]:
    """The temporary files of :func:`write_atomic_with` for ``path`` (``.<name>.<12
    hex>.tmp`` beside it) whose write was killed: removed (:func:`remove_abandoned`).
    Those of other files, and of writes at work, stay; the ones removed."""
    path = Path(path)
    prefix = f".{path.name}."
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    found = [
        path.with_name(n)
        for n in names
        if n.startswith(prefix) and n.endswith(".tmp") and _is_hex(n[len(prefix) : -len(".tmp")], _TMP_HEX)
    ]
    return remove_abandoned(found)


def _is_hex(text: str, length: int) -> bool:
    return len(text) == length and all(c in "0123456789abcdef" for c in text)


def lock_exclusive(path: Path, timeout: float, *, waiting: Callable[[], object] | None = None) -> int:
    """An fd of ``path`` (created 0600) holding its exclusive ``flock``; closing it releases
    the lock (:func:`unlock_removing` removes the file too). Waits up to ``timeout``
    seconds, calling ``waiting`` about once a second meanwhile, then raises
    :class:`TimeoutError`. The lock is always that of the file ``path`` names: one its last
    holder removed while this waited is let go, and ``path`` opened again."""
    told = time.monotonic()
    deadline = told + timeout
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    now = time.monotonic()
                    if now >= deadline:
                        raise TimeoutError(f"{path}: locked (waited {timeout:.0f} s)") from None
                    if waiting is not None and now - told >= 1.0:
                        told = now
                        waiting()
                    time.sleep(0.05)
            if _names(path, fd):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def unlock_removing(path: Path, fd: int) -> None:
    """Let go of the lock ``fd`` holds on ``path`` (:func:`lock_exclusive`), removing the
    file first so that none is left behind: a waiter that then holds the removed file's
    lock opens ``path`` again."""
    with suppress(OSError):
        path.unlink()
    os.close(fd)
