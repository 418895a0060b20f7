"""The image supply chain, for real: the smoke image holds exactly its lock's packages,
its manifest says what it was built from, a clean rebuild gives the same kernel,
initramfs, root filesystem and measurements, and a rebuild that differs names the first
differing file. Needs root and the network to the Debian mirrors, like the build."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

import tdxvm
from tdxvm.image import debpins, listing, lockfile, luks, manifest, provenance, rootfs
from tdxvm.image.recipe import BASE_PACKAGES
from tdxvm.image.reproduce import ReproduceError, reproduce
from tdxvm.image.secrets import load
from tdxvm.secretstore import SecretStore
from tdxvm.sshkey import controller_key, public_line

from ..conftest import REPO, test_cache_root

SMOKE = REPO / "images" / "smoke.yaml"


def _dpkg_status(smoke_build, tmp_path: Path) -> dict[str, tuple[str, str]]:
    """Package → (version, architecture) from /var/lib/dpkg/status inside the built disk."""
    image = tmp_path / "rootfs.ext4"
    key = load(smoke_build.manifest["luks"]["uuid"], directory=smoke_build.secrets)
    with open(image, "wb") as f:
        for chunk in luks.decrypt_payload(smoke_build.folder / "disk.img", key):
            f.write(chunk)
    text = subprocess.run(
        ["debugfs", "-R", "cat /var/lib/dpkg/status", str(image)], capture_output=True, text=True, check=True
    ).stdout
    image.unlink()
    found = {}
    for record in debpins._records(text):
        if "installed" in record.get("Status", ""):
            found[record["Package"]] = (record["Version"], record["Architecture"])
    return found


def test_the_image_holds_exactly_the_locked_packages(smoke_build, tmp_path):
    lock = lockfile.load(lockfile.lock_path(SMOKE))
    assert _dpkg_status(smoke_build, tmp_path) == {p.name: (p.version, p.architecture) for p in lock.packages}


def test_the_manifest_records_what_the_image_was_built_from(smoke_build):
    m = smoke_build.manifest
    p = m["provenance"]
    lock_file = lockfile.lock_path(SMOKE)
    lock = lockfile.load(lock_file)
    assert p["recipe_sha256"] == manifest.file_sha256(SMOKE) == m["recipe"]["sha256"]
    assert p["lock"] == {
        "path": str(lock_file),
        "sha256": manifest.file_sha256(lock_file),
        "taken_at": lock.taken_at_text(),
    }
    assert m["epoch"] == lock.taken_at  # SOURCE_DATE_EPOCH is the lock's date
    assert p["tdxvm"] == {"version": tdxvm.__version__, "guest_code_sha256": provenance.guest_code_sha256()}
    assert p["authorized_key"] == public_line(controller_key(SecretStore(directory=smoke_build.secrets))).strip()
    kernel = lock.package(f"linux-image-{m['kernel_version']}")
    assert p["kernel_package"] == {"name": kernel.name, "version": kernel.version, "sha256": kernel.sha256}
    assert p["firmware_package"] == {
        "name": "ovmf-inteltdx",
        "version": lock.firmware.version,
        "sha256": lock.firmware.sha256,
    }
    assert p["verity_root_hash"] == m["verity"]["root_hash"]
    lines = listing.read_listing(smoke_build.folder / p["listing"]["file"])
    assert p["listing"]["sha256"] == manifest.file_sha256(smoke_build.folder / provenance.LISTING)
    assert (p["listing"]["lines"], p["listing"]["tree_sha256"]) == (len(lines), listing.listing_sha256(lines))
    assert any(line.startswith("/etc/hostname\t") for line in lines)


def test_a_clean_rebuild_gives_the_same_image_and_measurements(smoke_build):
    """Two clean builds of images/smoke.yaml: the session's and this one, from an empty step cache."""
    events = []
    report = reproduce(smoke_build.folder, progress=events.append)
    assert report.identical, report.to_dict()
    assert [i.name for i in report.items] == [
        "kernel (vmlinuz)",
        "initramfs (initrd.img)",
        "root filesystem (verity root hash)",
        "root filesystem (listing)",
        "kernel command line",
        "MRTD",
        "RTMR1",
        "RTMR2",
    ]
    assert ("rootfs", "done") in [(e.step, e.status) for e in events]  # rebuilt, not taken from a cache
    assert not list(smoke_build.folder.parent.glob(".*verify-*"))  # its work folder is gone


def _copy_build(smoke_build, tmp_path: Path) -> Path:
    folder = tmp_path / "smoke"
    folder.mkdir()
    for name in ("manifest.json", provenance.LISTING):
        shutil.copyfile(smoke_build.folder / name, folder / name)
    return folder


def test_a_rebuild_that_differs_names_the_first_differing_file(smoke_build, tmp_path):
    """An image whose root filesystem had another /etc/hostname than its recipe makes."""
    folder = _copy_build(smoke_build, tmp_path)
    lines = listing.read_listing(folder / provenance.LISTING)
    i = next(n for n, line in enumerate(lines) if line.startswith("/etc/hostname\t"))
    fields = lines[i].split("\t")
    fields[6] = "0" * 64
    lines[i] = "\t".join(fields)
    listing.write_listing(lines, folder / provenance.LISTING)
    m = json.loads((folder / "manifest.json").read_text())
    m["provenance"]["listing"]["tree_sha256"] = listing.listing_sha256(lines)
    m["verity"]["root_hash"] = "f" * 64
    (folder / "manifest.json").write_text(json.dumps(m))
    report = reproduce(folder, cache=test_cache_root() / "image")  # the session's cached packages: a fast rebuild
    assert not report.identical
    assert [i.name for i in report.items if not i.same] == [
        "root filesystem (verity root hash)",
        "root filesystem (listing)",
    ]
    assert report.first_difference is not None and "/etc/hostname" in report.first_difference
    assert report.to_dict()["verdict"] == "differs"


def test_a_rebuild_needs_the_same_recipe_lock_and_guest_code(smoke_build, tmp_path):
    folder = _copy_build(smoke_build, tmp_path)
    m = json.loads((folder / "manifest.json").read_text())
    for key, path, message in (("recipe_sha256", None, "recipe"), ("lock", "sha256", "lock")):
        changed = json.loads(json.dumps(m))
        if path:
            changed["provenance"][key][path] = "0" * 64
        else:
            changed["provenance"][key] = "0" * 64
        (folder / "manifest.json").write_text(json.dumps(changed))
        with pytest.raises(
            ReproduceError, match=rf"^{message} .* but the image was built from one with 0{{64}}: check out"
        ):
            reproduce(folder)
    changed = json.loads(json.dumps(m))
    changed["provenance"]["tdxvm"]["guest_code_sha256"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(changed))
    with pytest.raises(ReproduceError, match="ships other guest code"):
        reproduce(folder)
    del changed["provenance"]
    (folder / "manifest.json").write_text(json.dumps(changed))
    with pytest.raises(ReproduceError, match="records no provenance"):
        reproduce(folder)


def test_a_version_the_mirror_no_longer_has_is_a_clear_error(smoke_build, tmp_path):
    """The real archive, asked for a version it does not carry (what a stale lock does)."""
    entry = next((test_cache_root() / "image").glob("rootfs-*/rootfs.tar"))
    root = tmp_path / "root"
    rootfs.unpack(entry, root)
    lock = lockfile.load(lockfile.lock_path(SMOKE))
    busybox = lock.package("busybox")
    stale = replace(lock, packages=tuple(replace(p, version="1:0.1-1") if p is busybox else p for p in lock.packages))
    with pytest.raises(lockfile.LockError) as info:
        debpins.install_locked(root, stale, lock_file=Path("images/smoke.lock"), recipe_file=Path("images/smoke.yaml"))
    text = str(info.value)
    assert text.startswith("the mirror no longer has busybox 1:0.1-1, locked in images/smoke.lock (taken ")
    assert text.endswith("take a new lock, security updates included, with: tdxvm image lock images/smoke.yaml")
    shutil.rmtree(root)


def test_image_lock_takes_a_lock_from_the_archives(tmp_path):
    recipe = tmp_path / "smoke.yaml"
    shutil.copyfile(SMOKE, recipe)
    out = subprocess.run(
        [str(REPO / ".venv/bin/tdxvm"), "image", "lock", str(recipe), "-o", "json"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["wrote"] == str(tmp_path / "smoke.lock") and doc["changes"] == []  # no older lock there
    assert doc["sources"] == ["bookworm", "bookworm-updates", "bookworm-security", "bookworm-backports"]
    fresh = lockfile.load(tmp_path / "smoke.lock")
    committed = lockfile.load(lockfile.lock_path(SMOKE))
    assert fresh.inputs == committed.inputs and doc["packages"] == len(fresh.packages)
    # the archives move: versions may differ from the committed lock's, so only what holds for any day
    names = {p.name for p in fresh.packages}
    assert set(BASE_PACKAGES) <= names and any(n.startswith("linux-image-6.") for n in names)
    assert fresh.firmware is not None and fresh.taken_at > committed.taken_at


def test_package_scripts_in_the_chroot_never_touch_the_hosts_dev(smoke_build, tmp_path):
    """The chroot's /dev is its own: systemd-tmpfiles' static-nodes rule (run by package
    scripts) once gave the host's /dev/kvm to the guest's kvm gid, which is another group
    on the host, and libvirt then hung probing QEMU."""
    import os
    import uuid

    entry = next((test_cache_root() / "image").glob("rootfs-*/rootfs.tar"))
    root = tmp_path / "root"
    rootfs.unpack(entry, root)
    probe = f"tdxvm-probe-{uuid.uuid4().hex[:8]}"
    kvm = os.stat("/dev/kvm") if os.path.exists("/dev/kvm") else None
    out = rootfs.in_root(
        root,
        f"touch /dev/{probe}\nsystemd-tmpfiles --create --prefix /dev >/dev/null 2>&1 || true\nls /dev",
        step="probe",
    )
    assert probe in out.split() and not os.path.exists(f"/dev/{probe}")
    if kvm is not None:
        after = os.stat("/dev/kvm")
        assert (after.st_uid, after.st_gid, after.st_mode) == (kvm.st_uid, kvm.st_gid, kvm.st_mode)
    shutil.rmtree(root)
