"""The model digest: one SHA-256 that names a model folder's exact plaintext bytes.

The digest covers every regular file of the folder, in a canonical order, with its path
and size, so renaming, adding, dropping or changing any file changes it::

    model digest = SHA-256( "tdxvm model digest v1\\0"
                            ‖ for each file, sorted by the UTF-8 bytes of its path:
                                u32 BE len(path) ‖ path (UTF-8, "/"-separated, relative)
                                ‖ u64 BE size ‖ SHA-256(file contents) )

``tdxvm weights encrypt`` computes it from the per-file SHA-256 it takes while
encrypting (:func:`digest_of_entries`) and records it in the encrypted index; the guest
computes it again from the decrypted files it is about to load (:func:`folder_digest`)
before the inference service measures it into RTMR3 (:mod:`tdxvm.guest.rtmr3`), so
what is measured is what is read, not what an index claims. A client compares the two
(``tdxvm verify-endpoint --model-digest``).

Standard library only: the guest and the controller run the same code.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import struct
from collections.abc import Iterable
from pathlib import Path

from tdxvm.errors import TdxvmError

DIGEST_TAG = b"tdxvm model digest v1\x00"
DIGEST_SIZE = 32
PREFIX = "sha256:"
_READ = 4 << 20


class ModelDigestError(TdxvmError):
    """A folder whose digest cannot be taken (a link, a special file, no files); the message names the path."""

    code = "model-digest"


def digest_of_entries(entries: Iterable[tuple[str, int, bytes]]) -> bytes:
    """The model digest of ``(relative path, size, SHA-256 of the contents)`` triples."""
    items = sorted(((p.encode("utf-8"), size, sha) for p, size, sha in entries), key=lambda item: item[0])
    if not items:
        raise ModelDigestError("a model digest needs at least one file")
    h = hashlib.sha256(DIGEST_TAG)
    previous = None
    for path, size, sha in items:
        if path == previous:
            raise ModelDigestError(f"{path.decode()!r} is listed twice")
        if len(sha) != DIGEST_SIZE or size < 0:
            raise ModelDigestError(
                f"{path.decode()!r}: expected a 32-byte SHA-256 and a size, got {len(sha)} bytes and {size}"
            )
        h.update(struct.pack(">I", len(path)) + path + struct.pack(">Q", size) + sha)
        previous = path
    return h.digest()


def file_sha256(path: Path, copy_to: Path | None = None) -> tuple[int, bytes]:
    """``(size, SHA-256)`` of one file, read in large blocks; with ``copy_to``, the bytes
    hashed are also written there (a new file, mode 0600), so the copy is what was hashed."""
    h, size = hashlib.sha256(), 0
    with contextlib.ExitStack() as files:
        f = files.enter_context(open(path, "rb", buffering=0))
        out = None
        if copy_to is not None:
            out = files.enter_context(open(os.open(copy_to, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb"))
        while block := f.read(_READ):
            h.update(block)
            size += len(block)
            if out is not None:
                out.write(block)
    return size, h.digest()


def folder_entries(folder: Path, copy_to: Path | None = None) -> list[tuple[str, int, bytes]]:
    """``(relative path, size, SHA-256)`` of every regular file under ``folder``; a symbolic
    link or a special file anywhere is a :class:`ModelDigestError` (its target is not measured).
    With ``copy_to`` (an empty folder), each file is copied there as it is hashed."""
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        raise ModelDigestError(f"{folder}: not a folder")
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            mode = os.lstat(path).st_mode
            rel = path.relative_to(folder).as_posix()
            if stat.S_ISLNK(mode):
                raise ModelDigestError(f"{path}: a symbolic link in the model folder; only regular files are measured")
            if stat.S_ISREG(mode):
                out.append((rel, *file_sha256(path, None if copy_to is None else copy_to / rel)))
            elif stat.S_ISDIR(mode):
                if copy_to is not None:
                    (copy_to / rel).mkdir(mode=0o700)
            else:
                raise ModelDigestError(f"{path}: not a regular file")
    if not out:
        raise ModelDigestError(f"{folder}: no files")
    return out


def folder_digest(folder: Path) -> bytes:
    """The model digest of the files now in ``folder`` (see the module doc)."""
    return digest_of_entries(folder_entries(folder))


def parse_digest(text: str) -> bytes:
    """A model digest from ``sha256:HEX`` or ``HEX`` (64 hex digits); ValueError otherwise."""
    raw = text.strip().lower().removeprefix(PREFIX)
    if len(raw) != 2 * DIGEST_SIZE:
        raise ValueError(
            f"expected {2 * DIGEST_SIZE} hex digits (a SHA-256), optionally after {PREFIX!r}; got {text!r}"
        )
    try:
        return bytes.fromhex(raw)
    except ValueError:
        raise ValueError(f"not hex: {text!r}") from None


def show(digest: bytes) -> str:
    """``sha256:HEX``: how tdxvm prints a model digest."""
    return PREFIX + digest.hex()
