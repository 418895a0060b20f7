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
   folder, reproducible (pinned UUID, hash seed, times), written sparse straight into
   the disk file at the LUKS2 payload offset (16 MiB).
5. ``verity``: the dm-verity hash tree after the ext4 image in the disk file
   (:mod:`tdxvm.image.verity`); its root hash goes on the kernel command line, and the
   measurements are predicted with that command line, so unusable input fails before a
   disk key exists.
6. ``encrypt``: a fresh volume key into the secret store (``disk/<LUKS UUID>``), the
   payload (ext4 and hash tree) encrypted offline where it lies in the disk file, no copy,
   and the LUKS2 header written before it; the step reports MB/s of payload. The guest
   never reads that header: the controller releases the volume key itself, and the
   measured initramfs maps the payload with fixed parameters (:mod:`tdxvm.guest.rootdisk`).
7. ``measure``: artifact hashes, the verity tree, the predicted MRTD/RTMRs and the
   build's provenance (:mod:`tdxvm.image.provenance`) into ``manifest.json``.

Steps 1–5 are :func:`tdxvm.image.rootimage.root_image`: what two builds from one recipe
and lock give byte for byte, and what ``tdxvm image verify`` (:mod:`tdxvm.image.reproduce`)
redoes. Steps 6 and 7 are here: :func:`_encrypt_step` and :func:`_measure_step`.

Everything is written in a work folder beside the output and moved into place at the
end: a failed or interrupted build leaves no half-written image in the output folder
(an older build there stays as it was), and no disk key of its own in the secret store.
SIGINT and SIGTERM unwind the same way (the CLI turns SIGTERM into an exit); a work
folder left by a build that was killed outright is removed by the next build of the same
output, once its process (``owner.pid`` in it) is gone. A work folder never exists
without its owner: it is made under another name (``.<output>.claim-*``), the owner
written in it, and only then renamed into place, so a concurrent build of the same output
cannot take a folder being made for one whose process is gone.
The volume key exists only in memory and in the secret store; the tests scan every file
the build writes for it.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tdxvm.image import listing, luks, manifest, provenance
from tdxvm.image import secrets as disk_secrets
from tdxvm.image.cache import StepCache
from tdxvm.image.progress import STEPS, Progress, StepEvent, Timer, quiet
from tdxvm.image.recipe import LoadedRecipe
from tdxvm.image.rootimage import Identity, RootImage, root_image
from tdxvm.releasekey import public_hex, release_key
from tdxvm.secretstore import SecretStore
from tdxvm.sshkey import controller_key, public_line

__all__ = ["OWNER_FILE", "STEPS", "Progress", "StepEvent", "build"]

OWNER_FILE = "owner.pid"  # in a work folder: the building process (stale folders are removed)
_ORPHAN_CLAIM_SECONDS = 600  # a claim folder with no owner this old: its build died making it


def build(
    loaded: LoadedRecipe,
    *,
    output: Path,
    cache: StepCache | None = None,
    secret_store: SecretStore | None = None,
    firmware: str | None = None,
    progress: Progress = quiet,
    encryption_engine: str = "cryptsetup",
    lock_file: Path | None = None,
) -> dict[str, Any]:
    """Build ``loaded`` into ``output``; returns the manifest written there (its JSON
    data) with the steps' ``timings``."""
    cache = cache or StepCache()
    store = secret_store or SecretStore()
    output = Path(output).resolve()
    work = _work_folder(output)
    timings: dict[str, float] = {}
    stored: list[str] = []  # the secret-store name of this build's disk key, once stored
    try:
        identity = functools.cache(
            lambda: _identity(store)
        )  # made at configure, not before: a refused build makes no keys
        image = root_image(
            loaded,
            work=work,
            cache=cache,
            identity=identity,
            firmware=firmware,
            lock_file=lock_file,
            progress=progress,
            timings=timings,
        )
        disk = _encrypt_step(
            image, store=store, engine=encryption_engine, stored=stored, progress=progress, timings=timings
        )
        result = _measure_step(loaded, image, disk, identity=identity(), progress=progress, timings=timings)
        _publish(image.staging, output, published=stored.clear)  # once the image exists, its key stays
        return {**result.to_data(), "timings": timings}
    finally:
        for name in stored:  # no image was published: its key would open nothing
            store.delete(name)
        shutil.rmtree(work, ignore_errors=True)


def _work_folder(output: Path) -> Path:
    """A new work folder beside ``output``, owned by this process; those of builds that
    were killed are removed first.

    The folder appears with its owner file in it: made as a claim folder (a name that
    :func:`_remove_stale_work` never takes while it has no owner), the owner written,
    then renamed into place. (Made under its own name with the owner written after, it
    could be seen ownerless in between by another build's cleanup, and removed.)
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_work(output)
    claim = Path(tempfile.mkdtemp(prefix=f".{output.name}.claim-", dir=output.parent))  # mode 0700
    try:
        (claim / OWNER_FILE).write_text(f"{os.getpid()}\n")
        work = output.with_name(f".{output.name}.work-{uuidlib.uuid4().hex[:8]}")
        claim.rename(work)  # fails, rather than replaces, should that name be taken (never empty)
    except BaseException:
        shutil.rmtree(claim, ignore_errors=True)
        raise
    return work


def _encrypt_step(
    image: RootImage,
    *,
    store: SecretStore,
    engine: str,
    stored: list[str],
    progress: Progress,
    timings: dict[str, float],
) -> manifest.Luks:
    """Step 6: a fresh volume key into the secret store (its name appended to ``stored``
    at once), the ext4 image and its tree encrypted in place in the disk file, which
    then moves to ``disk.img`` in the staging folder."""
    t = Timer(progress, "encrypt")
    luks_uuid = str(uuidlib.uuid4())
    volume_key = disk_secrets.generate_volume_key()
    payload_bytes = image.disk_image.stat().st_size - luks.DATA_OFFSET
    header = luks.encrypt_in_place(
        image.disk_image,
        volume_key=volume_key,
        passphrase=disk_secrets.keyslot_passphrase(volume_key),
        uuid=luks_uuid,
        engine=engine,
    )
    image.disk_image.rename(image.staging / "disk.img")
    seconds = time.monotonic() - t.start
    disk_secrets.store(luks_uuid, volume_key, directory=store.directory)
    stored.append(f"{disk_secrets.KIND}/{luks_uuid}")
    del volume_key
    timings["encrypt"] = t.done(detail=f"{payload_bytes / seconds / 1e6:.0f} MB/s")
    return manifest.Luks(uuid=luks_uuid, cipher=header.cipher, key_secret=stored[-1])


def _measure_step(
    loaded: LoadedRecipe,
    image: RootImage,
    disk: manifest.Luks,
    *,
    identity: Identity,
    progress: Progress,
    timings: dict[str, float],
) -> manifest.ImageManifest:
    """Step 7: the listing, then ``manifest.json``: artifact hashes, the verity tree, the
    predicted measurements and the build's provenance."""
    t = Timer(progress, "measure")
    staging, recipe, firmware = image.staging, loaded.recipe, image.firmware_path
    listing.write_listing(image.listing, staging / provenance.LISTING)
    result = manifest.ImageManifest(
        format=manifest.FORMAT,
        name=recipe.name,
        profile=recipe.profile,
        recipe=manifest.RecipeRecord(path=str(loaded.path), sha256=loaded.sha256),
        built_at=int(time.time()),
        epoch=image.epoch,
        kernel_version=image.boot_version,
        cmdline=image.cmdline,
        artifacts=manifest.artifacts_in(staging),
        rootfs_uuid=image.fs_uuid,
        verity=manifest.Verity.model_validate(image.verity_tree.to_dict()),
        luks=disk,
        release_key=identity.release_public,
        firmware=manifest.Firmware(path=str(firmware), sha256=manifest.file_sha256(firmware)) if firmware else None,
        measurements=manifest.Measurements.model_validate(image.predicted.to_dict()),
        guest_agent_port=recipe.agent_port,
        ssh_port=22,
        service_port=recipe.service_port,
        provenance=provenance.record(loaded, image, identity=identity, listing_file=staging / provenance.LISTING),
        cache=manifest.CacheRecord(hit=image.cached),
    )
    (staging / manifest.FILE).write_text(result.to_json())
    timings["measure"] = t.done()
    return result


def _identity(store: SecretStore) -> Identity:
    return Identity(authorized_key=public_line(controller_key(store)), release_public=public_hex(release_key(store)))


def _remove_stale_work(output: Path) -> None:
    """Work folders of earlier builds of ``output`` whose process is gone (killed before
    it could clean up): removed. A folder of a build still running is left alone.

    A claim folder (:func:`_work_folder`) with no owner file yet is a build making its
    work folder right now: left alone, unless it is older than a build takes for that
    (its build died in between)."""
    for folder in output.parent.glob(f".{output.name}.work-*"):
        if not _owner_running(folder):
            shutil.rmtree(folder, ignore_errors=True)
    for folder in output.parent.glob(f".{output.name}.claim-*"):
        try:
            if (folder / OWNER_FILE).exists():
                stale = not _owner_running(folder)
            else:
                stale = time.time() - folder.stat().st_mtime > _ORPHAN_CLAIM_SECONDS
        except OSError:
            continue  # renamed into place or removed meanwhile
        if stale:
            shutil.rmtree(folder, ignore_errors=True)


def _owner_running(folder: Path) -> bool:
    """Whether the process named by ``folder``'s owner file is running (False when there
    is no owner file or it names no process)."""
    try:
        os.kill(int((folder / OWNER_FILE).read_text()), 0)
    except PermissionError:
        return True  # running, as another user
    except (OSError, ValueError):
        return False  # no owner file, or its process is gone
    return True


def _publish(staging: Path, output: Path, *, published: Callable[[], object]) -> None:
    """Move the finished build into ``output``, replacing an older build as a whole;
    ``published()`` the moment the new build is in place (before the old one is deleted:
    an interrupt there must not take the new image's key). If the new one cannot be moved
    in, the old one is put back."""
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{uuidlib.uuid4().hex[:8]}")
        output.rename(old)
    try:
        staging.rename(output)
    except BaseException:
        if old is not None and not output.exists():
            old.rename(output)
        raise
    published()
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
