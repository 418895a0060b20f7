"""The root filesystem's Debian packages: resolved once into a lock, then installed exactly.

Both paths start the same way: debootstrap (Release signature checked against Debian's
archive keyring), then apt with every suite of the recipe (the release, its ``-updates``
and ``-security`` suites, the kernel's suite); apt checks every index against its
``InRelease`` signature.

* :func:`resolve` (``tdxvm image lock``) upgrades what debootstrap installed (security
  fixes), installs the recipe's packages and kernel, and reads back what is installed,
  with each version's ``.deb`` SHA-256, size and pool path from the signed indexes.
* :func:`install_locked` (``tdxvm image build``) asks apt for every locked
  ``name=version`` at once, then requires the installed set to be exactly the lock's
  (no package more or less, no other version) and every ``.deb`` that went in to have the
  lock's SHA-256. A version the mirror no longer carries is a clear error that says to
  take a new lock.

No service starts in the chroot (``policy-rc.d`` answers 101 while apt runs).
"""

from __future__ import annotations

import hashlib
import re
import shlex
from collections.abc import Sequence
from pathlib import Path

from tdxvm.image.ext4 import ImageStepError
from tdxvm.image.lockfile import DebPackage, Lock, LockError, Source
from tdxvm.image.manifest import file_sha256
from tdxvm.image.rootfs import in_root

ARCHIVES = "var/cache/apt/archives"
_NO_SERVICES = "#!/bin/sh\n# tdxvm image build: no service starts inside the build chroot\nexit 101\n"
_QUERY = r"${Package}\t${Version}\t${Architecture}\n"
_APT = "apt-get -y -qq -o Dpkg::Use-Pty=0 --no-install-recommends"
_MISSING_VERSION = re.compile(r"Version '([^']+)' for '([^']+)' was not found")


def sources_list(sources: Sequence[tuple[str, str]]) -> str:
    return "".join(f"deb {uri} {suite} main\n" for uri, suite in sources)


def _apt(root: Path, sources: Sequence[tuple[str, str]], script: str, *, step: str) -> str:
    """Run ``script`` in the chroot with ``sources`` as its only apt sources."""
    (root / "etc/apt/sources.list").write_text(sources_list(sources))
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text(_NO_SERVICES)
    policy.chmod(0o755)
    try:
        return in_root(root, "apt-get update -qq\n" + script, step=step)
    finally:
        policy.unlink(missing_ok=True)


def installed(root: Path) -> dict[str, tuple[str, str]]:
    """name → (version, architecture) of every package dpkg has installed in ``root``."""
    out = in_root(root, f"dpkg-query -W -f='{_QUERY}'", step="dpkg-query")
    found: dict[str, tuple[str, str]] = {}
    for line in out.splitlines():
        name, version, arch = line.split("\t")
        found[name] = (version, arch)
    return found


def _records(text: str) -> list[dict[str, str]]:
    """Deb822 paragraphs (``apt-cache show``) as dicts; continuation lines are dropped."""
    out: list[dict[str, str]] = []
    for block in re.split(r"\n\s*\n", text.strip()):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line[:1] in (" ", "\t") or ":" not in line:
                continue
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        if fields:
            out.append(fields)
    return out


def resolve(
    root: Path, *, sources: Sequence[tuple[str, str]], packages: Sequence[str], kernel: str, kernel_suite: str
) -> tuple[DebPackage, ...]:
    """Install the newest packages into a debootstrapped ``root`` and describe them as locked."""
    names = " ".join(shlex.quote(p) for p in packages)
    _apt(
        root,
        sources,
        f"{_APT} dist-upgrade\n{_APT} install {names}\n{_APT} install -t {shlex.quote(kernel_suite)} "
        f"{shlex.quote(kernel)}",
        step="apt-get install",
    )
    now = installed(root)
    pins = " ".join(shlex.quote(f"{n}={v}") for n, (v, _) in sorted(now.items()))
    shown = _records(in_root(root, f"apt-cache show --no-all-versions {pins}", step="apt-cache show"))
    index = {(r.get("Package"), r.get("Version"), r.get("Architecture")): r for r in shown}
    locked = []
    for name, (version, arch) in sorted(now.items()):
        record = index.get((name, version, arch))
        if record is None or not record.get("SHA256"):
            raise ImageStepError("lock", [], f"{name} {version} ({arch}) is installed but no archive index lists it")
        package = DebPackage(
            name=name,
            version=version,
            architecture=arch,
            sha256=record["SHA256"],
            size=int(record["Size"]),
            filename=record["Filename"],
        )
        deb = root / ARCHIVES / package.deb_name
        if deb.is_file() and file_sha256(deb) != package.sha256:
            raise ImageStepError(
                "lock", [], f"{deb}: its SHA-256 is not the one the signed index lists for {name} {version}"
            )
        locked.append(package)
    _clean_archives(root)
    return tuple(locked)


def inrelease(root: Path, uri: str, suite: str) -> Source:
    """The ``InRelease`` apt verified for ``suite`` at ``uri``: its SHA-256 and Date."""
    name = re.sub(r"^[a-z]+://", "", uri).rstrip("/").replace("/", "_") + f"_dists_{suite}_InRelease"
    path = root / "var/lib/apt/lists" / name
    if not path.is_file():
        raise ImageStepError("lock", [], f"apt has no InRelease for {uri} {suite} (expected {path})")
    data = path.read_bytes()
    date = next(
        (
            line.split(":", 1)[1].strip()
            for line in data.decode(errors="replace").splitlines()
            if line.startswith("Date:")
        ),
        "",
    )
    return Source(uri=uri, suite=suite, inrelease_sha256=hashlib.sha256(data).hexdigest(), date=date or "unknown")


def install_locked(root: Path, lock: Lock, *, lock_file: Path, recipe_file: Path) -> None:
    """Install exactly ``lock.packages`` into a debootstrapped ``root`` and prove it."""
    sources = [(s.uri, s.suite) for s in lock.sources]
    pins = " ".join(shlex.quote(p.pin) for p in lock.packages)
    try:
        _apt(root, sources, f"{_APT} --allow-downgrades install {pins}", step="apt-get install")
    except ImageStepError as exc:
        missing = _MISSING_VERSION.findall(exc.stderr)
        if missing:
            listed = ", ".join(f"{name} {version}" for version, name in missing)
            raise LockError(
                f"the mirror no longer has {listed}, locked in {lock_file} (taken {lock.taken_at_text()}): take a "
                f"new lock, security updates included, with: tdxvm image lock {recipe_file}"
            ) from None
        raise
    check_installed(root, lock, lock_file=lock_file, recipe_file=recipe_file)
    _clean_archives(root)


def check_installed(root: Path, lock: Lock, *, lock_file: Path, recipe_file: Path) -> None:
    """The installed packages are exactly the lock's, and every ``.deb`` has its SHA-256."""
    now = installed(root)
    want = {p.name: p for p in lock.packages}
    extra = sorted(set(now) - set(want))
    if extra:
        raise LockError(
            f"the mirror's base system now installs {', '.join(extra)}, which {lock_file} does not list: take a "
            f"new lock with: tdxvm image lock {recipe_file}"
        )
    for name, package in sorted(want.items()):
        got = now.get(name)
        if got != (package.version, package.architecture):
            found = f"{got[0]} ({got[1]})" if got else "nothing"
            raise LockError(
                f"{name}: {lock_file} locks {package.version} ({package.architecture}) but apt installed {found}"
            )
        deb = root / ARCHIVES / package.deb_name
        if not deb.is_file():
            raise LockError(
                f"{name} {package.version}: its .deb is not in {ARCHIVES} of the build tree, so its SHA-256 "
                "cannot be checked against the lock"
            )
        digest = file_sha256(deb)
        if digest != package.sha256:
            raise LockError(
                f"{name} {package.version}: the .deb the mirror served has SHA-256 {digest}, not {package.sha256} "
                f"as locked in {lock_file}"
            )


def _clean_archives(root: Path) -> None:
    for deb in (root / ARCHIVES).glob("*.deb"):
        deb.unlink()
