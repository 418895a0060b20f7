"""What a remote host can do to a launch, on the namespace host, without booting a guest
(issue #14): its SSH key changes (refused, with what to do about known_hosts), its
libvirtd restarts in the middle of a launch (a clear error, and no VM left half-made).
The same restart while a real guest boots: tests/e2e/test_remote.py."""

from __future__ import annotations

import json

import libvirt
import pytest

from tdxvm.launch import tunnel
from tdxvm.launch.connection import connection, open_connection
from tdxvm.launch.errors import LibvirtConnectionLost, LibvirtHostKeyRefused
from tdxvm.launch.lifecycle import destroy
from tdxvm.launch.records import VmRecords
from tdxvm.launch.spec import VmSpec
from tdxvm.launch.sshtarget import HostKeyRefused
from tdxvm.launch.volumes import POOL_NAME
from tdxvm.provision import bringup
from tdxvm.provision.trust import for_backend
from tdxvm.releasekey import SECRET as RELEASE_SECRET
from tdxvm.secretstore import SecretStore

from ..attested_guest import CONTROLLER
from ..clirun import run
from ..launch.conftest import make_image


@pytest.fixture
def store(tmp_path) -> SecretStore:
    s = SecretStore(directory=tmp_path / "secrets")
    s.put("disk/0f0e0d0c-0b0a-4908-8706-050403020100", bytes(64))
    s.put(RELEASE_SECRET, CONTROLLER.private_bytes_raw())
    return s


def _vm_volumes(conn: libvirt.virConnect, name: str) -> list[str]:
    try:
        return [v for v in conn.storagePoolLookupByName(POOL_NAME).listVolumes() if v.startswith(f"{name}.")]
    except libvirt.libvirtError:
        return []  # no pool yet: nothing of the VM either


def test_a_changed_host_key_is_refused_with_what_to_do(ns_host, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    ns_host.replace_host_key()
    try:
        code, _out, err = run(capsys, "status", "--uri", ns_host.uri)
        assert code == 1, err  # refused, not "unreachable": the host answered with another key
        assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in err
        assert f"ssh-keygen -R {ns_host.address} -f {ns_host.known_hosts}" in err and "do not connect" in err
        code, out, _err = run(capsys, "status", "--uri", ns_host.uri, "-o", "json")
        assert code == 1 and json.loads(out)["error"]["code"] == "host-key"
        with pytest.raises(LibvirtHostKeyRefused):
            open_connection(ns_host.uri)
        # tdxvm's own SSH session to the host (the guests' tunnels) checks the same file the same way
        with pytest.raises(HostKeyRefused, match="known_hosts"):
            tunnel.prepare(ns_host.uri)
    finally:
        ns_host.trust_host_key()
        tunnel.close_all()
    with connection(ns_host.uri) as conn:  # the new key, once written into known_hosts, is accepted
        assert conn.getURI().startswith("qemu+ssh://")


@pytest.mark.parametrize("when", ["define", "boot"])
def test_libvirtd_restarted_during_a_launch_leaves_no_half_made_vm(ns_host, store, tmp_path, when):
    """The host's libvirtd restarts as the ``define`` phase begins (nothing defined yet: nothing
    is left, volumes included) or as ``boot`` begins (defined, not started: it stays defined
    and off, as any failed launch, with its record)."""
    image = make_image(tmp_path / "image", seed=tmp_path.name.encode())
    name = f"restart-{when}"
    spec = VmSpec(name=name, uri=ns_host.uri, image=image.manifest_path, backend="emulated", vcpus=1, memory=512)
    records = VmRecords.beside(store)
    conn = open_connection(ns_host.uri)

    def progress(event: bringup.PhaseEvent) -> None:
        if event.phase == when and event.status == "start":
            ns_host.restart_libvirtd()

    try:
        with pytest.raises(LibvirtConnectionLost) as err:
            bringup.bring_up(
                spec,
                image.manifest(),
                conn,
                trust=for_backend("emulated", emulated_dir=tmp_path / "em"),
                secrets=store,
                progress=progress,
                boot_timeout=30,
            )
        message = str(err.value)
        assert err.value.exit_status == 3 and err.value.code == "libvirt-connection-lost"
        assert f"lost the connection to libvirt at {ns_host.uri} during {when}" in message
        assert f"virsh -c {ns_host.uri} list --all" in message
        with connection(ns_host.uri) as fresh:
            if when == "define":
                assert "nothing of VM" in message
                assert name not in [d.name() for d in fresh.listAllDomains()]
                assert _vm_volumes(fresh, name) == []
                assert list(records.directory.glob("*")) == []
            else:
                assert "is defined and powered off" in message and f"tdxvm destroy {name}" in message
                dom = fresh.lookupByName(name)
                assert not dom.isActive() and records.get(dom.UUIDString()) is not None
                destroy(fresh, name, records=records)
                assert _vm_volumes(fresh, name) == [] and records.get(dom.UUIDString()) is None
    finally:
        with pytest.raises(libvirt.libvirtError):
            conn.listAllDomains()  # the connection ended with the daemon
        tunnel.close_all()
