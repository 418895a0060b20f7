"""The second libvirt host the remote tests use (tests/nshost.py): reached only over SSH,
separate from the machine's own libvirt, strict about its host key, and gone without a
trace after teardown. Needs root (CI runs as root); seconds: one QEMU starts, with
nothing to boot."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from tdxvm.launch import sshhost
from tdxvm.launch.connection import connection, open_connection
from tdxvm.launch.errors import LibvirtHostKeyRefused, SshTransportError
from tdxvm.launch.sshtarget import HostSshError, ssh_target
from tdxvm.launch.volumes import POOL_NAME, POOL_PATH, ensure_pool

from ..nshost import NamespaceHost, Unavailable, alive, cmdline

TDXVM = Path(sys.executable).with_name("tdxvm")


def virsh(uri: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["virsh", "-q", "-c", uri, *args], capture_output=True, text=True, timeout=60, check=False)
    assert not check or proc.returncode == 0, f"virsh {' '.join(args)}: {proc.stderr}"
    return proc


def probe_domain(name: str) -> str:
    """A domain with no disk and no network: defined only, or started (QEMU then waits in
    its firmware with nothing to boot)."""
    return (
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='q35'>hvm</type></os></domain>"
    )


def mounts() -> str:
    return subprocess.run(["findmnt", "-rn", "-o", "TARGET,SOURCE,FSTYPE"], capture_output=True, text=True).stdout


def links() -> set[str]:
    return set(os.listdir("/sys/class/net"))


def netns_list() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_virsh_reaches_the_host_over_ssh(ns_host):
    assert ns_host.uri.startswith(f"qemu+ssh://root@{ns_host.address}/system?")
    assert virsh(ns_host.uri, "uri").stdout.strip() == ns_host.uri
    assert virsh(ns_host.uri, "hostname").stdout.strip() == ns_host.name
    virsh(ns_host.uri, "list", "--all")
    # No pool of the machine's: the host's libvirt starts from a configuration of its own
    # (other tests of the session may have made tdxvm's pool there since, never the machine's).
    machines = set(virsh("qemu:///system", "pool-list", "--all", "--uuid").stdout.split())
    assert machines and not machines & set(virsh(ns_host.uri, "pool-list", "--all", "--uuid").stdout.split())
    assert virsh(ns_host.uri, "net-list", "--all").stdout.strip() == ""
    # Plain OpenSSH with the same key and known_hosts reaches it too (what tunnels will use).
    ssh = subprocess.run(ns_host.ssh_argv("hostname"), capture_output=True, text=True, timeout=30)
    assert ssh.returncode == 0 and ssh.stdout.strip() == ns_host.name, ssh.stderr


def test_the_host_talks_only_to_the_controller_and_itself(ns_host):
    routes = ns_host.run(["ip", "-4", "route", "show", "table", "all"]).stdout
    assert "default" not in routes and f"{ns_host.address.rsplit('.', 1)[0]}.0/30" in routes
    addresses = ns_host.run(["ip", "-4", "-o", "addr", "show"]).stdout.split("\n")
    assert sorted(line.split()[3] for line in addresses if line) == sorted(["127.0.0.1/8", f"{ns_host.address}/30"])
    listening = ns_host.run(["ss", "-Hltn"]).stdout  # sshd on the host's address only
    assert f"{ns_host.address}:22" in listening and "0.0.0.0:22" not in listening


def test_its_domains_pools_and_files_are_its_own(ns_host):
    name = f"nshost-probe-{uuid.uuid4().hex[:8]}"
    with connection(ns_host.uri) as conn:
        caps = ET.fromstring(conn.getCapabilities())
        assert caps.findtext("host/uuid") == ns_host.host_uuid
        dom = conn.defineXML(probe_domain(name))
        pool = ensure_pool(conn)  # tdxvm's pool, at tdxvm's path, inside the host
        vol = pool.createXML(
            f"<volume><name>{name}.raw</name><capacity>4096</capacity><target><format type='raw'/></target></volume>"
        )
        try:
            assert name in conn.listDefinedDomains()
            assert vol.path() == f"{POOL_PATH}/{name}.raw"
            assert ns_host.path(vol.path()).is_file()  # in the host's own /var/lib/tdxvm
            assert not Path(vol.path()).exists()  # not in the machine's
            machine = _machine_view()
            if machine is not None:
                domains, volumes = machine
                assert name not in domains and f"{name}.raw" not in volumes
        finally:
            vol.delete(0)
            dom.undefine()
            pool.destroy()
            pool.undefine()
        assert conn.listAllStoragePools() == []


def test_a_hosts_file_is_read_over_its_ssh_session(ns_host):
    """:meth:`HostSession.read_file` (how the emulated quote service reads the argv of the
    QEMU a remote host runs): the host's own file, whole; a missing file, or one over the
    limit, is a typed error that names it."""
    host = sshhost.session(ssh_target(ns_host.uri))
    name = f"/tmp/read-probe-{uuid.uuid4().hex[:8]}"
    data = bytes(range(256)) * 300  # binary, and more than one channel read
    ns_host.path(name).write_bytes(data)
    try:
        assert host.read_file(name) == data
        assert not Path(name).exists()  # the host's /tmp, not the machine's
        with pytest.raises(HostSshError, match=f"{name} on .* is larger than 1000 bytes"):
            host.read_file(name, limit=1000)
    finally:
        ns_host.path(name).unlink()
    with pytest.raises(HostSshError, match=f"cannot read {name} on .*No such file"):
        host.read_file(name)


def _machine_view() -> tuple[list[str], list[str]] | None:
    """The machine's own libvirt, read-only: its domain names and tdxvm pool volumes (None
    when no libvirtd runs here)."""
    try:
        conn = libvirt.openReadOnly("qemu:///system")
    except libvirt.libvirtError:
        return None
    try:
        domains = [d.name() for d in conn.listAllDomains()]
        try:
            volumes = conn.storagePoolLookupByName(POOL_NAME).listVolumes()
        except libvirt.libvirtError:
            volumes = []
        return domains, volumes
    finally:
        conn.close()


def test_an_unknown_or_changed_host_key_is_refused(ns_host, tmp_path):
    empty = tmp_path / "known_hosts.empty"
    empty.write_text("")
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    wrong = tmp_path / "known_hosts.wrong"
    wrong.write_text(f"{ns_host.address} {' '.join(other.with_suffix('.pub').read_text().split()[:2])}\n")
    for known_hosts, says in (
        (empty, "No ED25519 host key is known"),
        (wrong, "REMOTE HOST IDENTIFICATION HAS CHANGED"),
    ):
        with pytest.raises(LibvirtHostKeyRefused) as info:  # refused (exit 1), not unreachable
            open_connection(ns_host.uri_with(known_hosts=known_hosts))
        assert says in str(info.value) and "Host key verification failed" in str(info.value)
    # A key the host does not know is refused too (no other way in).
    with pytest.raises(SshTransportError, match=r"Permission denied \(publickey\)"):
        open_connection(ns_host.uri_with(keyfile=other))


def test_tdxvm_opens_it_and_shows_its_status(ns_host, tmp_path):
    conn = open_connection(ns_host.uri)
    try:
        assert conn.getHostname() == ns_host.name and conn.listAllDomains() == []
    finally:
        conn.close()
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data"), "XDG_STATE_HOME": str(tmp_path / "state")}
    proc = subprocess.run(
        [str(TDXVM), "status", "--uri", ns_host.uri], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"no tdxvm VMs on {ns_host.uri}"


def test_faults_and_a_teardown_that_leaves_nothing():
    """A host of its own: sshd stopped and started, libvirtd restarted, the host key replaced;
    then nothing of it is left: processes, namespaces, veth pair, mounts, folder."""
    before = (mounts(), links(), netns_list())
    try:
        host = NamespaceHost().start()
    except Unavailable as exc:
        pytest.skip(str(exc))
    try:
        pids = host.pids()
        libvirtd, holder = host.libvirtd_pid, host.holder_pid
        assert {libvirtd, holder, host.sshd_pid} <= set(pids) and host.veth[0] in links()
        assert mounts() == before[0]  # every bind is inside the host's mount namespace

        host.stop_sshd()
        with pytest.raises(SshTransportError, match="Connection refused"):
            open_connection(host.uri)
        host.start_sshd()
        virsh(host.uri, "uri")

        with connection(host.uri) as conn:
            conn.defineXML(probe_domain("kept"))
            conn.createXML(probe_domain("running"))  # a real (TCG) QEMU, with nothing to boot
            qemu = [p for p in host.pids() if "guest=running" in cmdline(p)]
            assert len(qemu) == 1 and _owner(qemu[0]) == "libvirt-qemu"
            host.restart_libvirtd()
            with pytest.raises(libvirt.libvirtError):
                conn.listAllDomains()  # the old connection ended with the daemon
        assert host.libvirtd_pid != libvirtd and not alive(libvirtd) and alive(qemu[0])
        # The domains survive the restart, the running one still running (libvirtd found its QEMU again).
        assert sorted(virsh(host.uri, "list", "--all", "--name").stdout.split()) == ["kept", "running"]
        assert virsh(host.uri, "domstate", "running").stdout.strip() == "running"

        old = host.host_key
        assert host.replace_host_key() != old
        with pytest.raises(LibvirtHostKeyRefused, match="REMOTE HOST IDENTIFICATION HAS CHANGED"):
            open_connection(host.uri)
        host.trust_host_key()
        virsh(host.uri, "uri")
        pids = host.pids()
        folder = host.folder
    finally:
        host.close()
    assert [p for p in pids if alive(p)] == [] and not alive(holder) and not alive(qemu[0])
    assert host.pids() == []
    assert (mounts(), links(), netns_list()) == before
    assert not folder.exists()
    host.close()  # twice is fine


def _owner(pid: int) -> str:
    return pwd.getpwuid(os.stat(f"/proc/{pid}").st_uid).pw_name


def test_a_daemon_restarted_from_a_thread_is_still_stopped_later(ns_host):
    """nsenter dies with the thread that started it (PR_SET_PDEATHSIG follows the forking
    thread), the daemon does not: a later restart must still stop that daemon, or the new
    libvirtd finds the pid file locked and exits (seen in CI: an e2e restarts libvirtd
    from a thread, then tests/remote/test_remote_faults.py restarts it again)."""
    import threading

    worker = threading.Thread(target=ns_host.restart_libvirtd)
    worker.start()
    worker.join()
    started_in_thread = ns_host._daemons["libvirtd"]
    assert started_in_thread.popen.wait(10) == -9 and alive(started_in_thread.pid)  # nsenter gone, libvirtd not
    ns_host.restart_libvirtd()
    assert not alive(started_in_thread.pid)
    with connection(ns_host.uri) as conn:
        assert conn.getURI().startswith("qemu+ssh://")
