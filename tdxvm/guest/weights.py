"""Encrypted model weights: an authenticated, chunked AES-256-GCM format.

A model folder (config, tokenizer, safetensors shards) becomes an encrypted folder::

    ENC_DIR/index.tdxw            the list of files (path, size, SHA-256, file id), encrypted
    ENC_DIR/files/<file id>.tdxw  one encrypted file per model file (names reveal nothing)

Every ``.tdxw`` file is a 96-byte header followed by chunks of ``chunk_size``
plaintext bytes, each sealed with AES-256-GCM (16-byte tag):

=======  =====  ==========================================================
offset   size   field
=======  =====  ==========================================================
0        8      magic ``b"TDXVMW\\x00\\x01"``
8        2      format version (2), u16 LE
10       2      flags (0), u16 LE
12       4      chunk size, u32 LE
16       16     file id (random)
32       8      plaintext size, u64 LE
40       32     digest tag: HMAC-SHA256(digest key, plaintext SHA-256)
72       24     reserved (zero)
=======  =====  ==========================================================

Bindings (why reordering, truncation, substitution and tampering are all detected):

* each file has its own key, HKDF-SHA256(model key, salt = file id, info = tag ‖ path),
  so a file's chunks only open under the path the authenticated index gives it;
* chunk *i*'s nonce is ``u64 BE i ‖ u32 BE last`` — a moved chunk, or a non-final chunk
  presented as the last one (truncation), fails its tag;
* every chunk's associated data is SHA-256 of the header, so the header (size, digest,
  id) cannot be edited; bytes after the final chunk are refused.

The header is read by anyone who holds the folder (the host, as the upload passes its
port forward), so it never carries the plaintext's SHA-256, which would let it confirm
a guess of a small file (a ``config.json`` names the architecture): its digest tag is
an HMAC of that SHA-256 under a key derived like the file key (info ``tdxvm weights
digest v2``), which only the model key's holder can check. The SHA-256 itself is in
the index, which is encrypted. A format 1 folder (the plain SHA-256 in its headers) is
refused with the fix: encrypt the model again. Decryption relies on the tags, which already authenticate every byte, and
so runs at AES-GCM speed. The index also records the *model digest*
(:mod:`tdxvm.guest.modeldigest`, over every file's path, size and SHA-256), which
``tdxvm weights encrypt`` prints and the controller expects the served model's RTMR3
event to name; :func:`model_digest` gives it from an index's entries. Memory use is
one chunk, whatever the file size. A model is decrypted into a hidden folder that is renamed into place only once every
file is complete and authenticated: a reader never sees a partial model.

This module depends on the standard library and ``cryptography`` only: the guest runs
the same code to decrypt.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import io
import json
import os
import secrets
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tdxvm.errors import TdxvmError
from tdxvm.fileio import write_atomic_with
from tdxvm.guest.modeldigest import digest_of_entries, parse_digest, show

MAGIC = b"TDXVMW\x00\x01"
VERSION = 2
HEADER_SIZE = 96
TAG_SIZE = 16
KEY_SIZE = 32
DEFAULT_CHUNK_SIZE = 1 << 20
MAX_CHUNK_SIZE = 64 << 20
INDEX_NAME = "index.tdxw"
FILES_DIR = "files"
_HEADER = struct.Struct("<8sHHI16sQ32s24s")
_KDF_INFO = b"tdxvm weights v1\x00"
_DIGEST_INFO = b"tdxvm weights digest v2\x00"
_INDEX_PATH = ""  # the index's own key-derivation path; no model file may have it

Progress = Callable[[int], None]  # called with the number of plaintext bytes just done


class WeightsError(TdxvmError):
    """Encrypted weights are malformed, tampered with, or opened with the wrong key.

    The message names the file and, where it applies, the chunk and byte offset.
    """

    code = "weights"


@dataclass(frozen=True, slots=True)
class FileEntry:
    path: str
    file_id: bytes
    size: int
    sha256: bytes

    @property
    def blob(self) -> str:
        return f"{FILES_DIR}/{self.file_id.hex()}.tdxw"


@dataclass(frozen=True, slots=True)
class Header:
    chunk_size: int
    file_id: bytes
    size: int
    digest_tag: bytes  # digest_tag() of the plaintext's SHA-256

    def pack(self) -> bytes:
        return _HEADER.pack(MAGIC, VERSION, 0, self.chunk_size, self.file_id, self.size, self.digest_tag, bytes(24))

    @classmethod
    def unpack(cls, raw: bytes, where: str) -> Header:
        if len(raw) != HEADER_SIZE:
            raise WeightsError(f"{where}: header is {len(raw)} bytes, expected {HEADER_SIZE}")
        magic, version, flags, chunk, file_id, size, digest, reserved = _HEADER.unpack(raw)
        if magic != MAGIC:
            raise WeightsError(f"{where}: not a tdxvm encrypted-weights file (bad magic at byte 0)")
        if version == 1:
            raise WeightsError(
                f"{where}: encrypted-weights format 1, from an earlier tdxvm (its headers show each file's "
                "SHA-256 to whoever holds the folder); encrypt the model again: tdxvm weights encrypt"
            )
        if version != VERSION or flags != 0 or reserved != bytes(24):
            raise WeightsError(f"{where}: unsupported format version {version} / flags {flags} (byte 8)")
        if not 0 < chunk <= MAX_CHUNK_SIZE:
            raise WeightsError(f"{where}: chunk size {chunk} out of range (byte 12)")
        return cls(chunk_size=chunk, file_id=file_id, size=size, digest_tag=digest)

    def chunks(self) -> int:
        return max(1, -(-self.size // self.chunk_size))


def file_key(model_key: bytes, file_id: bytes, path: str) -> AESGCM:
    if len(model_key) != KEY_SIZE:
        raise WeightsError(f"the model key must be {KEY_SIZE} bytes")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=file_id, info=_KDF_INFO + path.encode("utf-8"))
    return AESGCM(hkdf.derive(model_key))


def digest_tag(model_key: bytes, file_id: bytes, path: str, sha256: bytes) -> bytes:
    """What a header carries for the plaintext's ``sha256``: an HMAC only the model key's holder can check."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=file_id, info=_DIGEST_INFO + path.encode("utf-8"))
    return hmac.new(hkdf.derive(model_key), sha256, hashlib.sha256).digest()


def _nonce(index: int, last: bool) -> bytes:
    return struct.pack(">QI", index, 1 if last else 0)


def generate_model_key() -> bytes:
    return secrets.token_bytes(KEY_SIZE)


# -- one file ----------------------------------------------------------------------------


def _sha256_of(path: Path, chunk_size: int) -> tuple[int, bytes]:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while block := f.read(chunk_size):
            h.update(block)
            size += len(block)
    return size, h.digest()


def encrypt_stream(
    src: BinaryIO,
    dst: BinaryIO,
    *,
    key: bytes,
    path: str,
    size: int,
    sha256: bytes,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    file_id: bytes | None = None,
    progress: Progress | None = None,
) -> Header:
    """Encrypt ``size`` bytes of ``src`` (whose SHA-256 is ``sha256``) into ``dst``."""
    fid = file_id or secrets.token_bytes(16)
    header = Header(chunk_size=chunk_size, file_id=fid, size=size, digest_tag=digest_tag(key, fid, path, sha256))
    raw = header.pack()
    aad = hashlib.sha256(raw).digest()
    aead = file_key(key, header.file_id, path)
    dst.write(raw)
    n = header.chunks()
    for i in range(n):
        block = src.read(chunk_size)
        want = min(chunk_size, size - i * chunk_size)
        if len(block) != want:
            raise WeightsError(
                f"{path}: changed while being encrypted (chunk {i} is {len(block)} bytes, expected {want})"
            )
        dst.write(aead.encrypt(_nonce(i, i == n - 1), block, aad))
        if progress:
            progress(len(block))
    if src.read(1):
        raise WeightsError(f"{path}: grew while being encrypted")
    return header


def decrypt_chunks(src: BinaryIO, *, key: bytes, path: str, where: str) -> tuple[Header, Iterator[bytes]]:
    """Read a header from ``src`` and return it with an iterator of authenticated chunks.

    The iterator raises :class:`WeightsError` on the first chunk that fails, and at the
    end if the file is cut short or has trailing bytes.
    """
    header = Header.unpack(src.read(HEADER_SIZE), where)
    aad = hashlib.sha256(header.pack()).digest()
    aead = file_key(key, header.file_id, path)

    def chunks() -> Iterator[bytes]:
        n = header.chunks()
        for i in range(n):
            want = min(header.chunk_size, header.size - i * header.chunk_size) + TAG_SIZE
            sealed = src.read(want)
            offset = HEADER_SIZE + i * (header.chunk_size + TAG_SIZE)
            if len(sealed) != want:
                raise WeightsError(f"{where}: truncated in chunk {i} at byte {offset + len(sealed)}")
            try:
                yield aead.decrypt(_nonce(i, i == n - 1), sealed, aad)
            except InvalidTag:
                raise WeightsError(
                    f"{where}: chunk {i} (byte {offset}) fails authentication: "
                    "tampered, reordered, truncated, or the wrong key",
                    code="weights-authentication",
                ) from None
        if src.read(1):
            raise WeightsError(f"{where}: unexpected bytes after the last chunk")

    return header, chunks()


# -- a model folder ----------------------------------------------------------------------


def _model_files(model_dir: Path) -> list[str]:
    files = []
    for p in sorted(model_dir.rglob("*")):
        if p.is_symlink():
            raise WeightsError(f"{p}: symbolic links are not encrypted; copy the file in instead")
        if p.is_file():
            files.append(p.relative_to(model_dir).as_posix())
    if not files:
        raise WeightsError(f"{model_dir}: no files to encrypt")
    return files


def _safe_relative(path: str, where: str) -> PurePosixPath:
    p = PurePosixPath(path)
    if not path or p.is_absolute() or ".." in p.parts or path != p.as_posix():
        raise WeightsError(f"{where}: unsafe path {path!r} in the index")
    return p


def encrypt_model(
    model_dir: Path,
    enc_dir: Path,
    key: bytes,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: Progress | None = None,
) -> list[FileEntry]:
    """Encrypt every file under ``model_dir`` into ``enc_dir`` (which must be new or empty)."""
    model_dir, enc_dir = Path(model_dir), Path(enc_dir)
    if not model_dir.is_dir():
        raise WeightsError(f"{model_dir}: not a folder")
    if enc_dir.exists() and any(enc_dir.iterdir()):
        raise WeightsError(f"{enc_dir}: exists and is not empty")
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise WeightsError(f"chunk size {chunk_size} out of range (1..{MAX_CHUNK_SIZE})")
    (enc_dir / FILES_DIR).mkdir(parents=True, exist_ok=True)
    entries = []
    for rel in _model_files(model_dir):
        src = model_dir / rel
        size, digest = _sha256_of(src, chunk_size)
        entry = FileEntry(path=rel, file_id=secrets.token_bytes(16), size=size, sha256=digest)
        with src.open("rb") as f:
            write_atomic_with(
                enc_dir / entry.blob,
                functools.partial(
                    encrypt_stream,
                    f,
                    key=key,
                    path=rel,
                    size=size,
                    sha256=digest,
                    chunk_size=chunk_size,
                    file_id=entry.file_id,
                    progress=progress,
                ),
                mode=0o644,
            )
        entries.append(entry)
    index = json.dumps(
        {
            "format": VERSION,
            "files": [
                {"path": e.path, "file_id": e.file_id.hex(), "size": e.size, "sha256": e.sha256.hex()} for e in entries
            ],
            "model_digest": show(model_digest(entries)),
        },
        sort_keys=True,
    ).encode()
    index_digest = hashlib.sha256(index).digest()
    write_atomic_with(
        enc_dir / INDEX_NAME,
        functools.partial(
            encrypt_stream,
            io.BytesIO(index),
            key=key,
            path=_INDEX_PATH,
            size=len(index),
            sha256=index_digest,
            chunk_size=chunk_size,
        ),
        mode=0o644,
    )
    return entries


def model_digest(entries: list[FileEntry]) -> bytes:
    """The model digest of these files (:func:`tdxvm.guest.modeldigest.digest_of_entries`)."""
    return digest_of_entries((e.path, e.size, e.sha256) for e in entries)


def read_index(enc_dir: Path, key: bytes) -> list[FileEntry]:
    """Decrypt and check the index: the authenticated list of the model's files (and, where
    the index records one, that its model digest is the one of these files)."""
    where = str(Path(enc_dir) / INDEX_NAME)
    try:
        with (Path(enc_dir) / INDEX_NAME).open("rb") as f:
            _, chunks = decrypt_chunks(f, key=key, path=_INDEX_PATH, where=where)
            text = b"".join(chunks)
    except FileNotFoundError:
        raise WeightsError(f"{where}: missing (not an encrypted model folder?)") from None
    try:
        doc = json.loads(text)
        entries = [
            FileEntry(
                path=e["path"],
                file_id=bytes.fromhex(e["file_id"]),
                size=int(e["size"]),
                sha256=bytes.fromhex(e["sha256"]),
            )
            for e in doc["files"]
        ]
        recorded = parse_digest(doc["model_digest"]) if "model_digest" in doc else None
    except (ValueError, KeyError, TypeError) as exc:
        raise WeightsError(f"{where}: authenticated but malformed index: {exc}") from None
    seen = set()
    for e in entries:
        _safe_relative(e.path, where)
        if e.path in seen or len(e.file_id) != 16 or len(e.sha256) != 32:
            raise WeightsError(f"{where}: bad or duplicate entry for {e.path!r}")
        seen.add(e.path)
    if recorded is not None and recorded != model_digest(entries):
        raise WeightsError(
            f"{where}: records model digest {show(recorded)}, but its files give {show(model_digest(entries))}"
        )
    return entries


def decrypt_model(enc_dir: Path, out_dir: Path, key: bytes, *, progress: Progress | None = None) -> list[FileEntry]:
    """Decrypt ``enc_dir`` into the new folder ``out_dir``, all or nothing.

    Files are decrypted into a hidden sibling folder that is renamed to ``out_dir`` only
    once every file is complete and authenticated; on any failure it is removed, so a
    reader (the inference service) never finds a partial or unauthenticated model.
    """
    enc_dir, out_dir = Path(enc_dir), Path(out_dir)
    if out_dir.exists():
        raise WeightsError(f"{out_dir}: already exists; decrypt into a new folder")
    entries = read_index(enc_dir, key)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.partial-{secrets.token_hex(4)}")
    staging.mkdir(mode=0o700)
    try:
        for e in entries:
            _decrypt_entry(enc_dir, e, staging, key, progress)
        os.rename(staging, out_dir)  # the plaintext stays its owner's: 0700 folders, 0600 files
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return entries


def _decrypt_entry(enc_dir: Path, e: FileEntry, staging: Path, key: bytes, progress: Progress | None) -> None:
    target = staging / _safe_relative(e.path, str(enc_dir / INDEX_NAME))
    for folder in reversed(target.relative_to(staging).parents[:-1]):
        (staging / folder).mkdir(mode=0o700, exist_ok=True)
    where = str(enc_dir / e.blob)
    try:
        src = (enc_dir / e.blob).open("rb")
    except FileNotFoundError:
        raise WeightsError(f"{where}: missing (listed in the index as {e.path})") from None
    with src, open(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), "wb") as out:
        header, chunks = decrypt_chunks(src, key=key, path=e.path, where=where)
        tag = digest_tag(key, header.file_id, e.path, e.sha256)
        if (header.file_id, header.size) != (e.file_id, e.size) or not hmac.compare_digest(header.digest_tag, tag):
            raise WeightsError(f"{where}: header does not match the index entry for {e.path}")
        for block in chunks:
            out.write(block)
            if progress:
                progress(len(block))
