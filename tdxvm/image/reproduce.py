"""``tdxvm image verify``: rebuild an image from its recipe and lock, compare bit for bit.

The rebuild redoes every step up to the verity tree (:func:`tdxvm.image.rootimage.root_image`)
in a clean step cache, with the controller keys the manifest records, and compares what
a relying party's measurements depend on: the kernel, the initramfs, the root
filesystem (its verity root hash, and the listing of every file), the command line and
the predicted MRTD, RTMR1 and RTMR2. When the root filesystem differs, the listings
name the first file that does. Nothing is encrypted and no key is made: the rebuild
never becomes an image. The rebuild works in a folder beside the image's
(``.<image>.verify-*``): removed when it ends, and by the next verify of that image when
the rebuild was killed outright.

A rebuild is only meaningful from the same inputs: the recipe and lock files must have
the SHA-256 the manifest records, and this tdxvm must ship the same guest code.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tdxvm.errors import TdxvmError
from tdxvm.fileio import partial_folder
from tdxvm.image import listing, lockfile, manifest, provenance
from tdxvm.image.cache import StepCache
from tdxvm.image.progress import Progress, quiet
from tdxvm.image.recipe import load_recipe
from tdxvm.image.rootimage import Identity, root_image

COMPARED_REGISTERS = ("mrtd", "rtmr1", "rtmr2")


class ReproduceError(TdxvmError):
    code = "reproduce"


@dataclass
class Item:
    name: str
    built: str | None
    rebuilt: str | None

    @property
    def same(self) -> bool:
        return self.built == self.rebuilt


@dataclass
class Report:
    manifest: Path
    items: list[Item] = field(default_factory=list)
    first_difference: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def identical(self) -> bool:
        return all(i.same for i in self.items)

    def to_dict(self) -> dict[str, Any]:
        return {
            "manifest": str(self.manifest),
            "verdict": "reproduced" if self.identical else "differs",
            "items": [{"name": i.name, "built": i.built, "rebuilt": i.rebuilt, "same": i.same} for i in self.items],
            "first_difference": self.first_difference,
            "timings": self.timings,
        }


@dataclass(frozen=True, slots=True)
class _Built:
    """What ``tdxvm image verify`` reads of a manifest: every field a build writes."""

    image: manifest.ImageManifest
    provenance: manifest.Provenance
    verity: manifest.Verity
    release_key: str


def _read_manifest(path: Path) -> _Built:
    try:
        m = manifest.read(path)
    except manifest.ImageManifestError as exc:
        raise ReproduceError(str(exc)) from None
    if m.provenance is None:
        raise ReproduceError(
            f"image manifest {m.path} records no provenance (it was built by an older tdxvm): build it "
            "again to verify it"
        )
    if m.verity is None or m.release_key is None:
        missing = "verity" if m.verity is None else "release_key"
        raise ReproduceError(f"image manifest {m.path} records no {missing}: it was not written by tdxvm image build")
    return _Built(image=m, provenance=m.provenance, verity=m.verity, release_key=m.release_key)


def _same_input(what: str, path: Path, want: str) -> None:
    try:
        got = manifest.file_sha256(path)
    except OSError as exc:
        raise ReproduceError(f"{what} {path}: cannot read it: {exc.strerror or exc}") from None
    if got != want:
        raise ReproduceError(
            f"{what} {path} has SHA-256 {got}, but the image was built from one with {want}: check out "
            "the version that built it"
        )


def reproduce(
    path: Path, *, recipe: Path | None = None, cache: Path | None = None, progress: Progress = quiet
) -> Report:
    """Rebuild the image whose manifest is ``path`` and compare; see the module docstring."""
    built = _read_manifest(Path(path))
    m, prov = built.image, built.provenance
    recipe_path = Path(recipe or (m.recipe.path if m.recipe else ""))
    if not recipe_path.is_file():
        raise ReproduceError(
            f"the recipe {recipe_path} the image was built from does not exist here: give it with --recipe"
        )
    _same_input("recipe", recipe_path, prov.recipe_sha256)
    lock_file = lockfile.lock_path(recipe_path)
    _same_input("lock", lock_file, prov.lock.sha256)
    guest = provenance.guest_code_sha256()
    if guest != prov.tdxvm.guest_code_sha256:
        raise ReproduceError(
            f"this tdxvm ({prov.tdxvm.version} built the image) ships other guest code: its digest is "
            f"{guest}, the image's {prov.tdxvm.guest_code_sha256}; run the tdxvm that built it"
        )
    firmware = None
    if m.firmware is not None and prov.firmware_package is None:  # a firmware file given to the build, not the lock's
        firmware = m.firmware.path
        _same_input("firmware", Path(firmware), m.firmware.sha256)
    identity = Identity(authorized_key=prov.authorized_key, release_public=built.release_key)
    loaded = load_recipe(recipe_path)
    folder = m.folder
    report = Report(manifest=m.path)
    with _verify_folder(folder) as work:
        start = time.monotonic()
        step_cache = StepCache(cache) if cache is not None else StepCache(work / "cache")
        image = root_image(
            loaded,
            work=work,
            cache=step_cache,
            identity=lambda: identity,
            firmware=firmware,
            lock_file=lock_file,
            progress=progress,
            timings=report.timings,
        )
        report.timings["total"] = time.monotonic() - start
        report.items += [
            Item("kernel (vmlinuz)", m.artifacts.vmlinuz.sha256, manifest.file_sha256(image.staging / "vmlinuz")),
            Item(
                "initramfs (initrd.img)", m.artifacts.initrd.sha256, manifest.file_sha256(image.staging / "initrd.img")
            ),
            Item("root filesystem (verity root hash)", built.verity.root_hash, image.verity_tree.root.root_hash),
            Item("root filesystem (listing)", prov.listing.tree_sha256, listing.listing_sha256(image.listing)),
            Item("kernel command line", m.cmdline, image.cmdline),
        ]
        report.items += [
            Item(reg.upper(), m.measurements.value(reg), image.predicted.value(reg)) for reg in COMPARED_REGISTERS
        ]
        if not report.identical:
            report.first_difference = _first_difference(folder / prov.listing.file, image.listing, report)
    return report


def _verify_folder(image: Path) -> AbstractContextManager[Path]:
    """The rebuild's work folder beside the image folder ``image``:
    ``.<image>.verify-<pid>-<8 hex>``, 0700, locked while the rebuild runs and removed
    after it (:func:`tdxvm.fileio.partial_folder`). Those of verifies that were killed
    are removed first; one with something still mounted in it (a killed debootstrap's
    ``/proc``) stays, with a warning."""
    return partial_folder(image.parent, f".{image.name}.verify-")


def _first_difference(original: Path, rebuilt: list[str], report: Report) -> str:
    try:
        built = listing.read_listing(original)
    except (OSError, ValueError) as exc:
        return f"the image's listing {original} cannot be read ({exc}); differing: " + ", ".join(
            i.name for i in report.items if not i.same
        )
    found = listing.first_difference(built, rebuilt, labels=("the image", "the rebuild"))
    if found is not None:
        return found
    # Same files: the difference is outside the root filesystem's contents.
    return "every root filesystem file is the same; differing: " + ", ".join(i.name for i in report.items if not i.same)
