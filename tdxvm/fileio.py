"""Atomic file writes (a reader sees the old file or the new one, never a part of either),
and an exclusive lock file taken with a deadline.

Standard library only, so that every part of tdxvm (the guest's included) can use it.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic_with(path: Path, write: Callable[[BinaryIO], object], *, mode: int, exclusive: bool = False) -> None:
    """Call ``write`` on a new temporary file beside ``path``, fsync it, rename it over ``path``.

    The temporary file is created with ``O_EXCL | O_NOFOLLOW`` and ``mode`` (set again with
    fchmod, so the umask cannot widen or narrow it); on any failure it is removed. With
    ``exclusive``, ``path`` is made only if it does not exist (a hard link, which never
    replaces: ``FileExistsError`` if another writer made it first).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        with os.fdopen(fd, "wb") as f:
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
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held, named = os.fstat(fd), os.stat(path, follow_symlinks=False)
        if (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino):
            return fd
    except (BlockingIOError, FileNotFoundError):
        pass
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def lock_exclusive(path: Path, timeout: float) -> int:
    """An fd of ``path`` (created 0600) holding its exclusive ``flock``; closing it releases
    the lock. Waits up to ``timeout`` seconds, then raises :class:`TimeoutError`."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise TimeoutError(f"{path}: locked (waited {timeout:.0f} s)") from None
            time.sleep(0.05)
