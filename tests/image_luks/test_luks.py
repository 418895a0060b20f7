"""LUKS2 images made offline: bulk XTS against a per-sector reference, the header, the
keyslot opened in user space, cryptsetup's own encryption, in place as the build does it,
and no key in any file."""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from tdxvm.image.ext4 import ImageStepError, make_ext4
from tdxvm.image.luks import (
    DATA_OFFSET,
    LuksError,
    af_merge,
    decrypt_payload,
    encrypt_image,
    encrypt_in_place,
    open_keyslot,
    parse_header,
    read_header,
)
from tdxvm.image.xts import XtsPlain64
from tests.image_luks import EPOCH, FS_UUID, LUKS_UUID, make_tree, require_tools, which

VOLUME_KEY = hashlib.sha512(b"tdxvm test volume key").digest()
PASSPHRASE = hashlib.sha256(b"tdxvm test passphrase").digest()
EXT4_SIZE = 16 << 20


def reference_xts(key: bytes, data: bytes, first: int, *, encrypt: bool) -> bytes:
    """One OpenSSL XTS call per 512-byte sector, tweak = plain64(sector): the obvious way."""
    out = bytearray()
    for i in range(len(data) // 512):
        cipher = Cipher(algorithms.AES(key), modes.XTS((first + i).to_bytes(16, "little")))
        ctx = cipher.encryptor() if encrypt else cipher.decryptor()
        out += ctx.update(data[512 * i : 512 * (i + 1)]) + ctx.finalize()
    return bytes(out)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """An ext4 image and its LUKS2 image, built in a folder whose temp files are ours to scan."""
    require_tools("mkfs.ext4", "debugfs", "dumpe2fs", "cryptsetup")
    root = tmp_path_factory.mktemp("luks")
    scratch = root / "tmp"
    scratch.mkdir()
    saved, tempfile.tempdir = tempfile.tempdir, str(scratch)
    try:
        ext4 = root / "out" / "root.ext4"
        make_ext4(source=make_tree(root / "tree"), output=ext4, size_bytes=EXT4_SIZE, uuid=FS_UUID, epoch=EPOCH)
        image = root / "out" / "disk.img"
        header = encrypt_image(payload=ext4, output=image, volume_key=VOLUME_KEY, passphrase=PASSPHRASE, uuid=LUKS_UUID)
    finally:
        tempfile.tempdir = saved
    return {"root": root, "ext4": ext4, "image": image, "header": header}


@pytest.mark.parametrize(("sectors", "first"), [(1, 0), (3, 2**64 - 3), (511, 7), (512, 1 << 40), (1300, 123_456)])
def test_bulk_xts_matches_one_call_per_sector(sectors, first):
    key, data = os.urandom(64), os.urandom(512 * sectors)
    xts = XtsPlain64(key)
    ciphertext = xts.encrypt(data, first)
    assert ciphertext == reference_xts(key, data, first, encrypt=True)
    assert xts.decrypt(ciphertext, first) == data == reference_xts(key, ciphertext, first, encrypt=False)


def test_xts_refuses_bad_keys_and_partial_sectors():
    with pytest.raises(ValueError, match="64 key bytes"):
        XtsPlain64(bytes(32))
    with pytest.raises(ValueError, match="halves"):
        XtsPlain64(bytes(range(32)) * 2)
    with pytest.raises(ValueError, match="whole 512-byte sectors"):
        XtsPlain64(VOLUME_KEY).encrypt(bytes(1000))


def test_round_trip_to_the_ext4_bytes(built):
    ext4, image = built["ext4"], built["image"]
    assert image.stat().st_size == DATA_OFFSET + EXT4_SIZE
    assert b"".join(decrypt_payload(image, VOLUME_KEY)) == ext4.read_bytes()
    assert image.read_bytes()[DATA_OFFSET : DATA_OFFSET + 4096] != ext4.read_bytes()[:4096]


def test_header_is_what_was_asked(built):
    header = read_header(built["image"])
    assert header == built["header"]
    assert (header.uuid, header.payload_offset, header.sector_size, header.cipher) == (
        LUKS_UUID,
        DATA_OFFSET,
        512,
        "aes-xts-plain64",
    )
    (slot,) = header.metadata["keyslots"].values()
    assert slot["kdf"]["type"] == "pbkdf2" and slot["kdf"]["iterations"] == 1000 and slot["kdf"]["hash"] == "sha256"
    assert slot["area"]["encryption"] == "aes-xts-plain64" and slot["key_size"] == 64
    dump = subprocess.run(
        [which("cryptsetup"), "luksDump", "--disable-locks", str(built["image"])],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"UUID:          \t{LUKS_UUID}" in dump and "offset: 16777216 [bytes]" in dump


def test_corrupt_header_is_refused(built):
    data = bytearray(built["image"].read_bytes()[: 16 << 10])
    data[4200] ^= 1  # inside the JSON area
    with pytest.raises(LuksError, match="checksum"):
        parse_header(bytes(data))
    with pytest.raises(LuksError, match="not a LUKS2"):
        parse_header(b"\0" * 4096)


def test_keyslot_opens_in_user_space_and_agrees_with_cryptsetup(built):
    image = built["image"]
    assert open_keyslot(image, PASSPHRASE) == VOLUME_KEY
    cryptsetup = which("cryptsetup")
    # Neither check needs device-mapper.
    subprocess.run(
        [cryptsetup, "luksOpen", "--test-passphrase", "--disable-locks", "--key-file", "-", str(image)],
        input=PASSPHRASE,
        check=True,
    )
    dump = subprocess.run(
        [cryptsetup, "luksDump", "--dump-volume-key", "--batch-mode", "--disable-locks", "--key-file", "-", str(image)],
        input=PASSPHRASE,
        capture_output=True,
        check=True,
    ).stdout.decode()
    hex_key = (
        "".join(line.split(":", 1)[-1] for line in dump.split("MK dump:", 1)[1].splitlines())
        .replace(" ", "")
        .replace("\t", "")
    )
    assert bytes.fromhex(hex_key) == VOLUME_KEY


def test_wrong_passphrase_and_wrong_key_fail(built):
    image = built["image"]
    with pytest.raises(LuksError, match="no keyslot opens"):
        open_keyslot(image, PASSPHRASE[:-1] + b"x")
    wrong = subprocess.run(
        [which("cryptsetup"), "luksOpen", "--test-passphrase", "--disable-locks", "--key-file", "-", str(image)],
        input=b"wrong",
        capture_output=True,
    )
    assert wrong.returncode != 0, wrong.stderr
    other = bytes(b ^ 1 for b in VOLUME_KEY)
    with pytest.raises(LuksError, match="does not match"):
        next(decrypt_payload(image, other))
    # Without the digest check, the wrong key simply yields garbage.
    with open(image, "rb") as f:
        f.seek(DATA_OFFSET)
        assert XtsPlain64(other).decrypt(f.read(4096)) != built["ext4"].read_bytes()[:4096]


def test_python_and_cryptsetup_engines_write_the_same_payload_header_differs(built, tmp_path):
    """cryptsetup's offline encryption (C, the default engine) and XtsPlain64 give the same
    payload bytes: two independent implementations agree, and the payload is reproducible;
    the header is not (salts, fill)."""
    again = tmp_path / "again.img"
    encrypt_image(
        payload=built["ext4"],
        output=again,
        volume_key=VOLUME_KEY,
        passphrase=PASSPHRASE,
        uuid=LUKS_UUID,
        engine="python",
    )
    first, second = built["image"].read_bytes(), again.read_bytes()
    assert first[DATA_OFFSET:] == second[DATA_OFFSET:]
    assert first[:DATA_OFFSET] != second[:DATA_OFFSET]
    assert open_keyslot(again, PASSPHRASE) == VOLUME_KEY
    assert read_header(again).uuid == LUKS_UUID
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.img"]
    for needle in (VOLUME_KEY, PASSPHRASE, VOLUME_KEY.hex().encode(), PASSPHRASE.hex().encode()):
        assert needle not in second
    with pytest.raises(ValueError, match="engine"):
        encrypt_image(
            payload=built["ext4"],
            output=again,
            volume_key=VOLUME_KEY,
            passphrase=PASSPHRASE,
            uuid=LUKS_UUID,
            engine="gpu",
        )


@pytest.mark.parametrize("engine", ["cryptsetup", "python"])
def test_in_place_the_payload_where_it_lies_becomes_the_same_image(built, tmp_path, engine):
    """The build's way: the (sparse) ext4 image already at DATA_OFFSET of the disk file,
    junk before it; encrypted where it is, the header over the junk. The payload bytes are
    encrypt_image's (so the guest reads the same disk), every sector of it encrypted, the
    holes too: none is left reading as zeros."""
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f, open(built["ext4"], "rb") as ext4:
        f.write(b"junk" * (DATA_OFFSET // 4))
        f.truncate(DATA_OFFSET + EXT4_SIZE)
        assert os.lseek(ext4.fileno(), 0, os.SEEK_HOLE) < EXT4_SIZE  # the ext4 image has holes
        ext4.seek(0)
        for start in range(0, EXT4_SIZE, 1 << 20):
            if (chunk := ext4.read(1 << 20)).strip(b"\0"):
                f.seek(DATA_OFFSET + start)
                f.write(chunk)
    header = encrypt_in_place(disk, volume_key=VOLUME_KEY, passphrase=PASSPHRASE, uuid=LUKS_UUID, engine=engine)
    assert (header.uuid, header.payload_offset) == (LUKS_UUID, DATA_OFFSET)
    assert disk.stat().st_size == DATA_OFFSET + EXT4_SIZE
    data = disk.read_bytes()
    assert data[DATA_OFFSET:] == built["image"].read_bytes()[DATA_OFFSET:]
    assert not any(data[at : at + 512] == bytes(512) for at in range(DATA_OFFSET, len(data), 512))
    assert b"junk" * 64 not in data[:DATA_OFFSET]
    assert open_keyslot(disk, PASSPHRASE) == VOLUME_KEY
    assert [p.name for p in tmp_path.iterdir()] == ["disk.img"]


def test_in_place_refuses_a_file_with_no_payload(tmp_path):
    short = tmp_path / "short.img"
    short.write_bytes(bytes(DATA_OFFSET))
    with pytest.raises(LuksError, match="payload size 0"):
        encrypt_in_place(short, volume_key=VOLUME_KEY, passphrase=PASSPHRASE, uuid=LUKS_UUID)
    with pytest.raises(ValueError, match="engine"):
        encrypt_in_place(short, volume_key=VOLUME_KEY, passphrase=PASSPHRASE, uuid=LUKS_UUID, engine="gpu")


def test_no_key_or_passphrase_bytes_in_any_file_written(built):
    needles = {"volume key": VOLUME_KEY, "passphrase": PASSPHRASE}
    needles |= {f"{name} (hex)": value.hex().encode() for name, value in list(needles.items())}
    needles |= {f"{name} (HEX)": value.upper() for name, value in list(needles.items()) if name.endswith("(hex)")}
    files = [p for p in built["root"].rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"root.ext4", "disk.img"}
    assert not list((built["root"] / "tmp").iterdir())  # temp files were removed
    assert not [p for p in files if p.name.endswith(".partial")]
    for path in files:
        data = path.read_bytes()
        for name, needle in needles.items():
            assert needle not in data, f"{name} found in {path}"


def test_failed_cryptsetup_step_leaves_nothing_and_no_key_in_the_error(built, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ImageStepError) as info:
        encrypt_image(
            payload=built["ext4"],
            output=out / "disk.img",
            volume_key=VOLUME_KEY,
            passphrase=PASSPHRASE,
            uuid="not-a-uuid",
        )
    err = info.value
    assert err.step == "cryptsetup luksFormat" and "--uuid" in err.command and err.stderr
    text = str(err) + repr(err.command)
    assert VOLUME_KEY.hex() not in text and PASSPHRASE.hex() not in text
    assert list(out.iterdir()) == []


def test_bad_payloads_are_refused(tmp_path):
    odd = tmp_path / "odd"
    odd.write_bytes(bytes(1000))
    for payload in (odd, tmp_path / "missing"):
        with pytest.raises((LuksError, FileNotFoundError)):
            encrypt_image(
                payload=payload, output=tmp_path / "x.img", volume_key=VOLUME_KEY, passphrase=PASSPHRASE, uuid=LUKS_UUID
            )
    assert not (tmp_path / "x.img").exists()


def test_af_merge_inverts_the_luks1_split():
    """Split as the LUKS1 spec's AF-Splitter does (random stripes, then the last), merge back."""
    key, stripes = os.urandom(64), 7
    randoms = [os.urandom(64) for _ in range(stripes - 1)]
    d = bytes(64)
    for s in randoms:
        d = bytes(a ^ b for a, b in zip(d, s, strict=True))
        d = b"".join(hashlib.sha256(i.to_bytes(4, "big") + d[32 * i : 32 * i + 32]).digest() for i in range(2))
    last = bytes(a ^ b for a, b in zip(d, key, strict=True))
    assert af_merge(b"".join(randoms) + last, 64, stripes, "sha256") == key
