"""Volumes and VM lifecycle on libvirt's test driver: a private host per test, nothing booted."""

from __future__ import annotations

import libvirt
import pytest

from tdxvm.launch import lifecycle
from tdxvm.launch.connection import open_connection
from tdxvm.launch.console import serial_log_tail
from tdxvm.launch.errors import ConsoleError, DomainError, NoSuchVmError, NotOurDomainError, VmExistsError, VolumeError
from tdxvm.launch.lifecycle import StepEvent
from tdxvm.launch.metadata import from_domain_xml
from tdxvm.launch.spec import parse_vm_spec
from tdxvm.launch.volumes import POOL_PATH, VolumeEvent, content_name, ensure_pool, prepare_volumes

from .conftest import host_xml, image_volumes

FOREIGN = """<domain type='test'><name>theirs</name><uuid>11111111-2222-4333-8444-555555555555</uuid>
<memory>524288</memory><vcpu>1</vcpu><os><type>hvm</type></os></domain>"""


def spec_for(image, uri, **extra):
    text = f"name: smoke\nuri: {uri}\nimage: {image.manifest_path}\nbackend: emulated\nvcpus: 1\nmemory: 1GiB\n"
    return parse_vm_spec(text + "".join(f"{k}: {v}\n" for k, v in extra.items()))


def volume_names(conn):
    return sorted(v.name() for v in conn.storagePoolLookupByName("tdxvm").listAllVolumes())


def test_prepare_defines_vm_with_metadata_and_reuses_image_volumes(image, host):
    conn = open_connection(host)
    events = []
    handle = lifecycle.prepare_domain(spec_for(image, host), image.manifest(), conn, events.append)
    manifest = image.manifest()
    # Image volumes were there (named by hash, right size): skipped; the VM's own were created.
    assert [e.status for e in events if isinstance(e, VolumeEvent) and e.role in ("kernel", "initrd", "disk")] == [
        "skip"
    ] * 3
    assert volume_names(conn) == sorted(
        [n for n, _ in image_volumes(manifest)] + ["smoke.qcow2", "smoke.serial.log", "smoke.scratch.img"]
    )
    assert [e.step for e in events if isinstance(e, StepEvent) and e.status == "done"] == [
        "preflight",
        "volumes",
        "define",
    ]
    dom = conn.lookupByName("smoke")
    assert not dom.isActive() and dom.UUIDString() == handle.uuid
    xml = dom.XMLDesc(0)
    assert f"{POOL_PATH}/{content_name('kernel', manifest.kernel.sha256)}" in xml
    assert "smoke.qcow2" in xml and "type='qcow2'" in xml and "smoke.serial.log" in xml
    assert "smoke.scratch.img" in xml and "dev='vdb'" in xml
    meta = from_domain_xml(xml)
    assert meta.backend == "emulated" and meta.labels["image"] == "smoke"
    assert meta.firmware == manifest.firmware_path  # where the emulated quote service finds the TDVF
    assert meta.forwards() == handle.forwards
    guests = sorted(f.guest_port for f in handle.forwards)
    assert guests == [22, 7300] and len({f.host_port for f in handle.forwards}) == 2
    assert handle.agent == ("127.0.0.1", handle.forward(7300).host_port)
    assert handle.policy.mrtd == (manifest.measurements.mrtd,)


def test_full_lifecycle(image, host):
    conn = open_connection(host)
    handle = lifecycle.prepare_domain(spec_for(image, host), image.manifest(), conn)
    lifecycle.start(handle)
    [st] = lifecycle.status(conn)
    assert st.state == "running" and st.name == "smoke" and st.started_at and st.uptime_s is not None
    assert st.attestation is None and st.agent_endpoint == f"127.0.0.1:{handle.agent[1]}"
    # without the controller's records, status takes no policy from the metadata the host writes
    assert st.policy is None and st.policy_exceptions == [] and st.record == "unchecked"
    assert st.manifest == str(image.manifest_path)
    verdict = {
        "verdict": "reject",
        "tcb_status": "OutOfDate",
        "reasons": [{"code": "tcb-status", "message": "m"}],
        "verified_at": "2026-01-15T00:00:00Z",
        "quote_version": 4,
        "measurements": {"mrtd": "00"},
    }
    lifecycle.record_attestation(handle.domain(), verdict)
    got = from_domain_xml(handle.domain().XMLDesc(0)).attestation  # the display copy
    assert got["verdict"] == "reject" and got["reasons"][0]["code"] == "tcb-status" and got["recorded_at"]
    assert "measurements" not in got  # only what status shows is kept
    assert from_domain_xml(handle.domain().XMLDesc(0)).firmware == image.manifest().firmware_path  # kept
    # The record survives in the persistent definition too.
    assert from_domain_xml(handle.domain().XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)).attestation["verdict"] == "reject"
    assert serial_log_tail(conn, "smoke") == ""  # the test driver writes no console output
    assert lifecycle.stop(conn, "smoke", timeout=5) == "shut down"
    assert lifecycle.stop(conn, "smoke") == "was not running"
    report = lifecycle.destroy(conn, "smoke")
    assert report.deleted_volumes == (
        f"{POOL_PATH}/smoke.qcow2",
        f"{POOL_PATH}/smoke.serial.log",
        f"{POOL_PATH}/smoke.scratch.img",
    )
    assert lifecycle.status(conn) == []
    assert volume_names(conn) == sorted(n for n, _ in image_volumes(image.manifest()))  # shared volumes stay
    with pytest.raises(NoSuchVmError, match="no VM named smoke"):
        lifecycle.destroy(conn, "smoke")


def test_destroy_running_vm(image, host):
    conn = open_connection(host)
    handle = lifecycle.prepare_domain(spec_for(image, host), image.manifest(), conn)
    lifecycle.start(handle)
    report = lifecycle.destroy(conn, "smoke")
    assert report.was_running and not [d.name() for d in conn.listAllDomains()]


def test_never_touches_domains_tdxvm_did_not_create(image, make_host):
    uri = make_host(host_xml(pool_volumes=image_volumes(image.manifest()), domains=[FOREIGN]))
    conn = open_connection(uri)
    for verb in (lifecycle.destroy, lifecycle.stop, lambda c, n: lifecycle.status(c, n), serial_log_tail):
        with pytest.raises(NotOurDomainError, match="theirs .* not created by tdxvm"):
            verb(conn, "theirs")
    assert conn.lookupByName("theirs").isActive()  # still running, still defined
    with pytest.raises(NotOurDomainError):
        lifecycle.record_attestation(conn.lookupByName("theirs"), {"verdict": "accept"})
    assert lifecycle.status(conn) == []  # not listed either
    with pytest.raises(VmExistsError, match="not created by tdxvm"):
        lifecycle.prepare_domain(spec_for(image, uri).model_copy(update={"name": "theirs"}), image.manifest(), conn)


def test_second_launch_of_same_name_refused(image, host):
    conn = open_connection(host)
    lifecycle.prepare_domain(spec_for(image, host), image.manifest(), conn)
    before = volume_names(conn)
    with pytest.raises(VmExistsError, match="VM smoke already exists .*tdxvm destroy smoke"):
        lifecycle.prepare_domain(spec_for(image, host), image.manifest(), conn)
    assert volume_names(conn) == before


def test_define_refused_by_libvirt_leaves_nothing(image, host):
    conn = open_connection(host)
    before = volume_names(conn)
    # A cpuset libvirt cannot parse: the spec is well-formed, libvirt refuses at define time.
    spec = spec_for(image, host, pinning='{vcpus: ["99999"]}')
    with pytest.raises(DomainError, match=r"refused to define VM smoke: .*99999"):
        lifecycle.prepare_domain(spec, image.manifest(), conn)
    assert conn.listAllDomains() == [] and volume_names(conn) == before


def test_interrupted_after_define_leaves_nothing(image, host):
    conn = open_connection(host)
    before = volume_names(conn)

    def progress(event):
        if isinstance(event, StepEvent) and event.step == "define" and event.status == "done":
            assert [d.name() for d in conn.listAllDomains()] == ["smoke"]  # it was defined
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        lifecycle.prepare_domain(spec_for(image, host), image.manifest(), conn, progress)
    assert conn.listAllDomains() == [] and volume_names(conn) == before


def test_missing_pool_is_created_then_upload_refused_cleanly(image, make_host):
    """The test driver cannot upload: the refusal is clear and leaves no partial volume."""
    uri = make_host(host_xml(pool=False))
    conn = open_connection(uri)
    with pytest.raises(VolumeError, match="cannot upload volumes"):
        prepare_volumes(conn, image.manifest(), "smoke")
    pool = conn.storagePoolLookupByName("tdxvm")
    assert pool.isActive() and pool.autostart() and "/var/lib/tdxvm/pool" in pool.XMLDesc()
    assert pool.listAllVolumes() == []
    assert ensure_pool(conn).name() == "tdxvm"  # idempotent


def test_short_leftover_volume_is_not_reused(image, make_host):
    manifest = image.manifest()
    vols = image_volumes(manifest)
    vols[2] = (vols[2][0], vols[2][1] - 100)  # disk volume cut short by an interrupted upload
    conn = open_connection(make_host(host_xml(pool_volumes=vols)))
    events = []
    with pytest.raises(VolumeError, match="cannot upload"):
        prepare_volumes(conn, manifest, "smoke", events.append)
    assert [e.role for e in events if e.status == "skip"] == ["kernel", "initrd"]
    assert content_name("disk", manifest.disk.sha256) not in volume_names(conn)  # the short one is gone


def test_start_failure_removes_the_vm(image, host):
    conn = open_connection(host)
    handle = lifecycle.prepare_domain(spec_for(image, host), image.manifest(), conn)
    handle.domain().create()  # already running: a second start is refused by libvirt
    with pytest.raises(DomainError, match="could not start VM smoke.*removed again"):
        lifecycle.start(handle)
    assert conn.listAllDomains() == [] and "smoke.qcow2" not in volume_names(conn)


def test_ports_avoid_other_tdxvm_vms(image, host):
    conn = open_connection(host)
    first = lifecycle.prepare_domain(spec_for(image, host), image.manifest(), conn)
    taken = {f.host_port for f in first.forwards}
    second = lifecycle.prepare_domain(
        spec_for(image, host).model_copy(update={"name": "smoke2"}), image.manifest(), conn
    )
    assert not taken & {f.host_port for f in second.forwards}
    assert lifecycle.ports_in_use(conn) == taken | {f.host_port for f in second.forwards}


def test_another_pool(image, make_host):
    uri = make_host(host_xml(pool_volumes=image_volumes(image.manifest()), pool_name="vms", pool_path="/srv/vms"))
    conn = open_connection(uri)
    handle = lifecycle.prepare_domain(spec_for(image, uri), image.manifest(), conn, pool="vms", pool_path="/srv/vms")
    assert handle.volumes.overlay == "/srv/vms/smoke.qcow2" and handle.volumes.pool == "vms"
    assert "tdxvm" not in [p.name() for p in conn.listAllStoragePools()]
    assert lifecycle.destroy(conn, "smoke").deleted_volumes == (
        "/srv/vms/smoke.qcow2",
        "/srv/vms/smoke.serial.log",
        "/srv/vms/smoke.scratch.img",
    )


def test_the_tdvf_goes_into_the_pool_only_for_an_emulated_guest_on_a_remote_host(image):
    """An emulated guest boots no TDVF; the controller's quote service reads the one it stands
    for back through libvirt: on this machine the manifest's file, on a remote host a copy in
    its pool (a path of the build machine means nothing there). A spec's own firmware: is a
    host path, and a TD boots its TDVF from the host."""
    remote = "qemu+ssh://root@tdx-host/system"
    manifest = image.manifest()
    upload = lifecycle.firmware_upload(spec_for(image, remote), manifest, remote)
    assert upload is not None and (upload.path, upload.sha256) == (image.firmware, manifest.firmware_sha256)
    assert upload.size == image.firmware.stat().st_size
    assert lifecycle.firmware_upload(spec_for(image, "qemu:///system"), manifest, "qemu:///system") is None
    assert lifecycle.firmware_upload(spec_for(image, remote, firmware="/usr/share/ovmf/T.fd"), manifest, remote) is None
    tdx = parse_vm_spec(f"name: td\nuri: {remote}\nimage: {image.manifest_path}\nfirmware: /usr/share/ovmf/T.fd\n")
    assert lifecycle.firmware_upload(tdx, manifest, remote) is None
    image.firmware.unlink()
    with pytest.raises(VolumeError, match=r"cannot be read on this machine.*\nfix: "):
        lifecycle.firmware_upload(spec_for(image, remote), manifest, remote)


class _AnswersWithAnother:
    """A host's libvirt that answers every lookup by name with the domain ``smoke``."""

    def __init__(self, conn) -> None:
        self.conn = conn

    def getURI(self) -> str:  # noqa: N802 - libvirt's name
        return self.conn.getURI()

    def lookupByName(self, name: str):  # noqa: N802 - libvirt's name
        return self.conn.lookupByName("smoke")


def test_a_lookup_answered_with_another_domain_is_refused(image, host):
    """attest, provision and destroy of VM b must never act on VM a because the host said so."""
    conn = open_connection(host)
    lifecycle.prepare_domain(spec_for(image, host), image.manifest(), conn)
    with pytest.raises(DomainError, match="answered the lookup of other with domain 'smoke': refused"):
        lifecycle.lookup(_AnswersWithAnother(conn), "other")
    assert lifecycle.lookup(conn, "smoke")[0].name() == "smoke"


class _FloodingStream:
    """A hostile host's libvirt: its download stream sends on past the length asked for."""

    def recv(self, n: int) -> bytes:
        return b"\n" * n

    def finish(self) -> None:
        raise AssertionError("a flooding stream is aborted, never finished")

    def abort(self) -> None:
        pass


class _HostsVolume:
    def __init__(self, size: int) -> None:
        self.size = size

    def info(self) -> list[int]:
        return [0, self.size, self.size]

    def download(self, stream: object, offset: int, length: int, flags: int) -> None:
        pass


class _HostsLibvirt:
    def __init__(self, size: int) -> None:
        self.size = size

    def getURI(self) -> str:  # noqa: N802  (libvirt's name)
        return "qemu+ssh://root@host.example/system"

    def newStream(self, flags: int) -> _FloodingStream:  # noqa: N802
        return _FloodingStream()

    def storageVolLookupByPath(self, path: str) -> _HostsVolume:  # noqa: N802
        return _HostsVolume(self.size)


def test_a_host_cannot_make_the_controller_keep_more_than_it_asked_for():
    """Before, a serial log said to be 10 bytes long took whatever the stream sent (64 MiB
    and on), and a "kernel" the host called 100 GiB was downloaded whole."""
    from tdxvm.launch.console import _read_tail, read_host_file

    with pytest.raises(ConsoleError, match="libvirt sent more than the 10 bytes asked for"):
        _read_tail(_HostsLibvirt(10), "/var/lib/tdxvm/pool/vm.serial.log", 50)
    with pytest.raises(ConsoleError, match="more than a kernel, initramfs or firmware"):
        read_host_file(_HostsLibvirt(100 << 30), "/var/lib/tdxvm/pool/vmlinuz-x")
