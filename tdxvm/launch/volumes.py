"""The image's artifacts on the libvirt host, through libvirt's storage API.

Local and remote hosts are handled the same way: a directory pool named ``tdxvm``
(created at ``/var/lib/tdxvm/pool`` when missing) holds

* the kernel, initramfs and encrypted disk image, each uploaded once through a
  ``virStream`` and named by its SHA-256 (``vmlinuz-<sha256>``, ``initrd-<sha256>.img``,
  ``disk-<sha256>.img``), so VMs of one image share them and a second launch uploads
  nothing; for an emulated guest on a remote host also the TDVF its emulated TD stands
  for (``tdvf-<sha256>.fd``: never booted, read back through libvirt by the controller's
  quote service, :func:`tdxvm.launch.lifecycle.firmware_upload`);
* per VM, a qcow2 overlay ``<vm>.qcow2`` whose backing store is the shared raw disk
  (the LUKS image is never written), the serial console log ``<vm>.serial.log``, and a
  sparse raw scratch disk ``<vm>.scratch.img`` that the TD formats once per boot (when first used) with
  authenticated encryption under a key it keeps (:mod:`tdxvm.guest.scratch`).

An upload is hashed as it streams and refused (the volume deleted) if it does not match
the manifest. Content volumes are created empty and grow with the upload, so one left by
an interrupted upload is shorter than its name says and is replaced, never reused.

Content volumes stay after the last VM of an image is destroyed (a relaunch uploads
nothing); :func:`unused_volumes` finds those no domain uses any more, the per-VM
volumes an interrupted launch left, and the partial files of killed uploads, for
``tdxvm image prune``.

Where the pool's folder is on the controller's machine, an upload copies the file
there instead (:func:`_copy_into`): into a partial file
``.<volume>.partial-<pid>-<8 hex>`` (unique per upload), renamed to the volume's name
once complete and checked. The copying process holds an exclusive ``flock`` on that file
from before its first byte until after the rename, so a partial file nobody holds a lock
on is one whose writer is gone (killed, or the machine lost power: the kernel drops a
dead process's locks); see :func:`_abandoned_partial`.

Several launches may set up one host at once: threads of one process (a fleet's
replicas), processes of one controller (two ``tdxvm launch``, two fleets' applies), and
controllers on different machines. :func:`ensure_pool` makes the pool whichever of them
comes first, and the others use it (:func:`_define_pool`); the uploads of one volume take
turns on a controller (a thread lock, then a ``flock`` in its state folder:
:func:`_controller_lock`), and an upload finding another controller's under way waits for
it to finish instead of replacing it (:func:`_complete_volume`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import libvirt

from tdxvm.fileio import claim_abandoned, create_locked, lock_exclusive, unlock_removing
from tdxvm.launch.connection import is_local, is_test_driver, libvirt_message
from tdxvm.launch.errors import VolumeError
from tdxvm.launch.manifest import Artifact, ImageManifest
from tdxvm.xdg import state_home

POOL_NAME = "tdxvm"
POOL_PATH = "/var/lib/tdxvm/pool"
REFRESH_WAIT = 300.0  # seconds a refresh waits for other clients' volume builds in the pool
ASYNC_JOBS = "has asynchronous jobs running"  # libvirt's refusal to refresh a pool mid-build
COPY_CHUNK = 4 << 20
CHUNK = 256 * 1024  # libvirt's RPC stream messages carry at most 256 KiB
# A partial file this long untouched is abandoned, judged from a machine that cannot see its lock
# (a live upload writes to it every COPY_CHUNK; this is far beyond any clock skew between hosts).
PARTIAL_STALE_AFTER = 24 * 3600.0
POOL_LOCK_WAIT = 60.0  # seconds a pool setup waits for this controller's others (then goes on without)
POOL_START_WAIT = 5.0  # seconds a pool another client defined gets to be built and started
UPLOAD_LOCK_WAIT = 3600.0  # seconds an upload waits for this controller's other upload of the volume
# A short content volume that has not grown for this long is an interrupted upload's: a live
# one writes every stream chunk, and a remote connection silent for ~35 s is closed by its keepalive.
UPLOAD_STALL = 60.0
UPLOAD_POLL = 1.0  # seconds between looks at a volume another upload is growing
UPLOAD_TRIES = 3  # creates of a volume that another upload (then failed or interrupted) took first


Role = Literal["kernel", "initrd", "disk", "firmware", "overlay", "serial-log", "scratch"]


@dataclass(frozen=True, slots=True)
class VolumeEvent:
    """Progress of one volume: ``skip`` (already there), ``wait`` (another upload of it
    is under way: the bytes on the host so far, 0 where not seen), ``upload`` (bytes sent
    so far), ``done``."""

    volume: str
    role: Role
    status: Literal["skip", "wait", "upload", "done"]
    done: int
    total: int


Progress = Callable[[VolumeEvent], None]


def _quiet(_event: VolumeEvent) -> None:
    pass


@dataclass(frozen=True, slots=True)
class VmVolumes:
    """Paths on the libvirt host of everything one VM boots from and writes."""

    pool: str
    kernel: str
    initrd: str
    base_disk: str
    overlay: str
    serial_log: str
    scratch: str
    firmware: str | None = None  # the TDVF uploaded for an emulated guest on a remote host, if one was


def content_name(role: str, sha256: str) -> str:
    return {
        "kernel": f"vmlinuz-{sha256}",
        "initrd": f"initrd-{sha256}.img",
        "disk": f"disk-{sha256}.img",
        "firmware": f"tdvf-{sha256}.fd",
    }[role]


def overlay_name(vm_name: str) -> str:
    return f"{vm_name}.qcow2"


def serial_log_name(vm_name: str) -> str:
    return f"{vm_name}.serial.log"


def scratch_name(vm_name: str) -> str:
    return f"{vm_name}.scratch.img"


def planned(
    manifest: ImageManifest,
    vm_name: str,
    *,
    pool: str = POOL_NAME,
    pool_path: str = POOL_PATH,
    firmware: Artifact | None = None,
) -> VmVolumes:
    """The paths a launch will use, computed without asking libvirt (for --dry-run)."""
    base = pool_path.rstrip("/")
    return VmVolumes(
        pool=pool,
        kernel=f"{base}/{content_name('kernel', manifest.kernel.sha256)}",
        initrd=f"{base}/{content_name('initrd', manifest.initrd.sha256)}",
        base_disk=f"{base}/{content_name('disk', manifest.disk.sha256)}",
        overlay=f"{base}/{overlay_name(vm_name)}",
        serial_log=f"{base}/{serial_log_name(vm_name)}",
        scratch=f"{base}/{scratch_name(vm_name)}",
        firmware=f"{base}/{content_name('firmware', firmware.sha256)}" if firmware is not None else None,
    )


def _uri(conn: libvirt.virConnect) -> str:
    try:
        return conn.getURI()
    except libvirt.libvirtError:
        return "the libvirt host"


def pool_path(pool: libvirt.virStoragePool) -> str:
    path = ET.fromstring(pool.XMLDesc(0)).findtext("target/path")
    if not path:
        raise VolumeError(f"storage pool {pool.name()} has no target path; tdxvm needs a directory pool")
    return path


def ensure_pool(conn: libvirt.virConnect, *, name: str = POOL_NAME, path: str = POOL_PATH) -> libvirt.virStoragePool:
    """The ``tdxvm`` directory pool, defined, built and started if needed (autostarted).

    Safe when several processes make the first use of a host at once, of this controller
    (they take turns, :func:`_controller_lock`) or of others: the one whose define comes
    second uses the pool the first defined, and "already active" from a start means
    another client started it (:func:`_define_pool`, :func:`_start_pool`)."""
    uri = _uri(conn)
    with _controller_lock(("pool", uri, name), wait=POOL_LOCK_WAIT):
        pool = _lookup_pool(conn, name, uri)
        defined = False
        if pool is None:
            pool, defined = _define_pool(conn, name, path, uri)
        _start_pool(pool, uri, wait=0.0 if defined else POOL_START_WAIT)
    refresh(pool, uri)
    return pool


def _lookup_pool(conn: libvirt.virConnect, name: str, uri: str) -> libvirt.virStoragePool | None:
    try:
        return conn.storagePoolLookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_POOL:
            raise VolumeError(f"cannot look up storage pool {name} on {uri}: {libvirt_message(exc)}") from None
        return None


def _active(pool: libvirt.virStoragePool) -> bool:
    try:
        return bool(pool.isActive())
    except libvirt.libvirtError:
        return False


def _start_pool(pool: libvirt.virStoragePool, uri: str, *, wait: float) -> None:
    """Start ``pool`` unless it runs. A failure while another client is still setting up a
    pool it defined (its folder not built yet) is tried again for ``wait`` seconds; a
    start that fails because the pool is active by then (another client started it) is
    success."""
    deadline = time.monotonic() + wait
    while not _active(pool):
        try:
            pool.create(0)
            return
        except libvirt.libvirtError as exc:
            if _active(pool):
                return  # "is already active": another client started it meanwhile
            if time.monotonic() >= deadline:
                raise VolumeError(
                    f"storage pool {pool.name()} on {uri} is defined but cannot be started: {libvirt_message(exc)}"
                    f"\nfix: check its folder ({pool_path(pool)}) exists (`virsh pool-build {pool.name()}` makes "
                    f"it), or `virsh pool-start {pool.name()}`"
                ) from None
        time.sleep(0.1)


def refresh(pool: libvirt.virStoragePool, uri: str, *, wait: float = REFRESH_WAIT) -> None:
    """Rescan the pool's folder. libvirt refuses while another client's volume is being built
    in the pool (a concurrent launch creating its overlay or scratch disk, a clone): that
    waits, up to ``wait`` seconds; any other failure is an error at once."""
    deadline = time.monotonic() + wait
    pause = 0.1
    while True:
        try:
            pool.refresh(0)
            return
        except libvirt.libvirtError as exc:
            busy = ASYNC_JOBS in (exc.get_error_message() or "")
            if not busy or time.monotonic() + pause > deadline:
                waited = f" (still busy after {wait:.0f} s)" if busy else ""
                raise VolumeError(
                    f"cannot refresh storage pool {pool.name()} on {uri}: {libvirt_message(exc)}{waited}"
                ) from None
        time.sleep(pause)
        pause = min(pause * 2, 2.0)


def _define_pool(conn: libvirt.virConnect, name: str, path: str, uri: str) -> tuple[libvirt.virStoragePool, bool]:
    """Define and build the pool (autostarted, not started); returns it and whether this
    call defined it. When another client defined it since the lookup, libvirt refuses the
    define ("operation failed: pool 'tdxvm' already exists with uuid …", as for any define
    of a name it has under another UUID): that pool is returned, for the caller to start.

    Nothing is undone on failure: a pool is never destroyed or undefined here. From the
    moment it is defined every client of the host sees it, and another launch (of this
    controller or another) may already have looked it up, started it and be uploading
    into it; undoing it would pull the pool from under that launch, which did happen
    while this undid its own define. A pool left defined but not built is harmless: the
    next launch finds it and says how to start it."""
    root = ET.Element("pool", {"type": "dir"})
    ET.SubElement(root, "name").text = name
    target = ET.SubElement(root, "target")
    ET.SubElement(target, "path").text = path
    perms = ET.SubElement(target, "permissions")
    ET.SubElement(perms, "mode").text = "0711"
    try:
        pool = conn.storagePoolDefineXML(ET.tostring(root, encoding="unicode"), 0)
    except libvirt.libvirtError as exc:
        other = _lookup_pool(conn, name, uri)
        if other is not None:
            return other, False  # another client defined it first
        raise VolumeError(f"cannot define storage pool {name} at {path} on {uri}: {libvirt_message(exc)}") from None
    try:
        try:
            pool.build(0)
        except libvirt.libvirtError:
            if not _active(pool):  # libvirt refuses to build a pool another client started: it is built
                raise
        pool.setAutostart(1)
    except libvirt.libvirtError as exc:
        raise VolumeError(
            f"cannot create storage pool {name} at {path} on {uri}: {libvirt_message(exc)}\nfix: the libvirt "
            f"daemon must be able to create {path} (it runs as root for qemu:///system)"
        ) from None
    return pool, True


@contextmanager
def _controller_lock(key: tuple[str, ...], *, wait: float, waiting: Callable[[], None] | None = None) -> Iterator[bool]:
    """Held by one process of this controller at a time for ``key`` while the block runs
    (yields True): a ``flock`` on ``<state>/locks/<kind>-<hash of key>.lock``, so that its
    launches take turns at a host's pool or at one volume's upload. ``waiting`` is called
    about once a second while another process holds it.

    Only a help: what it guards is safe without it too, as it must be, since controllers
    on other machines share no lock. So where the folder cannot be made or locks are not
    supported, or after ``wait`` seconds, the block runs without it (yields False). The
    holder removes the file before it lets go (:func:`tdxvm.fileio.unlock_removing`: none
    is left per volume ever uploaded, but for a killed holder's, empty and locked again
    by the next). ``key`` is (kind, URI, …); a test-driver URI names a host private to
    its process: no lock."""
    if is_test_driver(key[1]):
        yield False
        return
    path = state_home() / "locks" / f"{key[0]}-{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]}.lock"
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd: int | None = lock_exclusive(path, wait, waiting=waiting)
    except (TimeoutError, OSError):  # waited long enough, no folder, or no flock here: go on without it
        fd = None
    if fd is None:
        yield False
        return
    try:
        yield True
    finally:
        unlock_removing(path, fd)


def _lookup(pool: libvirt.virStoragePool, name: str) -> libvirt.virStorageVol | None:
    try:
        return pool.storageVolLookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
            return None
        raise VolumeError(f"cannot look up volume {name} in pool {pool.name()}: {libvirt_message(exc)}") from None


def _volume_xml(name: str, *, capacity: int, fmt: str, backing: str | None = None) -> str:
    root = ET.Element("volume")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "capacity", {"unit": "bytes"}).text = str(capacity)
    ET.SubElement(root, "allocation", {"unit": "bytes"}).text = "0"
    target = ET.SubElement(root, "target")
    ET.SubElement(target, "format", {"type": fmt})
    ET.SubElement(ET.SubElement(target, "permissions"), "mode").text = "0600"
    if backing is not None:
        bs = ET.SubElement(root, "backingStore")
        ET.SubElement(bs, "path").text = backing
        ET.SubElement(bs, "format", {"type": "raw"})
    return ET.tostring(root, encoding="unicode")


def _create(pool: libvirt.virStoragePool, xml: str, name: str) -> libvirt.virStorageVol:
    try:
        return pool.createXML(xml, 0)
    except libvirt.libvirtError as exc:
        raise VolumeError(f"cannot create volume {name} in pool {pool.name()}: {libvirt_message(exc)}") from None


def delete_volume(vol: libvirt.virStorageVol) -> None:
    with suppress(libvirt.libvirtError):
        vol.delete(0)


def _send_all(stream: libvirt.virStream, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = stream.send(bytes(view))
        if sent < 0:
            raise VolumeError("the libvirt stream refused data")
        view = view[sent:]


_uploading: dict[tuple[str, str, str], threading.Lock] = {}
_uploading_guard = threading.Lock()


def upload_artifact(
    conn: libvirt.virConnect, pool: libvirt.virStoragePool, artifact: Artifact, role: Role, progress: Progress = _quiet
) -> tuple[libvirt.virStorageVol, bool]:
    """Upload ``artifact`` as its content-named volume unless it is there; returns (volume, uploaded).

    Launches of one image to one host at once upload it once: those of this controller
    take turns (the threads of a process on a lock, its processes on a ``flock``,
    :func:`_controller_lock`; ``wait`` events while another's upload runs), and the later
    ones find the volume there; one that finds another controller's upload under way
    waits for it (:func:`_complete_volume`)."""
    name = content_name(role, artifact.sha256)
    key = (_uri(conn), pool.name(), name)
    with _uploading_guard:
        lock = _uploading.setdefault(key, threading.Lock())

    def waiting() -> None:
        progress(VolumeEvent(name, role, "wait", _size_on_host(pool, name), artifact.size))

    with lock, _controller_lock(("upload", *key), wait=UPLOAD_LOCK_WAIT, waiting=waiting):
        return _upload_once(conn, pool, artifact, role, name, progress)


def _size_on_host(pool: libvirt.virStoragePool, name: str) -> int:
    """The size of volume ``name`` now, 0 where there is none (yet)."""
    try:
        return int(pool.storageVolLookupByName(name).info()[1])
    except libvirt.libvirtError:
        return 0


def _upload_once(
    conn: libvirt.virConnect,
    pool: libvirt.virStoragePool,
    artifact: Artifact,
    role: Role,
    name: str,
    progress: Progress,
) -> tuple[libvirt.virStorageVol, bool]:
    for _ in range(UPLOAD_TRIES):
        existing = _complete_volume(pool, name, artifact, role, progress)
        if existing is not None:
            progress(VolumeEvent(name, role, "skip", artifact.size, artifact.size))
            return existing, False
        try:
            f = open(artifact.path, "rb")  # noqa: SIM115 - closed below, after the volume exists
        except OSError as exc:
            raise VolumeError(f"image artifact {artifact.path}: {exc.strerror or exc}") from None
        with f:
            if local_folder(pool) is not None:
                return _copy_into(pool, f, artifact, role, name, progress), True
            try:
                vol = pool.createXML(_volume_xml(name, capacity=0, fmt="raw"), 0)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_STORAGE_VOL_EXIST:
                    continue  # another controller's upload created it since the look: wait for that one
                raise VolumeError(
                    f"cannot create volume {name} in pool {pool.name()}: {libvirt_message(exc)}"
                ) from None
            try:
                _stream_into(conn, vol, f, artifact, role, name, progress)
            except BaseException:
                delete_volume(vol)
                raise
        return vol, True
    raise VolumeError(
        f"cannot upload {artifact.path} to volume {name} in pool {pool.name()}: {UPLOAD_TRIES} times another "
        "client's upload of it created the volume first and then failed or stopped; try again"
    )


def _complete_volume(
    pool: libvirt.virStoragePool, name: str, artifact: Artifact, role: Role, progress: Progress
) -> libvirt.virStorageVol | None:
    """Volume ``name`` once it is complete (``artifact``'s size); None when there is none,
    deleting first one that will never be complete.

    A shorter one is an upload's, under way or interrupted: content volumes are created
    empty and grow as the stream writes them (:func:`_upload_once`). An upload of this
    controller cannot be under way (the caller holds the volume's locks), but another
    controller's can, and nothing on the host tells the two apart at once. So it is
    watched, its size compared across polls of :data:`UPLOAD_POLL` seconds (the host's
    sizes and this machine's clock only: no clocks of two machines compared, unlike the
    partial files' ``mtime`` in :func:`_abandoned_partial`): while it grows it is waited
    for (``wait`` events with its size), until it is complete, or gone (that upload failed
    and removed it); one that has not grown for :data:`UPLOAD_STALL` seconds is an
    interrupted upload's and is deleted (a live upload writes every stream chunk). A
    volume longer than the artifact is no upload of it, and on libvirt's test driver
    no upload can be under way (it cannot upload): both are deleted at once."""
    can_grow = not is_test_driver(_uri(pool.connect()))
    seen, since = -1, time.monotonic()
    while True:
        vol = _lookup(pool, name)
        if vol is None:
            return None
        try:
            size = int(vol.info()[1])
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
                continue  # deleted since the lookup
            raise VolumeError(f"cannot read volume {name} in pool {pool.name()}: {libvirt_message(exc)}") from None
        if size == artifact.size:
            return vol
        now = time.monotonic()
        if size > artifact.size or not can_grow or (size == seen and now - since >= UPLOAD_STALL):
            delete_volume(vol)
            return None
        if size != seen:
            seen, since = size, now
            progress(VolumeEvent(name, role, "wait", size, artifact.size))
        time.sleep(UPLOAD_POLL)


def local_folder(pool: libvirt.virStoragePool) -> Path | None:
    """The pool's folder when it is on this machine (the connection is to this machine's
    libvirtd, not its test driver, and the folder is here), else None."""
    uri = _uri(pool.connect())
    if not is_local(uri) or is_test_driver(uri):
        return None
    folder = Path(pool_path(pool))
    return folder if folder.is_dir() else None


def _partial_name(name: str) -> str:
    return f".{name}.partial-{os.getpid()}-{secrets.token_hex(4)}"


def _new_partial(folder: Path, name: str) -> tuple[Path, int]:
    """A new partial file for volume ``name`` in ``folder`` and its fd, which holds the
    file's exclusive lock (kept until the fd is closed, after the rename); a prune that
    deleted it before it was locked is made up for (:func:`tdxvm.fileio.create_locked`)."""
    return create_locked(lambda: folder / _partial_name(name), mode=0o666)


def _copy_into(
    pool: libvirt.virStoragePool, f: BinaryIO, artifact: Artifact, role: Role, name: str, progress: Progress
) -> libvirt.virStorageVol:
    """The local fast path: the pool's folder is on this machine, so copy the file there
    (checking its hash on the way) and let libvirt pick it up, instead of pushing it
    through libvirtd's RPC stream (~15 MB/s here). The partial file is locked while it is
    written and renamed (see the module doc), so a prune can tell it from a killed one's."""
    folder = Path(pool_path(pool))
    partial: Path | None = None
    digest = hashlib.sha256()
    done = 0
    try:
        partial, fd = _new_partial(folder, name)
        with open(fd, "wb") as out:  # closing it drops the lock: after the rename
            while chunk := f.read(COPY_CHUNK):
                digest.update(chunk)
                out.write(chunk)
                done += len(chunk)
                progress(VolumeEvent(name, role, "upload", min(done, artifact.size), artifact.size))
            out.flush()
            os.fsync(out.fileno())
            if done != artifact.size or digest.hexdigest() != artifact.sha256:
                raise VolumeError(
                    f"image artifact {artifact.path} differs from its manifest (expected {artifact.size} "
                    f"bytes with sha256 {artifact.sha256}); rebuild the image or fix the manifest"
                )
            partial.rename(folder / name)
        refresh(pool, _uri(pool.connect()))
        vol = _lookup(pool, name)
        if vol is None:
            raise VolumeError(f"libvirt does not see {folder / name} in pool {pool.name()} after a refresh")
    except OSError as exc:
        raise VolumeError(f"cannot copy {artifact.path} into pool folder {folder}: {exc.strerror or exc}") from None
    finally:
        if partial is not None:
            partial.unlink(missing_ok=True)
    progress(VolumeEvent(name, role, "done", done, artifact.size))
    return vol


def _stream_into(
    conn: libvirt.virConnect,
    vol: libvirt.virStorageVol,
    f: BinaryIO,
    artifact: Artifact,
    role: Role,
    name: str,
    progress: Progress,
) -> None:
    stream = conn.newStream(0)
    try:
        vol.upload(stream, 0, artifact.size, 0)
    except libvirt.libvirtError as exc:
        with suppress(libvirt.libvirtError):
            stream.abort()
        if exc.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT:
            raise VolumeError(
                f"the libvirt driver at {_uri(conn)} cannot upload volumes ({libvirt_message(exc)}); "
                f"put {name} into its storage pool some other way"
            ) from None
        raise VolumeError(f"cannot upload {artifact.path} to volume {name}: {libvirt_message(exc)}") from None
    digest = hashlib.sha256()
    done = 0
    try:
        while chunk := f.read(CHUNK):
            if done + len(chunk) > artifact.size:
                break
            digest.update(chunk)
            _send_all(stream, chunk)
            done += len(chunk)
            progress(VolumeEvent(name, role, "upload", done, artifact.size))
        if done != artifact.size or f.read(1) or digest.hexdigest() != artifact.sha256:
            raise VolumeError(
                f"image artifact {artifact.path} differs from its manifest (expected {artifact.size} "
                f"bytes with sha256 {artifact.sha256}); rebuild the image or fix the manifest"
            )
        stream.finish()
    except BaseException as exc:
        with suppress(libvirt.libvirtError):
            stream.abort()
        if isinstance(exc, libvirt.libvirtError):
            raise VolumeError(f"upload of {artifact.path} to volume {name} failed: {libvirt_message(exc)}") from None
        raise
    progress(VolumeEvent(name, role, "done", done, artifact.size))


def prepare_volumes(
    conn: libvirt.virConnect,
    manifest: ImageManifest,
    vm_name: str,
    progress: Progress = _quiet,
    *,
    pool_name: str = POOL_NAME,
    pool_target: str = POOL_PATH,
    scratch_bytes: int = 2 << 30,
    firmware: Artifact | None = None,
) -> VmVolumes:
    """Upload what is missing (``firmware`` too, when given) and create the VM's overlay,
    serial log and (sparse) scratch disk.

    On failure, the VM's own volumes this call created are deleted again; complete
    content volumes stay (they are a cache keyed by hash, and other VMs may use them),
    a partial upload never does.
    """
    pool = ensure_pool(conn, name=pool_name, path=pool_target)
    created: list[libvirt.virStorageVol] = []
    uploads: tuple[tuple[Role, Artifact], ...] = (
        ("kernel", manifest.kernel),
        ("initrd", manifest.initrd),
        ("disk", manifest.disk),
    ) + ((("firmware", firmware),) if firmware is not None else ())
    try:
        paths = {}
        for role, artifact in uploads:
            vol, _uploaded = upload_artifact(conn, pool, artifact, role, progress)
            paths[role] = vol.path()
        overlay = _fresh(
            pool,
            overlay_name(vm_name),
            _volume_xml(overlay_name(vm_name), capacity=manifest.disk.size, fmt="qcow2", backing=paths["disk"]),
        )
        created.append(overlay)
        progress(VolumeEvent(overlay.name(), "overlay", "done", 0, 0))
        log = _fresh(pool, serial_log_name(vm_name), _volume_xml(serial_log_name(vm_name), capacity=0, fmt="raw"))
        created.append(log)
        progress(VolumeEvent(log.name(), "serial-log", "done", 0, 0))
        scratch = _fresh(
            pool, scratch_name(vm_name), _volume_xml(scratch_name(vm_name), capacity=scratch_bytes, fmt="raw")
        )
        created.append(scratch)
        progress(VolumeEvent(scratch.name(), "scratch", "done", 0, 0))
        return VmVolumes(
            pool=pool.name(),
            kernel=paths["kernel"],
            initrd=paths["initrd"],
            base_disk=paths["disk"],
            overlay=overlay.path(),
            serial_log=log.path(),
            scratch=scratch.path(),
            firmware=paths.get("firmware"),
        )
    except BaseException:
        for vol in reversed(created):
            delete_volume(vol)
        raise


def _fresh(pool: libvirt.virStoragePool, name: str, xml: str) -> libvirt.virStorageVol:
    """Create ``name``, replacing one left by an interrupted launch (the caller checked no VM uses it)."""
    old = _lookup(pool, name)
    if old is not None:
        delete_volume(old)
    return _create(pool, xml, name)


def delete_vm_volume(conn: libvirt.virConnect, path: str, *, pool_name: str = POOL_NAME) -> bool:
    """Delete the volume at ``path`` if it is in tdxvm's pool; True when one was deleted."""
    try:
        vol = conn.storageVolLookupByPath(path)
        if vol.storagePoolLookupByVolume().name() != pool_name:
            return False
        vol.delete(0)
        return True
    except libvirt.libvirtError:
        return False


def sweep_vm_volumes(conn: libvirt.virConnect, vm: str, *, pool: str = POOL_NAME) -> list[str]:
    """Volumes an interrupted launch left behind: the VM's overlay, serial log and scratch
    disk in tdxvm's pool, deleted when no domain has its name (a domain that has it owns
    them); the paths deleted."""
    try:
        conn.lookupByName(vm)
        return []
    except libvirt.libvirtError:
        pass
    try:
        p = conn.storagePoolLookupByName(pool)
    except libvirt.libvirtError:
        return []
    deleted = []
    for name in (overlay_name(vm), serial_log_name(vm), scratch_name(vm)):
        try:
            vol = p.storageVolLookupByName(name)
            path = vol.path()
            vol.delete(0)
            deleted.append(path)
        except libvirt.libvirtError:
            continue
    return deleted


_CONTENT = r"(?:vmlinuz-|initrd-|disk-|tdvf-)[0-9a-f]{64}(?:\.img|\.fd)?"
_CONTENT_NAME = re.compile(_CONTENT)
_PARTIAL_NAME = re.compile(rf"\.{_CONTENT}\.partial-[0-9]+-[0-9a-f]{{8}}")  # _partial_name's
_VM_SUFFIXES = (".qcow2", ".serial.log", ".scratch.img")
_VM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")  # what a VM spec's name may be


Kind = Literal["image", "leftover", "partial"]


@dataclass(frozen=True, slots=True)
class UnusedVolume:
    """A volume of tdxvm's pool that no domain on the host uses: ``image`` (an artifact of
    an image no VM boots any more), ``leftover`` (a VM's own volume, with no domain of
    that VM's name) or ``partial`` (the partial file of an upload that was killed; see
    :func:`_abandoned_partial`)."""

    name: str
    path: str
    allocation: int  # bytes it takes on the host's disk
    kind: Kind


def unused_volumes(conn: libvirt.virConnect, *, pool: str = POOL_NAME) -> list[UnusedVolume]:
    """tdxvm's volumes in ``pool`` that no domain defined on the host refers to, by name.

    A domain refers to a volume when its path is a value in the domain's XML (live or
    inactive: kernel, initrd, disk, serial log, an emulated guest's firmware), or backs
    a volume the domain refers to (a VM's overlay backs onto its image's disk). The
    partial files of uploads that were killed are listed too, never one an upload is
    still writing (:func:`_abandoned_partial`). Volumes tdxvm did not name (other files
    in the pool) are never listed; no pool, none."""
    uri = _uri(conn)
    try:
        p = conn.storagePoolLookupByName(pool)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_POOL:
            return []
        raise VolumeError(f"cannot look up storage pool {pool} on {uri}: {libvirt_message(exc)}") from None
    try:
        if not p.isActive():
            return []
        refresh(p, uri)
        domains = conn.listAllDomains(0)
        names = {d.name() for d in domains}
        referenced: set[str] = set()
        for domain in domains:
            for flags in (0, libvirt.VIR_DOMAIN_XML_INACTIVE):
                referenced |= _values(domain.XMLDesc(flags))
        volumes = [(vol, vol.name(), vol.path()) for vol in p.listAllVolumes(0)]
        for vol, _name, path in volumes:
            if path in referenced:
                backing = ET.fromstring(vol.XMLDesc(0)).findtext("backingStore/path")
                if backing:
                    referenced.add(backing)
        folder, now = local_folder(p), time.time()
        unused = []
        for vol, name, path in volumes:
            if path in referenced:
                continue
            if _PARTIAL_NAME.fullmatch(name):
                try:
                    if _abandoned_partial(folder, name, vol.XMLDesc(0), now=now):
                        unused.append(UnusedVolume(name, path, vol.info()[2], "partial"))
                except libvirt.libvirtError:
                    pass  # renamed into place (or deleted) since the refresh: not a partial any more
                continue
            if _CONTENT_NAME.fullmatch(name):
                kind: Kind = "image"
            elif (vm := _vm_of(name)) is not None and vm not in names:
                kind = "leftover"
            else:
                continue
            unused.append(UnusedVolume(name, path, vol.info()[2], kind))
    except libvirt.libvirtError as exc:
        raise VolumeError(f"cannot list what uses pool {pool} on {uri}: {libvirt_message(exc)}") from None
    except ET.ParseError as exc:  # the host's libvirt wrote it
        raise VolumeError(f"cannot list what uses pool {pool} on {uri}: unreadable XML from libvirt ({exc})") from None
    return sorted(unused, key=lambda u: u.name)


def delete_unused(conn: libvirt.virConnect, chosen: list[UnusedVolume], *, pool: str = POOL_NAME) -> list[UnusedVolume]:
    """Delete those of ``chosen`` that are still unused now (a launch may have taken one
    since they were listed); the ones deleted. A partial file is deleted while this holds
    its lock (where the pool's folder is on this machine), so no upload can be writing it."""
    still = {u.name for u in unused_volumes(conn, pool=pool)}
    try:
        p = conn.storagePoolLookupByName(pool)
    except libvirt.libvirtError:
        return []
    folder = local_folder(p)
    deleted = []
    for u in chosen:
        if u.name not in still:
            continue
        held = None
        if u.kind == "partial" and folder is not None:
            try:
                held = claim_abandoned(folder / u.name)
            except OSError:
                held = -1  # not openable here: listed by its age, as from another machine
            if held is None:
                continue  # an upload holds it (or it is gone)
        try:
            p.storageVolLookupByName(u.name).delete(0)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
                continue
            raise VolumeError(f"cannot delete volume {u.name} in pool {pool}: {libvirt_message(exc)}") from None
        finally:
            if held is not None and held >= 0:
                os.close(held)
        deleted.append(u)
    return deleted


def _abandoned_partial(folder: Path | None, name: str, xml: str, *, now: float) -> bool:
    """Whether the partial file ``name`` (volume XML ``xml``) is one no upload will finish.

    Only :func:`_copy_into` makes partial files, and only in a pool whose folder is on its
    own machine; it holds the file's ``flock`` from before its first byte until after
    the rename (:func:`_new_partial`). So where the folder is on this machine too
    (``folder``), the lock tells: a file whose lock can be taken has no writer, since
    the kernel drops a process's locks when it dies, however it died, and the lock is
    held by file (not process id), so a writer in another PID namespace counts and a
    reused pid cannot fool it. A controller elsewhere (pruning over SSH) cannot take the
    lock: there a partial file counts as abandoned once the host's own ``mtime`` for it
    (libvirt's volume XML) is :data:`PARTIAL_STALE_AFTER` old; a live upload writes to
    it every :data:`COPY_CHUNK`. No ``mtime`` (libvirt's test driver): kept."""
    if folder is not None:
        try:
            fd = claim_abandoned(folder / name)
        except OSError:
            pass  # cannot open it here (another user's): judge by age, as from elsewhere
        else:
            if fd is None:
                return False
            os.close(fd)
            return True
    mtime = ET.fromstring(xml).findtext("target/timestamps/mtime")
    try:
        return mtime is not None and now - float(mtime) > PARTIAL_STALE_AFTER
    except ValueError:
        return False


def _values(xml: str) -> set[str]:
    """Every attribute value and text of a domain's XML."""
    out: set[str] = set()
    for el in ET.fromstring(xml).iter():
        out.update(el.attrib.values())
        if el.text and el.text.strip():
            out.add(el.text.strip())
    return out


def _vm_of(volume: str) -> str | None:
    for suffix in _VM_SUFFIXES:
        if volume.endswith(suffix) and _VM_NAME.fullmatch(vm := volume[: -len(suffix)]):
            return vm
    return None
