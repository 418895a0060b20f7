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
from tdxvm.launch import volumes
from tdxvm.launch.connection import open_connection
from tdxvm.launch.console import _read_tail
from tdxvm.launch.errors import ConnectError, ConsoleError, VolumeError
from tdxvm.launch.manifest import Artifact
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


class _Workers:
    """Controller processes that each run ``script`` once per line written to them (the
    line is the script's input, its one output line the result), started together: the
    parent writes a round's line to every worker before reading any answer. ``shared``:
    one controller (one state folder, so its locks are shared), else one per worker."""

    def __init__(self, script: str, args: list[str], tmp_path: Path, *, count: int = 2, shared: bool) -> None:
        self.procs = []
        for i in range(count):
            env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / ("state" if shared else f"state{i}")))
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", script, *args],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    env=env,
                )
            )

    def round(self, line: str) -> list[str]:
        for p in self.procs:
            p.stdin.write(line + "\n")
            p.stdin.flush()
        return [p.stdout.readline().strip() or f"exit {p.wait()}" for p in self.procs]

    def close(self) -> None:
        for p in self.procs:
            p.stdin.close()
            p.wait(timeout=60)
            p.stdout.close()


_ENSURE_POOL = """
import sys
from tdxvm.launch.connection import open_connection
from tdxvm.launch.volumes import ensure_pool
conn = open_connection("qemu:///system")
for line in sys.stdin:
    name, path = line.split()
    try:
        ensure_pool(conn, name=name, path=path)
        print("ok", flush=True)
    except Exception as exc:
        print(f"{type(exc).__name__}: {exc}".replace("\\n", " "), flush=True)
"""


@pytest.mark.parametrize("shared", [True, False], ids=["one-controller", "two-controllers"])
def test_two_first_launches_on_a_host_at_once_both_get_the_pool(pool, tmp_path, shared):
    """Two processes make the first use of a host at once (two launches, two fleets'
    applies): both define, build and start the pool. Each must get it, and neither may
    remove the pool the other got (one's define failed with "already exists", its start
    with "already active", and its error path undefined the pool the other had)."""
    conn, name, _target = pool
    workers = _Workers(_ENSURE_POOL, [], tmp_path, shared=shared)
    failures = []
    try:
        for i in range(10):
            round_name = f"{name}-{i}"
            results = workers.round(f"{round_name} {tmp_path / f'pool{i}'}")
            try:
                p = conn.storagePoolLookupByName(round_name)
            except libvirt.libvirtError:
                failures.append(f"round {i}: {results}; the pool is gone")
                continue
            if results != ["ok", "ok"] or not p.isActive():
                failures.append(f"round {i}: {results}; active: {p.isActive()}")
            if p.isActive():
                p.destroy()
            p.undefine()
    finally:
        workers.close()
    assert not failures, f"{len(failures)} of 10 rounds failed:\n" + "\n".join(failures)


_UPLOAD = """
import sys
from pathlib import Path
from tdxvm.launch import volumes
from tdxvm.launch.connection import open_connection
from tdxvm.launch.manifest import Artifact
volumes.local_folder = lambda pool: None  # a remote host's path: the virStream upload
volumes.UPLOAD_POLL = 0.05  # look at the other's upload often: short rounds
name, source, sha256, size = sys.argv[1:]
conn = open_connection("qemu:///system")
pool = conn.storagePoolLookupByName(name)
artifact = Artifact("disk.img", Path(source), sha256, int(size))
for _ in sys.stdin:
    try:
        _vol, uploaded = volumes.upload_artifact(conn, pool, artifact, "disk")
        print("uploaded" if uploaded else "found", flush=True)
    except Exception as exc:
        print(f"{type(exc).__name__}: {exc}".replace("\\n", " "), flush=True)
"""


@pytest.mark.parametrize("shared", [True, False], ids=["one-controller", "two-controllers"])
def test_two_processes_uploading_one_volume_to_a_remote_host_at_once(pool, tmp_path, shared):
    """Two launches of one image to one (remote: virStream) host at once from two
    processes: one uploads, the other waits for that upload and finds the volume. Once,
    the second deleted the first's volume mid-upload as "left by an interrupted upload",
    or its create failed ("exists already")."""
    conn, name, target = pool
    p = ensure_pool(conn, name=name, path=str(target))
    data = os.urandom(3 << 20)
    source = tmp_path / "disk.img"
    source.write_bytes(data)
    sha256 = hashlib.sha256(data).hexdigest()
    volume = target / content_name("disk", sha256)
    workers = _Workers(_UPLOAD, [name, str(source), sha256, str(len(data))], tmp_path, shared=shared)
    failures = []
    try:
        for i in range(10):
            for vol in p.listAllVolumes():
                vol.delete(0)
            results = workers.round("go")
            if sorted(results) != ["found", "uploaded"] or volume.read_bytes() != data:
                failures.append(f"round {i}: {results}")
    finally:
        workers.close()
    assert not failures, f"{len(failures)} of 10 rounds failed:\n" + "\n".join(failures)


def test_a_short_volume_that_stops_growing_is_replaced(pool, tmp_path, monkeypatch):
    """A content volume shorter than its artifact that does not grow (a remote upload
    that was killed, or another controller's that stopped) is waited for while it may
    still grow, then deleted and uploaded again."""
    conn, name, target = pool
    p = ensure_pool(conn, name=name, path=str(target))
    monkeypatch.setattr(volumes, "local_folder", lambda _pool: None)  # the virStream upload
    monkeypatch.setattr(volumes, "UPLOAD_STALL", 0.2, raising=False)
    monkeypatch.setattr(volumes, "UPLOAD_POLL", 0.05, raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    data = os.urandom(300_000)
    (tmp_path / "disk.img").write_bytes(data)
    artifact = Artifact("disk.img", tmp_path / "disk.img", hashlib.sha256(data).hexdigest(), len(data))
    volume = content_name("disk", artifact.sha256)
    p.createXML(f"<volume><name>{volume}</name><capacity>1000</capacity><target><format type='raw'/></target></volume>")
    events = []
    _vol, uploaded = volumes.upload_artifact(conn, p, artifact, "disk", events.append)
    assert uploaded and (target / volume).read_bytes() == data
    statuses = [e.status for e in events]
    assert statuses[0] == "wait" and events[0].done == 1000 and statuses[-1] == "done"
    assert "skip" not in statuses
    assert not list((tmp_path / "state" / "tdxvm" / "locks").iterdir())  # the lock file is removed
