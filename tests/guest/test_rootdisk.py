"""The initramfs's root step: what it accepts from the command line and from the live
device-mapper tables. The mapping itself needs device-mapper, which only the guest has;
the end-to-end tests boot it (a forged header, a changed byte and another root
filesystem are refused there)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tdxvm.guest import rootdisk
from tdxvm.guest.rootdisk import RootDiskError, VerityRoot, crypt_table_problem, parse_cmdline, verity_table_problem

ROOT_HASH = "ab" * 32
KEY = bytes(range(64))
KEY_HEX = KEY.hex()
ROOT = VerityRoot(data_blocks=262144, root_hash=ROOT_HASH)


def test_the_command_line_pins_blocks_and_root_hash():
    root = parse_cmdline(f"console=ttyS0 root=/dev/mapper/root ro panic=-1 tdxvm.verity=262144:{ROOT_HASH}\n")
    assert root == ROOT and root.hash_offset == 262144 * 4096
    assert root.arg() == f"tdxvm.verity=262144:{ROOT_HASH}"


@pytest.mark.parametrize(
    "cmdline",
    [
        "root=/dev/mapper/root",  # none: an image without a verified root
        f"tdxvm.verity=1:{ROOT_HASH} tdxvm.verity=1:{ROOT_HASH}",  # two: which one would win is the host's guess
        f"tdxvm.verity=0:{ROOT_HASH}",
        f"tdxvm.verity=x:{ROOT_HASH}",
        "tdxvm.verity=8:" + "AB" * 32,
        "tdxvm.verity=8:" + "ab" * 31,
        f"tdxvm.verity={ROOT_HASH}",
    ],
)
def test_a_command_line_without_exactly_one_well_formed_root_is_refused(cmdline):
    with pytest.raises(RootDiskError, match="tdxvm.verity"):
        parse_cmdline(cmdline)


def _crypt(cipher="aes-xts-plain64", key=KEY_HEX, iv="0", dev="254:0", offset="32768", *options):
    options = options or ("1", "no_read_workqueue")
    return " ".join(["0", "4194304", "crypt", cipher, key, iv, dev, offset, *options]) + "\n"


def test_the_fixed_crypt_table_with_the_released_key_is_accepted():
    assert crypt_table_problem(_crypt(), key=KEY, device="254:0") is None
    assert (
        crypt_table_problem(
            _crypt("aes-xts-plain64", KEY.hex(), "0", "254:0", "32768", "2", "no_read_workqueue", "sector_size:512"),
            key=KEY,
            device="254:0",
        )
        is None
    )


@pytest.mark.parametrize(
    "table, problem",
    [
        (_crypt(cipher="cipher_null-ecb", key="-"), "cipher is 'cipher_null-ecb'"),
        (_crypt(cipher="aes-cbc-essiv:sha256"), "cipher is"),
        (_crypt(key="00" * 64), "not the key the controller released"),
        (_crypt(key=KEY.hex()[:64]), "not the key the controller released"),
        (_crypt(key=":64:logon:cryptsetup:x"), "not the key the controller released"),
        (_crypt(iv="8"), "IV offset 8"),
        (_crypt(dev="254:16"), "device 254:16"),
        (_crypt(offset="0"), "offset 0"),
        (
            _crypt("aes-xts-plain64", KEY.hex(), "0", "254:0", "32768", "2", "no_read_workqueue", "sector_size:4096"),
            "unexpected optional",
        ),
        (_crypt("aes-xts-plain64", KEY.hex(), "0", "254:0", "32768", "2", "allow_discards"), "malformed"),
        (_crypt("aes-xts-plain64", KEY.hex(), "0", "254:0", "32768", "1", "sector_size:512"), "lack no_read_workqueue"),
        (" ".join(_crypt().split()[:8]) + "\n", "no optional parameters"),
        (_crypt() + _crypt(), "2 targets"),
        ("0 8 linear 254:0 0\n", "not a single crypt target"),
    ],
)
def test_any_other_crypt_table_is_refused(table, problem):
    found = crypt_table_problem(table, key=KEY, device="254:0")
    assert found is not None and problem in found
    assert KEY.hex() not in found  # a message never shows the key


def _verity(*fields, options=("2", "panic_on_corruption", "try_verify_in_tasklet")):
    base = ["1", "253:0", "253:0", "4096", "4096", "262144", "262144", "sha256", ROOT_HASH, "-"]
    for i, v in fields:
        base[i] = v
    return " ".join(["0", "2097152", "verity", *base, *options]) + "\n"


def test_the_verity_table_of_the_command_line_root_is_accepted():
    assert verity_table_problem(_verity(), data_device="253:0", root=ROOT, panic=True) is None
    assert (
        verity_table_problem(
            _verity(options=("1", "try_verify_in_tasklet")), data_device="253:0", root=ROOT, panic=False
        )
        is None
    )


@pytest.mark.parametrize(
    "fields, options, problem",
    [
        ([(7, "crc32c")], ("2", "panic_on_corruption", "try_verify_in_tasklet"), "verity parameters"),
        ([(8, "cd" * 32)], ("1", "panic_on_corruption"), "verity parameters"),
        ([(5, "1024")], ("1", "panic_on_corruption"), "verity parameters"),
        ([(6, "1")], ("1", "panic_on_corruption"), "verity parameters"),
        ([(9, "00")], ("1", "panic_on_corruption"), "verity parameters"),
        ([(2, "253:1")], ("1", "panic_on_corruption"), "verity parameters"),
        ([], (), "verity options"),
        ([], ("1", "panic_on_corruption"), "verity options"),
        ([], ("1", "ignore_corruption"), "verity options"),
        ([], ("3", "panic_on_corruption", "try_verify_in_tasklet", "check_at_most_once"), "verity options"),
    ],
)
def test_any_other_verity_table_is_refused(fields, options, problem):
    found = verity_table_problem(_verity(*fields, options=options), data_device="253:0", root=ROOT, panic=True)
    assert found is not None and problem in found


def test_the_root_step_refuses_a_short_key_before_mapping_anything(tmp_path):
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(f"root=/dev/mapper/root tdxvm.verity=8:{ROOT_HASH}\n")
    done = subprocess.run(
        [sys.executable, "-m", "tdxvm.guest.rootdisk", "--cmdline", str(cmdline)],
        input=b"short",
        capture_output=True,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.decode().strip() == (
        "tdxvm-rootdisk: refusing the root filesystem: the released volume key is 5 bytes, expected 64"
    )


def test_the_root_step_refuses_a_command_line_without_a_root_hash(tmp_path):
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("root=/dev/mapper/root\n")
    done = subprocess.run(
        [sys.executable, "-m", "tdxvm.guest.rootdisk", "--cmdline", str(cmdline)],
        input=KEY,
        capture_output=True,
        check=False,
    )
    assert done.returncode == 1 and "0 tdxvm.verity= arguments" in done.stderr.decode()


def test_constants_match_the_image_build():
    from tdxvm.image import luks

    assert rootdisk.PAYLOAD_OFFSET == luks.DATA_OFFSET and rootdisk.SECTOR == luks.SECTOR
