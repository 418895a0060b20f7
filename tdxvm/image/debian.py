"""Files from Debian packages, fetched as data (downloaded and unpacked, never installed).

Debian 12 lacks TDX-aware packages; unstable's ``ovmf-inteltdx`` carries a real TDVF
(``OVMF.inteltdx.ms.fd``). :func:`package_files` downloads the locked version of a
package with ``apt-get download`` through a private sources list and lists folder (the
host's apt state is not touched), checks the ``.deb`` against the lock's SHA-256,
unpacks it with ``dpkg-deb -x`` into a cache folder and reuses it after. The unpack
writes a partial folder beside it first; one left by an unpack that was killed is
removed by the next unpack of that package version.
A recipe names such a file as ``debian:PACKAGE/PATH`` (from unstable).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from contextlib import AbstractContextManager
from pathlib import Path

from tdxvm.fileio import partial_folder
from tdxvm.image.cache import base_folder, private_folder
from tdxvm.image.ext4 import ImageStepError, run_step, tool
from tdxvm.image.lockfile import LockError

MIRROR = "http://deb.debian.org/debian"
_REF = re.compile(r"^debian:([a-z0-9][a-z0-9+.-]+)/(.+)$")


def default_cache() -> Path:
    """``debian/`` in tdxvm's cache folder (:func:`tdxvm.image.cache.base_folder`)."""
    return base_folder() / "debian"


def cache_folder(cache: Path | None = None) -> Path:
    """``cache`` (else :func:`default_cache`), made 0700 if missing and refused with
    :class:`~tdxvm.image.cache.CacheError` unless only this user can reach it: what it
    holds becomes part of the image (:func:`tdxvm.image.cache.private_folder`)."""
    if cache is not None:
        return private_folder(Path(cache))
    return private_folder(default_cache(), top=base_folder())


def _apt_opts(work: Path, *, suite: str, mirror: str) -> list[str]:
    """apt options for a private state in ``work`` with one source; the indexes are
    checked against the host's trusted archive keys as usual."""
    (work / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (work / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    sources = work / "sources.list"
    sources.write_text(f"deb {mirror} {suite} main\n")
    return [
        f"-oDir::Etc::SourceList={sources}",
        "-oDir::Etc::SourceParts=/dev/null",
        f"-oDir::State::Lists={work / 'lists'}",
        f"-oDir::Cache={work / 'cache'}",
        "-oAPT::Sandbox::User=root",
        "-qq",
    ]


def newest(package: str, *, suite: str = "unstable", mirror: str = MIRROR) -> tuple[str, str]:
    """The version of ``package`` that ``suite`` carries now and its ``.deb``'s SHA-256
    (from the signed index), for a lock."""
    apt = tool("apt-get", step="lock debian package", package="apt")
    apt_cache = tool("apt-cache", step="lock debian package", package="apt")
    with tempfile.TemporaryDirectory(prefix="tdxvm-apt-") as tmp:
        opts = _apt_opts(Path(tmp), suite=suite, mirror=mirror)
        run_step("apt-get update", [apt, *opts, "update"])
        out = run_step(f"apt-cache show {package}", [apt_cache, *opts, "show", "--no-all-versions", package])
    fields = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line and not line.startswith(" "))
    if "Version" not in fields or "SHA256" not in fields:
        raise ImageStepError(
            f"apt-cache show {package}", [], f"{suite} at {mirror} lists no version of {package} with a SHA-256"
        )
    return fields["Version"], fields["SHA256"]


def package_files(
    package: str, *, version: str, sha256: str, suite: str = "unstable", cache: Path | None = None, mirror: str = MIRROR
) -> Path:
    """The unpacked root of ``package`` ``version`` (downloaded once into ``cache``); its
    ``.deb`` must have the SHA-256 the lock recorded."""
    root = cache_folder(cache) / f"{package}_{version.replace(':', '%3a')}"
    marker = root / ".complete"
    if marker.is_file() and marker.read_text().strip() == sha256:
        return root
    apt = tool("apt-get", step="fetch debian package", package="apt")
    dpkg_deb = tool("dpkg-deb", step="fetch debian package", package="dpkg")
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tdxvm-apt-") as tmp:
        work = Path(tmp)
        opts = _apt_opts(work, suite=suite, mirror=mirror)
        run_step("apt-get update", [apt, *opts, "update"])
        try:
            run_step(
                f"apt-get download {package}={version}", [apt, *opts, "download", f"{package}={version}"], cwd=work
            )
        except ImageStepError as exc:
            if "was not found" in exc.stderr:
                raise LockError(
                    f"{suite} at {mirror} no longer has {package} {version}, which the lock names: take a new lock "
                    "with: tdxvm image lock RECIPE"
                ) from None
            raise
        debs = sorted(work.glob(f"{package}_*.deb"))
        if len(debs) != 1:
            raise ImageStepError(f"apt-get download {package}", [], f"expected one .deb, got {[d.name for d in debs]}")
        digest = hashlib.sha256(debs[0].read_bytes()).hexdigest()
        if digest != sha256:
            raise LockError(f"{debs[0].name}: SHA-256 {digest}, not {sha256} as locked")
        with _unpacking(root) as staging:
            run_step("dpkg-deb -x", [dpkg_deb, "-x", str(debs[0]), str(staging)])
            (staging / ".complete").write_text(sha256 + "\n")
            shutil.rmtree(root, ignore_errors=True)
            staging.rename(root)
    return root


def _unpacking(root: Path) -> AbstractContextManager[Path]:
    """The folder a package is unpacked in before it becomes ``root``:
    ``<root>.partial-<pid>-<8 hex>``, locked while it is written
    (:func:`tdxvm.fileio.partial_folder`). Those of unpacks of ``root`` that were killed
    are removed first (``dpkg-deb -x`` mounts nothing: a plain tree)."""
    return partial_folder(root.parent, f"{root.name}.partial-", mode=0o777)


def is_reference(reference: str) -> bool:
    return _REF.fullmatch(reference) is not None


def split_reference(reference: str) -> tuple[str, str]:
    """``debian:PACKAGE/PATH`` → (PACKAGE, PATH)."""
    match = _REF.fullmatch(reference)
    if not match:
        raise ValueError(f"{reference!r} is not debian:PACKAGE/PATH")
    return match.group(1), match.group(2)


def resolve(reference: str, *, version: str, sha256: str, cache: Path | None = None) -> Path:
    """The file ``debian:PACKAGE/PATH`` names, from the locked ``version`` of PACKAGE
    (Debian unstable)."""
    package, inner = split_reference(reference)
    path = package_files(package, version=version, sha256=sha256, cache=cache) / inner
    if not path.is_file():
        raise ImageStepError(f"fetch {package}", [], f"{reference}: the package has no file {inner}")
    return path
