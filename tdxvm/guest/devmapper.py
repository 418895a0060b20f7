"""Device-mapper helpers shared by the root and scratch disk steps: live tables read back
and split, device numbers, and the setup tools run with their last error line kept.
Standard library only (it runs in the initramfs too)."""

from __future__ import annotations

import hmac
import os
import subprocess


def devno(path: str) -> str:
    """``major:minor`` of the block device at ``path``, as dm tables name devices."""
    rdev = os.stat(path).st_rdev
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def one_target(table: str, target: str, min_fields: int) -> list[str] | str:
    """The fields of a table that is one ``target`` line of at least ``min_fields``
    fields, or why it is not (the key field, index 4, never shown)."""
    lines = table.strip().splitlines()
    if len(lines) != 1:
        return f"the mapping has {len(lines)} targets, expected one"
    fields = lines[0].split()
    if len(fields) < min_fields or fields[2] != target:
        shown = " ".join("<key>" if i == 4 else f for i, f in enumerate(fields[:8]))
        return f"the mapping is not a single {target} target: {shown}"
    return fields


def crypt_problem(fields: list[str], *, cipher: str, key: bytes, device: str, offset: int, whose: str) -> str | None:
    """Why the fields of a one-target crypt table are not ``cipher`` with ``key`` (``whose``
    key, for the message) over ``device`` at sector ``offset`` with IV offset 0; None when
    they are. The optional parameters are the caller's to check."""
    _start, _length, _target, found, hexkey, iv_offset, dev, at = fields[:8]
    if found != cipher:
        return f"cipher is {found!r}, expected {cipher}"
    if not hmac.compare_digest(hexkey.encode(), key.hex().encode()):
        return f"the mapping's key is not {whose}"
    if (iv_offset, dev, at) != ("0", device, str(offset)):
        return f"IV offset {iv_offset}, device {dev}, offset {at}: expected 0, {device}, {offset}"
    return None


def run(argv: list[str], error: type[Exception], *, stdin: bytes = b"", fds: tuple[int, ...] = ()) -> str:
    """Run a setup tool; its stdout, or ``error`` naming the tool and its last error line."""
    done = subprocess.run(argv, input=stdin, capture_output=True, check=False, pass_fds=fds)
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        raise error(f"{' '.join(argv[:2])} failed (exit {done.returncode}): {lines[-1] if lines else ''}")
    return done.stdout.decode(errors="replace")
