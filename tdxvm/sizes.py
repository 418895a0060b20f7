"""Sizes as YAML files write them: a whole number and a binary unit (``2GiB``, ``512MiB``).

Binary units only, so a size means one thing. Anything above :data:`MAX_SIZE` is a typo:
no memory or disk of a tdxvm VM or image is that large, and libvirt or QEMU would refuse
it only later, at launch.
"""

from __future__ import annotations

import re

_UNITS = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
_SIZE = re.compile(r"^\s*(\d{1,20})\s*(KiB|MiB|GiB|TiB)\s*$")
MAX_SIZE = 64 << 40  # 64 TiB


def parse_size(value: object) -> int:
    """``"2GiB"`` → bytes; ValueError saying what a size looks like, or that it is too large."""
    match = _SIZE.fullmatch(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a size like 512MiB or 2GiB (units KiB, MiB, GiB, TiB)")
    size = int(match.group(1)) * _UNITS[match.group(2)]
    if size > MAX_SIZE:
        raise ValueError(f"{str(value).strip()} is more than 64TiB")
    return size
