"""``tdxvm image build``: recipe → encrypted disk image, kernel, initramfs and manifest.

Steps, each reported to ``progress`` with its time:

1. ``rootfs`` (cached): debootstrap minbase, then apt installs the base packages, the
   recipe's packages and the kernel. Cached as a tarball under the hash of its inputs.
   The kernel is known from here on: one whose EFI stub does not measure the command
   line and initrd into RTMR2 (Linux < 6.9, or a stub that cannot be recognised) is
   refused at once (:func:`tdxvm.image.measure.require_measuring_kernel`), before any
   later step; a measurement floor, with no opt-out.
2. ``python`` (cached, model-server recipes): pip installs the inference stack into it.
3. ``configure``: the tdxvm overlay (agent, unlock and root steps, units), the recipe's
   files, the controller's SSH public key, the initramfs; timestamps clamped to the
   epoch. The kernel that ships is checked again.
4. ``ext4``: ``mkfs.ext4 -d`` of the folder, reproducible (pinned UUID, hash seed, times).
5. ``verity``: the dm-verity hash tree appended to the ext4 image
   (:mod:`tdxvm.image.verity`); its root hash goes on the kernel command line, and the
   measurements are predicted with that command line, so unusable input fails before a
   disk key exists.
6. ``encrypt``: a fresh volume key into the secret store (``disk/<LUKS UUID>``), LUKS2
   header and payload (ext4 and hash tree) written offline on the file. The guest never
   reads that header: the controller releases the volume key itself, and the measured
   initramfs maps the payload with fixed parameters (:mod:`tdxvm.guest.rootdisk`).
7. ``measure``: artifact hashes, the verity tree and the predicted MRTD/RTMRs into
   ``manifest.json``.

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

from tdxvm.image import configure, debian, luks, manifest, measure, rootfs, verity
from tdxvm.image import secrets as disk_secrets
from tdxvm.image.cache import StepCache, step_key
from tdxvm.image.ext4 import make_ext4, run_step, tool
from tdxvm.image.recipe import BASE_PACKAGES, LoadedRecipe
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


def _debootstrap_version() -> str:
    out = run_step("dpkg-query", [tool("dpkg-query", step="dpkg-query", package="dpkg"), "-W", "-f=${Version}", "debootstrap"])
    return out.strip()


def rootfs_inputs(loaded: LoadedRecipe) -> dict[str, Any]:
    r = loaded.recipe
    return {
        "suite": r.suite, "mirror": r.mirror, "debootstrap": _debootstrap_version(),
        "packages": sorted(set(BASE_PACKAGES) | set(r.packages)),
        "kernel": {"package": r.kernel.package, "suite": r.kernel_suite},
    }  # fmt: skip


def python_inputs(loaded: LoadedRecipe, rootfs_key: str) -> dict[str, Any]:
    import sys

    p = loaded.recipe.python
    return {"rootfs": rootfs_key, "requirements": list(p.requirements), "index_url": p.index_url,
            "find_links": list(p.find_links), "python": sys.version.split()[0]}  # fmt: skip


def _rootfs_step(loaded: LoadedRecipe, cache: StepCache, work: Path) -> tuple[Path, str, int, bool]:
    """The cached rootfs tarball (built if missing), its key, its epoch and whether it was cached."""
    r = loaded.recipe
    inputs = rootfs_inputs(loaded)
    key = step_key("rootfs", inputs)
    entry = cache.get("rootfs", key)
    hit = entry is not None
    if entry is None:
        with cache.put("rootfs", key, inputs) as staging:
            tree = work / "debootstrap"
            rootfs.debootstrap(tree, suite=r.suite, mirror=r.mirror)
            sources = []
            kernel_suite = r.kernel_suite
            if kernel_suite != r.suite:
                sources.append(f"deb {r.mirror} {kernel_suite} main")
            rootfs.apt_install(tree, packages=sorted(set(BASE_PACKAGES) | set(r.packages)), sources=sources)
            rootfs.apt_install(tree, packages=[r.kernel.package], suite=kernel_suite)
            rootfs.clean(tree)  # no SSH host keys or logs even in the cache
            epoch = int(time.time())
            rootfs.clamp_mtimes(tree, epoch)
            rootfs.pack(tree, staging / "rootfs.tar")
            (staging / "epoch").write_text(f"{epoch}\n")
            shutil.rmtree(tree)
        entry = cache.path("rootfs", key)
    return entry / "rootfs.tar", key, int((entry / "epoch").read_text()), hit


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


def _python_step(loaded: LoadedRecipe, cache: StepCache, work: Path, base_tar: Path, base_key: str, epoch: int) -> tuple[Path, bool]:
    p = loaded.recipe.python
    inputs = python_inputs(loaded, base_key)
    key = step_key("python", inputs)
    entry = cache.get("python", key)
    if entry is not None:
        return entry / "rootfs.tar", True
    with cache.put("python", key, inputs) as staging:
        tree = work / "python"
        rootfs.unpack(base_tar, tree)
        rootfs.pip_install(tree, requirements=p.requirements, index_url=p.index_url, find_links=p.find_links)
        rootfs.clamp_mtimes(tree, epoch)
        rootfs.pack(tree, staging / "rootfs.tar")
        shutil.rmtree(tree)
    return cache.path("python", key) / "rootfs.tar", False


def filesystem_uuid(loaded: LoadedRecipe) -> str:
    """The ext4 UUID, pinned per recipe name (the image's fstab names /dev/mapper/root)."""
    return str(uuidlib.uuid5(_FS_UUID_NAMESPACE, loaded.recipe.name))


def build(
    loaded: LoadedRecipe,
    *,
    output: Path,
    cache: StepCache | None = None,
    secret_store: SecretStore | None = None,
    firmware: str | None = None,
    progress: Progress = _quiet,
    encryption_engine: str = "cryptsetup",
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
    cached: list[str] = []
    stored_key: str | None = None  # the secret-store name of this build's disk key, once stored
    try:
        firmware_ref = firmware or recipe.firmware
        firmware_path = debian.resolve(firmware_ref).resolve() if firmware_ref else None
        if firmware_path is not None and not firmware_path.is_file():
            raise FileNotFoundError(f"firmware {firmware_path} does not exist")

        t = _Timer(progress, "rootfs")
        tar, key, epoch, was_cached = _rootfs_step(loaded, cache, work)
        timings["rootfs"] = t.done("cached" if was_cached else "done")
        cached += ["rootfs"] if was_cached else []
        found = kernel_in_rootfs(tar)
        if found is not None:  # refuse an unmeasuring kernel now, before the slow steps
            check_kernel(found[1], source=f"kernel /{found[0]} ({recipe.kernel.package} from {recipe.kernel_suite})")
        epoch = recipe.epoch if recipe.epoch is not None else epoch

        t = _Timer(progress, "python")
        if recipe.python.requirements:
            tar, hit = _python_step(loaded, cache, work, tar, key, epoch)
            timings["python"] = t.done("cached" if hit else "done")
            cached += ["python"] if hit else []
        else:
            timings["python"] = t.done("skipped", "no Python requirements")

        t = _Timer(progress, "configure")
        tree = work / "rootfs"
        rootfs.unpack(tar, tree)
        release_public = public_hex(release_key(store))
        boot = configure.configure(tree, loaded, authorized_key=public_line(controller_key(store)), release_public=release_public,
                                   epoch=epoch)  # fmt: skip
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
        make_ext4(source=tree, output=ext4_image, size_bytes=recipe.disk_size, uuid=fs_uuid, epoch=epoch)
        shutil.rmtree(tree)
        timings["ext4"] = t.done(detail=f"{recipe.disk_size >> 20} MiB")

        t = _Timer(progress, "verity")
        verity_tree = verity.format_tree(ext4_image)
        cmdline = verity.pinned_cmdline(recipe.cmdline, verity_tree)
        predicted = measure.predict(firmware=firmware_path.read_bytes() if firmware_path else None, kernel=kernel,
                                    initrd=(staging / "initrd.img").read_bytes(), cmdline=cmdline)  # fmt: skip
        del kernel
        timings["verity"] = t.done(detail=f"root hash {verity_tree.root.root_hash[:16]}…")

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
        result = {
            "format": manifest.FORMAT,
            "name": recipe.name,
            "profile": recipe.profile,
            "recipe": {"path": str(loaded.path), "sha256": loaded.sha256},
            "built_at": int(time.time()),
            "epoch": epoch,
            "kernel_version": boot.version,
            "cmdline": cmdline,
            "artifacts": {name: manifest.artifact_entry(staging / name) for name in manifest.ARTIFACTS},
            "rootfs_uuid": fs_uuid,
            "verity": verity_tree.to_dict(),
            "luks": {"uuid": luks_uuid, "cipher": header.cipher, "key_secret": stored_key},
            "release_key": release_public,
            "firmware": {"path": str(firmware_path), "sha256": manifest.file_sha256(firmware_path)} if firmware_path else None,
            "measurements": predicted.to_dict(),
            "guest_agent_port": recipe.agent_port,
            "ssh_port": 22,
            "service_port": recipe.service_port,
            "cache": {"hit": cached},
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
