"""End to end on a remote libvirt host (issue #14): the namespace host of tests/nshost.py,
reached only as ``qemu+ssh://root@10.231.N.2/system``, with its own libvirtd, pool and
loopback. The smoke image is launched emulated there from this process (the
controller): its volumes uploaded over the libvirt connection, the guest's ports reached
through the host's SSH, and the emulated quote service, whose keys stay here, offered to
the guest on the host's loopback through the same SSH session (``ssh -R``). Then SSH
with the attested host key, the per-domain quote daemon (what provisioning uses), a
re-attestation, destroy, and nothing left on the host but the shared content volumes."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shlex
import signal
import threading
import time
from pathlib import Path

import libvirt
import pytest

from tdxvm.attest.quote import parse_quote
from tdxvm.launch import sshhost, tunnel
from tdxvm.launch.connection import open_connection
from tdxvm.launch.console import serial_log_tail
from tdxvm.launch.errors import LaunchError, LibvirtConnectionLost
from tdxvm.launch.lifecycle import destroy, status
from tdxvm.launch.manifest import load_manifest
from tdxvm.launch.records import VmRecords
from tdxvm.launch.spec import VmSpec
from tdxvm.launch.sshtarget import ssh_target
from tdxvm.launch.volumes import POOL_NAME, POOL_PATH, content_name
from tdxvm.provision import attestation, bringup, handshake, ssh
from tdxvm.provision.trust import for_backend
from tdxvm.secretstore import SecretStore
from tdxvm.sshkey import controller_key

from ..nshost import alive, cmdline
from .test_launch import _HostAddsAVcpu, _launch

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def trust(tmp_path_factory):
    return for_backend("emulated", emulated_dir=tmp_path_factory.mktemp("emulated"))


@pytest.fixture
def remote(ns_host):
    conn = open_connection(ns_host.uri)
    yield conn
    with contextlib.suppress(libvirt.libvirtError):  # a test may have restarted the host's sshd under it
        conn.close()
    tunnel.close_all()


def _smoke_spec(name: str, ns_host, smoke_build) -> VmSpec:
    return VmSpec(
        name=name,
        uri=ns_host.uri,
        image=smoke_build.folder / "manifest.json",
        backend="emulated",
        vcpus=1,
        memory=1024,
        scratch=256,
    )


def _listening(ns_host, port: int) -> bool:
    """Whether something listens on the host's 127.0.0.1:``port`` (``ss`` inside the host)."""
    return f"127.0.0.1:{port} " in ns_host.run(["ss", "-Hltn"]).stdout + " "


def _guest_asks(client, address: str, request: dict) -> dict:
    """One request to the emulated quote service at ``address`` (``10.0.2.2:PORT``), sent from inside the guest."""
    host, port = address.rsplit(":", 1)
    code = (
        "import socket, sys; "
        f"s = socket.create_connection(({host!r}, {int(port)}), 30); "
        f"s.sendall({json.dumps(request).encode()!r} + b'\\n'); "
        "sys.stdout.write(s.makefile().readline())"
    )
    return json.loads(ssh.run(client, f"python3 -c {shlex.quote(code)}", timeout=120))


def _pid_gone(pid: int, timeout: float) -> bool:
    """Whether process ``pid`` (a quote daemon this test process started) ended within
    ``timeout`` seconds; reaped then (it is our child: its zombie would stay)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        if state == "Z":
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            return True
        time.sleep(0.2)
    return False


def test_launch_on_a_remote_host_attest_unlock_ssh_reattest(ns_host, remote, trust, smoke_build, tmp_path):
    store = SecretStore(directory=smoke_build.secrets)
    records = VmRecords.beside(store)
    name = f"e2e-remote-{secrets.token_hex(3)}"
    spec = _smoke_spec(name, ns_host, smoke_build)
    manifest = smoke_build.manifest
    daemon_pid = 0
    events: list = []
    opened: list[libvirt.virConnect] = []
    try:
        result = _launch(remote, spec, trust, store, events)
        assert [e.phase for e in events if e.status == "done"] == list(bringup.PHASES)
        print(f"remote launch on {ns_host.name}: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items()))
        assert result.verdict["verdict"] == "accept" and result.verdict["tcb_status"] == "UpToDate"
        # the host runs this machine's libvirt and QEMU: RTMR0 predicted with the controller's own (never the
        # host's converter) and pinned; the emulated TD's quote carried the same value, from the argv the host
        # runs (read over its SSH session), or the launch would have been refused
        assert result.rtmr0["value"] is not None and "profile same-versions" in result.rtmr0["reason"]
        assert result.verdict["measurements"]["rtmr0"] == result.rtmr0["value"]

        # the image went into the host's own pool over the libvirt connection, the TDVF the
        # emulated TD stands for with it; the domain names those volumes
        pool = remote.storagePoolLookupByName(POOL_NAME)
        artifacts = manifest["artifacts"]
        uploaded = {
            content_name("kernel", artifacts["vmlinuz"]["sha256"]): artifacts["vmlinuz"]["size"],
            content_name("initrd", artifacts["initrd.img"]["sha256"]): artifacts["initrd.img"]["size"],
            content_name("disk", artifacts["disk.img"]["sha256"]): artifacts["disk.img"]["size"],
        }
        firmware = Path(manifest["firmware"]["path"])
        uploaded[content_name("firmware", manifest["firmware"]["sha256"])] = firmware.stat().st_size
        for volume, size in uploaded.items():
            assert pool.storageVolLookupByName(volume).info()[1] == size
            assert ns_host.path(f"{POOL_PATH}/{volume}").stat().st_size == size  # in the host's /var/lib
        xml = remote.lookupByName(name).XMLDesc(0)
        fw_volume = f"{POOL_PATH}/{content_name('firmware', manifest['firmware']['sha256'])}"
        assert f'path="{fw_volume}"' in xml and str(firmware) not in xml
        assert not Path(f"/run/libvirt/qemu/{name}.pid").exists()  # not a domain of this machine's libvirtd

        # the quote service was offered on the host's loopback only while it attested
        assert sshhost.session(ssh_target(ns_host.uri)).offered == []
        # the serial log (a volume on the host) is read through libvirt
        tail = serial_log_tail(remote, name, lines=2000)
        assert "tdxvm-unlock: listening" in tail and "received secret 'disk'" in tail

        # SSH through the host's SSH, accepting only the attested key
        host_key = base64.b64decode(result.ssh_host_key)
        address = tunnel.reach(ns_host.uri, *result.ssh)
        with ssh.connect(address, host_key=host_key, client_key=controller_key(store)) as client:
            assert ssh.run(client, "findmnt -no FSTYPE /").strip() == "overlay"
            assert ssh.run(client, "cat /etc/ssh/ssh_host_ed25519_key.pub").split()[1] == result.ssh_host_key

            # the per-domain quote daemon (what provisioning hands the model service) runs on the
            # controller and holds a port on the host's loopback for the guest
            dom = remote.lookupByName(name)
            qgs = trust.ensure_quote_daemon(ns_host.uri, dom.UUIDString(), boot_id=dom.ID())
            doc = json.loads((trust.emulated_dir / "qgsd" / f"{dom.UUIDString()}.json").read_text())
            daemon_pid = int(doc["pid"])
            assert qgs == f"10.0.2.2:{doc['port']}" and _listening(ns_host, doc["port"])
            assert _guest_asks(client, qgs, {"op": "read", "rtmr": 3}) == {"rtmr": 3, "value": "00" * 48}
            extended = _guest_asks(client, qgs, {"op": "extend", "rtmr": 3, "digest": "ab" * 48})
            assert extended["rtmr"] == 3 and extended["value"] != "00" * 48
            quote = _guest_asks(client, qgs, {"report_data": "cd" * 64})
            signed = parse_quote(base64.b64decode(quote["quote"]))
            assert signed.body.report_data == bytes.fromhex("cd" * 64)
            assert signed.body.rtmrs[3] == bytes.fromhex(extended["value"])
            assert trust.ensure_quote_daemon(ns_host.uri, dom.UUIDString(), boot_id=dom.ID()) == qgs  # the same one

        # the host's sshd restarts and every session ends (libvirt's, the tunnels', the daemon's): the
        # daemon opens libvirt and its SSH session again and is offered the same port; its RTMR3 is kept
        ns_host.stop_sshd()
        ns_host.start_sshd()
        remote = open_connection(ns_host.uri)
        opened.append(remote)
        deadline = time.monotonic() + 60
        while not _listening(ns_host, doc["port"]) and time.monotonic() < deadline:
            time.sleep(0.5)
        address = tunnel.reach(ns_host.uri, *result.ssh)
        with ssh.connect(address, host_key=host_key, client_key=controller_key(store)) as client:
            assert _guest_asks(client, qgs, {"op": "read", "rtmr": 3}) == extended

        # re-attestation with a fresh nonce, under the controller's record
        with attestation.reattest(remote, name, records=records, trust=trust) as again:
            assert again.nonce != b"" and again.verdict.accepted
            assert again.keys["ssh-host"] == host_key
        [vm] = status(remote, name, records=records)
        assert vm.record == "ok" and vm.attestation["verdict"] == "accept" and vm.uri == ns_host.uri

        report = destroy(remote, name, records=records)
        assert report.was_running and records.get(vm.uuid) is None
        assert sorted(Path(p).name for p in report.deleted_volumes) == sorted(
            [f"{name}.qcow2", f"{name}.serial.log", f"{name}.scratch.img"]
        )
    finally:
        with contextlib.suppress(LaunchError, libvirt.libvirtError):
            destroy(remote, name, records=records)
        if daemon_pid and not _pid_gone(daemon_pid, 15):  # it exits once the domain is gone
            os.kill(daemon_pid, signal.SIGTERM)
            pytest.fail(f"the quote daemon {daemon_pid} outlived its domain")
        for conn in opened:
            conn.close()

    # nothing left on the host: no domain, no QEMU, no VM volume, no offered port
    remote = open_connection(ns_host.uri)
    opened.append(remote)
    pool = remote.storagePoolLookupByName(POOL_NAME)
    assert remote.listAllDomains() == []
    assert ns_host.run(["pgrep", "-f", "qemu-system"], check=False).returncode == 1
    assert not [v for v in pool.listVolumes() if v.startswith(name)]
    assert set(uploaded) <= set(pool.listVolumes())  # the shared content volumes stay
    assert not _listening(ns_host, doc["port"])
    assert sshhost.session(ssh_target(ns_host.uri)).offered == []
    with pytest.raises(libvirt.libvirtError):
        remote.lookupByName(name)
    remote.close()


def test_a_machine_the_remote_host_changed_after_definition_is_refused(ns_host, remote, trust, smoke_build):
    """The same-versions profile: RTMR0 predicted from the XML the controller wrote, with
    its own libvirt and QEMU; the host then gives the domain one more vCPU before starting
    it. The emulated TD's quote describes the machine the host really runs (its QEMU argv,
    read over the host's SSH session), so the first quote misses the pin: refused, the
    disk key never sent."""
    store = SecretStore(directory=smoke_build.secrets)
    name = f"e2e-remote-vcpu-{secrets.token_hex(3)}"
    events = _HostAddsAVcpu(remote, name)
    try:
        with pytest.raises(handshake.AttestationRefused) as refused:
            _launch(remote, _smoke_spec(name, ns_host, smoke_build), trust, store, events)
        [define] = [e.detail for e in events if e.phase == "define" and e.status == "done"]
        assert "RTMR0 pinned" in define
        assert [(r.code, r.message.split(" is ")[0]) for r in refused.value.reasons] == [
            ("measurement-mismatch", "quote field RTMR0")
        ]
        tail = serial_log_tail(remote, name, lines=400)
        assert "tdxvm-unlock: listening" in tail and "received secret" not in tail
        assert not remote.lookupByName(name).isActive()  # stopped
    finally:
        with contextlib.suppress(LaunchError, libvirt.libvirtError):
            destroy(remote, name)


def test_libvirtd_restarted_while_the_guest_boots(ns_host, remote, trust, smoke_build, tmp_path):
    """The host's libvirtd restarts while the guest's QEMU runs (QEMU goes on, as under
    systemd): the launch ends with a clear error naming the connection it lost, and the VM
    is left as any failed launch leaves it, defined and powered off, its QEMU gone."""
    store = SecretStore(directory=smoke_build.secrets)
    records = VmRecords.beside(store)
    name = f"e2e-restart-{secrets.token_hex(3)}"
    spec = _smoke_spec(name, ns_host, smoke_build)

    def progress(event: bringup.PhaseEvent) -> None:
        if event.phase == "boot" and event.status == "start":
            threading.Thread(target=restart_once_running, daemon=True).start()

    restarted: list[int] = []

    def restart_once_running() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            qemu = [p for p in ns_host.pids() if f"guest={name}" in cmdline(p)]
            if qemu:
                time.sleep(2)  # into the boot: the controller is polling the guest's agent
                ns_host.restart_libvirtd()
                restarted.append(qemu[0])
                return
            time.sleep(0.2)

    try:
        with pytest.raises(LibvirtConnectionLost) as err:
            bringup.bring_up(
                spec, load_manifest(spec.image), remote, trust=trust, secrets=store, progress=progress, boot_timeout=120
            )
        assert restarted, "QEMU never ran on the host"
        message = str(err.value)
        assert "during boot" in message and "is defined and powered off" in message
        with contextlib.closing(open_connection(ns_host.uri)) as fresh:
            dom = fresh.lookupByName(name)
            assert not dom.isActive() and records.get(dom.UUIDString()) is not None
            assert not alive(restarted[0])  # its QEMU was stopped, through the new connection
    finally:
        with (
            contextlib.suppress(LaunchError, libvirt.libvirtError),
            contextlib.closing(open_connection(ns_host.uri)) as fresh,
        ):
            destroy(fresh, name, records=records)
        tunnel.close_all()
