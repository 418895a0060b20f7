"""Guest ports of a ``qemu+ssh://`` host through the host's SSH (issue #14), against a real
OpenSSH sshd on 127.0.0.1 (:class:`tests.provision.sshd.LocalSshd`): the "host" forwards
are TCP servers on this machine, which the sshd connects to as a remote host's sshd
connects to its loopback. ``HOME`` is an empty folder and ``SSH_AUTH_SOCK`` unset in
every test, so nothing of this machine's user takes part unless a test puts it there."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from tdxvm.errors import EXIT_INPUT, EXIT_REFUSED, EXIT_UNREACHABLE
from tdxvm.launch import sshhost, tunnel
from tdxvm.launch.knownhosts import fingerprint
from tdxvm.launch.sshhost import InsecureHostKeyWarning
from tdxvm.launch.sshtarget import (
    HostForwardRefused,
    HostKeyRefused,
    HostSshAuthError,
    HostSshError,
    HostSshUnreachable,
    TransportUnsupported,
    ssh_target,
)

from ..provision.sshd import SSHD, LocalSshd, unavailable

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))


class Sshd(LocalSshd):
    """A :class:`LocalSshd` that can be killed (with every session it serves) and started
    again on the same port with the same keys."""

    def kill(self) -> None:
        assert self.proc is not None
        pids = _descendants(self.proc.pid)
        self.proc.kill()
        self.proc.wait()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def start_again(self) -> None:
        log = (self.dir / "sshd.log").open("ab")
        self.proc = subprocess.Popen(
            [str(SSHD), "-D", "-e", "-f", str(self.dir / "sshd_config")],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("sshd did not start again")

    @property
    def host_blob(self) -> bytes:
        import base64

        return base64.b64decode(Path(f"{self.host_key}.pub").read_text().split()[1])

    def uri(self, **params: str | Path) -> str:
        """``qemu+ssh://USER@127.0.0.1:PORT/system`` with this server's client key and
        known_hosts unless ``params`` say otherwise (a value of "" leaves one out)."""
        given = {"keyfile": self.client_key, "known_hosts": self.known_hosts, **params}
        query = "&".join(f"{k}={quote(str(v), safe='/')}" for k, v in given.items() if v != "")
        return f"qemu+ssh://{self.user}@127.0.0.1:{self.port}/system" + (f"?{query}" if query else "")


def _descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, parent in parents.items() if parent == p]
        found += kids
        frontier += kids
    return found


class TcpServer:
    """A threaded TCP server on 127.0.0.1 running ``handle(conn)`` for each connection."""

    def __init__(self, handle: Callable[[socket.socket], None]) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.handle = handle
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            self.handle(conn)

    def close(self) -> None:
        self.sock.close()


def read_all(sock: socket.socket) -> bytes:
    parts = []
    while data := sock.recv(1 << 20):
        parts.append(data)
    return b"".join(parts)


TRAILER = b"<after your EOF>"


def echo_then_trailer(conn: socket.socket) -> None:
    """Echo every byte; once the client half-closes, send TRAILER (which it can only get
    if its half-close arrived as one) and close."""
    while data := conn.recv(1 << 20):
        conn.sendall(data)
    conn.sendall(TRAILER)


@pytest.fixture(autouse=True)
def _apart(tmp_path, monkeypatch) -> Iterator[None]:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    yield
    tunnel.close_all()


@pytest.fixture
def sshd() -> Iterator[Sshd]:
    with Sshd() as server:
        yield server


@pytest.fixture
def echo() -> Iterator[TcpServer]:
    server = TcpServer(echo_then_trailer)
    yield server
    server.close()


def round_trip(address: tuple[str, int], payload: bytes) -> bytes:
    with socket.create_connection(address, timeout=60) as s:
        sender = threading.Thread(target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR)))
        sender.start()
        got = read_all(s)
        sender.join()
    return got


def session_of(uri: str) -> sshhost.HostSession:
    return sshhost.session(ssh_target(uri))


def connections_to(port: int) -> int:
    """Established TCP connections whose remote end is 127.0.0.1:``port`` (the client sides)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "01" and fields[2] == f"0100007F:{port:04X}":
            count += 1
    return count


# -- local hosts: nothing in between --------------------------------------------------------


@pytest.mark.parametrize(
    "uri", ["qemu:///system", "qemu:///session", "qemu+unix:///system", "test:///default", "test:///tmp/host.xml"]
)
def test_local_uris_reach_the_forward_itself_and_open_nothing(uri):
    assert tunnel.reach(uri, "127.0.0.1", 22345) == ("127.0.0.1", 22345)
    assert tunnel.reach(uri, "0.0.0.0", 22346) == ("0.0.0.0", 22346)
    tunnel.prepare(uri)
    assert tunnel.tunnels() == []
    assert not any(t.name.startswith("tdxvm-tunnel") for t in threading.enumerate())


@pytest.mark.parametrize(
    "uri",
    [
        "qemu+tls://host.example/system",
        "qemu://host.example/system",
        "qemu+tcp://host.example/system",
        "qemu+libssh://root@host.example/system",
        "qemu+libssh2://root@host.example/system",
    ],
)
def test_other_remote_transports_are_refused_clearly(uri):
    with pytest.raises(TransportUnsupported, match=r"over SSH only.*qemu\+ssh://\[user@\]host\.example/system") as e:
        tunnel.reach(uri, "127.0.0.1", 22345)
    assert e.value.exit_status == EXIT_INPUT
    assert tunnel.tunnels() == []


# -- relaying ------------------------------------------------------------------------------


def test_bytes_round_trip_both_ways_with_half_close(sshd, echo):
    uri = sshd.uri()
    address = tunnel.reach(uri, "127.0.0.1", echo.port)
    assert address[0] == "127.0.0.1" and address[1] != echo.port
    payload = os.urandom(24 << 20)
    assert round_trip(address, payload) == payload + TRAILER  # client -> host half-close passed on
    assert tunnel.reach(uri, "127.0.0.1", echo.port) == address  # the listener is reused

    got: list[bytes] = []
    first = os.urandom(5 << 20)

    def speaks_first(conn: socket.socket) -> None:
        conn.sendall(first)
        conn.shutdown(socket.SHUT_WR)  # host -> client half-close: the client must still be heard
        got.append(read_all(conn))

    talker = TcpServer(speaks_first)
    try:
        with socket.create_connection(tunnel.reach(uri, "127.0.0.1", talker.port), timeout=60) as s:
            assert read_all(s) == first
            s.sendall(b"heard you after your EOF")
            s.shutdown(socket.SHUT_WR)
            assert s.recv(1) == b""
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.02)
        assert got == [b"heard you after your EOF"]
    finally:
        talker.close()


def test_one_ssh_connection_per_host_for_every_forward_and_thread(sshd):
    servers = [TcpServer(echo_then_trailer) for _ in range(3)]
    uri = sshd.uri()
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for j in range(4):
                server = servers[(i + j) % len(servers)]
                payload = os.urandom(200_000 + i * 1000 + j)
                assert round_trip(tunnel.reach(uri, "127.0.0.1", server.port), payload) == payload + TRAILER
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        assert session_of(uri).connects == 1
        assert connections_to(sshd.port) == 1
        assert sorted(t.dest for t in tunnel.tunnels()) == sorted(("127.0.0.1", s.port) for s in servers)
        assert len({t.local for t in tunnel.tunnels()}) == 3
    finally:
        for s in servers:
            s.close()


def test_a_bind_all_forward_is_reached_on_the_hosts_loopback(sshd, echo):
    address = tunnel.reach(sshd.uri(), "0.0.0.0", echo.port)
    assert round_trip(address, b"x" * 1000) == b"x" * 1000 + TRAILER
    assert [t.dest for t in tunnel.tunnels()] == [("127.0.0.1", echo.port)]


def test_nothing_listening_on_the_host_closes_the_connection(sshd):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    address = tunnel.reach(sshd.uri(), "127.0.0.1", closed_port)
    with socket.create_connection(address, timeout=30) as s:
        assert s.recv(1) == b""


def test_a_restarted_sshd_is_reconnected_on_the_next_connection(sshd, echo):
    uri = sshd.uri()
    address = tunnel.reach(uri, "127.0.0.1", echo.port)
    assert round_trip(address, b"before") == b"before" + TRAILER
    first = session_of(uri).transport
    assert first is not None and first.is_active()

    sshd.kill()
    deadline = time.monotonic() + 10
    while first.is_active() and time.monotonic() < deadline:
        time.sleep(0.05)
    with socket.create_connection(address, timeout=30) as s:  # sshd down: the one reconnect fails, closed
        assert s.recv(1) == b""

    sshd.start_again()
    assert round_trip(address, b"after") == b"after" + TRAILER
    again = session_of(uri)
    assert again.transport is not first and again.transport.is_active()
    assert again.connects == 2
    assert connections_to(sshd.port) == 1


# -- offers: a port on the host relayed to this machine (ssh -R) -------------------------------


def listens(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port`` (here: the "host"'s sshd)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        return True
    except OSError:
        return False


@pytest.mark.parametrize("uri", ["qemu:///system", "test:///default"])
def test_a_local_host_is_offered_the_port_itself(uri):
    with tunnel.offer(uri, "127.0.0.1", 22347) as port:
        assert port == 22347
    assert tunnel.tunnels() == [] and sshhost._sessions == {}


def test_an_offered_port_on_the_host_relays_to_this_machine_both_ways(sshd, echo):
    uri = sshd.uri()
    other = TcpServer(lambda conn: conn.sendall(b"the other one"))
    try:
        with tunnel.offer(uri, "127.0.0.1", echo.port) as port, tunnel.offer(uri, "127.0.0.1", other.port) as second:
            assert port not in (echo.port, second, other.port)  # the sshd's own listener, a port it chose
            assert session_of(uri).offered == sorted([port, second])
            payload = os.urandom(24 << 20)
            assert round_trip(("127.0.0.1", port), payload) == payload + TRAILER  # half-close passed on
            with socket.create_connection(("127.0.0.1", second), timeout=30) as s:  # dispatched by port
                assert read_all(s) == b"the other one"
            assert tunnel.reach(uri, "127.0.0.1", echo.port)  # the same session carries both directions
            assert session_of(uri).connects == 1 and connections_to(sshd.port) == 1
        assert session_of(uri).offered == []
        deadline = time.monotonic() + 5
        while (listens(port) or listens(second)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not listens(port) and not listens(second)  # withdrawn: the sshd listens there no more
    finally:
        other.close()


def test_an_offer_to_nothing_closes_the_hosts_connection(sshd):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    with (
        tunnel.offer(sshd.uri(), "127.0.0.1", closed_port) as port,
        socket.create_connection(("127.0.0.1", port), timeout=30) as s,
    ):
        assert s.recv(1) == b""


def test_an_offer_is_asked_again_on_the_same_port_after_a_reconnect(sshd, echo):
    uri = sshd.uri()
    with tunnel.offer(uri, "127.0.0.1", echo.port) as port:
        first = session_of(uri).transport
        sshd.kill()
        deadline = time.monotonic() + 10
        while first.is_active() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not listens(port)
        sshd.start_again()
        session_of(uri).ensure()  # what a long-lived holder (the quote daemon) calls now and then
        assert session_of(uri).connects == 2
        assert round_trip(("127.0.0.1", port), b"again") == b"again" + TRAILER


def test_a_host_that_allows_no_remote_forwards_is_an_input_error_with_the_fix(sshd, echo):
    config = sshd.dir / "sshd_config"
    config.write_text(config.read_text().replace("AllowTcpForwarding yes", "AllowTcpForwarding local"))
    sshd.kill()
    sshd.start_again()
    uri = sshd.uri()
    with pytest.raises(HostForwardRefused) as e, tunnel.offer(uri, "127.0.0.1", echo.port):
        pass
    assert e.value.exit_status == EXIT_INPUT
    assert "AllowTcpForwarding" in str(e.value) and "fix:" in str(e.value)
    assert session_of(uri).offered == []
    assert round_trip(tunnel.reach(uri, "127.0.0.1", echo.port), b"local") == b"local" + TRAILER  # -L still works


# -- host keys -------------------------------------------------------------------------------


def test_a_changed_host_key_is_refused_naming_fingerprint_and_file(sshd, echo, tmp_path):
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    known = tmp_path / "known_hosts"
    kind, blob = Path(f"{other}.pub").read_text().split()[:2]
    known.write_text(f"[127.0.0.1]:{sshd.port} {kind} {blob}\n")
    for uri in (sshd.uri(known_hosts=known), sshd.uri(known_hosts=known, no_verify="1")):
        with pytest.raises(HostKeyRefused) as e:
            tunnel.reach(uri, "127.0.0.1", echo.port)
        message = str(e.value)
        assert fingerprint(sshd.host_blob) in message and f"{known}:1" in message
        assert "HAS CHANGED" in message and "ssh-keygen -R" in message
        assert e.value.exit_status == EXIT_REFUSED and e.value.fingerprint == fingerprint(sshd.host_blob)
    assert tunnel.tunnels() == []


def test_an_unknown_host_is_refused(sshd, echo, tmp_path):
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    with pytest.raises(HostKeyRefused, match=r"can't be established") as e:
        tunnel.reach(sshd.uri(known_hosts=empty), "127.0.0.1", echo.port)
    message = str(e.value)
    assert fingerprint(sshd.host_blob) in message and str(empty) in message and "ssh-keyscan" in message
    assert "ED25519" in message and e.value.files == (str(empty),)


def test_no_verify_accepts_an_unknown_host_with_a_warning(sshd, echo, tmp_path):
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    with pytest.warns(InsecureHostKeyWarning, match=fingerprint(sshd.host_blob).replace("+", r"\+")) as caught:
        address = tunnel.reach(sshd.uri(known_hosts=empty, no_verify="1"), "127.0.0.1", echo.port)
    assert "no_verify=1" in str(caught[0].message)
    assert round_trip(address, b"unverified") == b"unverified" + TRAILER
    assert empty.read_text() == ""  # nothing written into the user's file


def test_the_cli_prints_tdxvms_warnings_as_one_line(capsys):
    from tdxvm.cli import _warnings_shown

    others: list[tuple] = []
    show = _warnings_shown(lambda *args: others.append(args))
    warning = InsecureHostKeyWarning("host [h]:22: its ED25519 key SHA256:x is not in kh; accepted unchecked")
    show(warning, InsecureHostKeyWarning, sshhost.__file__, 10)
    show(UserWarning("theirs"), UserWarning, "/usr/lib/python3/dist-packages/elsewhere.py", 3)
    assert capsys.readouterr().err == f"warning: {warning}\n"
    assert [a[2] for a in others] == ["/usr/lib/python3/dist-packages/elsewhere.py"]


def test_hashed_and_pattern_entries_are_read(sshd, echo, tmp_path):
    known = tmp_path / "known_hosts"
    shutil.copy(sshd.known_hosts, known)
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(known)], check=True, capture_output=True)
    assert known.read_text().startswith("|1|")
    address = tunnel.reach(sshd.uri(known_hosts=known), "127.0.0.1", echo.port)
    assert round_trip(address, b"hashed") == b"hashed" + TRAILER
    tunnel.close_all()

    kind, blob = Path(f"{sshd.host_key}.pub").read_text().split()[:2]
    known.write_text(f"[127.0.0.*]:{sshd.port},!192.0.2.1 {kind} {blob}\n")
    tunnel.reach(sshd.uri(known_hosts=known), "127.0.0.1", echo.port)
    tunnel.close_all()
    known.write_text(f"[127.0.0.*]:{sshd.port},![127.0.0.1]:{sshd.port} {kind} {blob}\n")
    with pytest.raises(HostKeyRefused, match="can't be established"):
        tunnel.reach(sshd.uri(known_hosts=known), "127.0.0.1", echo.port)
    known.write_text(f"[127.0.0.1]:{sshd.port} {kind} {blob}\n@revoked * {kind} {blob}\n")
    with pytest.raises(HostKeyRefused, match="@revoked"):
        tunnel.reach(sshd.uri(known_hosts=known, no_verify="1"), "127.0.0.1", echo.port)


# -- logging in ------------------------------------------------------------------------------


def test_a_key_the_host_does_not_take_is_an_input_error_with_the_fix(sshd, echo, tmp_path):
    other = tmp_path / "not_authorized"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    with pytest.raises(HostSshAuthError) as e:
        tunnel.reach(sshd.uri(keyfile=other), "127.0.0.1", echo.port)
    message = str(e.value)
    assert e.value.exit_status == EXIT_INPUT and not isinstance(e.value, HostKeyRefused)
    assert str(other) in message and "authorized_keys" in message and "keyfile=PATH" in message
    assert "fix:" in message
    with pytest.raises(HostSshError, match="does not exist"):
        tunnel.reach(sshd.uri(keyfile=tmp_path / "missing"), "127.0.0.1", echo.port)


def test_the_default_identity_and_known_hosts_of_home(sshd, echo):
    dot_ssh = Path(os.environ["HOME"]) / ".ssh"
    dot_ssh.mkdir(mode=0o700)
    uri = sshd.uri(keyfile="", known_hosts="")
    with pytest.raises(HostKeyRefused, match=str(dot_ssh / "known_hosts")):
        tunnel.reach(uri, "127.0.0.1", echo.port)
    shutil.copy(sshd.known_hosts, dot_ssh / "known_hosts")
    with pytest.raises(HostSshAuthError, match="no key file, ssh-agent key or default identity"):
        tunnel.reach(uri, "127.0.0.1", echo.port)
    shutil.copy(sshd.client_key, dot_ssh / "id_ed25519")
    assert round_trip(tunnel.reach(uri, "127.0.0.1", echo.port), b"defaults") == b"defaults" + TRAILER


def test_a_host_alias_of_ssh_config(sshd, echo, tmp_path):
    dot_ssh = Path(os.environ["HOME"]) / ".ssh"
    dot_ssh.mkdir(mode=0o700)
    (dot_ssh / "config").write_text(
        f"Host tdx-host\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User {sshd.user}\n"
        f"  IdentityFile {sshd.client_key}\n  UserKnownHostsFile {sshd.known_hosts}\n"
    )
    address = tunnel.reach("qemu+ssh://tdx-host/system", "127.0.0.1", echo.port)
    assert round_trip(address, b"alias") == b"alias" + TRAILER
    # HostKeyAlias: known_hosts holds the key under the alias as it is, with no port (as ssh looks it up)
    aliased = dot_ssh / "known_hosts_alias"
    aliased.write_text(
        "".join("tdx-alias " + line.split(" ", 1)[1] for line in sshd.known_hosts.read_text().splitlines(True))
    )
    (dot_ssh / "config").write_text(
        f"Host tdx-host\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User {sshd.user}\n  HostKeyAlias tdx-alias\n"
        f"  IdentityFile {sshd.client_key}\n  UserKnownHostsFile {aliased}\n"
    )
    address = tunnel.reach("qemu+ssh://tdx-host/system", "127.0.0.1", echo.port)
    assert round_trip(address, b"alias") == b"alias" + TRAILER
    (dot_ssh / "config").write_text("Host tdx-host\n  ProxyJump bastion\n")
    with pytest.raises(HostSshError, match="ProxyJump|proxyjump"):
        tunnel.reach("qemu+ssh://tdx-host/system", "127.0.0.1", echo.port)


def test_ssh_config_includes_are_followed(sshd, echo):
    """paramiko ignores ``Include``; the ``ssh`` that libvirt runs follows it, so tdxvm must
    reach the same host with the same settings."""
    dot_ssh = Path(os.environ["HOME"]) / ".ssh"
    (dot_ssh / "conf.d").mkdir(parents=True, mode=0o700)
    (dot_ssh / "conf.d" / "10-tdx").write_text(
        f"Host tdx-host\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User {sshd.user}\n"
        f"  IdentityFile {sshd.client_key}\n  UserKnownHostsFile {sshd.known_hosts}\n"
    )
    (dot_ssh / "config").write_text("Include conf.d/*\nHost other\n  Include conf.d/none-*\n  Port 1\n")
    address = tunnel.reach("qemu+ssh://tdx-host/system", "127.0.0.1", echo.port)
    assert round_trip(address, b"included") == b"included" + TRAILER


@pytest.mark.skipif(shutil.which("ssh") is None, reason="needs OpenSSH's ssh")
def test_included_settings_are_those_ssh_resolves(tmp_path):
    """The block an Include sits in goes on after it, and the first value wins, as
    ``ssh -G`` resolves them (absolute paths: ssh takes ~ from the password database)."""
    dot_ssh = Path(os.environ["HOME"]) / ".ssh"
    dot_ssh.mkdir(mode=0o700)
    extra = tmp_path / "extra.conf"
    extra.write_text("Host b\n  Port 2202\n  User bee\nHost a\n  HostName from-extra\n")
    config = dot_ssh / "config"
    config.write_text(
        f"Host a\n  Port 2201\n  Include {extra}\n  User ay\nHost *\n  HostName default-host\n"
        f"Include {tmp_path}/missing-*.conf\nHost c\n  Port 2203\n"
    )
    for host in ("a", "b", "c", "d"):
        ours = ssh_target(f"qemu+ssh://{host}/system")
        theirs = dict(
            line.split(" ", 1)
            for line in subprocess.run(
                ["ssh", "-G", "-F", str(config), host], capture_output=True, text=True, check=True
            ).stdout.splitlines()
        )
        assert (ours.host, str(ours.port)) == (theirs["hostname"], theirs["port"]), host
        if host != "d":
            assert ours.user == theirs["user"], host


def test_an_include_of_itself_is_refused(tmp_path):
    dot_ssh = Path(os.environ["HOME"]) / ".ssh"
    dot_ssh.mkdir(mode=0o700)
    (dot_ssh / "config").write_text("Include config\n")
    with pytest.raises(HostSshError, match="Include nested more than 16 deep"):
        ssh_target("qemu+ssh://a/system")


def test_keys_of_ssh_agent(sshd, echo, tmp_path):
    if shutil.which("ssh-agent") is None or shutil.which("ssh-add") is None:
        pytest.skip("ssh-agent is not installed")
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        subprocess.run(["ssh-add", "-q", str(sshd.client_key)], env=env, check=True, capture_output=True)
        os.environ["SSH_AUTH_SOCK"] = str(sock)  # undone by the fixture's monkeypatch.delenv
        address = tunnel.reach(sshd.uri(keyfile=""), "127.0.0.1", echo.port)
        assert round_trip(address, b"agent") == b"agent" + TRAILER
    finally:
        os.environ.pop("SSH_AUTH_SOCK", None)
        agent.terminate()
        agent.wait(10)


def test_an_unreachable_host(echo):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(HostSshUnreachable, match="cannot reach") as e:
        tunnel.reach(f"qemu+ssh://root@127.0.0.1:{port}/system", "127.0.0.1", echo.port)
    assert e.value.exit_status == EXIT_UNREACHABLE


# -- through a VM record: the agent handshake of `tdxvm attest` -------------------------------


def test_a_remote_vms_agent_is_attested_through_its_record(sshd, tmp_path):
    from tdxvm.attest.policy import Policy
    from tdxvm.emulate.qgs import QuoteService
    from tdxvm.launch.domain import PortForward
    from tdxvm.launch.records import VmRecord
    from tdxvm.provision.handshake import attest_guest

    from ..attested_guest import AT, CONTROLLER, agent_thread, anchor, artifacts, platform, policy_for

    (tmp_path / "root").mkdir()
    with (
        QuoteService(platform(), artifacts()) as qgs,
        agent_thread(tmp_path / "secrets", tmp_path / "root") as agent,
    ):
        record = VmRecord(
            name="remote-vm",
            uuid="6b2a3c1e-0000-4000-8000-000000000001",
            uri=sshd.uri(),
            backend="emulated",
            policy=Policy(),
            manifest="/nonexistent/manifest.json",
            manifest_sha256="00" * 32,
            trust_anchor_sha256=None,
            forwards=(PortForward(host_port=agent.port, guest_port=7300, host_address="127.0.0.1"),),
            agent_port=7300,
            ssh_port=22,
        )
        address = record.reach(record.agent_port, "guest agent")
        assert address != ("127.0.0.1", agent.port)
        with attest_guest(
            address,
            collateral=platform().collateral(),
            policy=policy_for(artifacts()),
            at=AT,
            trust_anchor=anchor(),
            qgs_address=qgs.address,
            timeout=30,
        ) as guest:
            assert guest.verdict.accepted
            guest.release("disk", b"through the tunnel", sender=CONTROLLER)
    assert (tmp_path / "secrets" / "disk").read_bytes() == b"through the tunnel"
    assert [t.dest for t in tunnel.tunnels()] == [("127.0.0.1", agent.port)]


def test_a_remote_vms_service_is_checked_through_the_tunnel_and_published_as_the_hosts(sshd, tmp_path):
    from tdxvm.attest.policy import Policy
    from tdxvm.emulate import EmulatedPlatform
    from tdxvm.guest.tls import ensure_identity
    from tdxvm.launch.domain import PortForward
    from tdxvm.launch.records import VmRecord
    from tdxvm.provision.endpoint import EndpointRefused, verify_endpoint
    from tdxvm.provision.model import checked_service_url, controller_service_url, service_url

    from ..provision.servers import HttpsServer

    identity = ensure_identity(tmp_path / "tls", ["127.0.0.1"])
    server = HttpsServer(identity, lambda path: (503, {}, b'{"error": {"message": "still loading"}}'))
    try:

        def record(address: str) -> VmRecord:
            return VmRecord(
                name="remote-vm",
                uuid="6b2a3c1e-0000-4000-8000-000000000002",
                uri=sshd.uri(),
                backend="emulated",
                policy=Policy(),
                manifest="/nonexistent/manifest.json",
                manifest_sha256="00" * 32,
                trust_anchor_sha256=None,
                forwards=(PortForward(host_port=server.port, guest_port=8443, host_address=address),),
                agent_port=7300,
                ssh_port=22,
                service_port=8443,
            )

        on_loopback = record("127.0.0.1")
        assert service_url(on_loopback) == server.url  # what clients are told: the host's own forward
        checked = checked_service_url(on_loopback)
        assert checked == controller_service_url(on_loopback) != server.url  # only the host reaches its loopback
        with pytest.raises(EndpointRefused, match="attestation-unavailable|HTTP 503") as e:
            verify_endpoint(checked, collateral=EmulatedPlatform().collateral(), require_measurements=False)
        assert e.value.tls_spki_sha256 == identity.spki_sha256  # the real server's key, through the tunnel
        assert [p.split("?")[0] for p in server.requests] == ["/v1/attestation"]

        bind_all = record("0.0.0.0")  # published on every address of the host: checked there, as clients do
        assert service_url(bind_all) == f"https://127.0.0.1:{server.port}" == checked_service_url(bind_all)
    finally:
        server.stop()


def test_the_emulated_quote_service_is_offered_on_a_remote_hosts_loopback(sshd, tmp_path):
    """An emulated guest on a qemu+ssh:// host asks 10.0.2.2:<port>, the host's loopback: the
    controller's quote service (its keys stay here) is offered there through the host's SSH
    for the length of the attestation."""
    import base64
    import json

    from tdxvm.attest.quote import parse_quote
    from tdxvm.provision.trust import EmulatedTrust

    from ..attested_guest import CMDLINE, INITRD, kernel

    trust = EmulatedTrust.load(tmp_path / "emulated")
    files = {"/pool/vmlinuz": kernel(), "/pool/initrd.img": INITRD}
    xml = (
        "<domain><name>remote-vm</name><os><kernel>/pool/vmlinuz</kernel><initrd>/pool/initrd.img</initrd>"
        f"<cmdline>{CMDLINE}</cmdline></os></domain>"
    )
    uri = sshd.uri()
    with trust.quote_service(xml, files.__getitem__, uri=uri) as address:
        gateway, port = address.rsplit(":", 1)
        assert gateway == "10.0.2.2" and session_of(uri).offered == [int(port)]
        with socket.create_connection(("127.0.0.1", int(port)), timeout=30) as s:  # as QEMU's slirp does on the host
            s.sendall(json.dumps({"report_data": "ef" * 64}).encode() + b"\n")
            answer = json.loads(s.makefile().readline())
        quote = parse_quote(base64.b64decode(answer["quote"]))
        assert quote.body.report_data == bytes.fromhex("ef" * 64)
    assert session_of(uri).offered == []
    deadline = time.monotonic() + 5
    while listens(int(port)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not listens(int(port))
    with trust.quote_service(xml, files.__getitem__, uri="qemu:///system") as local:  # this machine: the port itself
        assert local.startswith("10.0.2.2:") and sshhost._sessions.keys() == {ssh_target(uri)}
