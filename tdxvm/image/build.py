"""``tdxvm image build``: recipe → encrypted disk image, kernel, initramfs and manifest.

Steps, each reported to ``progress`` with its time:

1. ``rootfs`` (cached): debootstrap minbase (Release signature checked), then apt
   installs exactly the recipe's lock (``images/<recipe>.lock``): every package at its
   locked version, every ``.deb`` with its locked SHA-256 (:mod:`tdxvm.image.debpins`).
   Cached as a tarball under the hash of the lock, the debootstrap version and the epoch.
   The kernel is known from here on: one whose EFI stub does not measure the command
   line and initrd into RTMR2 (Linux < 6.9, or a stub that cannot be recognised) is
   refused at once (:func:`tdxvm.image.measure.require_measuring_kernel`), before any
   later step; a measurement floor, with no opt-out.
2. ``python`` (cached, model-server recipes): pip installs the locked wheels, hashes
   required, into it.
3. ``configure``: the tdxvm overlay (agent, unlock and root steps, units), the recipe's
   files, the controller's SSH public key, the initramfs; then
   :func:`tdxvm.image.normalize.normalize` and timestamps clamped to the epoch (the
   lock's date unless the recipe sets one). The kernel that ships is checked again.
4. ``ext4``: the tree's listing (``rootfs.list.gz``), then ``mkfs.ext4 -d`` of the
   folder, reproducible (pinned UUID, hash seed, times).
5. ``verity``: the dm-verity hash tree appended to the ext4 image
   (:mod:`tdxvm.image.verity`); its root hash goes on the kernel command line, and the
   measurements are predicted with that command line, so unusable input fails before a
   disk key exists.
6. ``encrypt``: a fresh volume key into the secret store (``disk/<LUKS UUID>``), LUKS2
   header and payload (ext4 and hash tree) written offline on the file. The guest never
   reads that header: the controller releases the volume key itself, and the measured
   initramfs maps the payload with fixed parameters (:mod:`tdxvm.guest.rootdisk`).
7. ``measure``: artifact hashes, the verity tree, the predicted MRTD/RTMRs and the
   build's provenance (:mod:`tdxvm.image.provenance`) into ``manifest.json``.

Steps 1–5 are :func:`root_image`: what two builds from one recipe and lock give byte for
byte, and what ``tdxvm image verify`` (:mod:`tdxvm.image.reproduce`) redoes.

Everything is written in a work folder beside the output and moved into place at the
end: a failed or interrupted build leaves no half-written image in the output folder
(an older build there stays as it was), and no disk key of its own in the secret store.
SIGINT and SIGTERM unwind the same way (the CLI turns SIGTERM into an exit); a work
folder left by a build that was killed outright is removed by the next build of the same
output, once its process (``owner.pid`` in it) is gone.
The volume key exists only in memory and in the secret store; the tests scan every file
the build writes for it.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import tarfile
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tdxvm.image import (configure, debian, debpins, listing, lockfile, locking, luks, manifest, measure, normalize, provenance,
                         rootfs, verity)
from tdxvm.image import secrets as disk_secrets
from tdxvm.image.cache import FileDigest, StepCache, step_key
from tdxvm.image.ext4 import make_ext4
from tdxvm.image.lockfile import Lock
from tdxvm.image.recipe import LoadedRecipe, RecipeError
from tdxvm.secretstore import SecretStore
from tdxvm.releasekey import public_hex, release_key
from tdxvm.sshkey import controller_key, public_line

STEPS = ("rootfs", "python", "configure", "ext4", "verity", "encrypt", "measure")
_FS_UUID_NAMESPACE = uuidlib.UUID("0b4f5d0e-8f63-4c1a-9d59-2f7d3c8e61a4")
LUKS_HEADER_BYTES = luks.DATA_OFFSET
OWNER_FILE = "owner.pid"  # in a work folder: the building process (stale folders are removed)


@dataclass(frozen=True, slots=True)
class StepEvent:
    step: str
    status: str  # "start", "cached", "done", "skipped"
    seconds: float = 0.0
    detail: str = ""


Progress = Callable[[StepEvent], None]


def _quiet(_: StepEvent) -> None:
    pass


class _Timer:
    def __init__(self, progress: Progress, step: str) -> None:
        self.progress, self.step, self.start = progress, step, time.monotonic()
        progress(StepEvent(step, "start"))

    def done(self, status: str = "done", detail: str = "") -> float:
        seconds = time.monotonic() - self.start
        self.progress(StepEvent(self.step, status, seconds, detail))
        return seconds


def rootfs_inputs(lock: Lock, epoch: int) -> dict[str, Any]:
    """The rootfs step's cache key inputs: the locked packages (with their hashes), the
    debootstrap that unpacks the base system and the epoch the mtimes are clamped to."""
    return {"lock": lock.debian_digest(), "debootstrap": locking.debootstrap_version(), "epoch": epoch}


def python_inputs(lock: Lock, rootfs_key: str) -> dict[str, Any]:
    """The python step's cache key inputs: the rootfs, the locked wheels, and the Python
    and pip that install them (pip versions write different script bodies)."""
    import sys
    from importlib.metadata import version

    return {"rootfs": rootfs_key, "wheels": lock.wheels_digest(), "python": sys.version.split()[0], "pip": version("pip")}


def _rootfs_step(loaded: LoadedRecipe, lock: Lock, lock_file: Path, cache: StepCache, work: Path,
                 epoch: int) -> tuple[Path, FileDigest, str, bool]:  # fmt: skip
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
            normalize.remove_package_initramfs(tree)  # made without SOURCE_DATE_EPOCH; configure makes the one that ships
            normalize.normalize(tree, epoch=epoch)
            rootfs.clamp_mtimes(tree, epoch)
            rootfs.pack(tree, staging / "rootfs.tar")
            shutil.rmtree(tree)
        entry = cache.path("rootfs", key)
    return entry / "rootfs.tar", cache.digest(entry, "rootfs.tar"), key, hit


_BOOT_KERNEL = re.compile(r"^(\./)?boot/vmlinuz-[^/]+$")


def kernel_in_rootfs(tarball: Path) -> tuple[str, bytes] | None:
    """The rootfs tarball's ``/boot/vmlinuz-*`` (its name and bytes), read without
    unpacking the rest; None when there is not exactly one (the configure step says why)."""
    with tarfile.open(tarball, "r:") as tar:
        found = [m for m in tar if m.isfile() and _BOOT_KERNEL.match(m.name)]
        if len(found) != 1:
            return None
        f = tar.extractfile(found[0])
        assert f is not None  # a regular file
        return found[0].name.removeprefix("./"), f.read()


def check_kernel(kernel: bytes, *, source: str) -> None:
    """The build's measurement floor: refuse a kernel whose EFI stub does not measure the
    command line and initrd into RTMR2 (:class:`~tdxvm.image.measure.UnmeasuredKernelError`)."""
    measure.require_measuring_kernel(kernel, source=source)


def _python_step(loaded: LoadedRecipe, lock: Lock, cache: StepCache, work: Path, base_tar: Path, base_digest: FileDigest,
                 base_key: str, epoch: int) -> tuple[Path, FileDigest, bool]:  # fmt: skip
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


def filesystem_uuid(loaded: LoadedRecipe) -> str:
    """The ext4 UUID, pinned per recipe name (the image's fstab names /dev/mapper/root)."""
    return str(uuidlib.uuid5(_FS_UUID_NAMESPACE, loaded.recipe.name))


@dataclass(frozen=True, slots=True)
class Identity:
    """What of the controller goes into an image besides the recipe and the lock: the
    SSH public key that may log in and the release public key the guest trusts."""

    authorized_key: str  # an OpenSSH public key line
    release_public: str  # 64 hex digits


@dataclass
class RootImage:
    """The reproducible part of a build, in ``work``: the boot files (in ``staging``), the
    ext4 image with its verity tree appended, the command line that pins its root hash,
    the predicted measurements and the root filesystem's listing."""

    lock: Lock
    lock_file: Path
    epoch: int
    firmware_path: Path | None
    firmware_locked: bool  # the firmware is the lock's Debian package (not a path given to the build)
    staging: Path
    ext4_image: Path
    fs_uuid: str
    boot_version: str
    verity_tree: verity.VerityTree
    cmdline: str
    predicted: measure.Measurements
    listing: list[str]
    cached: list[str]


def root_image(loaded: LoadedRecipe, *, work: Path, cache: StepCache, identity: Callable[[], Identity], firmware: str | None = None,
               lock_file: Path | None = None, progress: Progress = _quiet,
               timings: dict[str, float] | None = None) -> RootImage:  # fmt: skip
    """Steps rootfs to verity: everything of an image that two builds from one recipe and
    lock must give byte for byte (``tdxvm image verify`` redoes exactly this).
    ``identity`` is asked for only at the configure step, so a build refused earlier
    makes no controller keys."""
    recipe = loaded.recipe
    timings = {} if timings is None else timings
    cached: list[str] = []
    lock_file = lock_file or lockfile.lock_path(loaded.path)
    lock = lockfile.load(lock_file)
    stale = lockfile.stale_inputs(lock, recipe.lock_inputs(), path=lock_file, recipe_path=loaded.path)
    if stale is not None:
        raise stale
    epoch = recipe.epoch if recipe.epoch is not None else lock.taken_at
    if epoch > time.time():  # files the build makes would keep their own times: not reproducible
        raise RecipeError(f"{loaded.path}: epoch: {epoch} is in the future; it must be no later than the build")
    firmware_ref = firmware or recipe.firmware
    firmware_path = _firmware(firmware_ref, lock)

    t = _Timer(progress, "rootfs")
    tar, digest, key, was_cached = _rootfs_step(loaded, lock, lock_file, cache, work, epoch)
    timings["rootfs"] = t.done("cached" if was_cached else "done")
    cached += ["rootfs"] if was_cached else []
    # An early look only (the shipped kernel is checked again); the tarball's digest is
    # checked as it is unpacked, before anything from it is used.
    found = kernel_in_rootfs(tar)
    if found is not None:  # refuse an unmeasuring kernel now, before the slow steps
        check_kernel(found[1], source=f"kernel /{found[0]} ({recipe.kernel.package} from {recipe.kernel_suite})")

    t = _Timer(progress, "python")
    if recipe.python.requirements:
        tar, digest, hit = _python_step(loaded, lock, cache, work, tar, digest, key, epoch)
        timings["python"] = t.done("cached" if hit else "done")
        cached += ["python"] if hit else []
    else:
        timings["python"] = t.done("skipped", "no Python requirements")

    t = _Timer(progress, "configure")
    tree = work / "rootfs"
    rootfs.unpack(tar, tree, sha256=digest.sha256)
    ident = identity()
    boot = configure.configure(tree, loaded, authorized_key=ident.authorized_key, release_public=ident.release_public,
                               epoch=epoch)  # fmt: skip
    normalize.normalize(tree, epoch=epoch)
    rootfs.clamp_mtimes(tree, epoch)
    staging = work / "out"
    staging.mkdir()
    shutil.copyfile(boot.kernel, staging / "vmlinuz")
    shutil.copyfile(boot.initrd, staging / "initrd.img")
    kernel = (staging / "vmlinuz").read_bytes()
    check_kernel(kernel, source=f"kernel {boot.version} ({recipe.kernel.package} from {recipe.kernel_suite})")
    timings["configure"] = t.done(detail=f"kernel {boot.version}")

    t = _Timer(progress, "ext4")
    ext4_image = work / "rootfs.ext4"
    fs_uuid = filesystem_uuid(loaded)
    lines = listing.tree_listing(tree)
    make_ext4(source=tree, output=ext4_image, size_bytes=recipe.disk_size, uuid=fs_uuid, epoch=epoch)
    shutil.rmtree(tree)
    timings["ext4"] = t.done(detail=f"{recipe.disk_size >> 20} MiB")

    t = _Timer(progress, "verity")
    verity_tree = verity.format_tree(ext4_image)
    cmdline = verity.pinned_cmdline(recipe.cmdline, verity_tree)
    predicted = measure.predict(firmware=firmware_path.read_bytes() if firmware_path else None, kernel=kernel,
                                initrd=(staging / "initrd.img").read_bytes(), cmdline=cmdline)  # fmt: skip
    timings["verity"] = t.done(detail=f"root hash {verity_tree.root.root_hash[:16]}…")
    return RootImage(lock=lock, lock_file=lock_file, epoch=epoch, firmware_path=firmware_path,
                     firmware_locked=bool(firmware_ref and debian.is_reference(firmware_ref)), staging=staging,
                     ext4_image=ext4_image, fs_uuid=fs_uuid, boot_version=boot.version, verity_tree=verity_tree,
                     cmdline=cmdline, predicted=predicted, listing=lines, cached=cached)  # fmt: skip


def build(
    loaded: LoadedRecipe,
    *,
    output: Path,
    cache: StepCache | None = None,
    secret_store: SecretStore | None = None,
    firmware: str | None = None,
    progress: Progress = _quiet,
    encryption_engine: str = "cryptsetup",
    lock_file: Path | None = None,
) -> dict[str, Any]:
    """Build ``loaded`` into ``output``; returns the manifest (also written there)."""
    recipe = loaded.recipe
    cache = cache or StepCache()
    store = secret_store or SecretStore()
    output = Path(output).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_work(output)
    work = output.with_name(f".{output.name}.work-{uuidlib.uuid4().hex[:8]}")
    work.mkdir(mode=0o700)
    (work / OWNER_FILE).write_text(f"{os.getpid()}\n")
    timings: dict[str, float] = {}
    stored_key: str | None = None  # the secret-store name of this build's disk key, once stored
    try:
        identity_once = functools.cache(lambda: _identity(store))  # made at configure, not before: a refused build makes no keys
        image = root_image(loaded, work=work, cache=cache, identity=identity_once, firmware=firmware, lock_file=lock_file,
                           progress=progress, timings=timings)  # fmt: skip
        staging, ext4_image = image.staging, image.ext4_image
        identity = identity_once()

        t = _Timer(progress, "encrypt")
        luks_uuid = str(uuidlib.uuid4())
        volume_key = disk_secrets.generate_volume_key()
        payload_bytes = ext4_image.stat().st_size
        header = luks.encrypt_image(payload=ext4_image, output=staging / "disk.img", volume_key=volume_key,
                                    passphrase=disk_secrets.keyslot_passphrase(volume_key), uuid=luks_uuid,
                                    engine=encryption_engine)  # fmt: skip
        enc_seconds = time.monotonic() - t.start
        ext4_image.unlink()
        disk_secrets.store(luks_uuid, volume_key, directory=store.directory)
        stored_key = f"{disk_secrets.KIND}/{luks_uuid}"
        del volume_key
        timings["encrypt"] = t.done(detail=f"{payload_bytes / enc_seconds / 1e6:.0f} MB/s")

        t = _Timer(progress, "measure")
        listing.write_listing(image.listing, staging / provenance.LISTING)
        firmware_path = image.firmware_path
        result = {
            "format": manifest.FORMAT,
            "name": recipe.name,
            "profile": recipe.profile,
            "recipe": {"path": str(loaded.path), "sha256": loaded.sha256},
            "built_at": int(time.time()),
            "epoch": image.epoch,
            "kernel_version": image.boot_version,
            "cmdline": image.cmdline,
            "artifacts": {name: manifest.artifact_entry(staging / name) for name in manifest.ARTIFACTS},
            "rootfs_uuid": image.fs_uuid,
            "verity": image.verity_tree.to_dict(),
            "luks": {"uuid": luks_uuid, "cipher": header.cipher, "key_secret": stored_key},
            "release_key": identity.release_public,
            "firmware": {"path": str(firmware_path), "sha256": manifest.file_sha256(firmware_path)} if firmware_path else None,
            "measurements": image.predicted.to_dict(),
            "guest_agent_port": recipe.agent_port,
            "ssh_port": 22,
            "service_port": recipe.service_port,
            "provenance": provenance.record(loaded, image, identity=identity, listing_file=staging / provenance.LISTING),
            "cache": {"hit": image.cached},
        }
        (staging / "manifest.json").write_text(manifest.dump(result))
        timings["measure"] = t.done()
        result["timings"] = timings
        _publish(staging, output)
        stored_key = None  # the image exists now: its key stays
        return result
    finally:
        if stored_key is not None:  # no image was published: its key would open nothing
            store.delete(stored_key)
        shutil.rmtree(work, ignore_errors=True)


def _identity(store: SecretStore) -> Identity:
    return Identity(authorized_key=public_line(controller_key(store)), release_public=public_hex(release_key(store)))


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
        raise lockfile.LockError(f"the lock has no firmware package {package} (take a new lock: tdxvm image lock RECIPE)")
    return debian.resolve(reference, version=lock.firmware.version, sha256=lock.firmware.sha256).resolve()


def _remove_stale_work(output: Path) -> None:
    """Work folders of earlier builds of ``output`` whose process is gone (killed before
    it could clean up): removed. A folder of a build still running is left alone."""
    for folder in output.parent.glob(f".{output.name}.work-*"):
        try:
            pid = int((folder / OWNER_FILE).read_text())
            os.kill(pid, 0)
            continue  # that build is still running
        except PermissionError:
            continue  # running, as another user
        except (OSError, ValueError):
            pass  # no owner file, or its process is gone
        shutil.rmtree(folder, ignore_errors=True)


def _publish(staging: Path, output: Path) -> None:
    """Move the finished build into ``output``, replacing an older build as a whole."""
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{uuidlib.uuid4().hex[:8]}")
        output.rename(old)
    staging.rename(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
