"""The per-VM scratch disk: authenticated encryption under a key that never leaves this TD.

    python3 -m tdxvm.guest.scratch [--device /dev/vdb] [--mount /var/lib/tdxvm]

The root filesystem is read-only; large run-time data (uploads, the installed model)
goes to the second disk the launch gives every VM. Once per boot, when first used,
this formats it afresh: LUKS2 with dm-integrity, ``aes-xts-random`` for confidentiality
and ``hmac-sha256`` per 4 KiB sector for integrity, under a random volume key drawn here
and held only in this TD's memory (kernel and this process). A reboot loses the
contents by design; provisioning again restores the model.

The host controls the disk, and a header it swapped in between format and open could
name ``cipher_null``: so the LUKS2 header is detached and lives in TD memory (``/run``),
never on the disk, and the live tables are read back (``dmsetup table --showkeys``) and
refused unless they are exactly the authenticated cipher with this key over a
dm-integrity device on ``--device`` with 48-byte tags (16-byte random IV, 32-byte HMAC).
A sector the host changes then fails to read (an I/O error), it cannot be decrypted or
forged without the key; a sector it replays from earlier at the same place is not
detected (dm-integrity keeps no version counter).

The unit (:data:`UNIT`) is not part of the boot: formatting takes a while (below), and
attestation, SSH and the launch's ``ready`` do not need the disk. What keeps data on it
calls :func:`require` first (the upload receiver and the model install), which starts
the unit, waits for it, and refuses unless :data:`MOUNT` is this mapping, so nothing
meant for the disk lands in the in-memory root.

Formatting writes every sector once (a sector never written has no valid tag, and
``mkfs.ext4`` reads some before it writes them): seconds per GiB with AES-NI and SHA
extensions, about a minute per GiB under TCG emulation, so emulated guests take small
scratch disks. Standard library only; the ``cryptsetup``, ``dmsetup``, ``mkfs.ext4`` and
``mount`` binaries of the image.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tdxvm.errors import TdxvmError
from tdxvm.guest.devmapper import crypt_problem, devno, one_target, run

DEVICE = "/dev/vdb"
MOUNT = "/var/lib/tdxvm"
NAME = "tdxvm-scratch"
UNIT = "tdxvm-scratch.service"
CIPHER = "aes-xts-random"
INTEGRITY = "hmac-sha256"
DM_CIPHER = "capi:authenc(hmac(sha256),xts(aes))-random"
KEY_BYTES = 96  # 64 for AES-256-XTS, then 32 for HMAC-SHA256
CIPHER_KEY_BITS = 512  # cryptsetup's --key-size: the cipher's part; it adds the HMAC key's
TAG_BYTES = 48  # 16-byte random IV and the 32-byte HMAC, per sector
SECTOR = 4096
HEADER_DIR = Path("/run/tdxvm")
_MIB = 1 << 20


class ScratchError(TdxvmError):
    """The scratch disk could not be set up as asked, or its tables are not the ones asked for."""

    code = "scratch"


def crypt_table_problem(table: str, *, key: bytes, device: str) -> str | None:
    """Why the dm-crypt table is not :data:`DM_CIPHER` with ``key`` over ``device``
    (``major:minor`` of the integrity mapping) with :data:`TAG_BYTES` of AEAD tags; None when it is."""
    f = one_target(table, "crypt", 9)
    if isinstance(f, str):
        return f
    problem = crypt_problem(f, cipher=DM_CIPHER, key=key, device=device, offset=0, whose="the key drawn in this TD")
    if problem is not None:
        return problem
    count, *rest = options = f[8:]
    if not count.isdigit() or int(count) != len(rest):
        return f"malformed optional parameters {options}"
    if f"integrity:{TAG_BYTES}:aead" not in rest:
        return f"no integrity:{TAG_BYTES}:aead among the options {rest}"
    unexpected = [
        o for o in rest if o not in (f"integrity:{TAG_BYTES}:aead", f"sector_size:{SECTOR}", "iv_large_sectors")
    ]
    if unexpected:
        return f"unexpected optional parameters {unexpected}"
    return None


def integrity_table_problem(table: str, *, device: str) -> str | None:
    """Why the dm-integrity table is not over ``device`` with :data:`TAG_BYTES`-byte tags
    kept by dm-crypt (no internal hash); None when it is."""
    f = one_target(table, "integrity", 7)
    if isinstance(f, str):
        return f
    _start, _length, _target, dev, _offset, tag, mode, *options = f
    if dev != device:
        return f"device {dev}, expected {device}"
    if tag != str(TAG_BYTES):
        return f"tag size {tag}, expected {TAG_BYTES}"
    if mode not in ("J", "B", "D"):
        return f"mode {mode!r} is not journal, bitmap or direct"
    if any(o.startswith("internal_hash:") for o in options[1:]):
        return "an internal hash: the tags must be dm-crypt's authenticated ones"
    return None


def _run(argv: list[str], *, stdin: bytes = b"", fds: tuple[int, ...] = ()) -> str:
    return run(argv, ScratchError, stdin=stdin, fds=fds)


def _key_pipe(key: bytes) -> int:
    """The read end of a pipe holding ``key`` (written whole: it fits the pipe's buffer)."""
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "wb") as pipe:
        pipe.write(key)
    return read_end


def setup(device: str = DEVICE, mount: str = MOUNT) -> str:
    """Format, open, check, make a filesystem on and mount the scratch disk; returns the
    mapping's path. :class:`ScratchError` (nothing left mapped) when any step or check fails."""
    if not Path(device).is_block_device():
        raise ScratchError(f"{device} is not a block device: the launch gives every VM a scratch disk")
    key = os.urandom(KEY_BYTES)
    HEADER_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    mapped = False
    with tempfile.NamedTemporaryFile(dir=HEADER_DIR, prefix="scratch-", suffix=".luks2") as header:
        os.chmod(header.name, 0o600)
        header.truncate(16 * _MIB)
        common = ["--header", header.name, "--disable-keyring", "--batch-mode"]
        try:
            for action in (
                [
                    "luksFormat",
                    "--type",
                    "luks2",
                    "--cipher",
                    CIPHER,
                    "--integrity",
                    INTEGRITY,
                    "--key-size",
                    str(CIPHER_KEY_BITS),
                    "--sector-size",
                    str(SECTOR),
                    "--pbkdf",
                    "pbkdf2",
                    "--pbkdf-force-iterations",
                    "1000",
                    "--key-file",
                    "-",
                ],
                ["open", "--type", "luks2"],
            ):
                read_end = _key_pipe(key)
                try:
                    target = [device] if action[0] == "luksFormat" else [device, NAME]
                    _run(
                        ["cryptsetup", *action, *common, "--volume-key-file", f"/dev/fd/{read_end}", *target],
                        stdin=os.urandom(32),
                        fds=(read_end,),
                    )  # the keyslot: never opened again
                finally:
                    os.close(read_end)
            mapped = True
            mapping = f"/dev/mapper/{NAME}"
            problem = integrity_table_problem(_run(["dmsetup", "table", f"{NAME}_dif"]), device=devno(device))
            if problem is None:
                problem = crypt_table_problem(
                    _run(["dmsetup", "table", "--showkeys", NAME]), key=key, device=devno(f"/dev/mapper/{NAME}_dif")
                )
            if problem is not None:
                raise ScratchError(f"{mapping}: {problem}")
            _run(
                [
                    "mkfs.ext4",
                    "-q",
                    "-F",
                    "-b",
                    str(SECTOR),
                    "-E",
                    "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
                    mapping,
                ]
            )
            Path(mount).mkdir(parents=True, exist_ok=True)
            _run(["mount", "-o", "nodev,nosuid", mapping, mount])
        except BaseException:
            if mapped:
                subprocess.run(["cryptsetup", "close", NAME], capture_output=True, check=False)
            raise
    return mapping


def mount_source(mount: str, mountinfo: str | None = None) -> str | None:
    """The device mounted on ``mount`` (the last mount there), from ``/proc/self/mountinfo``; None when nothing is."""
    text = Path("/proc/self/mountinfo").read_text() if mountinfo is None else mountinfo
    target, source = mount.rstrip("/") or "/", None
    for line in text.splitlines():
        fields, sep, tail = line.partition(" - ")
        parts, rest = fields.split(), tail.split()
        if sep and len(parts) >= 5 and len(rest) >= 2 and parts[4] == target:
            source = rest[1]
    return source


def require(mount: str = MOUNT, *, wait: bool = True) -> None:
    """Wait for :data:`UNIT` to finish formatting (``systemctl start`` of a oneshot that ran
    returns at once) and refuse unless ``mount`` is this disk's mapping: :class:`ScratchError`."""
    if wait:
        done = subprocess.run(["systemctl", "start", UNIT], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ScratchError(
                f"the scratch disk is not set up ({UNIT} failed: {done.stderr.strip() or done.returncode}; "
                f"see `journalctl -u {UNIT}`)"
            )
    source = mount_source(mount)
    if source != f"/dev/mapper/{NAME}":
        raise ScratchError(
            f"{mount} is not the scratch disk (mounted there: {source or 'nothing'}; expected /dev/mapper/{NAME})"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python3 -m tdxvm.guest.scratch",
        description="Format and mount the scratch disk with authenticated encryption under a key kept in this TD",
    )
    p.add_argument("--device", default=DEVICE)
    p.add_argument("--mount", default=MOUNT)
    args = p.parse_args(argv)
    try:
        mapping = setup(args.device, args.mount)
    except (ScratchError, OSError) as exc:
        print(f"tdxvm-scratch: {exc}", file=sys.stderr)
        return 1
    print(
        f"tdxvm-scratch: {args.device} is {mapping} ({CIPHER} + {INTEGRITY}, key kept in this TD), "
        f"mounted on {args.mount}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
