"""The controller's secret store: disk and model keys, never anywhere else in the clear.

A folder under the user's data directory (``$XDG_DATA_HOME/tdxvm/secrets``, else
``~/.local/share/tdxvm/secrets``) or one the user names; folders are mode 0700 and
files 0600, written atomically (a put killed mid-write leaves a ``.NAME.<hex>.tmp`` copy
of the key, 0600 too: the next put of that name, or its delete, removes it). Names are ``kind/name`` (``disk/smoke``,
``weights/llama2-7b``) so one store holds every kind of key. Keys are never logged;
errors name the secret, never its value.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

from tdxvm.errors import TdxvmError
from tdxvm.fileio import remove_abandoned_temporaries, write_atomic
from tdxvm.xdg import data_home

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}/[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class SecretStoreError(TdxvmError):
    code = "secret-store"


class SecretExists(SecretStoreError):
    """A secret of that name is already stored."""


def default_directory() -> Path:
    return data_home() / "secrets"


class SecretStore:
    def __init__(self, *, directory: Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_directory()

    def _path(self, name: str) -> Path:
        if not _NAME.fullmatch(name):
            raise SecretStoreError(f"secret name {name!r} must look like kind/name (letters, digits, '.', '_', '-')")
        return self.directory / name

    def _private_dir(self, path: Path) -> None:
        try:
            self.directory.parent.mkdir(parents=True, exist_ok=True)
            for d in (self.directory, path):
                d.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise SecretStoreError(f"{exc.filename or path}: cannot make the secret folder: {exc.strerror}") from None
        for d in (self.directory, path):
            mode = d.stat().st_mode
            if mode & 0o077:
                raise SecretStoreError(
                    f"{d}: secret folder mode is {stat.filemode(mode)}; it must be private (chmod 700)"
                )

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def put(self, name: str, value: bytes, *, replace: bool = False) -> Path:
        """Store ``value`` under ``name`` (refused if it exists, unless ``replace``: made
        exclusively, so of two processes storing one name at once, one is refused)."""
        path = self._path(name)
        self._private_dir(path.parent)
        if path.exists() and not replace:
            raise SecretExists(f"secret {name} already exists in {self.directory}")
        try:
            write_atomic(path, value, mode=0o600, exclusive=not replace)
        except FileExistsError:
            raise SecretExists(f"secret {name} already exists in {self.directory}") from None
        except OSError as exc:
            raise SecretStoreError(f"secret {name}: cannot write {path}: {exc.strerror}") from None
        return path

    def get_or_make(self, name: str, make: Callable[[], bytes]) -> bytes:
        """The secret ``name``, made with ``make()`` and stored on first use. Processes that
        make it at once all get the one stored (the others' are dropped, never used)."""
        if not self.exists(name):
            with contextlib.suppress(SecretExists):
                self.put(name, make())
        return self.get(name)

    def get(self, name: str) -> bytes:
        path = self._path(name)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            raise SecretStoreError(f"secret {name} is not in {self.directory}") from None
        except OSError as exc:
            raise SecretStoreError(f"secret {name}: cannot open: {exc.strerror}") from None
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise SecretStoreError(f"secret {name}: {path} is not a file")
        with os.fdopen(fd, "rb") as f:
            if mode & 0o077:
                raise SecretStoreError(
                    f"secret {name}: file mode is {stat.filemode(mode)}; it must be private (chmod 600)"
                )
            return f.read()

    def delete(self, name: str) -> None:
        """Remove the secret ``name``, and the temporary copies of it that puts killed
        mid-write left (never one of a put at work)."""
        path = self._path(name)
        path.unlink(missing_ok=True)
        remove_abandoned_temporaries(path)

    def names(self, kind: str) -> list[str]:
        """The names of the secrets of ``kind`` (``kind/NAME``), sorted."""
        folder = self._path(f"{kind}/x").parent
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_file() and _NAME.fullmatch(f"{kind}/{p.name}"))
