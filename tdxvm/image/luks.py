"""LUKS2 disk images made offline on a file: no device-mapper, no loop devices, no mounts.

One file: the LUKS2 header ``cryptsetup luksFormat`` writes (binary headers, JSON areas,
keyslots area: the first 16 MiB), then the payload (an ext4 image and its verity tree) in
aes-xts-plain64, as the guest's dm-crypt reads it. The build writes the payload at its
place in that file itself and encrypts it there (:func:`encrypt_in_place`); no copy.
The volume key reaches cryptsetup through a pipe, the passphrase through its stdin:
neither is ever written to a file.

Reproducible: the payload, a function of the ext4 image and the volume key. Not: the
header, whose binary-header, keyslot and digest salts, AF stripes and keyslots-area fill
cryptsetup draws from its RNG with no option to pin them (UUID, layout and parameters are).

[LUKS2] LUKS2 On-Disk Format Specification 1.1 (cryptsetup, on-disk-format-luks2.pdf):
"Binary header"; JSON "keyslots", "segments", "digests". [LUKS1] LUKS1 On-Disk Format
Specification 1.2.3, "AF-Splitter" (af type "luks1"). [XTS] IEEE 1619-2007, 5.3; dm-crypt
plain64 IV: the 512-byte sector number, 64-bit little-endian, zero-padded to 16 bytes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tdxvm.errors import TdxvmError
from tdxvm.image.ext4 import run_step, tool
from tdxvm.image.sparse import copy_data
from tdxvm.image.xts import SECTOR, XtsPlain64

DATA_OFFSET = 16 << 20  # payload offset (cryptsetup's LUKS2 default, pinned with --offset)
PBKDF2_ITERATIONS = 1000  # the keyslot is not the protection: the key is released after attestation
MAGIC = b"LUKS\xba\xbe"
# [LUKS2] "Binary header": magic, version, hdr_size, seqid, label, checksum_alg, salt,
# uuid, subsystem, hdr_offset, padding, csum (big-endian); 4096 bytes with padding.
_BINARY_HEADER = struct.Struct(">6sHQQ48s32s64s40s48sQ184s64s")
_CSUM_AT = _BINARY_HEADER.size - 64
_BINARY_SIZE = 4096
_b64 = base64.b64decode


class LuksError(TdxvmError):
    """A LUKS2 header that cannot be read, or a key or passphrase that does not open it."""

    code = "luks"


@dataclass(frozen=True)
class LuksHeader:
    """What a LUKS2 header says (the primary one, checksum verified)."""

    uuid: str
    header_size: int
    payload_offset: int
    sector_size: int
    cipher: str
    metadata: dict[str, Any]


def parse_header(data: bytes) -> LuksHeader:
    """Parse and check a primary LUKS2 header ([LUKS2] "Binary header", JSON area)."""
    if len(data) < _BINARY_SIZE:
        raise LuksError("too short for a LUKS2 header")
    magic, version, size, _seq, _label, alg, _salt, uuid, _sub, offset, _pad, csum = _BINARY_HEADER.unpack_from(data)
    if magic != MAGIC or version != 2:
        raise LuksError("not a LUKS2 header (magic or version)")
    if offset != 0 or size < 2 * _BINARY_SIZE or size > len(data):
        raise LuksError(f"LUKS2 header size {size} or offset {offset} is not a primary header here")
    algorithm = alg.rstrip(b"\0").decode()
    if algorithm not in ("sha256", "sha512"):
        raise LuksError(f"unsupported LUKS2 header checksum {algorithm!r}")
    digest = hashlib.new(algorithm, data[:_CSUM_AT] + bytes(64) + data[_CSUM_AT + 64 : size]).digest()
    if not hmac.compare_digest(digest, csum[: len(digest)]):
        raise LuksError("LUKS2 header checksum mismatch")
    metadata = json.loads(data[_BINARY_SIZE:size].split(b"\0", 1)[0])
    segment = metadata["segments"]["0"]
    return LuksHeader(
        uuid=uuid.rstrip(b"\0").decode(),
        header_size=size,
        payload_offset=int(segment["offset"]),
        sector_size=int(segment["sector_size"]),
        cipher=segment["encryption"],
        metadata=metadata,
    )


def read_header(image: Path) -> LuksHeader:
    with open(image, "rb") as f:
        start = f.read(_BINARY_SIZE)
        if len(start) < _BINARY_SIZE or start[:6] != MAGIC:
            raise LuksError(f"{image}: not a LUKS2 image")
        return parse_header(start + f.read(_BINARY_HEADER.unpack_from(start)[2] - _BINARY_SIZE))


def volume_key_matches(header: LuksHeader, volume_key: bytes) -> bool:
    """Whether ``volume_key`` matches the header's digest for segment 0 ([LUKS2] "digests")."""
    for digest in header.metadata["digests"].values():
        if digest["type"] == "pbkdf2" and "0" in digest["segments"]:
            expected = _b64(digest["digest"])
            derived = hashlib.pbkdf2_hmac(
                digest["hash"], volume_key, _b64(digest["salt"]), int(digest["iterations"]), len(expected)
            )
            return hmac.compare_digest(derived, expected)
    raise LuksError("the LUKS2 header has no pbkdf2 digest for segment 0")


def af_merge(material: bytes, key_size: int, stripes: int, hash_name: str) -> bytes:
    """[LUKS1] AF-Splitter, merge: d = diffuse(d ^ s_i) over the first stripes-1, key = d ^ s_last."""
    size, d = hashlib.new(hash_name).digest_size, bytes(key_size)
    stripe = [material[i * key_size : (i + 1) * key_size] for i in range(stripes)]
    for s in stripe[:-1]:
        d = bytes(x ^ y for x, y in zip(d, s, strict=True))
        pieces = (d[k : k + size] for k in range(0, key_size, size))
        d = b"".join(hashlib.new(hash_name, n.to_bytes(4, "big") + p).digest()[: len(p)] for n, p in enumerate(pieces))
    return bytes(x ^ y for x, y in zip(d, stripe[-1], strict=True))


def open_keyslot(image: Path, passphrase: bytes) -> bytes:
    """The volume key, unlocked from a keyslot with ``passphrase``, in user space.

    [LUKS2] "keyslots" (type luks2): PBKDF2 of the passphrase gives the area key; the
    area, decrypted with aes-xts-plain64 from IV sector 0, is the AF-split volume key.
    """
    header = read_header(image)
    with open(image, "rb") as f:
        for slot in header.metadata["keyslots"].values():
            area, kdf, af = slot["area"], slot["kdf"], slot["af"]
            if (slot["type"], kdf["type"], af["type"], area["encryption"]) != (
                "luks2",
                "pbkdf2",
                "luks1",
                "aes-xts-plain64",
            ):
                continue
            key_size, stripes = int(slot["key_size"]), int(af["stripes"])
            area_key = hashlib.pbkdf2_hmac(
                kdf["hash"], passphrase, _b64(kdf["salt"]), int(kdf["iterations"]), int(area["key_size"])
            )
            length = -(-key_size * stripes // SECTOR) * SECTOR
            f.seek(int(area["offset"]))
            material = bytes(XtsPlain64(area_key).decrypt(f.read(length)))
            candidate = af_merge(material, key_size, stripes, af["hash"])
            if volume_key_matches(header, candidate):
                return candidate
    raise LuksError(f"{image}: no keyslot opens with this passphrase")


def _python_encrypt(image: Path, *, volume_key: bytes) -> None:
    """Encrypt the payload of ``image`` (from DATA_OFFSET to its end) in place with
    :class:`XtsPlain64`, 4 MiB at a time."""
    xts, step = XtsPlain64(volume_key), 4 << 20
    with open(image, "r+b") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size - DATA_OFFSET
        for at in range(0, size, step):
            chunk = os.pread(fd, min(step, size - at), DATA_OFFSET + at)
            if len(chunk) != min(step, size - at):
                raise LuksError(f"{image} changed while it was being encrypted")
            ciphertext, written = xts.encrypt(chunk, at // SECTOR), 0
            while written < len(ciphertext):
                written += os.pwrite(fd, memoryview(ciphertext)[written:], DATA_OFFSET + at + written)


def _cryptsetup(
    step: str, action: list[str], *, target: Path, volume_key: bytes, passphrase: bytes, fds: tuple[int, ...] = ()
) -> None:
    """Run cryptsetup with the pinned LUKS2 parameters; the volume key goes through a pipe,
    the passphrase through stdin."""
    cryptsetup = tool("cryptsetup", step=step, package="cryptsetup-bin")
    read_end, write_end = os.pipe()
    try:
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(volume_key)  # 64 bytes: fits the pipe's buffer before cryptsetup reads
        options = [
            "--type",
            "luks2",
            "--cipher",
            "aes-xts-plain64",
            "--key-size",
            str(8 * len(volume_key)),
            "--sector-size",
            str(SECTOR),
            "--offset",
            str(DATA_OFFSET // SECTOR),
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            str(PBKDF2_ITERATIONS),
            "--hash",
            "sha256",
        ]
        keys = [
            "--volume-key-file",
            f"/dev/fd/{read_end}",
            "--key-file",
            "-",
            "--batch-mode",
            "--disable-locks",
            str(target),
        ]
        run_step(step, [cryptsetup, *action, *options, *keys], input=passphrase, pass_fds=[read_end, *fds])
    finally:
        os.close(read_end)


def _cryptsetup_encrypt(image: Path, *, volume_key: bytes) -> None:
    """The payload of ``image`` (from DATA_OFFSET to its end) encrypted in place by
    cryptsetup's offline reencryption (C; the same bytes as :class:`XtsPlain64`). Its
    detached header is a throwaway in memory (memfd) with a random passphrase; the real
    one comes after."""
    header = os.memfd_create("tdxvm-throwaway-luks-header")
    try:
        os.ftruncate(header, DATA_OFFSET)
        action = ["reencrypt", "--encrypt", "--force-offline-reencrypt", "--header", f"/dev/fd/{header}"]
        _cryptsetup(
            "cryptsetup reencrypt",
            action,
            target=image,
            volume_key=volume_key,
            passphrase=os.urandom(32),
            fds=(header,),
        )
    finally:
        os.close(header)


def _check_engine(engine: str) -> None:
    if engine not in ("python", "cryptsetup"):
        raise ValueError(f"unknown encryption engine {engine!r} (python or cryptsetup)")


def encrypt_in_place(
    image: Path, *, volume_key: bytes, passphrase: bytes, uuid: str, engine: str = "cryptsetup"
) -> LuksHeader:
    """Make ``image``, whose payload (an ext4 image and its hash tree) already lies at
    DATA_OFFSET up to its end, a LUKS2 image: the payload encrypted with ``volume_key``
    where it is, the header written over the first DATA_OFFSET bytes (never read).

    Nothing is copied: the build writes the filesystem at DATA_OFFSET of the disk file
    (:func:`tdxvm.image.ext4.make_ext4`'s ``offset``). The holes of a sparse payload do
    not stay holes: every sector is encrypted, zeros included, as the guest's dm-crypt
    reads the disk (a hole would decrypt to garbage, and the host would learn which
    blocks the filesystem uses). ``engine`` "cryptsetup" (its offline reencryption, in
    C: the default) or "python" (:class:`~tdxvm.image.xts.XtsPlain64`) give the same
    bytes. Should a step fail, ``image`` is left half-encrypted: the caller removes it.
    """
    _check_engine(engine)
    image = Path(image)
    size = image.stat().st_size - DATA_OFFSET
    if size <= 0 or size % SECTOR:
        raise LuksError(f"{image}: payload size {size} is not a positive multiple of {SECTOR}")
    XtsPlain64(volume_key)  # refuse a malformed key before running anything
    if engine == "cryptsetup":  # first: luksFormat then writes only the first DATA_OFFSET bytes
        _cryptsetup_encrypt(image, volume_key=volume_key)
    _cryptsetup(
        "cryptsetup luksFormat",
        ["luksFormat", "--uuid", uuid],
        target=image,
        volume_key=volume_key,
        passphrase=passphrase,
    )
    header = read_header(image)
    if (header.payload_offset, header.sector_size, header.cipher) != (DATA_OFFSET, SECTOR, "aes-xts-plain64"):
        raise LuksError(
            f"cryptsetup wrote an unexpected segment: offset {header.payload_offset}, "
            f"sector {header.sector_size}, {header.cipher}"
        )
    if engine == "python":
        _python_encrypt(image, volume_key=volume_key)
    with open(image, "rb") as f:
        os.fsync(f.fileno())
    return header


def encrypt_image(
    *, payload: Path, output: Path, volume_key: bytes, passphrase: bytes, uuid: str, engine: str = "cryptsetup"
) -> LuksHeader:
    """Write ``output``: a LUKS2 header, then ``payload`` encrypted with ``volume_key``.

    ``payload`` is copied to DATA_OFFSET of a new file (its holes stay holes, not
    written), then encrypted there (:func:`encrypt_in_place`). The image build has no
    such copy: it writes its payload in place. Nothing is left at ``output`` if a step
    fails.
    """
    _check_engine(engine)
    size = Path(payload).stat().st_size
    if size == 0 or size % SECTOR:
        raise LuksError(f"{payload}: payload size {size} is not a positive multiple of {SECTOR}")
    XtsPlain64(volume_key)  # refuse a malformed key before running anything
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".partial")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "r+b") as dst, open(payload, "rb") as src:
            dst.truncate(DATA_OFFSET + size)
            copy_data(src.fileno(), dst.fileno(), size=size, dst_offset=DATA_OFFSET)
        header = encrypt_in_place(tmp, volume_key=volume_key, passphrase=passphrase, uuid=uuid, engine=engine)
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return header


def decrypt_payload(image: Path, volume_key: bytes, *, chunk_bytes: int = 4 << 20) -> Iterator[bytes]:
    """The decrypted payload of a LUKS2 image, in chunks; a key that fails the header's digest raises."""
    header = read_header(image)
    if (header.sector_size, header.cipher) != (SECTOR, "aes-xts-plain64"):
        raise LuksError(
            f"{image}: segment 0 is {header.cipher} with {header.sector_size}-byte sectors, not aes-xts-plain64/512"
        )
    if not volume_key_matches(header, volume_key):
        raise LuksError(f"{image}: this volume key does not match the header's digest")
    xts, step = XtsPlain64(volume_key), chunk_bytes - chunk_bytes % SECTOR
    with open(image, "rb") as f:
        f.seek(header.payload_offset)
        sector = 0
        while chunk := f.read(step):
            yield bytes(xts.decrypt(chunk, sector))
            sector += len(chunk) // SECTOR
