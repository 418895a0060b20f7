"""Uploads through the real libvirtd (qemu:///system), into a private pool; nothing is booted.

libvirt's test driver cannot upload or download volumes, so this is where the stream
code meets a real daemon. The pool lives in the test's temporary folder under a unique
name and is removed afterwards. Skipped where no libvirtd answers (CI starts one).
"""

from __future__ import annotations

import subprocess
import uuid

import libvirt
import pytest

from tdxvm.launch.connection import open_connection
from tdxvm.launch.console import _read_tail
from tdxvm.launch.errors import ConnectError, VolumeError
from tdxvm.launch.volumes import content_name, prepare_volumes


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
