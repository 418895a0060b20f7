"""A launch's host side on the namespace host, without booting: what an emulated guest on
a ``qemu+ssh://`` host needs there (issue #14). The image's volumes, the TDVF with them,
go into the host's own pool through libvirt's upload stream; the domain is defined with
them; the controller reads the kernel, initramfs and TDVF back through libvirt as the
emulated quote service does, and the serial log too; destroy leaves only the shared
content volumes. (Booted end to end: tests/e2e/test_remote.py.)"""

from __future__ import annotations

import libvirt
import pytest

from tdxvm.emulate.qgs import LaunchArtifacts
from tdxvm.launch import tunnel
from tdxvm.launch.connection import open_connection
from tdxvm.launch.console import read_host_file, serial_log_tail
from tdxvm.launch.lifecycle import destroy, prepare_domain
from tdxvm.launch.spec import parse_vm_spec
from tdxvm.launch.volumes import POOL_NAME, POOL_PATH, content_name

from ..launch.conftest import make_image


@pytest.fixture
def remote(ns_host):
    conn = open_connection(ns_host.uri)
    yield conn
    conn.close()
    tunnel.close_all()


def test_an_emulated_vm_is_defined_on_the_host_from_its_own_pool(ns_host, remote, tmp_path):
    image = make_image(tmp_path / "smoke", seed=tmp_path.name.encode())
    manifest = image.manifest()
    spec = parse_vm_spec(
        f"name: remote-define\nuri: {ns_host.uri}\nimage: {image.manifest_path}\nbackend: emulated\nmemory: 512MiB\n"
        "scratch: 256MiB\n"
    )
    handle = prepare_domain(spec, manifest, remote)
    try:
        firmware = f"{POOL_PATH}/{content_name('firmware', manifest.firmware_sha256)}"
        assert handle.volumes.firmware == firmware
        assert f'path="{firmware}"' in handle.xml and str(image.firmware) not in handle.xml
        # the files are the host's own (its /var/lib), streamed over the libvirt connection
        for path, source in (
            (handle.volumes.kernel, manifest.kernel.path),
            (handle.volumes.initrd, manifest.initrd.path),
            (handle.volumes.base_disk, manifest.disk.path),
            (firmware, image.firmware),
        ):
            assert ns_host.path(path).read_bytes() == source.read_bytes()
        # what the emulated quote service measures, read back through libvirt
        xml = remote.lookupByName("remote-define").XMLDesc(0)
        artifacts = LaunchArtifacts.from_domain_xml(xml, read=lambda path: read_host_file(remote, path))
        assert artifacts.kernel == manifest.kernel.path.read_bytes()
        assert artifacts.initrd == manifest.initrd.path.read_bytes()
        assert artifacts.firmware == image.firmware.read_bytes() and artifacts.cmdline == manifest.cmdline
        # the serial log is a volume of the host: its tail comes through libvirt's download stream
        ns_host.path(handle.volumes.serial_log).write_bytes(b"".join(b"line %d\n" % i for i in range(500)))
        assert serial_log_tail(remote, "remote-define", lines=2) == "line 498\nline 499\n"
    finally:
        report = destroy(remote, "remote-define")
    assert sorted(report.deleted_volumes) == sorted(
        [handle.volumes.overlay, handle.volumes.serial_log, handle.volumes.scratch]
    )
    with pytest.raises(libvirt.libvirtError):
        remote.lookupByName("remote-define")
    pool = remote.storagePoolLookupByName(POOL_NAME)
    left = set(pool.listVolumes())
    assert {content_name("firmware", manifest.firmware_sha256), content_name("disk", manifest.disk.sha256)} <= left
    assert not [v for v in left if v.startswith("remote-define")]
    for name in (
        content_name("kernel", manifest.kernel.sha256),
        content_name("initrd", manifest.initrd.sha256),
        content_name("disk", manifest.disk.sha256),
        content_name("firmware", manifest.firmware_sha256),
    ):
        pool.storageVolLookupByName(name).delete(0)  # this test's own image: nobody else uses it
