"""An upload being received, on the guest's disk; and installing a received model.

Layout under the receiving folder ``DEST`` (in a TD, on the scratch disk mounted at
``/var/lib/tdxvm``: authenticated encryption under a key drawn in the TD,
:mod:`tdxvm.guest.scratch`)::

    DEST/<upload id>/                 a complete upload: index.tdxw, files/*.tdxw
    DEST/.partial/<upload id>.lock    held (flock) by the one receiver working on that upload
    DEST/.partial/<upload id>/data/   the files as they arrive, written at their offsets
    DEST/.partial/<upload id>/state/  key (32 random bytes) and <file index>.tags

Every block is written only after its session tag checked (see
:mod:`tdxvm.guest.transferwire`); the receiver then stores the block's own tag under a
local key in ``<file index>.tags`` (16 bytes per block, zero = not received). Whole
blocks go to the disk with ``O_DIRECT`` (see :meth:`Staging.write_block`); the rest is
buffered, with writeback started early (a background ``fdatasync`` every 64 MiB of a
file). Nothing depends on either: after a crash, a kill or a
torn write, the next receiver re-checks every block on disk against its stored tag and
keeps only those that match, so the resume point never rests on a journal that could
disagree with the data. The
local key never leaves the guest and lives in ``state/`` beside the data, on the same
scratch disk; it authenticates ciphertext, not a secret.

When every block is in, :meth:`Staging.commit` truncates, fsyncs and renames
``data/`` to ``DEST/<upload id>`` in one ``rename``: that folder exists complete or not
at all. :func:`install_model` decrypts a complete upload with the released model key
into the service's model folder, also all or nothing and durable.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import re
import secrets
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

from tdxvm.errors import TdxvmError
from tdxvm.fileio import lock_exclusive
from tdxvm.guest.transferwire import MAC_KEY_SIZE, MAC_SIZE, BlockMac, Manifest, WireError
from tdxvm.guest.weights import FileEntry, Progress, decrypt_model

PARTIAL = ".partial"
FLUSH_BYTES = 64 << 20  # start writeback of a file after this many new buffered bytes
DIRECT_ALIGN = 4096  # O_DIRECT: buffer address, file offset and length on this boundary
_ZERO_TAG = bytes(MAC_SIZE)
_UPLOAD_ID = re.compile(r"[0-9a-f]{64}")


class StagingError(TdxvmError):
    """The receiving folder cannot hold this upload (busy, full, inconsistent); the message says where."""

    code = "staging"


def upload_path(dest: Path, upload_id: str) -> Path:
    """Where a complete upload lives (the folder :func:`install_model` decrypts)."""
    if not _UPLOAD_ID.fullmatch(upload_id):
        raise StagingError(f"upload id {upload_id!r} is not 64 lowercase hex digits", code="usage")
    return Path(dest) / upload_id


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lock(path: Path, timeout: float) -> int:
    try:
        return lock_exclusive(path, timeout)
    except TimeoutError:
        raise StagingError(
            f"{path}: another receiver is working on this upload (waited {timeout:.0f} s)", code="busy"
        ) from None


class Staging:
    """One upload's partial state: which blocks are on disk and verified; see the module doc.

    Open it with :meth:`open` (which takes the upload's lock and re-checks what is on
    disk), write verified blocks with :meth:`write_block` (thread-safe for distinct
    blocks), then :meth:`commit` or :meth:`close`.
    """

    def __init__(self, dest: Path, manifest: Manifest, lock_fd: int, *, complete: bool) -> None:
        self.dest, self.manifest, self.upload_id = Path(dest), manifest, manifest.upload_id
        self.final = upload_path(self.dest, self.upload_id)
        self.root = self.dest / PARTIAL / self.upload_id
        self._lock_fd: int | None = lock_fd
        self.already_complete = complete
        self.verified = [bytearray(f.blocks(manifest.block_size)) for f in manifest.files]
        self._data: list[int] = []
        self._direct: list[int | None] = []  # the same files opened O_DIRECT, where the file system allows
        self._tags: list[int] = []
        self._local: BlockMac | None = None
        self._unflushed = [0] * len(manifest.files)
        self._flush_queue: queue.Queue[int | None] = queue.Queue()
        self._flusher: threading.Thread | None = None

    # -- opening and the resume scan ---------------------------------------------------

    @classmethod
    def open(cls, dest: Path, manifest: Manifest, *, lock_timeout: float = 30.0) -> Staging:
        dest = Path(dest)
        (dest / PARTIAL).mkdir(mode=0o700, parents=True, exist_ok=True)
        lock_path = dest / PARTIAL / f"{manifest.upload_id}.lock"
        fd = _lock(lock_path, lock_timeout)
        try:
            final = upload_path(dest, manifest.upload_id)
            if final.is_dir():
                stage = cls(dest, manifest, fd, complete=True)
                stage._check_final()
                shutil.rmtree(stage.root, ignore_errors=True)  # left by a crash between rename and cleanup
                for v in stage.verified:
                    v[:] = b"\x01" * len(v)
                return stage
            stage = cls(dest, manifest, fd, complete=False)
            stage._open_files()
            stage._scan()
            return stage
        except BaseException:
            os.close(fd)
            raise

    def _check_final(self) -> None:
        for f in self.manifest.files:
            p = self.final / f.name
            if not p.is_file() or p.stat().st_size != f.size:
                raise StagingError(
                    f"{p}: complete upload folder lacks this file or has the wrong size ({f.size} bytes expected)",
                    code="inconsistent",
                )

    def _open_files(self) -> None:
        data, state = self.root / "data", self.root / "state"
        for d in (self.root, data, state, data / "files"):
            d.mkdir(mode=0o700, exist_ok=True)
        key_path = state / "key"
        try:
            key = key_path.read_bytes()
        except FileNotFoundError:
            key = b""
        if len(key) != MAC_KEY_SIZE:  # new upload, or a key torn by a crash: no stored tag can be trusted
            for p in state.glob("*.tags"):
                p.unlink()
            key = secrets.token_bytes(MAC_KEY_SIZE)
            tmp = state / "key.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
            try:
                os.write(fd, key)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, key_path)
            _fsync_dir(state)
        self._local = BlockMac(key)
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        for i, f in enumerate(self.manifest.files):
            self._data.append(os.open(data / f.name, flags, 0o600))
            try:
                self._direct.append(os.open(data / f.name, flags | os.O_DIRECT, 0o600))
            except (OSError, AttributeError):  # EINVAL: no direct I/O on this file system (an old tmpfs): buffered then
                self._direct.append(None)
            self._tags.append(os.open(state / f"{i}.tags", flags, 0o600))

    def _scan(self) -> None:
        """Mark each block whose bytes on disk match their stored local tag."""
        assert self._local is not None
        buf = bytearray(self.manifest.block_size)
        view = memoryview(buf)
        for i in range(len(self.manifest.files)):
            tags = os.pread(self._tags[i], MAC_SIZE * len(self.verified[i]), 0)
            for b in range(len(self.verified[i])):
                tag = tags[b * MAC_SIZE : (b + 1) * MAC_SIZE]
                if len(tag) < MAC_SIZE or tag == _ZERO_TAG:
                    continue
                n = self.manifest.block_len(i, b)
                got = os.preadv(self._data[i], [view[:n]], b * self.manifest.block_size)
                if got == n and self._local.verify(i, b, view[:n], tag):
                    self.verified[i][b] = 1

    # -- progress ------------------------------------------------------------------------

    def have_bytes(self) -> int:
        return sum(self.manifest.block_len(i, b) for i, v in enumerate(self.verified) for b, ok in enumerate(v) if ok)

    def missing(self) -> Iterator[tuple[int, int, int]]:
        """``(file index, first block, block count)`` of each run of blocks not yet held."""
        for i, v in enumerate(self.verified):
            b = 0
            while b < len(v):
                if v[b]:
                    b += 1
                    continue
                start = b
                while b < len(v) and not v[b]:
                    b += 1
                yield i, start, b - start

    def resume_report(self) -> dict:
        """What the controller needs to resume: per file, byte ranges still missing and the first one."""
        bs = self.manifest.block_size
        missing: dict[str, list[list[int]]] = {}
        for i, start, count in self.missing():
            f = self.manifest.files[i]
            missing.setdefault(f.name, []).append([start * bs, min((start + count) * bs, f.size)])
        resume = {f.name: (missing[f.name][0][0] if f.name in missing else f.size) for f in self.manifest.files}
        return {
            "complete": not missing,
            "have": self.have_bytes(),
            "total": self.manifest.total_bytes,
            "resume": resume,
            "missing": missing,
        }

    def is_complete(self) -> bool:
        return all(all(v) for v in self.verified)

    # -- receiving -----------------------------------------------------------------------

    def write_block(self, file_index: int, block: int, data: memoryview, *, aligned: bool = False) -> None:
        """Store one block whose session tag has been checked (``data`` is exactly the block).

        With ``aligned`` (``data`` starts on a page boundary, e.g. in an ``mmap`` buffer),
        whole-page blocks are written with ``O_DIRECT``: straight to the disk from the
        caller's reused buffer, not through new page-cache pages (a fresh page-cache
        write runs at a fraction of the speed in a VM whose free memory went back to
        the host, and a model larger than the guest's memory would only churn the cache).
        """
        if self.already_complete:
            return
        assert self._local is not None
        f = self.manifest.files[file_index]
        if block == 0 and bytes(data[: len(f.header)]) != f.header:
            raise WireError(f"{f.name}: block 0 does not start with the header in the manifest", code="header-mismatch")
        off = block * self.manifest.block_size
        direct = self._direct[file_index] if aligned and len(data) % DIRECT_ALIGN == 0 else None
        if direct is not None:
            try:
                self._pwrite_all(direct, data, off)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._direct[file_index] = None  # alignment refused after all: buffered from now on
                os.close(direct)
                direct = None
        if direct is None:
            self._pwrite_all(self._data[file_index], data, off)
            self._unflushed[file_index] += len(data)
        os.pwrite(self._tags[file_index], self._local.tag(file_index, block, data), block * MAC_SIZE)
        self.verified[file_index][block] = 1
        if self._unflushed[file_index] >= FLUSH_BYTES:
            self._unflushed[file_index] = 0
            if self._flusher is None:
                self._flusher = threading.Thread(target=self._flush_loop, name="writeback", daemon=True)
                self._flusher.start()
            self._flush_queue.put(file_index)

    @staticmethod
    def _pwrite_all(fd: int, data: memoryview, off: int) -> None:
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], off + done)

    def _flush_loop(self) -> None:
        while (i := self._flush_queue.get()) is not None:
            with contextlib.suppress(OSError, IndexError):  # only a head start; commit fsyncs for real
                os.fdatasync(self._data[i])

    def _stop_flusher(self) -> None:
        if self._flusher is not None:
            self._flush_queue.put(None)
            self._flusher.join()
            self._flusher = None

    def commit(self) -> Path:
        """Make the upload durable and move it into place, all at once; returns its folder."""
        if self.already_complete:
            return self.final
        if not self.is_complete():
            left = sum(len(v) - sum(v) for v in self.verified)
            raise StagingError(f"{self.root}: {left} blocks still missing; nothing moved into place", code="incomplete")
        self._stop_flusher()
        for i, f in enumerate(self.manifest.files):
            os.ftruncate(self._data[i], f.size)
            os.fsync(self._data[i])
        data = self.root / "data"
        _fsync_dir(data / "files")
        _fsync_dir(data)
        self._close_files()
        try:
            os.rename(data, self.final)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            raise StagingError(
                f"{self.final}: exists but was not there when this upload started", code="inconsistent"
            ) from None
        _fsync_dir(self.dest)
        shutil.rmtree(self.root, ignore_errors=True)
        self.already_complete = True
        return self.final

    def _close_files(self) -> None:
        self._stop_flusher()
        for fd in self._data + self._tags + [d for d in self._direct if d is not None]:
            os.close(fd)
        self._data, self._tags, self._direct = [], [], []

    def close(self) -> None:
        """Release the lock, keeping whatever partial state is on disk for the next receiver."""
        self._close_files()
        if self._lock_fd is not None:
            if self.already_complete:
                (self.dest / PARTIAL / f"{self.upload_id}.lock").unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None


# -- installing a received model -------------------------------------------------------


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def install_model(
    upload_dir: Path, model_dir: Path, key: bytes, *, replace: bool = False, progress: Progress | None = None
) -> list[FileEntry]:
    """Decrypt a complete upload into ``model_dir`` with the released model key, all or nothing.

    The model is decrypted and authenticated (:func:`tdxvm.guest.weights.decrypt_model`)
    into a hidden sibling, fsynced, and renamed to ``model_dir``: after a crash or a
    refused chunk at any point, ``model_dir`` is either absent (or the previous model,
    with ``replace``) or the whole new model, never part of one. Hidden leftovers of an
    earlier interrupted install are removed first. Without ``replace``, an existing
    ``model_dir`` is an error; with it, the old folder is swapped out only after the new
    one is complete (a reader may find no folder for that instant, never a partial one).
    """
    upload_dir, model_dir = Path(upload_dir), Path(model_dir)
    if not upload_dir.is_dir():
        raise StagingError(f"{upload_dir}: not a complete upload folder", code="incomplete")
    if model_dir.exists() and not replace:
        raise StagingError(
            f"{model_dir}: a model is already installed there (install with replace to swap it)", code="exists"
        )
    parent = model_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{model_dir.name}.installing-"
    for stale in parent.iterdir():  # our hidden folders, and decrypt_model's own (".<ours>.partial-*")
        if (
            stale.name.startswith(prefix)
            or stale.name.startswith(f".{prefix}")
            or stale.name.startswith(f".{model_dir.name}.old-")
        ):
            shutil.rmtree(stale, ignore_errors=True)
    staging = parent / f"{prefix}{secrets.token_hex(4)}"
    try:
        entries = decrypt_model(upload_dir, staging, key, progress=progress)
        _fsync_tree(staging)
        if model_dir.exists():
            old = parent / f".{model_dir.name}.old-{secrets.token_hex(4)}"
            os.rename(model_dir, old)
            os.rename(staging, model_dir)
            _fsync_dir(parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, model_dir)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return entries
