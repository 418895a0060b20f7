"""Files from Debian unstable packages, fetched as data for tests (never installed).

Debian 12 lacks TDX-aware packages; unstable's ``libvirt-common`` (the TDX domain
schema) and ``ovmf-inteltdx`` (a real TDVF) are downloaded with ``apt-get download``
through a private sources list and lists folder, unpacked with ``dpkg -x`` into a
cache (``~/.cache/tdxvm-test/debian``, or ``$TDXVM_TEST_CACHE``), and reused.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

MIRROR = "http://deb.debian.org/debian"


def cache_dir() -> Path:
    base = os.environ.get("TDXVM_TEST_CACHE") or str(Path.home() / ".cache" / "tdxvm-test")
    return Path(base) / "debian"


def unstable_package(package: str) -> Path:
    """The unpacked root of ``package`` from Debian unstable (downloaded once)."""
    root = cache_dir() / package
    if (root / ".complete").exists():
        return root
    work = Path(tempfile.mkdtemp(prefix="tdxvm-apt-"))
    try:
        (work / "lists" / "partial").mkdir(parents=True)
        (work / "cache" / "archives" / "partial").mkdir(parents=True)
        sources = work / "sources.list"
        sources.write_text(f"deb {MIRROR} unstable main\n")
        opts = [
            f"-oDir::Etc::SourceList={sources}",
            "-oDir::Etc::SourceParts=/dev/null",
            f"-oDir::State::Lists={work / 'lists'}",
            f"-oDir::Cache={work / 'cache'}",
            "-oAPT::Sandbox::User=root",
            "-qq",
        ]
        subprocess.run(["apt-get", *opts, "update"], check=True, capture_output=True)
        subprocess.run(["apt-get", *opts, "download", package], check=True, capture_output=True, cwd=work)
        debs = list(work.glob(f"{package}_*.deb"))
        if len(debs) != 1:
            raise RuntimeError(f"apt-get download {package} gave {debs}")
        staging = root.with_name(root.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(staging)], check=True, capture_output=True)
        (staging / ".complete").write_text(debs[0].name + "\n")
        shutil.rmtree(root, ignore_errors=True)
        staging.rename(root)
        return root
    finally:
        shutil.rmtree(work, ignore_errors=True)
