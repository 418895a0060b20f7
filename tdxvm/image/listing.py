"""A root filesystem tree as text, one line per path, so two builds can be compared and
the first file that differs named.

A line has seven tab-separated fields, then optional ones::

    <path> <type> <mode> <uid>:<gid> <mtime> <size> <digest> [link=<path>] [xattr:<name>=<hex>]...

* ``path``: from the tree's root, ``/`` for the root itself. Bytes that are not valid
  UTF-8 are written ``\\xHH``, a backslash ``\\\\``, other characters that do not print
  (tab, newline, controls, non-ASCII spaces) ``\\xHH``/``\\uHHHH``/``\\UHHHHHHHH``;
  so a line never holds a raw tab or newline, and the escaping can be undone exactly;
* ``type``: ``f`` regular file, ``d`` directory, ``l`` symlink, ``c``/``b`` character or
  block device, ``p`` fifo, ``s`` socket;
* ``mode``: the permission bits with setuid, setgid and sticky, four octal digits;
* ``mtime``: whole seconds, with ``.nnnnnnnnn`` only when the nanoseconds are not zero
  (``mke2fs -d`` copies them into the image);
* ``size``: bytes of a regular file, the target's length for a symlink, ``-`` otherwise
  (a directory's size depends on the filesystem it sits on, not on its entries);
* ``digest``: SHA-256 of a regular file, the target of a symlink (escaped like a path),
  ``major:minor`` of a device, ``-`` otherwise;
* ``link=``: a hard link, to the first path (in listing order) with the same inode;
  ``mke2fs -d`` keeps hard links, so they are part of the image;
* ``xattr:``: each extended attribute (POSIX ACLs and file capabilities included), sorted
  by name, the value in hex.

Lines are sorted by the path's bytes. Symlinks are never followed, and regular files are
opened with ``O_NOFOLLOW`` and checked to be the inode that was listed. A listing of a
tree that changes while it is read raises :class:`ListingError`.

Listings are stored gzip-compressed (:func:`write_listing`): the smoke image's 13,000
lines are 1.7 MB of mostly SHA-256 hex, 0.54 MB compressed, and ``zcat``/``zless`` still
read them. The gzip header's time and name are left empty, so the file depends only on
the lines and the zlib version; :func:`listing_sha256` hashes the text itself, which no
zlib version changes.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import os
import re
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

from tdxvm.errors import TdxvmError
from tdxvm.fileio import write_atomic_with

FORMAT = "#tdxvm-tree-listing 1"
FIELDS = 7  # path, type, mode, owner, mtime, size, digest
CHUNK = 1 << 20
TYPE_NAMES = {
    "f": "regular file",
    "d": "directory",
    "l": "symlink",
    "c": "character device",
    "b": "block device",
    "p": "fifo",
    "s": "socket",
}
_TYPES = (
    (stat.S_ISREG, "f"),
    (stat.S_ISDIR, "d"),
    (stat.S_ISLNK, "l"),
    (stat.S_ISCHR, "c"),
    (stat.S_ISBLK, "b"),
    (stat.S_ISFIFO, "p"),
    (stat.S_ISSOCK, "s"),
)
_ESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8})")


class ListingError(TdxvmError, ValueError):
    """A tree that cannot be listed (changed while read, root not a directory) or a stored
    listing that cannot be read; the message names the path, or the file and line."""

    code = "tree-listing"


def escape(raw: bytes) -> str:
    """``raw`` (a path or name) as printable text without tabs or newlines; see the module."""
    text = raw.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if ch.isprintable():
            out.append(ch)
        elif code < 0x80:
            out.append(f"\\x{code:02x}")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


def unescape(text: str) -> bytes:
    """The bytes :func:`escape` was given."""
    if "\\" not in text:
        return text.encode()
    parts = _ESCAPE.split(text)
    out = bytearray()
    for i, part in enumerate(parts):
        if i % 2 == 0:
            if "\\" in part:
                raise ValueError(f"bad escape in {text!r}")
            out += part.encode()
        elif part == "\\":
            out += b"\\"
        elif part[0] == "x":
            out.append(int(part[1:], 16))
        else:
            out += chr(int(part[1:], 16)).encode()
    return bytes(out)


def _type(mode: int) -> str:
    for test, letter in _TYPES:
        if test(mode):
            return letter
    raise ValueError(f"unknown file type in mode {mode:o}")


def _mtime(ns: int) -> str:
    seconds, fraction = divmod(ns, 1_000_000_000)
    return f"{seconds}.{fraction:09d}" if fraction else str(seconds)


def _sha256(path: bytes, st: os.stat_result, buffer: bytearray) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ListingError(f"{os.fsdecode(path)}: cannot open: {exc.strerror}") from None
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            raise ListingError(f"{os.fsdecode(path)}: replaced while the tree was listed")
        digest = hashlib.sha256()
        view = memoryview(buffer)
        total = 0
        while n := os.readv(fd, [buffer]):
            digest.update(view[:n])
            total += n
    finally:
        os.close(fd)
    if total != st.st_size:
        raise ListingError(f"{os.fsdecode(path)}: changed size while the tree was listed")
    return digest.hexdigest()


def _xattrs(path: bytes) -> list[str]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:  # a filesystem without xattrs has none to list
        if exc.errno in {errno.EOPNOTSUPP, errno.ENODATA}:
            return []
        raise ListingError(f"{os.fsdecode(path)}: cannot list extended attributes: {exc.strerror}") from None
    fields = []
    for name in sorted(names, key=os.fsencode):
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError as exc:
            raise ListingError(f"{os.fsdecode(path)}: cannot read extended attribute {name}: {exc.strerror}") from None
        key = escape(os.fsencode(name)).replace("=", "\\x3d")  # the first "=" ends the name
        fields.append(f"xattr:{key}={value.hex()}")
    return fields


def _walk(root: bytes) -> Iterable[tuple[bytes, os.stat_result]]:
    """(path under root, lstat) of every entry below ``root``, never through a symlink."""
    stack = [b""]
    while stack:
        rel = stack.pop()
        with os.scandir(root + rel if rel else root) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                child = rel + b"/" + entry.name
                yield child, st
                if stat.S_ISDIR(st.st_mode):
                    stack.append(child)


def tree_listing(root: Path) -> list[str]:
    """The listing of the tree at ``root`` (see the module), sorted by path bytes."""
    base = os.fsencode(root)
    top = os.lstat(base)
    if not stat.S_ISDIR(top.st_mode):
        raise ListingError(f"{root}: not a directory (a symlink is not followed)")
    entries = sorted([(b"/", top), *_walk(base)], key=lambda e: e[0])
    buffer = bytearray(CHUNK)
    first_path: dict[tuple[int, int], str] = {}
    digests: dict[tuple[int, int], str] = {}
    lines = []
    for rel, st in entries:
        kind = _type(st.st_mode)
        full = base + rel if rel != b"/" else base
        path = escape(rel)
        inode = (st.st_dev, st.st_ino)
        extra = []
        if kind != "d" and st.st_nlink > 1:
            if inode in first_path:
                extra.append(f"link={first_path[inode]}")
            else:
                first_path[inode] = path
        size = "-"
        if kind == "f":
            size = str(st.st_size)
            digest = digests.get(inode) or _sha256(full, st, buffer)
            if st.st_nlink > 1:
                digests[inode] = digest
        elif kind == "l":
            target = os.readlink(full)
            size, digest = str(len(target)), escape(target)
        elif kind in "cb":
            digest = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        else:
            digest = "-"
        fields = [
            path,
            kind,
            f"{stat.S_IMODE(st.st_mode):04o}",
            f"{st.st_uid}:{st.st_gid}",
            _mtime(st.st_mtime_ns),
            size,
            digest,
            *extra,
            *_xattrs(full),
        ]
        lines.append("\t".join(fields))
    return lines


def listing_sha256(lines: Sequence[str]) -> str:
    """SHA-256 of the listing's text (as :func:`write_listing` stores it, uncompressed)."""
    digest = hashlib.sha256(FORMAT.encode() + b"\n")
    for line in lines:
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()


def write_listing(lines: Sequence[str], path: Path) -> None:
    """Store ``lines`` at ``path``, gzip-compressed, atomically; header time and name empty."""
    text = "".join(f"{line}\n" for line in (FORMAT, *lines)).encode()

    def write(f: BinaryIO) -> None:
        with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as gz:
            gz.write(text)

    write_atomic_with(Path(path), write, mode=0o644)


def read_listing(path: Path) -> list[str]:
    """The lines :func:`write_listing` stored; :class:`ListingError` (file and line) when the
    file is not such a listing, a line lacks fields, or the lines are out of order."""
    try:
        with gzip.open(path, "rb") as gz:
            text = gz.read().decode()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise ListingError(f"{path}: not a gzip-compressed tree listing ({exc})") from None
    lines = text.split("\n")
    if lines[0] != FORMAT:
        raise ListingError(f"{path}:1: expected the header {FORMAT!r}, found {lines[0][:40]!r}")
    if lines[-1] != "":
        raise ListingError(f"{path}:{len(lines)}: the last line does not end with a newline (truncated?)")
    body = lines[1:-1]
    previous = b""
    for number, line in enumerate(body, start=2):
        fields = line.split("\t")
        if len(fields) < FIELDS or fields[1] not in TYPE_NAMES:
            raise ListingError(f"{path}:{number}: not a listing line (expected {FIELDS} tab-separated fields)")
        try:
            key = unescape(fields[0])
        except ValueError:
            raise ListingError(f"{path}:{number}: bad escape in the path {fields[0]!r}") from None
        if number > 2 and key <= previous:
            raise ListingError(f"{path}:{number}: {fields[0]} is out of order (lines must be sorted by path)")
        previous = key
    return body


def _only(fields: list[str], label: str) -> str:
    kind = TYPE_NAMES.get(fields[1], fields[1]) if len(fields) > 1 else "entry"
    return f"{fields[0]} ({kind}) is only in {label}"


def _describe(a: list[str], b: list[str]) -> str:
    """What differs between two lines of the same path, in words."""
    if len(a) < FIELDS or len(b) < FIELDS:
        return "the lines differ (one is not a listing line)"
    if a[1] != b[1]:
        return f"type ({TYPE_NAMES.get(a[1], a[1])} vs {TYPE_NAMES.get(b[1], b[1])})"
    kind = a[1]
    parts = []
    for index, name in ((2, "mode"), (3, "owner"), (4, "mtime")):
        if a[index] != b[index]:
            parts.append(f"{name} ({a[index]} vs {b[index]})")
    if a[6] != b[6] or a[5] != b[5]:
        if kind == "f":
            sizes = f", size {a[5]} vs {b[5]}" if a[5] != b[5] else ""
            parts.append(f"content (sha256 {a[6][:16]}… vs {b[6][:16]}…{sizes})")
        elif kind == "l":
            parts.append(f"symlink target ({a[6]} vs {b[6]})")
        else:
            parts.append(f"device number ({a[6]} vs {b[6]})")
    extra_a = dict(field.partition("=")[::2] for field in a[FIELDS:])
    extra_b = dict(field.partition("=")[::2] for field in b[FIELDS:])
    if extra_a.get("link") != extra_b.get("link"):
        parts.append(f"hard link ({extra_a.get('link', 'none')} vs {extra_b.get('link', 'none')})")
    for name in sorted((set(extra_a) | set(extra_b)) - {"link"}):
        if extra_a.get(name) != extra_b.get(name):
            parts.append(
                f"extended attribute {name.removeprefix('xattr:')} "
                f"({extra_a.get(name, 'absent')[:32]} vs {extra_b.get(name, 'absent')[:32]})"
            )
    if parts:
        return ", ".join(parts)
    line_a, line_b = "\t".join(a), "\t".join(b)
    return f"the lines differ ({line_a!r} vs {line_b!r})"


def first_difference(
    a: Sequence[str], b: Sequence[str], *, labels: tuple[str, str] = ("the first listing", "the second listing")
) -> str | None:
    """A sentence naming the first path (in listing order) whose lines differ between the
    sorted listings ``a`` and ``b`` (called ``labels`` in it), and what differs; None when
    they are equal."""
    i = j = 0
    while i < len(a) and j < len(b):
        fa, fb = a[i].split("\t"), b[j].split("\t")
        ka, kb = unescape(fa[0]), unescape(fb[0])
        if ka < kb:
            return _only(fa, labels[0])
        if kb < ka:
            return _only(fb, labels[1])
        if fa != fb:
            return f"{fa[0]} differs between {labels[0]} and {labels[1]}: {_describe(fa, fb)}"
        i, j = i + 1, j + 1
    if i < len(a):
        return _only(a[i].split("\t"), labels[0])
    if j < len(b):
        return _only(b[j].split("\t"), labels[1])
    return None
