"""The scratch disk's checks of the live tables: only the authenticated cipher with the
key drawn in the TD, over dm-integrity with 48-byte tags on the scratch device. The
mapping itself needs device-mapper (the guest has it): the end-to-end launch test
formats, checks and mounts it in a booted TD."""

from __future__ import annotations

import pytest

from tdxvm.guest import scratch
from tdxvm.guest.scratch import crypt_table_problem, integrity_table_problem

KEY = bytes(range(96))
KEY_HEX = KEY.hex()
CIPHER = "capi:authenc(hmac(sha256),xts(aes))-random"


def _crypt(
    cipher=CIPHER, key=KEY_HEX, iv="0", dev="253:3", offset="0", options=("2", "integrity:48:aead", "sector_size:4096")
):
    return " ".join(["0", "8388608", "crypt", cipher, key, iv, dev, offset, *options]) + "\n"


def test_the_authenticated_mapping_with_the_tds_key_is_accepted():
    assert crypt_table_problem(_crypt(), key=KEY, device="253:3") is None
    assert crypt_table_problem(_crypt(options=("1", "integrity:48:aead")), key=KEY, device="253:3") is None


@pytest.mark.parametrize(
    "table, problem",
    [
        (_crypt(cipher="cipher_null-ecb"), "cipher is 'cipher_null-ecb'"),
        (_crypt(cipher="aes-xts-plain64", options=("1", "sector_size:4096")), "cipher is 'aes-xts-plain64'"),
        (_crypt(key="00" * 96), "not the key drawn in this TD"),
        (_crypt(dev="253:0"), "device 253:0"),
        (_crypt(offset="8"), "offset 8"),
        (_crypt(options=("1", "sector_size:4096")), "no integrity:48:aead"),
        (_crypt(options=("2", "integrity:28:aead", "sector_size:4096")), "no integrity:48:aead"),
        (
            _crypt(options=("3", "integrity:48:aead", "sector_size:4096", "allow_discards")),
            "unexpected optional parameters",
        ),
        (_crypt(options=("3", "integrity:48:aead")), "malformed"),
        (_crypt() + _crypt(), "2 targets"),
    ],
)
def test_any_other_crypt_table_is_refused(table, problem):
    found = crypt_table_problem(table, key=KEY, device="253:3")
    assert found is not None and problem in found and KEY_HEX not in found


def _integrity(
    dev="254:16",
    tag="48",
    mode="J",
    options=(
        "6",
        "journal_sectors:130944",
        "interleave_sectors:32768",
        "buffer_sectors:128",
        "journal_watermark:50",
        "commit_time:10000",
        "fix_padding",
    ),
):
    return " ".join(["0", "8388608", "integrity", dev, "0", tag, mode, *options]) + "\n"


def test_integrity_with_dm_crypts_tags_on_the_scratch_device_is_accepted():
    assert integrity_table_problem(_integrity(), device="254:16") is None
    assert integrity_table_problem(_integrity(mode="D", options=()), device="254:16") is None


@pytest.mark.parametrize(
    "table, problem",
    [
        (_integrity(dev="254:0"), "device 254:0"),
        (_integrity(tag="0"), "tag size 0"),
        (_integrity(mode="R"), "mode 'R'"),
        (_integrity(options=("1", "internal_hash:crc32c")), "internal hash"),
        ("0 8 linear 254:16 0\n", "not a single integrity target"),
    ],
)
def test_any_other_integrity_table_is_refused(table, problem):
    found = integrity_table_problem(table, device="254:16")
    assert found is not None and problem in found


MOUNTINFO = """\
22 1 0:21 / / rw,relatime - overlay overlay rw,lowerdir=/run/tdxvm/root-ro
30 22 254:2 / /var/lib/tdxvm rw,nosuid,nodev,relatime - ext4 /dev/mapper/tdxvm-scratch rw
31 22 0:25 / /run rw,nosuid,nodev - tmpfs tmpfs rw,mode=755
"""


def test_the_source_of_a_mount_point_is_read_from_mountinfo():
    assert scratch.mount_source("/var/lib/tdxvm", MOUNTINFO) == "/dev/mapper/tdxvm-scratch"
    assert scratch.mount_source("/var/lib/tdxvm/", MOUNTINFO) == "/dev/mapper/tdxvm-scratch"
    assert scratch.mount_source("/", MOUNTINFO) == "overlay"
    assert scratch.mount_source("/var/lib", MOUNTINFO) is None  # a folder on the root, not a mount point
    stacked = MOUNTINFO + "40 30 0:30 / /var/lib/tdxvm rw - tmpfs tmpfs rw\n"  # mounted over it: the last one counts
    assert scratch.mount_source("/var/lib/tdxvm", stacked) == "tmpfs"


def test_a_folder_that_is_not_the_scratch_mapping_is_refused(tmp_path):
    """What the receiver and the install check before writing under the scratch mount:
    a folder of the in-memory root (nothing mounted there) is refused, naming what is."""
    with pytest.raises(
        scratch.ScratchError,
        match=r"is not the scratch disk \(mounted there: nothing; expected /dev/mapper/tdxvm-scratch\)",
    ):
        scratch.require(str(tmp_path), wait=False)
