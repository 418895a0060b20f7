"""Files from Debian unstable packages, fetched as data for tests (never installed).

Debian 12 lacks TDX-aware packages; unstable's ``libvirt-common`` (the TDX domain
schema) and ``ovmf-inteltdx`` (a real TDVF) are downloaded with ``apt-get download``
through a private sources list and lists folder, unpacked with ``dpkg -x`` into a
cache (``~/.cache/tdxvm-test/debian``, or ``$TDXVM_TEST_CACHE``), and reused.
"""

from __future__ import annotations

import os
from pathlib import Path

from tdxvm.image.debian import MIRROR, newest, package_files

__all__ = ["MIRROR", "cache_dir", "unstable_package"]


def cache_dir() -> Path:
    base = os.environ.get("TDXVM_TEST_CACHE") or str(Path.home() / ".cache" / "tdxvm-test")
    return Path(base) / "debian"


def unstable_package(package: str) -> Path:
    """The unpacked root of ``package`` from Debian unstable: a version already in the
    cache, else the newest (downloaded once)."""
    cached = sorted(p.parent for p in cache_dir().glob(f"{package}_*/.complete"))
    if cached:
        return cached[-1]
    version, sha256 = newest(package)
    return package_files(package, version=version, sha256=sha256, cache=cache_dir())
