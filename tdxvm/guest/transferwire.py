"""The upload of an encrypted model folder: its manifest and the bulk-stream wire format.

Both ends use this module: the controller (:mod:`tdxvm.provision.transfer`) and the
guest's receiver (:mod:`tdxvm.guest.receiver`). It depends on the standard library,
``cryptography`` and :mod:`tdxvm.guest.weights` only, so it ships into the guest.

**Manifest.** An encrypted folder (``tdxvm weights encrypt``) is ``index.tdxw`` and
``files/<file id>.tdxw``. The manifest lists each file's name, size and 96-byte
``.tdxw`` header, and the transfer block size, as canonical JSON; its SHA-256 is the
*upload id*. The headers hold a random file id per file (fresh for every encryption), so
the id names one encryption of one model and nothing else: a guest that holds part of
an upload under that id holds part of exactly these files. Reading the manifest costs
96 bytes per file, not a pass over the weights.

**Control channel.** The controller starts the receiver through SSH (the guest's host
key is the one its quote attested) and writes two lines to its stdin: the manifest and
``{"mac_key": "<64 hex>"}``, a random key for this session only. The receiver's replies
(its port and what it already holds; the commit result) come back on its stdout.

**Bulk streams** (plain TCP, or SSH ``direct-tcpip`` channels), each::

    hello    MAGIC (8) ‖ token (16, from the receiver's ready line)
    segment  u32 file index ‖ u32 block count ‖ u64 first block      (little endian)
             then per block: tag (16) ‖ block bytes
    end      u32 0xFFFFFFFF ‖ u32 0 ‖ u64 0
    reply    one JSON line from the receiver: {"ok": true, ...} or {"ok": false, "code", "error"}

A file is cut into blocks of the manifest's block size (the last one shorter). A
block's tag is GMAC (AES-256-GCM with no plaintext, the block as associated data) under
the session key, with nonce ``u32 BE file index ‖ u64 BE block index``: the host, which
sees and can alter this stream but not the SSH channel, cannot change, move or
substitute a block without the receiver refusing it before it is written. Each
(file, block) nonce is used at most once per key, and only ever over that block's bytes.
GMAC runs at memory speed (unlike SHA-256, which would cost a pass over the weights on
the controller before the first byte could leave). The weights' own AES-GCM tags still
authenticate every byte end to end when the guest decrypts; this layer makes sure the
guest only keeps, and resumes from, bytes that are what the controller sent.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from tdxvm.errors import TdxvmError
from tdxvm.guest.weights import FILES_DIR, HEADER_SIZE, INDEX_NAME, TAG_SIZE, Header, WeightsError

FORMAT = "tdxvm-upload-v1"
MAGIC = b"TDXVMU\x00\x01"
TOKEN_SIZE = 16
MAC_KEY_SIZE = 32
MAC_SIZE = 16
DEFAULT_BLOCK_SIZE = 4 << 20
MIN_BLOCK_SIZE = 64 << 10
MAX_BLOCK_SIZE = 64 << 20
MAX_FILES = 4096  # a Hugging Face model folder has tens to hundreds
MAX_LINE = 4 << 20  # the longest control line either side reads (a manifest of MAX_FILES files fits)
HELLO_SIZE = len(MAGIC) + TOKEN_SIZE
SEGMENT = struct.Struct("<IIQ")  # file index, block count, first block
END_OF_STREAM = 0xFFFFFFFF
_BLOB_NAME = re.compile(rf"{FILES_DIR}/([0-9a-f]{{32}})\.tdxw")


class WireError(TdxvmError):
    """A manifest or bulk stream that breaks this format; the message says which field and where."""

    code = "transfer-wire"


@dataclass(frozen=True, slots=True)
class ManifestFile:
    name: str  # relative path inside the encrypted folder (POSIX)
    size: int
    header: bytes  # the file's first HEADER_SIZE bytes

    def blocks(self, block_size: int) -> int:
        return -(-self.size // block_size)


@dataclass(frozen=True, slots=True)
class Manifest:
    block_size: int
    files: tuple[ManifestFile, ...]

    def to_bytes(self) -> bytes:
        doc = {
            "format": FORMAT,
            "block": self.block_size,
            "files": [{"name": f.name, "size": f.size, "header": f.header.hex()} for f in self.files],
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @property
    def upload_id(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def block_len(self, file_index: int, block: int) -> int:
        return min(self.block_size, self.files[file_index].size - block * self.block_size)

    @classmethod
    def from_bytes(cls, raw: bytes, *, expect: str | None = None) -> Manifest:
        """Parse and check a manifest; with ``expect``, its SHA-256 must be that upload id."""
        if expect is not None and not hmac.compare_digest(hashlib.sha256(raw).hexdigest(), expect.lower()):
            raise WireError(
                f"manifest SHA-256 {hashlib.sha256(raw).hexdigest()} is not the expected upload id {expect}",
                code="manifest-mismatch",
            )
        try:
            doc = json.loads(raw)
            if doc["format"] != FORMAT:
                raise WireError(f"manifest format {doc['format']!r}, expected {FORMAT!r}", code="manifest")
            files = tuple(
                ManifestFile(name=str(e["name"]), size=int(e["size"]), header=bytes.fromhex(e["header"]))
                for e in doc["files"]
            )
            manifest = cls(block_size=int(doc["block"]), files=files)
        except WireError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise WireError(f"malformed manifest: {exc!r}", code="manifest") from None
        manifest.check()
        if manifest.to_bytes() != raw:
            raise WireError("manifest is not in canonical form (sorted keys, no spaces)", code="manifest")
        return manifest

    def check(self) -> None:
        """Names, sizes and headers consistent with the encrypted-weights format."""
        if not (MIN_BLOCK_SIZE <= self.block_size <= MAX_BLOCK_SIZE and self.block_size % 4096 == 0):
            raise WireError(
                f"manifest field block: {self.block_size} is not a multiple of 4096 "
                f"in {MIN_BLOCK_SIZE}..{MAX_BLOCK_SIZE}",
                code="manifest",
            )
        if not 0 < len(self.files) <= MAX_FILES:
            raise WireError(
                f"manifest field files: {len(self.files)} entries (1..{MAX_FILES} allowed)", code="manifest"
            )
        names = [f.name for f in self.files]
        if len(set(names)) != len(names) or names.count(INDEX_NAME) != 1:
            raise WireError(f"manifest field files: duplicate names or not exactly one {INDEX_NAME}", code="manifest")
        for i, f in enumerate(self.files):
            check_file(f.name, f.size, f.header, where=f"manifest files[{i}]")


def check_file(name: str, size: int, header: bytes, *, where: str) -> None:
    """One ``.tdxw`` file: an allowed name, a header that parses, the size its header implies."""
    blob = _BLOB_NAME.fullmatch(name)
    if name != INDEX_NAME and blob is None:
        raise WireError(
            f"{where}: name {name!r} is neither {INDEX_NAME} nor {FILES_DIR}/<32 hex>.tdxw", code="manifest"
        )
    try:
        parsed = Header.unpack(header, f"{where} ({name})")
    except WeightsError as exc:
        raise WireError(str(exc), code="manifest") from None
    if blob is not None and parsed.file_id.hex() != blob.group(1):
        raise WireError(
            f"{where}: {name} holds file id {parsed.file_id.hex()}, not the one its name gives", code="manifest"
        )
    want = HEADER_SIZE + parsed.size + TAG_SIZE * parsed.chunks()
    if size != want:
        raise WireError(f"{where}: {name} is {size} bytes, its header says {want}", code="manifest")


def build_manifest(enc_dir: Path, *, block_size: int = DEFAULT_BLOCK_SIZE) -> Manifest:
    """The manifest of an encrypted folder: reads each file's header, not its contents."""
    enc_dir = Path(enc_dir)
    if not (enc_dir / INDEX_NAME).is_file():
        raise WireError(
            f"{enc_dir}: no {INDEX_NAME}; not an encrypted model folder (tdxvm weights encrypt)", code="bad-folder"
        )
    names = [INDEX_NAME]
    for p in sorted(enc_dir.rglob("*")):
        rel = p.relative_to(enc_dir).as_posix()
        if rel in (INDEX_NAME, FILES_DIR) and not p.is_symlink():
            continue
        if p.is_symlink() or not p.is_file() or not _BLOB_NAME.fullmatch(rel):
            raise WireError(f"{p}: unexpected entry in an encrypted model folder", code="bad-folder")
        names.append(rel)
    files = []
    for name in names:
        with (enc_dir / name).open("rb") as f:
            header, size = f.read(HEADER_SIZE), f.seek(0, 2)
        try:
            check_file(name, size, header, where=str(enc_dir))
        except WireError as exc:
            raise WireError(str(exc), code="bad-folder") from None
        files.append(ManifestFile(name=name, size=size, header=header))
    manifest = Manifest(block_size=block_size, files=tuple(files))
    manifest.check()
    return manifest


class BlockMac:
    """GMAC tags of (file index, block index, bytes) under one key; see the module doc.

    Built on ``Cipher(AES, GCM)`` rather than ``AESGCM``: the guest's Debian
    ``cryptography`` (38) takes only ``bytes`` in ``AESGCM``, and a copy of every block
    would cost more than the tag; the streaming API takes the block as a buffer.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) != MAC_KEY_SIZE:
            raise WireError(f"MAC key is {len(key)} bytes, expected {MAC_KEY_SIZE}", code="mac-key")
        self._aes = algorithms.AES(key)

    @staticmethod
    def _nonce(file_index: int, block: int) -> bytes:
        return struct.pack(">IQ", file_index, block)

    def tag(self, file_index: int, block: int, data: bytes | memoryview) -> bytes:
        enc = Cipher(self._aes, modes.GCM(self._nonce(file_index, block))).encryptor()
        enc.authenticate_additional_data(data)
        enc.finalize()
        return enc.tag

    def verify(self, file_index: int, block: int, data: bytes | memoryview, tag: bytes | memoryview) -> bool:
        dec = Cipher(self._aes, modes.GCM(self._nonce(file_index, block), bytes(tag))).decryptor()
        dec.authenticate_additional_data(data)
        try:
            dec.finalize()
        except InvalidTag:
            return False
        return True


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) as a socket address."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise WireError(f"listen address {text!r} is not HOST:PORT", code="usage")
    return host.strip("[]") or "0.0.0.0", int(port)
