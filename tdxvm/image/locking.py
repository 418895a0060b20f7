"""``tdxvm image lock``: take a recipe's lock (:mod:`tdxvm.image.lockfile`) from the archives.

The Debian packages are resolved in a throwaway root (:func:`tdxvm.image.debpins.resolve`:
debootstrap, security and stable updates, the recipe's packages, the kernel); the wheels
by pip's resolver without installing anything (``--dry-run --report``, wheels only);
the firmware package by downloading it once. Needs root (debootstrap, chroot) and the
network to the mirrors and the package index.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from tdxvm.image import debian, debpins, rootfs
from tdxvm.image.ext4 import ImageStepError, run_step, tool
from tdxvm.image.lockfile import Firmware, Lock, Wheel
from tdxvm.image.recipe import BASE_PACKAGES, LoadedRecipe, Python


def debootstrap_version() -> str:
    out = run_step(
        "dpkg-query", [tool("dpkg-query", step="dpkg-query", package="dpkg"), "-W", "-f=${Version}", "debootstrap"]
    )
    return out.strip()


def take(loaded: LoadedRecipe, *, progress: Callable[[str], None] = lambda _: None) -> Lock:
    """A fresh lock for ``loaded``: the newest versions the archives carry now."""
    r = loaded.recipe
    taken_at = int(time.time())
    with tempfile.TemporaryDirectory(prefix="tdxvm-lock-") as tmp:
        root = Path(tmp) / "root"
        progress(f"debootstrap {r.suite} from {r.mirror}")
        rootfs.debootstrap(root, suite=r.suite, mirror=r.mirror)
        progress("apt: security and stable updates, the recipe's packages, the kernel")
        packages = debpins.resolve(
            root,
            sources=r.apt_sources(),
            packages=sorted(set(BASE_PACKAGES) | set(r.packages)),
            kernel=r.kernel.package,
            kernel_suite=r.kernel_suite,
        )
        sources = tuple(debpins.inrelease(root, uri, suite) for uri, suite in r.apt_sources())
    wheels: tuple[Wheel, ...] = ()
    if r.python.requirements:
        progress(f"pip: resolving {len(r.python.requirements)} requirements to wheels")
        wheels = resolve_wheels(r.python)
    firmware = None
    if r.firmware and debian.is_reference(r.firmware):
        package, _ = debian.split_reference(r.firmware)
        progress(f"firmware: {package} from unstable")
        version, sha256 = debian.newest(package)
        firmware = Firmware(package=package, suite="unstable", version=version, sha256=sha256)
    return Lock(
        recipe=r.name,
        taken_at=taken_at,
        inputs=r.lock_inputs(),
        debootstrap=debootstrap_version(),
        sources=sources,
        packages=packages,
        wheels=wheels,
        firmware=firmware,
    )


def resolve_wheels(python: Python) -> tuple[Wheel, ...]:
    """The wheels pip would install for ``python.requirements`` (sdists refused), with hashes."""
    with tempfile.TemporaryDirectory(prefix="tdxvm-pip-lock-") as tmp:
        report = Path(tmp) / "report.json"
        command = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--only-binary=:all:",
            "--quiet",
            "--disable-pip-version-check",
            "--target",
            str(Path(tmp) / "target"),
            "--report",
            str(report),
            *python.requirements,
        ]
        if python.index_url:
            command += ["--index-url", python.index_url]
        for link in python.find_links:
            command += ["--find-links", link]
        run_step("pip lock", command)
        data = json.loads(report.read_text())
    wheels = []
    for item in data.get("install", []):
        info = item.get("download_info") or {}
        digest = ((info.get("archive_info") or {}).get("hashes") or {}).get("sha256")
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        file = urllib.parse.unquote(info.get("url", "").rsplit("/", 1)[-1])
        if not digest or not file.endswith(".whl"):
            raise ImageStepError(
                "pip lock", [], f"{name} {version}: pip gave no wheel with a SHA-256 ({info.get('url')})"
            )
        wheels.append(Wheel(name=name, version=version, sha256=digest, file=file))
    return tuple(sorted(wheels, key=lambda w: w.name.lower()))


def changes(old: Lock | None, new: Lock) -> list[str]:
    """What a new lock changes, one line per package: added, removed, new version."""
    if old is None:
        return []
    out = []
    for kind, before, after in (
        ("deb", {p.name: p.version for p in old.packages}, {p.name: p.version for p in new.packages}),
        ("wheel", {w.name: w.version for w in old.wheels}, {w.name: w.version for w in new.wheels}),
    ):
        for name in sorted(set(before) | set(after)):
            if name not in before:
                out.append(f"+ {kind} {name} {after[name]}")
            elif name not in after:
                out.append(f"- {kind} {name} {before[name]}")
            elif before[name] != after[name]:
                out.append(f"~ {kind} {name} {before[name]} -> {after[name]}")
    if old.firmware != new.firmware and new.firmware is not None:
        was = old.firmware.version if old.firmware else "none"
        out.append(f"~ firmware {new.firmware.package} {was} -> {new.firmware.version}")
    return out
