"""Uploads through the real libvirtd (qemu:///system), into a private pool; nothing is booted.

libvirt's test driver cannot upload or download volumes, so this is where the stream
code meets a real daemon. The pool lives in the test's temporary folder under a unique
name and is removed afterwards. Skipped where no libvirtd answers (CI starts one).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from contextlib import suppress
from pathlib import Path

import libvirt
import pytest

from tdxvm.cli.imageprune import _report
from tdxvm.launch.connection import open_connection
from tdxvm.launch.console import _read_tail
from tdxvm.launch.errors import ConnectError, ConsoleError, VolumeError
from tdxvm.launch.volumes import (
    ASYNC_JOBS,
    COPY_CHUNK,
    PARTIAL_STALE_AFTER,
    _abandoned_partial,
    content_name,
    delete_unused,
    ensure_pool,
    prepare_volumes,
    refresh,
    unused_volumes,
)

from .conftest import make_image


@pytest.fixture
def pool(tmp_path):
    try:
        conn = open_connection("qemu:///system")
    except ConnectError as exc:
        pytest.skip(f"no libvirtd: {exc}")
    name = f"tdxvm-test-{uuid.uuid4().hex[:8]}"
    target = tmp_path / "pool"
    yield conn, name, target
    try:
        p = conn.storagePoolLookupByName(name)
    except libvirt.libvirtError:
        return
    for vol in p.listAllVolumes():
        vol.delete(0)
    if p.isActive():
        p.destroy()
    p.undefine()
    conn.close()


def test_upload_reuse_overlay_and_log(image, pool):
    conn, name, target = pool
    manifest = image.manifest()
    events = []
    vols = prepare_volumes(conn, manifest, "smoke", events.append, pool_name=name, pool_target=str(target))
    assert vols.kernel == str(target / content_name("kernel", manifest.kernel.sha256))
    for art, path in ((manifest.kernel, vols.kernel), (manifest.initrd, vols.initrd), (manifest.disk, vols.base_disk)):
        with open(path, "rb") as f:
            assert f.read() == art.path.read_bytes()
    assert [e.status for e in events if e.role == "disk"][-1] == "done"
    assert sum(e.status == "upload" for e in events if e.role == "disk") == 1  # 64 KiB: one chunk
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", vols.overlay], capture_output=True, text=True, check=True
    )
    assert (
        f'"backing-filename": "{vols.base_disk}"' in info.stdout and '"backing-filename-format": "raw"' in info.stdout
    )
    # A second VM of the same image uploads nothing.
    events.clear()
    prepare_volumes(conn, manifest, "smoke2", events.append, pool_name=name, pool_target=str(target))
    assert [e.status for e in events if e.role in ("kernel", "initrd", "disk")] == ["skip"] * 3
    # The serial log is read back through libvirt's download stream.
    with open(vols.serial_log, "ab") as f:
        f.write(b"".join(b"line %d\n" % i for i in range(1000)))
    tail = _read_tail(conn, vols.serial_log, 3)
    assert tail.endswith(b"line 997\nline 998\nline 999\n") and len(tail) < 2000


def test_a_serial_log_label_cannot_make_the_controller_read_another_file(image, pool):
    """The label is the host's to write: only a regular file in the pool's own folder is read
    directly (one libvirt has not listed yet), never through a symlink, a FIFO or elsewhere."""
    conn, name, target = pool
    prepare_volumes(conn, image.manifest(), "smoke", pool_name=name, pool_target=str(target))
    (target / "fresh.log").write_bytes(b"booting\n")  # made by QEMU after the pool's last refresh
    assert _read_tail(conn, str(target / "fresh.log"), 5, pool_name=name) == b"booting\n"
    os.mkfifo(target / "fifo.log")
    (target / "link.log").symlink_to("/etc/hostname")
    for path, said in (
        ("/etc/hostname", "is not in tdxvm's pool"),
        (str(target / "fifo.log"), "is not a regular file"),
        (str(target / "link.log"), "Too many levels of symbolic links"),
    ):
        with pytest.raises(ConsoleError, match=said):
            _read_tail(conn, path, 5, pool_name=name)


def test_artifact_that_differs_from_its_manifest_is_refused(image, pool):
    conn, name, target = pool
    data = bytearray((image.folder / "initrd.img").read_bytes())
    data[100] ^= 1
    (image.folder / "initrd.img").write_bytes(bytes(data))
    with pytest.raises(VolumeError, match="initrd.img differs from its manifest"):
        prepare_volumes(conn, image.manifest(), "smoke", pool_name=name, pool_target=str(target))
    names = [v.name() for v in conn.storagePoolLookupByName(name).listAllVolumes()]
    assert not [n for n in names if n.startswith("initrd-")]  # no partial volume left
    assert "smoke.qcow2" not in names


def _busy_pool(conn, name: str, target) -> tuple[threading.Thread, list]:
    """The pool with a volume being built by another client (a 1 GiB clone, a few seconds):
    libvirt refuses to refresh a pool while that runs."""
    pool = ensure_pool(conn, name=name, path=str(target))
    raw = "<volume><name>{}</name><capacity>1073741824</capacity><target><format type='raw'/></target></volume>"
    src = pool.createXML(raw.format("src"), 0)
    done: list = []

    def clone() -> None:
        other = open_connection("qemu:///system")
        try:
            other.storagePoolLookupByName(name).createXMLFrom(raw.format("copy"), src, 0)
        finally:
            done.append(True)
            other.close()

    builder = threading.Thread(target=clone)
    builder.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # until libvirt reports the build under way
        try:
            pool.refresh(0)
        except libvirt.libvirtError as exc:
            assert ASYNC_JOBS in str(exc)
            return builder, done
        time.sleep(0.01)
    builder.join()
    pytest.skip("the clone finished before a refresh could see it running")


def test_a_refresh_waits_for_another_clients_volume_build(pool):
    """Two launches on one host at once: one creates its volumes while the other refreshes
    the pool, which libvirt refuses mid-build; the refresh waits for the build to end."""
    conn, name, target = pool
    builder, done = _busy_pool(conn, name, target)
    try:
        ensure_pool(conn, name=name, path=str(target))
        assert done  # it returned only once the other client's build had ended
    finally:
        builder.join()


def test_a_pool_busy_for_longer_than_the_wait_is_a_clear_error(pool):
    conn, name, target = pool
    builder, _ = _busy_pool(conn, name, target)
    try:
        with pytest.raises(VolumeError, match=r"has asynchronous jobs running.*still busy after 0 s"):
            refresh(conn.storagePoolLookupByName(name), "qemu:///system", wait=0)
    finally:
        builder.join()


def test_prune_keeps_what_a_domain_took_after_the_listing(image, pool, tmp_path):
    """Two VMs' volumes in the pool, no domain: both images and both VMs' own volumes are
    unused. VM a is defined before the delete: its overlay, log, scratch disk and image
    (kernel and initramfs in its XML, the disk behind its overlay) stay; b's go."""
    conn, name, target = pool
    other = make_image(tmp_path / "other", seed=b"other")
    a, b = f"prune-a-{uuid.uuid4().hex[:6]}", f"prune-b-{uuid.uuid4().hex[:6]}"
    va = prepare_volumes(conn, image.manifest(), a, pool_name=name, pool_target=str(target))
    prepare_volumes(conn, other.manifest(), b, pool_name=name, pool_target=str(target))
    listed = unused_volumes(conn, pool=name)
    assert len(listed) == 12 and {u.kind for u in listed} == {"image", "leftover"}
    dom = conn.defineXML(
        f"<domain type='qemu'><name>{a}</name><memory unit='MiB'>64</memory>"
        f"<os><type arch='x86_64'>hvm</type><kernel>{va.kernel}</kernel><initrd>{va.initrd}</initrd></os>"
        f"<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{va.overlay}'/>"
        f"<target dev='vda' bus='virtio'/></disk><disk type='file' device='disk'><driver name='qemu' type='raw'/>"
        f"<source file='{va.scratch}'/><target dev='vdb' bus='virtio'/></disk>"
        f"<serial type='file'><source path='{va.serial_log}'/><target port='0'/></serial></devices></domain>"
    )
    try:
        deleted = delete_unused(conn, listed, pool=name)
        kept = set(conn.storagePoolLookupByName(name).listVolumes())
    finally:
        dom.undefine()
    assert {u.name for u in deleted} == {u.name for u in listed} - kept
    assert kept == {Path(p).name for p in (va.kernel, va.initrd, va.base_disk, va.overlay, va.serial_log, va.scratch)}


def test_two_launches_of_one_image_at_once_upload_it_once(image, pool):
    """A fleet's replicas of one image on one host launch in parallel threads: the second
    waits for the first's upload and finds the volume, where both once copied into one
    partial file and the second's rename failed (ENOENT)."""
    conn, name, target = pool
    manifest = image.manifest()
    ensure_pool(conn, name=name, path=str(target))
    results: dict[str, object] = {}

    def launch(vm: str) -> None:
        c = open_connection("qemu:///system")
        try:
            events = []
            prepare_volumes(c, manifest, vm, events.append, pool_name=name, pool_target=str(target))
            results[vm] = [e.status for e in events if e.role == "disk"]
        except Exception as exc:  # noqa: BLE001 - reported below
            results[vm] = exc
        finally:
            c.close()

    threads = [threading.Thread(target=launch, args=(f"twin{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r[-1] if isinstance(r, list) else repr(r) for r in results.values()) == ["done", "skip"]


_UPLOADER = """
import sys
from pathlib import Path
from tdxvm.image.manifest import Artifact
from tdxvm.launch.connection import open_connection
from tdxvm.launch.volumes import ensure_pool, upload_artifact
pool, target, source, sha256, size = sys.argv[1:]
conn = open_connection("qemu:///system")
p = ensure_pool(conn, name=pool, path=target)
upload_artifact(conn, p, Artifact("disk.img", Path(source), sha256, int(size)), "disk")
print("uploaded")
"""


class _Upload:
    """Another controller process uploading a disk into the pool from a FIFO: it has copied
    the first 4 MiB (one copy chunk) into its partial file and waits for the rest."""

    def __init__(self, pool, tmp_path: Path) -> None:
        conn, name, target = pool
        ensure_pool(conn, name=name, path=str(target))
        self.data = os.urandom(COPY_CHUNK) + b"the rest"
        self.volume = content_name("disk", hashlib.sha256(self.data).hexdigest())
        fifo = tmp_path / "disk.fifo"
        os.mkfifo(fifo)
        args = [name, str(target), str(fifo), hashlib.sha256(self.data).hexdigest(), str(len(self.data))]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _UPLOADER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.fifo = open(fifo, "wb")  # noqa: SIM115 - closed by finish() or kill()
        self.fifo.write(self.data[:COPY_CHUNK])
        self.fifo.flush()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.proc.poll() is None:
            partials = list(target.glob(f".{self.volume}.partial-*"))
            if partials and partials[0].stat().st_size == COPY_CHUNK:
                self.partial = partials[0]
                return
            time.sleep(0.01)
        self.proc.kill()
        pytest.fail(f"the upload never wrote its first chunk: {self.proc.communicate()}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        with suppress(BrokenPipeError):
            self.fifo.close()

    def finish(self) -> tuple[int, str, str]:
        self.fifo.write(self.data[COPY_CHUNK:])
        self.fifo.close()
        out, err = self.proc.communicate(timeout=120)
        return self.proc.returncode, out, err


def test_prune_removes_the_partial_file_of_a_killed_upload(pool, tmp_path, capsys):
    """An upload killed mid-copy (SIGKILL: no cleanup runs) leaves its partial file in the
    pool's folder; prune lists it with its size and deletes it."""
    conn, name, target = pool
    upload = _Upload(pool, tmp_path)
    upload.kill()
    assert upload.partial.exists()  # what the kill left
    listed = unused_volumes(conn, pool=name)
    assert [(u.name, u.kind) for u in listed] == [(upload.partial.name, "partial")]
    assert listed[0].path == str(upload.partial) and listed[0].allocation >= COPY_CHUNK
    _report(listed, "qemu:///system", "text", deleted=False)  # what prune --dry-run prints of it
    out = capsys.readouterr().out
    assert f"would delete {upload.partial}  4 MiB  (partial file of an upload that was killed)" in out
    assert out.endswith("qemu:///system: would free 4 MiB\n")
    # A controller on another machine cannot take the lock: it goes by the host's mtime.
    xml = conn.storagePoolLookupByName(name).storageVolLookupByName(upload.partial.name).XMLDesc(0)
    assert not _abandoned_partial(None, upload.partial.name, xml, now=time.time())
    day_old = time.time() - PARTIAL_STALE_AFTER - 60
    os.utime(upload.partial, (day_old, day_old))
    xml = conn.storagePoolLookupByName(name).storageVolLookupByName(upload.partial.name).XMLDesc(0)
    assert _abandoned_partial(None, upload.partial.name, xml, now=time.time())
    assert delete_unused(conn, listed, pool=name) == listed
    assert not upload.partial.exists()
    assert conn.storagePoolLookupByName(name).listVolumes() == []


def test_prune_keeps_the_partial_file_of_an_upload_in_progress(pool, tmp_path):
    """The partial file of an upload still running (here blocked on its input) is neither
    listed nor deleted, and that upload then completes."""
    conn, name, target = pool
    upload = _Upload(pool, tmp_path)
    try:
        assert unused_volumes(conn, pool=name) == []
        assert delete_unused(conn, unused_volumes(conn, pool=name), pool=name) == []
        assert upload.partial.exists()
    finally:
        code, out, err = upload.finish()
    assert (code, out) == (0, "uploaded\n"), err
    assert (target / upload.volume).read_bytes() == upload.data
    assert not upload.partial.exists()
