"""The guest's root filesystem as a folder: debootstrap, apt and pip, with no mounts left behind.

Commands that must run inside the rootfs (apt, mkinitramfs) run through
``unshare --mount`` then ``chroot``: ``/dev``, ``/proc``, ``/sys`` and ``/run`` are
mounted in a private mount namespace that disappears with the command, so a failed or
interrupted step leaves no mount on the build host. No loop device, no device-mapper.

Cached steps store the folder as an uncompressed tarball with numeric owners (see
:mod:`tdxvm.image.cache`); unpacking one gives the same tree, mtimes included.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from tdxvm.image.ext4 import ImageStepError, run_step, tool

_CHROOT = (
    'set -e; r="$1"; shift; '
    'mount --rbind /dev "$r/dev"; mount -t proc proc "$r/proc"; mount -t sysfs sysfs "$r/sys"; '
    'mount -t tmpfs tmpfs "$r/run"; exec chroot "$r" /usr/bin/env -i "$@"'
)
_ENV = ("PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C", "DEBIAN_FRONTEND=noninteractive", "HOME=/root")
_NO_SERVICES = "#!/bin/sh\n# tdxvm image build: no service starts inside the build chroot\nexit 101\n"


def in_root(root: Path, script: str, *, step: str, env: Sequence[str] = ()) -> str:
    """Run ``script`` with /bin/sh inside ``root``; mounts live only as long as the command."""
    unshare = tool("unshare", step=step, package="util-linux")
    command = [unshare, "--mount", "--propagation", "private", "sh", "-c", _CHROOT, "tdxvm-chroot", str(root),
               *_ENV, *env, "/bin/sh", "-c", "set -e\n" + script]  # fmt: skip
    return run_step(step, command)


def debootstrap(root: Path, *, suite: str, mirror: str) -> None:
    """A minimal Debian (``--variant=minbase``) in ``root``. Further packages come from
    :func:`apt_install`: debootstrap's own resolver does not handle virtual packages."""
    exe = tool("debootstrap", step="debootstrap", package="debootstrap")
    run_step("debootstrap", [exe, "--variant=minbase", "--components=main", suite, str(root), mirror])


def apt_install(root: Path, *, packages: Sequence[str], suite: str | None = None, sources: Sequence[str] = ()) -> None:
    """``apt-get install --no-install-recommends`` inside ``root`` (from ``suite`` if given),
    with extra ``sources.list`` lines, and no service started in the chroot."""
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text(_NO_SERVICES)
    policy.chmod(0o755)
    if sources:
        (root / "etc/apt/sources.list.d/tdxvm.list").write_text("".join(f"{line}\n" for line in sources))
    target = f"-t {shlex.quote(suite)} " if suite else ""
    names = " ".join(shlex.quote(p) for p in packages)
    try:
        in_root(root, f"apt-get update -qq\napt-get install -y -qq --no-install-recommends {target}{names}\n"
                "apt-get clean", step="apt-get install")  # fmt: skip
    finally:
        policy.unlink(missing_ok=True)


def pip_install(root: Path, *, requirements: Sequence[str], index_url: str | None, find_links: Sequence[str]) -> Path:
    """Install Python packages into the guest's ``/usr/local/lib/pythonX.Y/dist-packages``
    with this host's pip. The guest's Python must be this one's version (Debian 12 both)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    if not (root / "usr/lib" / version).is_dir():
        raise ImageStepError("pip install", [], f"the guest has no {version} (the host's pip installs for {version})")
    target = root / "usr/local/lib" / version / "dist-packages"
    target.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile",
               "--target", str(target), *requirements]  # fmt: skip
    if index_url:
        command += ["--index-url", index_url]
    for link in find_links:
        command += ["--find-links", link]
    run_step("pip install", command)
    return target


def clean(root: Path) -> None:
    """Remove what must not ship or would differ between builds: apt lists and caches,
    logs, the machine id (systemd makes one at first boot), SSH host keys (made inside
    the TD at first boot, never at build time)."""
    for pattern in ("var/lib/apt/lists/*", "var/cache/apt/*.bin", "var/cache/debconf/*-old", "var/log/**/*",
                    "etc/ssh/ssh_host_*", "var/lib/dbus/machine-id", "etc/*-", "var/lib/dpkg/*-old",
                    "root/.cache", "tmp/*", "var/tmp/*", "debootstrap"):  # fmt: skip
        for p in sorted(root.glob(pattern), reverse=True):
            if p.is_dir() and not p.is_symlink():
                if pattern.startswith("var/log"):
                    continue
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
    (root / "etc/machine-id").write_text("")


def clamp_mtimes(root: Path, epoch: int) -> None:
    """Set every mtime later than ``epoch`` to ``epoch`` (SOURCE_DATE_EPOCH rules)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames, ""):
            p = os.path.join(dirpath, name) if name else dirpath
            st = os.lstat(p)
            if st.st_mtime > epoch:
                os.utime(p, (epoch, epoch), follow_symlinks=False)


def pack(root: Path, tarball: Path) -> None:
    exe = tool("tar", step="tar", package="tar")
    run_step("tar", [exe, "--numeric-owner", "--xattrs", "--acls", "-cf", str(tarball), "-C", str(root), "."])


def unpack(tarball: Path, root: Path) -> None:
    exe = tool("tar", step="tar", package="tar")
    root.mkdir(parents=True, exist_ok=True)
    run_step("tar", [exe, "--numeric-owner", "--xattrs", "--acls", "-xpf", str(tarball), "-C", str(root)])
