"""Files from Debian packages, fetched as data (downloaded and unpacked, never installed).

Debian 12 lacks TDX-aware packages; unstable's ``ovmf-inteltdx`` carries a real TDVF
(``OVMF.inteltdx.ms.fd``). :func:`package_files` downloads a package with ``apt-get
download`` through a private sources list and lists folder (the host's apt state is not
touched), unpacks it with ``dpkg-deb -x`` into a cache folder and reuses it after.
A recipe names such a file as ``debian:PACKAGE/PATH`` (from unstable).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from tdxvm.image.ext4 import ImageStepError, run_step, tool

MIRROR = "http://deb.debian.org/debian"
_REF = re.compile(r"^debian:([a-z0-9][a-z0-9+.-]+)/(.+)$")


def default_cache() -> Path:
    base = os.environ.get("TDXVM_CACHE")
    if base:
        return Path(base) / "debian"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "tdxvm" / "debian"


def package_files(package: str, *, suite: str = "unstable", cache: Path | None = None, mirror: str = MIRROR) -> Path:
    """The unpacked root of ``package`` from ``suite`` (downloaded once into ``cache``)."""
    root = (cache or default_cache()) / (package if suite == "unstable" else f"{package}@{suite}")
    if (root / ".complete").exists():
        return root
    apt = tool("apt-get", step="fetch debian package", package="apt")
    dpkg_deb = tool("dpkg-deb", step="fetch debian package", package="dpkg")
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tdxvm-apt-") as tmp:
        work = Path(tmp)
        (work / "lists" / "partial").mkdir(parents=True)
        (work / "cache" / "archives" / "partial").mkdir(parents=True)
        sources = work / "sources.list"
        sources.write_text(f"deb {mirror} {suite} main\n")
        opts = [f"-oDir::Etc::SourceList={sources}", "-oDir::Etc::SourceParts=/dev/null",
                f"-oDir::State::Lists={work / 'lists'}", f"-oDir::Cache={work / 'cache'}",
                "-oAPT::Sandbox::User=root", "-qq"]  # fmt: skip
        run_step("apt-get update", [apt, *opts, "update"])
        cwd = os.getcwd()
        try:
            os.chdir(work)
            run_step(f"apt-get download {package}", [apt, *opts, "download", package])
        finally:
            os.chdir(cwd)
        debs = sorted(work.glob(f"{package}_*.deb"))
        if len(debs) != 1:
            raise ImageStepError(f"apt-get download {package}", [], f"expected one .deb, got {[d.name for d in debs]}")
        staging = root.with_name(root.name + f".partial-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        run_step("dpkg-deb -x", [dpkg_deb, "-x", str(debs[0]), str(staging)])
        (staging / ".complete").write_text(debs[0].name + "\n")
        shutil.rmtree(root, ignore_errors=True)
        staging.rename(root)
    return root


def resolve(reference: str, *, cache: Path | None = None) -> Path:
    """A path, or ``debian:PACKAGE/PATH`` (a file of a Debian unstable package)."""
    match = _REF.match(reference)
    if not match:
        return Path(reference)
    package, inner = match.groups()
    path = package_files(package, cache=cache) / inner
    if not path.is_file():
        raise ImageStepError(f"fetch {package}", [], f"{reference}: the package has no file {inner}")
    return path
