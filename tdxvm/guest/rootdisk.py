"""The root filesystem, opened in the initramfs with parameters fixed here: none come from the disk.

The disk (``/dev/vda``) is the host's to change. Its LUKS2 header says which cipher,
key size, sector size, offset and keyslot to use, and a header the host forged with
``cipher_null`` and a key of its own would open with any passphrase. So the header is
never read: the controller releases the volume key itself (after attestation), and the
payload is mapped as plain dm-crypt with the constants below, which the measured
initramfs holds. The live tables are then read back (``dmsetup table --showkeys``) and
refused unless they are exactly what was asked for, key included.

On the decrypted mapping, dm-verity: the ext4 image's hash tree follows it inside the
encrypted payload, and the root hash and data size come from the kernel command line
(``tdxvm.verity=<data blocks>:<root hash>``, measured into RTMR2), never from a verity
superblock (there is none). Before the root is handed over, a check mapping without
``panic_on_corruption`` reads the first block, so a disk that is not the built one (a
byte changed, another root filesystem, a forged header) is refused with a message on
the console; the root itself is mapped with ``panic_on_corruption``, so a block changed
under a running TD stops it.

Everything here runs before the root filesystem exists: standard library only, the
``cryptsetup``, ``veritysetup`` and ``dmsetup`` binaries of the initramfs.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from dataclasses import dataclass

from tdxvm.errors import TdxvmError
from tdxvm.guest.devmapper import crypt_problem, devno, one_target, run

CIPHER = "aes-xts-plain64"
KEY_BYTES = 64  # two AES-256 keys
SECTOR = 512
PAYLOAD_OFFSET = 16 << 20  # where the payload starts on the disk (after the LUKS2 header area)
VERITY_HASH = "sha256"
VERITY_BLOCK = 4096  # data and hash block size
CMDLINE_KEY = "tdxvm.verity"
DEVICE = "/dev/vda"
CRYPT_NAME = "root-crypt"
CHECK_NAME = "root-check"
ROOT_NAME = "root"  # /dev/mapper/root: the kernel command line's root=
# Reads decrypted as they complete and verified there when the hash blocks are cached, not
# queued to kernel workers: the same checks, less latency (a queue hop per read costs most
# under emulation). The second is the default sector size, which dmsetup may show.
CRYPT_OPTIONS = ("no_read_workqueue", f"sector_size:{SECTOR}")
VERITY_OPTION = "try_verify_in_tasklet"

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class RootDiskError(TdxvmError):
    """The root filesystem is not the one the measured command line names, or cannot be opened."""

    code = "root-disk"


@dataclass(frozen=True, slots=True)
class VerityRoot:
    """What the command line pins: the data size in blocks and the hash tree's root hash."""

    data_blocks: int
    root_hash: str

    @property
    def hash_offset(self) -> int:
        """Byte offset of the hash tree in the decrypted payload: right after the data."""
        return self.data_blocks * VERITY_BLOCK

    def arg(self) -> str:
        """The kernel command line argument that pins this root."""
        return f"{CMDLINE_KEY}={self.data_blocks}:{self.root_hash}"


def parse_cmdline(cmdline: str) -> VerityRoot:
    """The one ``tdxvm.verity=`` argument of ``cmdline``; refused if missing, repeated or malformed."""
    values = [word.split("=", 1)[1] for word in cmdline.split() if word.startswith(CMDLINE_KEY + "=")]
    if len(values) != 1:
        raise RootDiskError(f"the kernel command line has {len(values)} {CMDLINE_KEY}= arguments, expected exactly one")
    blocks, _, root_hash = values[0].partition(":")
    if not blocks.isdigit() or int(blocks) == 0 or not _HEX64.fullmatch(root_hash):
        raise RootDiskError(f"{CMDLINE_KEY}={values[0]!r} is not <data blocks>:<64 hex digits of root hash>")
    return VerityRoot(data_blocks=int(blocks), root_hash=root_hash)


def crypt_table_problem(table: str, *, key: bytes, device: str) -> str | None:
    """Why the dm-crypt table (``dmsetup table --showkeys``) is not the fixed mapping of
    ``device`` (``major:minor``) with ``key``; None when it is."""
    f = one_target(table, "crypt", 8)
    if isinstance(f, str):
        return f
    problem = crypt_problem(
        f,
        cipher=CIPHER,
        key=key,
        device=device,
        offset=PAYLOAD_OFFSET // SECTOR,
        whose="the key the controller released",
    )
    if problem is not None:
        return problem
    options = f[8:]
    if not options:
        return f"no optional parameters, expected {CRYPT_OPTIONS[0]}"
    count, *rest = options
    if not count.isdigit() or int(count) != len(rest):
        return f"malformed optional parameters {options}"
    if CRYPT_OPTIONS[0] not in rest:
        return f"optional parameters {rest} lack {CRYPT_OPTIONS[0]}"
    extra = [o for o in rest if o not in CRYPT_OPTIONS]
    if extra:
        return f"unexpected optional parameters {extra}"
    return None


def verity_table_problem(table: str, *, data_device: str, root: VerityRoot, panic: bool) -> str | None:
    """Why the dm-verity table is not ``root`` over ``data_device`` (data and hash tree on
    the same device); None when it is."""
    f = one_target(table, "verity", 13)
    if isinstance(f, str):
        return f
    want = [
        "1",
        data_device,
        data_device,
        str(VERITY_BLOCK),
        str(VERITY_BLOCK),
        str(root.data_blocks),
        str(root.hash_offset // VERITY_BLOCK),
        VERITY_HASH,
        root.root_hash,
        "-",
    ]
    if f[3:13] != want:
        return f"verity parameters {' '.join(f[3:13])}, expected {' '.join(want)}"
    options = f[13:]
    wanted = ["panic_on_corruption", VERITY_OPTION] if panic else [VERITY_OPTION]
    expected = [str(len(wanted)), *wanted]
    if options != expected:
        return f"verity options {options}, expected {expected}"
    return None


def _run(argv: list[str], *, stdin: bytes = b"") -> str:
    return run(argv, RootDiskError, stdin=stdin)


def _table(name: str, *, keys: bool = False) -> str:
    return _run(["dmsetup", "table", *(["--showkeys"] if keys else []), name])


def _verity(name: str, data: str, root: VerityRoot, *, panic: bool) -> None:
    _run(
        [
            "veritysetup",
            "open",
            data,
            name,
            data,
            root.root_hash,
            "--no-superblock",
            f"--hash={VERITY_HASH}",
            f"--data-block-size={VERITY_BLOCK}",
            f"--hash-block-size={VERITY_BLOCK}",
            f"--data-blocks={root.data_blocks}",
            f"--hash-offset={root.hash_offset}",
            "--salt=-",
            "--use-tasklets",
            *(["--panic-on-corruption"] if panic else []),
        ]
    )
    problem = verity_table_problem(_table(name), data_device=devno(data), root=root, panic=panic)
    if problem is not None:
        raise RootDiskError(f"/dev/mapper/{name}: {problem}")


def open_root(key: bytes, root: VerityRoot, *, device: str = DEVICE) -> str:
    """Map ``device`` as the verified, decrypted root (``/dev/mapper/root``, read-only) and
    return its path; :class:`RootDiskError` (nothing left mapped) when the disk is not the
    one ``root`` names or a table is not the one asked for."""
    if len(key) != KEY_BYTES:
        raise RootDiskError(f"the released volume key is {len(key)} bytes, expected {KEY_BYTES}")
    mapped: list[str] = []  # each name before the step that may create it: a failed check leaves nothing
    try:
        mapped.append(CRYPT_NAME)
        _run(
            [
                "cryptsetup",
                "open",
                "--type",
                "plain",
                "--cipher",
                CIPHER,
                "--key-size",
                str(8 * KEY_BYTES),
                "--hash",
                "plain",
                "--sector-size",
                str(SECTOR),
                "--offset",
                str(PAYLOAD_OFFSET // SECTOR),
                "--key-file",
                "-",
                "--keyfile-size",
                str(KEY_BYTES),
                "--readonly",
                "--disable-keyring",
                "--perf-no_read_workqueue",
                device,
                CRYPT_NAME,
            ],
            stdin=key,
        )
        problem = crypt_table_problem(_table(CRYPT_NAME, keys=True), key=key, device=devno(device))
        if problem is not None:
            raise RootDiskError(f"/dev/mapper/{CRYPT_NAME}: {problem}")
        data = f"/dev/mapper/{CRYPT_NAME}"
        mapped.append(CHECK_NAME)
        _verity(CHECK_NAME, data, root, panic=False)
        try:
            fd = os.open(f"/dev/mapper/{CHECK_NAME}", os.O_RDONLY)
            try:
                os.read(fd, VERITY_BLOCK)  # verified against the root hash on the way in
            finally:
                os.close(fd)
        except OSError as exc:
            raise RootDiskError(
                f"the disk is not the root filesystem the measured command line names "
                f"(its first block does not verify against root hash {root.root_hash}: {exc.strerror})"
            ) from None
        _run(["dmsetup", "remove", CHECK_NAME])
        mapped.remove(CHECK_NAME)
        mapped.append(ROOT_NAME)
        _verity(ROOT_NAME, data, root, panic=True)
    except BaseException:
        for name in reversed(mapped):
            subprocess.run(["dmsetup", "remove", "--force", name], capture_output=True, check=False)
        raise
    return f"/dev/mapper/{ROOT_NAME}"


def main(argv: list[str] | None = None) -> int:
    """``python3 -m tdxvm.guest.rootdisk``: the volume key on standard input (what the unlock
    step prints), the root hash from the kernel command line; exit 0 once
    ``/dev/mapper/root`` is mapped, else a message on standard error and exit 1."""
    p = argparse.ArgumentParser(
        prog="python3 -m tdxvm.guest.rootdisk",
        description="Open the verified, decrypted root filesystem with the volume key read from standard input",
    )
    p.add_argument("--cmdline", default="/proc/cmdline", help="the kernel command line (tdxvm.verity=)")
    p.add_argument("--device", default=DEVICE, help="the encrypted disk")
    args = p.parse_args(argv)
    try:
        with open(args.cmdline, encoding="utf-8") as f:
            root = parse_cmdline(f.read())
        key = sys.stdin.buffer.read(KEY_BYTES + 1)
        path = open_root(key, root, device=args.device)
    except (RootDiskError, OSError) as exc:
        print(f"tdxvm-rootdisk: refusing the root filesystem: {exc}", file=sys.stderr)
        return 1
    print(f"tdxvm-rootdisk: {path} is the verified root filesystem (root hash {root.root_hash})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
