"""Steps 1–5 of an image build (:mod:`tdxvm.image.build`): recipe and lock → boot files,
an ext4 image with its dm-verity tree, the command line that pins its root hash and the
predicted measurements.

This is what two builds from one recipe and lock give byte for byte, and what ``tdxvm
image verify`` (:mod:`tdxvm.image.reproduce`) redoes: no key is made and nothing is
encrypted here. Each step is one function:

1. :func:`resolve_inputs`: the lock (refused when stale), the epoch, the firmware file.
2. :func:`_base_tarball`: the cached ``rootfs`` step (and ``python`` for recipes with
   requirements); the kernel it installs is checked against the measurement floor at
   once, before any slow step.
3. :func:`_configure_step`: the tree configured and normalized; the boot files staged,
   the kernel that ships checked again.
4. :func:`_ext4_step`: the tree's listing and its reproducible ext4 image, written
   straight into the disk file at the LUKS2 payload offset (:data:`~tdxvm.image.luks.DATA_OFFSET`;
   a hole before it, where the encrypt step puts the header), so the payload is never copied.
5. :func:`_verity_step`: the hash tree after it, the pinned command line, the measurements.
"""

from __future__ import annotations

import re
import shutil
import tarfile
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tdxvm.image import configure, debian, debpins, listing, lockfile, locking, measure, normalize, rootfs, verity
from tdxvm.image.cache import FileDigest, StepCache, step_key
from tdxvm.image.ext4 import make_ext4
from tdxvm.image.lockfile import Lock
from tdxvm.image.luks import DATA_OFFSET
from tdxvm.image.progress import Progress, Timer, quiet
from tdxvm.image.recipe import LoadedRecipe, RecipeError

_FS_UUID_NAMESPACE = uuidlib.UUID("0b4f5d0e-8f63-4c1a-9d59-2f7d3c8e61a4")
_BOOT_KERNEL = re.compile(r"^(\./)?boot/vmlinuz-[^/]+$")


@dataclass(frozen=True, slots=True)
class Identity:
    """What of the controller goes into an image besides the recipe and the lock: the
    SSH public key that may log in and the release public key the guest trusts."""

    authorized_key: str  # an OpenSSH public key line
    release_public: str  # 64 hex digits


@dataclass(frozen=True, slots=True)
class Inputs:
    """What a build reads besides the recipe: the lock, the epoch, the firmware."""

    lock: Lock
    lock_file: Path
    epoch: int  # SOURCE_DATE_EPOCH: every mtime is clamped to it
    firmware_path: Path | None
    firmware_locked: bool  # the firmware is the lock's Debian package (not a path given to the build)


@dataclass
class RootImage:
    """The reproducible part of a build, in ``work``: the boot files (in ``staging``), the
    disk file (``disk_image``: the ext4 image at DATA_OFFSET with its verity tree after
    it, to be encrypted in place), the command line that pins its root hash, the
    predicted measurements and the root filesystem's listing."""

    lock: Lock
    lock_file: Path
    epoch: int
    firmware_path: Path | None
    firmware_locked: bool
    staging: Path
    disk_image: Path
    fs_uuid: str
    boot_version: str
    verity_tree: verity.VerityTree
    cmdline: str
    predicted: measure.Measurements
    listing: list[str]
    cached: list[str]


def root_image(
    loaded: LoadedRecipe,
    *,
    work: Path,
    cache: StepCache,
    identity: Callable[[], Identity],
    firmware: str | None = None,
    lock_file: Path | None = None,
    progress: Progress = quiet,
    timings: dict[str, float] | None = None,
) -> RootImage:
    """Steps rootfs to verity: everything of an image that two builds from one recipe and
    lock must give byte for byte (``tdxvm image verify`` redoes exactly this).
    ``identity`` is asked for only at the configure step, so a build refused earlier
    makes no controller keys."""
    run = _Run(loaded, work, cache, progress, {} if timings is None else timings)
    inputs = resolve_inputs(loaded, firmware=firmware, lock_file=lock_file)
    tar, digest = _base_tarball(run, inputs)
    configured = _configure_step(run, inputs, tar, digest, identity)
    disk_image, fs_uuid, lines = _ext4_step(run, inputs, configured.tree)
    verity_tree, cmdline, predicted = _verity_step(run, inputs, configured, disk_image)
    return RootImage(
        lock=inputs.lock,
        lock_file=inputs.lock_file,
        epoch=inputs.epoch,
        firmware_path=inputs.firmware_path,
        firmware_locked=inputs.firmware_locked,
        staging=configured.staging,
        disk_image=disk_image,
        fs_uuid=fs_uuid,
        boot_version=configured.version,
        verity_tree=verity_tree,
        cmdline=cmdline,
        predicted=predicted,
        listing=lines,
        cached=run.cached,
    )


@dataclass
class _Run:
    """One run of :func:`root_image`: where it works and what it reports."""

    loaded: LoadedRecipe
    work: Path
    cache: StepCache
    progress: Progress
    timings: dict[str, float]
    cached: list[str] = field(default_factory=list)

    def start(self, step: str) -> Timer:
        return Timer(self.progress, step)

    def done(self, timer: Timer, status: str = "done", detail: str = "") -> None:
        self.timings[timer.step] = timer.done(status, detail)
        if status == "cached":
            self.cached.append(timer.step)


def resolve_inputs(loaded: LoadedRecipe, *, firmware: str | None = None, lock_file: Path | None = None) -> Inputs:
    """The recipe's lock (refused when it was taken for other inputs), the epoch (the
    recipe's, else the lock's date; never in the future) and the firmware file."""
    recipe = loaded.recipe
    lock_file = lock_file or lockfile.lock_path(loaded.path)
    lock = lockfile.load(lock_file)
    stale = lockfile.stale_inputs(lock, recipe.lock_inputs(), path=lock_file, recipe_path=loaded.path)
    if stale is not None:
        raise stale
    taken = [(s.uri, s.suite) for s in lock.sources]
    if taken != recipe.apt_sources():  # apt installs from the lock's sources: they must be the recipe's
        shown = ", ".join(f"{uri} {suite}" for uri, suite in taken)
        raise lockfile.LockError(
            f"{lock_file} lists other apt sources ({shown}) than {loaded.path} asks for: take a new lock with: "
            f"tdxvm image lock {loaded.path}"
        )
    if lock.taken_at < 0:
        raise lockfile.LockError(f"{lock_file}: taken_at is before 1970")
    epoch = recipe.epoch if recipe.epoch is not None else lock.taken_at
    if epoch > time.time():  # files the build makes would keep their own times: not reproducible
        raise RecipeError(f"{loaded.path}: epoch: {epoch} is in the future; it must be no later than the build")
    reference = firmware or recipe.firmware
    return Inputs(
        lock=lock,
        lock_file=lock_file,
        epoch=epoch,
        firmware_path=_firmware(reference, lock),
        firmware_locked=bool(reference and debian.is_reference(reference)),
    )


def _firmware(reference: str | None, lock: Lock) -> Path | None:
    """The firmware file: a path, or a file of the locked Debian package (its ``.deb``
    checked against the lock's SHA-256)."""
    if not reference:
        return None
    if not debian.is_reference(reference):
        path = Path(reference).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"firmware {path} does not exist")
        return path
    package, _ = debian.split_reference(reference)
    if lock.firmware is None or lock.firmware.package != package:
        raise lockfile.LockError(
            f"the lock has no firmware package {package} (take a new lock: tdxvm image lock RECIPE)"
        )
    return debian.resolve(reference, version=lock.firmware.version, sha256=lock.firmware.sha256).resolve()


def rootfs_inputs(lock: Lock, epoch: int) -> dict[str, Any]:
    """The rootfs step's cache key inputs: the locked packages (with their hashes), the
    debootstrap that unpacks the base system and the epoch the mtimes are clamped to."""
    return {"lock": lock.debian_digest(), "debootstrap": locking.debootstrap_version(), "epoch": epoch}


def python_inputs(lock: Lock, rootfs_key: str) -> dict[str, Any]:
    """The python step's cache key inputs: the rootfs, the locked wheels, the Python and
    pip that install them (pip versions write different script bodies), and how the
    modules are byte-compiled (:func:`tdxvm.image.rootfs.compile_python`)."""
    import sys
    from importlib.metadata import version

    from tdxvm.image.rootfs import BYTECODE

    return {
        "rootfs": rootfs_key,
        "wheels": lock.wheels_digest(),
        "python": sys.version.split()[0],
        "pip": version("pip"),
        "bytecode": BYTECODE,
    }


def _base_tarball(run: _Run, inputs: Inputs) -> tuple[Path, FileDigest]:
    """Steps rootfs and python: the cached tarball the image starts from and its digest
    (checked as it is unpacked, before anything from it is used)."""
    recipe = run.loaded.recipe
    t = run.start("rootfs")
    tar, digest, key, hit = _rootfs_step(run.loaded, inputs.lock, inputs.lock_file, run.cache, run.work, inputs.epoch)
    run.done(t, "cached" if hit else "done")
    # An early look only (the shipped kernel is checked again).
    found = kernel_in_rootfs(tar)
    if found is not None:  # refuse an unmeasuring kernel now, before the slow steps
        check_kernel(found[1], source=f"kernel /{found[0]} ({recipe.kernel.package} from {recipe.kernel_suite})")

    t = run.start("python")
    if recipe.python.requirements:
        tar, digest, hit = _python_step(run.loaded, inputs.lock, run.cache, run.work, tar, digest, key, inputs.epoch)
        run.done(t, "cached" if hit else "done")
    else:
        run.done(t, "skipped", "no Python requirements")
    return tar, digest


def _rootfs_step(
    loaded: LoadedRecipe, lock: Lock, lock_file: Path, cache: StepCache, work: Path, epoch: int
) -> tuple[Path, FileDigest, str, bool]:
    """The cached rootfs tarball (built if missing), its recorded digest, its key and
    whether it was cached."""
    r = loaded.recipe
    inputs = rootfs_inputs(lock, epoch)
    key = step_key("rootfs", inputs)
    entry = cache.get("rootfs", key)
    hit = entry is not None
    if entry is None:
        with cache.put("rootfs", key, inputs) as staging:
            tree = work / "debootstrap"
            rootfs.debootstrap(tree, suite=r.suite, mirror=r.mirror)
            debpins.install_locked(tree, lock, lock_file=lock_file, recipe_file=loaded.path)
            rootfs.clean(tree)  # no SSH host keys or logs even in the cache
            normalize.remove_package_initramfs(
                tree
            )  # made without SOURCE_DATE_EPOCH; configure makes the one that ships
            normalize.normalize(tree, epoch=epoch)
            rootfs.clamp_mtimes(tree, epoch)
            rootfs.pack(tree, staging / "rootfs.tar")
            shutil.rmtree(tree)
        entry = cache.path("rootfs", key)
    return entry / "rootfs.tar", cache.digest(entry, "rootfs.tar"), key, hit


def _python_step(
    loaded: LoadedRecipe,
    lock: Lock,
    cache: StepCache,
    work: Path,
    base_tar: Path,
    base_digest: FileDigest,
    base_key: str,
    epoch: int,
) -> tuple[Path, FileDigest, bool]:
    p = loaded.recipe.python
    inputs = python_inputs(lock, base_key)
    key = step_key("python", inputs)
    entry = cache.get("python", key)
    if entry is not None:
        return entry / "rootfs.tar", cache.digest(entry, "rootfs.tar"), True
    with cache.put("python", key, inputs) as staging:
        tree = work / "python"
        rootfs.unpack(base_tar, tree, sha256=base_digest.sha256)
        rootfs.pip_install(tree, wheels=lock.wheels, index_url=p.index_url, find_links=p.find_links)
        normalize.normalize(tree, epoch=epoch)
        rootfs.clamp_mtimes(tree, epoch)
        rootfs.pack(tree, staging / "rootfs.tar")
        shutil.rmtree(tree)
    entry = cache.path("python", key)
    return entry / "rootfs.tar", cache.digest(entry, "rootfs.tar"), False


def kernel_in_rootfs(tarball: Path) -> tuple[str, bytes] | None:
    """The rootfs tarball's ``/boot/vmlinuz-*`` (its name and bytes), read without
    unpacking the rest; None when there is not exactly one (the configure step says why)."""
    with tarfile.open(tarball, "r:") as tar:
        found = [m for m in tar if m.isfile() and _BOOT_KERNEL.fullmatch(m.name)]
        if len(found) != 1:
            return None
        f = tar.extractfile(found[0])
        assert f is not None  # a regular file
        return found[0].name.removeprefix("./"), f.read()


def check_kernel(kernel: bytes, *, source: str) -> None:
    """The build's measurement floor: refuse a kernel whose EFI stub does not measure the
    command line and initrd into RTMR2 (:class:`~tdxvm.image.measure.UnmeasuredKernelError`)."""
    measure.require_measuring_kernel(kernel, source=source)


@dataclass(frozen=True, slots=True)
class _Configured:
    tree: Path  # the configured root tree
    staging: Path  # vmlinuz and initrd.img, to ship
    version: str  # the kernel's
    kernel: bytes


def _configure_step(
    run: _Run, inputs: Inputs, tar: Path, digest: FileDigest, identity: Callable[[], Identity]
) -> _Configured:
    recipe = run.loaded.recipe
    t = run.start("configure")
    tree = run.work / "rootfs"
    rootfs.unpack(tar, tree, sha256=digest.sha256)
    ident = identity()
    boot = configure.configure(
        tree, run.loaded, authorized_key=ident.authorized_key, release_public=ident.release_public, epoch=inputs.epoch
    )
    normalize.normalize(tree, epoch=inputs.epoch)
    rootfs.clamp_mtimes(tree, inputs.epoch)
    staging = run.work / "out"
    staging.mkdir()
    shutil.copyfile(boot.kernel, staging / "vmlinuz")
    shutil.copyfile(boot.initrd, staging / "initrd.img")
    kernel = (staging / "vmlinuz").read_bytes()
    check_kernel(kernel, source=f"kernel {boot.version} ({recipe.kernel.package} from {recipe.kernel_suite})")
    run.done(t, detail=f"kernel {boot.version}")
    return _Configured(tree=tree, staging=staging, version=boot.version, kernel=kernel)


def filesystem_uuid(loaded: LoadedRecipe) -> str:
    """The ext4 UUID, pinned per recipe name (the image's fstab names /dev/mapper/root)."""
    return str(uuidlib.uuid5(_FS_UUID_NAMESPACE, loaded.recipe.name))


def _ext4_step(run: _Run, inputs: Inputs, tree: Path) -> tuple[Path, str, list[str]]:
    """The tree's listing, then its ext4 image at DATA_OFFSET of the disk file (the tree
    is removed)."""
    recipe = run.loaded.recipe
    t = run.start("ext4")
    disk_image = run.work / "disk.img"
    fs_uuid = filesystem_uuid(run.loaded)
    lines = listing.tree_listing(tree)
    make_ext4(
        source=tree,
        output=disk_image,
        size_bytes=recipe.disk_size,
        uuid=fs_uuid,
        epoch=inputs.epoch,
        offset=DATA_OFFSET,
    )
    shutil.rmtree(tree)
    run.done(t, detail=f"{recipe.disk_size >> 20} MiB")
    return disk_image, fs_uuid, lines


def _verity_step(
    run: _Run, inputs: Inputs, configured: _Configured, disk_image: Path
) -> tuple[verity.VerityTree, str, measure.Measurements]:
    """The hash tree of the ext4 image in ``disk_image``, appended to it; the command line
    that pins its root hash, and the measurements predicted with that command line."""
    t = run.start("verity")
    verity_tree = verity.format_tree(disk_image, offset=DATA_OFFSET)
    cmdline = verity.pinned_cmdline(run.loaded.recipe.cmdline, verity_tree)
    firmware = inputs.firmware_path.read_bytes() if inputs.firmware_path else None
    predicted = measure.predict(
        firmware=firmware,
        kernel=configured.kernel,
        initrd=(configured.staging / "initrd.img").read_bytes(),
        cmdline=cmdline,
    )
    run.done(t, detail=f"root hash {verity_tree.root.root_hash[:16]}…")
    return verity_tree, cmdline, predicted
