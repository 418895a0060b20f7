"""The image build's step cache: a step's output, kept under the hash of its inputs.

An entry is a folder ``<root>/<step>-<key>`` holding the step's files (plain files, no
folders) and ``entry.json``: the step, its full key, its inputs, and the SHA-256 and
size of every file. It is built in a ``.partial-<pid>-<8 hex>`` folder beside it and
renamed into place when the step has finished, so an interrupted build never leaves an
entry that a later build would take for complete; of builds of one entry at once, the
first to finish publishes it and the others use it (:meth:`StepCache.put`). The
building process holds that folder's ``flock`` until the rename; a ``.partial`` folder
of the same entry nobody holds (its build was killed) is removed when the step is next put
(:func:`tdxvm.fileio.partial_folder`). An entry without ``entry.json`` (one from an
older tdxvm), or whose files are missing, extra or of another size, is a miss and is
rebuilt. The root is ``$TDXVM_CACHE`` (else ``$XDG_CACHE_HOME/tdxvm``, else
``~/.cache/tdxvm``), then ``image/``.

The build unpacks a cached tarball as root and runs programs from it, so whoever can
write the cache owns the build host and the image. Every use therefore checks the root
(:func:`private_folder`): a real folder (not a symlink) of this user that group and
others cannot open, made 0700 when missing; anything else is refused with
:class:`CacheError` and the command that fixes it. A file is checked against its digest
when it is used (:meth:`StepCache.verified_file`, :func:`verify_file`), or as it is
read anyway: :func:`tdxvm.image.rootfs.unpack` hashes the tarball on the read that
feeds ``tar``, which costs CPU (SHA-256 runs at about 1.4 GB/s on one core) but no
second read. The digests sit
beside the files they cover: they catch a file that changed after it was written (a
disk, an older tdxvm that left the folder open, a hand edit), while the folder check is
what keeps others out.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tdxvm.errors import TdxvmError
from tdxvm.fileio import partial_folder
from tdxvm.image.recipe import canonical
from tdxvm.xdg import cache_home

ENTRY_FILE = "entry.json"
FORMAT = 1
CHUNK = 1 << 20
_LOCK_WAIT = 60.0  # seconds a put waits for another's publishing
_PUBLISH_TRIES = 8


class CacheError(TdxvmError):
    """The cache cannot be trusted: a folder others can reach, or a file that changed."""

    code = "cache"

    def __init__(self, path: Path, message: str) -> None:
        self.path = Path(path)
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class FileDigest:
    sha256: str
    size: int


def base_folder() -> Path:
    """tdxvm's own cache folder: ``$TDXVM_CACHE``, else :func:`tdxvm.xdg.cache_home`
    (``$XDG_CACHE_HOME/tdxvm``, else ``~/.cache/tdxvm``)."""
    base = os.environ.get("TDXVM_CACHE")
    if base:
        return Path(base)
    return cache_home()


def default_root() -> Path:
    return base_folder() / "image"


def private_folder(path: Path, *, top: Path | None = None) -> Path:
    """``path``, made if missing, refused unless it is fit to hold what runs as root.

    A missing ``path`` is made 0700, and so is every missing folder from ``top`` (one of
    its parents, also tdxvm's: :func:`base_folder`) down to it; folders above ``top`` are
    made with the usual mode. Then ``path`` must be a folder, not a symlink, owned by
    this process's effective uid, with no group or other permission (``mode & 0o077``)."""
    path = Path(path)
    top = path if top is None else Path(top)
    if not os.path.lexists(path):
        top.parent.mkdir(parents=True, exist_ok=True)
        for folder in (top, *(top / part for part in _prefixes(path.relative_to(top)))):
            try:
                folder.mkdir(mode=0o700)
            except FileExistsError:
                continue
            folder.chmod(0o700)  # whatever the umask
    st = os.lstat(path)
    uid, mode, euid = st.st_uid, stat.S_IMODE(st.st_mode), os.geteuid()
    where = f"cache folder {path} (owner uid {uid}, mode {mode:04o})"
    if stat.S_ISLNK(st.st_mode):
        raise CacheError(
            path,
            f"{where} is a symlink to {os.readlink(path)}: give the real folder instead, "
            f"or replace the link with a folder of uid {euid} and mode 0700",
        )
    if not stat.S_ISDIR(st.st_mode):
        raise CacheError(path, f"{where} is not a folder")
    fixes = ([f"chown {euid} {path}"] if uid != euid else []) + ([f"chmod 700 {path}"] if mode & 0o077 else [])
    if fixes:
        why = f"not owned by uid {euid}" if uid != euid else "open to group or others"
        raise CacheError(
            path,
            f"{where} is {why}: the image build unpacks and runs what it holds as root, so "
            f"only its owner may reach it; fix: {' && '.join(fixes)}",
        )
    return path


def _prefixes(relative: Path) -> list[Path]:
    return [Path(*relative.parts[: i + 1]) for i in range(len(relative.parts))]


def step_key(step: str, inputs: Mapping[str, Any]) -> str:
    """The cache key of ``step`` for ``inputs`` (SHA-256 of their canonical JSON)."""
    return hashlib.sha256(step.encode() + b"\0" + canonical(inputs)).hexdigest()


def file_digest(path: Path) -> FileDigest:
    """SHA-256 and size of ``path``, read once in 1 MiB chunks."""
    digest, size = hashlib.sha256(), 0
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
            size += n
    return FileDigest(digest.hexdigest(), size)


def mismatch(path: Path, expected: str, actual: str) -> CacheError:
    """The error for a cache entry file whose SHA-256 is not the one its entry recorded."""
    entry = Path(path).parent
    return CacheError(
        path,
        f"cache entry file {path} changed after its step wrote it: SHA-256 {actual}, expected "
        f"{expected} (from {entry / ENTRY_FILE}); delete the entry (rm -rf {entry}) and build again",
    )


def verify_file(path: Path, *, sha256: str, size: int) -> Path:
    """``path`` if its size and SHA-256 are these, else :class:`CacheError` naming both digests."""
    actual_size = os.stat(path).st_size
    if actual_size != size:
        entry = Path(path).parent
        raise CacheError(
            path,
            f"cache entry file {path} is {actual_size} bytes, expected {size} (from "
            f"{entry / ENTRY_FILE}); delete the entry (rm -rf {entry}) and build again",
        )
    actual = file_digest(path)
    if actual.sha256 != sha256 or actual.size != size:
        raise mismatch(path, sha256, actual.sha256)
    return Path(path)


class StepCache:
    """Entries under ``root`` (else :func:`default_root`); the root is checked on every use."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()
        self._top = self.root if root is not None else base_folder()

    def path(self, step: str, key: str) -> Path:
        return self.root / f"{step}-{key[:32]}"

    def get(self, step: str, key: str) -> Path | None:
        """The entry for ``step`` and ``key`` if a build finished it and its files are all
        there with their recorded sizes, else None. Contents are checked on use. An entry
        that vanishes or is replaced while this looks is a miss, never an error."""
        private_folder(self.root, top=self._top)
        entry = self.path(step, key)
        return entry if _complete(entry, step, key) else None

    def digest(self, entry: Path, name: str) -> FileDigest:
        """What ``entry.json`` of ``entry`` records for its file ``name``."""
        files = _recorded_files(_read_record(entry) or {})
        if files is None or name not in files:
            raise CacheError(
                entry, f"cache entry {entry} records no file {name!r}; delete it (rm -rf {entry}) and build again"
            )
        return files[name]

    def verified_file(self, entry: Path, name: str) -> Path:
        """The path of ``name`` in ``entry``, once its SHA-256 and size match ``entry.json``."""
        expected = self.digest(entry, name)
        return verify_file(entry / name, sha256=expected.sha256, size=expected.size)

    @contextmanager
    def put(self, step: str, key: str, inputs: Mapping[str, Any]) -> Iterator[Path]:
        """A fresh folder to build the entry in; published only if the block succeeds,
        with ``entry.json`` recording the digest of every file the block wrote there.

        Builds of the same step at once each build their own folder; the first to finish
        publishes it, and the others keep that entry (the same key means the same inputs)
        and drop theirs, so an entry another build returned from :meth:`get` or just
        published is never removed under it. Only an entry :meth:`get` would not return (an
        older tdxvm's, a damaged one) is replaced: renamed aside, the new one renamed into
        place, then the old one removed, so a reader sees the old entry or the new one,
        never none or a part of one. A reader still reading such an entry loses it (its
        files are gone, or :meth:`verified_file` finds they changed): the one case left,
        and one :meth:`get` had already called a miss."""
        private_folder(self.root, top=self._top)
        entry = self.path(step, key)
        with partial_folder(entry.parent, f"{entry.name}.partial-") as staging:
            yield staging
            files = {name: file_digest(staging / name) for name in _plain_files(staging)}
            record = {
                "format": FORMAT,
                "step": step,
                "key": key,
                "inputs": inputs,
                "files": {name: {"sha256": d.sha256, "size": d.size} for name, d in files.items()},
            }
            (staging / ENTRY_FILE).write_text(json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")
            self._publish(staging, entry, step, key, trash=f"{staging.name}.old")

    def _publish(self, staging: Path, entry: Path, step: str, key: str, *, trash: str) -> None:
        """Rename ``staging`` to ``entry`` unless a complete entry of ``key`` is there, under
        the root folder's ``flock`` (held by publishers only, for these renames): two
        builds cannot both find the entry missing, or replace each other's. The old entry
        goes aside to ``trash`` (a partial name: a put killed before it removed it leaves
        it to the next put's sweep). A folder something other than a put made meanwhile
        (``ENOTEMPTY``) is looked at again."""
        old = entry.with_name(trash)
        for _ in range(_PUBLISH_TRIES):
            with _locked_folder(self.root):
                if _complete(entry, step, key):
                    return  # another build's, of the same inputs: kept; staging is dropped
                moved = _rename_if_there(entry, old)
                try:
                    os.rename(staging, entry)
                except OSError as exc:
                    if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
                    continue
                finally:
                    if moved:
                        _remove(old)
            return
        raise CacheError(entry, f"cache entry {entry} keeps changing while this build publishes it; build again")


def _complete(entry: Path, step: str, key: str) -> bool:
    """Whether ``entry`` is a finished entry of ``step`` and ``key`` with every recorded
    file there at its recorded size: read through one open handle of the folder, so the
    answer is about one folder even while another replaces it, and False when it is
    gone or replaced before the look ends."""
    try:
        fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:  # missing, a symlink, not a folder
        return False
    try:
        record = _read_record_at(fd)
        if record is None or record.get("step") != step or record.get("key") != key:
            return False
        files = _recorded_files(record)
        if files is None or set(os.listdir(fd)) != {*files, ENTRY_FILE}:
            return False
        for name, digest in files.items():
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode) or st.st_size != digest.size:
                return False
        return True
    except OSError:  # removed, or replaced, while this looked
        return False
    finally:
        os.close(fd)


def _read_record_at(folder_fd: int) -> dict[str, Any] | None:
    try:
        fd = os.open(ENTRY_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder_fd)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        try:
            record = json.loads(f.read())
        except ValueError:
            return None
    return record if isinstance(record, dict) and record.get("format") == FORMAT else None


@contextmanager
def _locked_folder(folder: Path) -> Iterator[None]:
    """The exclusive ``flock`` of ``folder`` itself while the block runs, waited for at
    most :data:`_LOCK_WAIT` seconds (a publisher holds it for a few renames)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        deadline = time.monotonic() + _LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise CacheError(
                        folder, f"cache folder {folder} stays locked by another build ({_LOCK_WAIT:.0f} s); build again"
                    ) from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)


def _rename_if_there(path: Path, to: Path) -> bool:
    """Rename ``path`` to ``to``; False if there was nothing to rename."""
    try:
        os.rename(path, to)
    except FileNotFoundError:
        return False
    return True


def _plain_files(staging: Path) -> list[str]:
    names = sorted(os.listdir(staging))
    for name in names:
        if name == ENTRY_FILE or not stat.S_ISREG(os.lstat(staging / name).st_mode):
            raise ValueError(f"{staging / name}: a cache entry holds plain files only, and not {ENTRY_FILE}")
    return names


def _read_record(entry: Path) -> dict[str, Any] | None:
    try:
        st = os.lstat(entry)
        if not stat.S_ISDIR(st.st_mode):
            return None
        record = json.loads((entry / ENTRY_FILE).read_bytes())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == FORMAT else None


def _recorded_files(record: Mapping[str, Any]) -> dict[str, FileDigest] | None:
    files = record.get("files")
    if not isinstance(files, dict):
        return None
    out = {}
    for name, value in files.items():
        if "/" in name or name in ("", ".", "..", ENTRY_FILE) or not isinstance(value, dict):
            return None
        sha256, size = value.get("sha256"), value.get("size")
        if not isinstance(sha256, str) or len(sha256) != 64 or not isinstance(size, int) or isinstance(size, bool):
            return None
        out[name] = FileDigest(sha256, size)
    return out


def _remove(path: Path) -> None:
    """Remove a folder and everything in it, or a file or symlink; nothing if missing."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
