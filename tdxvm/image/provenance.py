"""Build provenance: what an image was built from, in its manifest (``provenance``).

Everything a rebuild needs besides the recipe and lock files themselves, and what a
reviewer asks first: the recipe's and the lock's SHA-256 and the lock's date, the tdxvm
version and a digest of the guest code it ships (overlay trees and guest modules), the
controller's public keys that went into the image, the debootstrap that unpacked the
base, the kernel and firmware packages with their versions, the verity root hash, and
the root filesystem's listing (``rootfs.list.gz`` beside the manifest; one line per
file, see :mod:`tdxvm.image.listing`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import tdxvm
from tdxvm.image import configure, listing, locking, manifest
from tdxvm.image.recipe import LoadedRecipe
from tdxvm.image.rootimage import Identity, RootImage

LISTING = "rootfs.list.gz"


def guest_code_sha256() -> str:
    """SHA-256 over every file tdxvm itself puts into an image: the overlay trees and the
    guest modules (path and bytes, in order). Two tdxvm checkouts with the same digest
    configure an image the same way."""
    h = hashlib.sha256()
    files: list[tuple[str, Path]] = []
    for tree in (configure.OVERLAY, *configure.PROFILE_OVERLAYS.values()):
        files += [(f"{tree.name}/{p.relative_to(tree).as_posix()}", p) for p in tree.rglob("*") if p.is_file()]
    files += [(rel, src) for src, rel in configure.guest_module_files()]
    for rel, path in sorted(files):
        data = path.read_bytes()
        h.update(f"{rel}\0{len(data)}\0".encode() + data)
    return h.hexdigest()


def record(loaded: LoadedRecipe, image: RootImage, *, identity: Identity, listing_file: Path) -> manifest.Provenance:
    """The manifest's ``provenance`` of a build of ``loaded`` whose listing is written to ``listing_file``."""
    lock = image.lock
    kernel = lock.package(f"linux-image-{image.boot_version}")
    firmware = lock.firmware if image.firmware_locked else None
    return manifest.Provenance(
        recipe_sha256=loaded.sha256,
        lock=manifest.LockRecord(
            path=str(image.lock_file), sha256=manifest.file_sha256(image.lock_file), taken_at=lock.taken_at_text()
        ),
        tdxvm=manifest.ToolRecord(version=tdxvm.__version__, guest_code_sha256=guest_code_sha256()),
        authorized_key=identity.authorized_key,
        debootstrap=locking.debootstrap_version(),
        kernel_package=manifest.Package(name=kernel.name, version=kernel.version, sha256=kernel.sha256)
        if kernel
        else None,
        firmware_package=(
            manifest.Package(name=firmware.package, version=firmware.version, sha256=firmware.sha256)
            if firmware
            else None
        ),
        verity_root_hash=image.verity_tree.root.root_hash,
        listing=manifest.ListingRecord(
            file=LISTING,
            sha256=manifest.file_sha256(listing_file),
            lines=len(image.listing),
            tree_sha256=listing.listing_sha256(image.listing),
        ),
    )
