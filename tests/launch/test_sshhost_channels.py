"""Channels a remote host opens on the controller's SSH session (tdxvm.launch.sshhost):
a hostile sshd of the test's own, reached as qemu+ssh://, that opens channels of every
kind. Before, the controller took every ``forwarded-tcpip`` channel it was sent and ran
two threads and a local connection for each offered one: a host could open as many as it
liked. Now only channels to an offered port are opened, at most
:data:`sshhost.MAX_FORWARDED` at a time; the rest are refused (OPEN_FAILURE), not queued."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tdxvm.launch import sshhost, tunnel

from ..hangs import raised_by

OFFERED = 40022  # the port the hostile sshd says it listens on for the controller


def _key() -> tuple[paramiko.Ed25519Key, bytes]:
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    return paramiko.Ed25519Key.from_private_key(io.StringIO(pem.decode())), pem


class _Hostile(paramiko.ServerInterface):
    """Grants the controller's remote forward (and anything else), so that the test can
    open channels towards the controller from the host's side."""

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        return paramiko.AUTH_SUCCESSFUL

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_port_forward_request(self, address: str, port: int) -> int:
        return port or OFFERED

    def check_global_request(self, kind: str, msg: paramiko.Message) -> bool:
        return True


class Host:
    """The hostile sshd: ``uri`` to reach it, ``transport`` its side of the controller's session."""

    def __init__(self, folder: Path) -> None:
        server_key, _ = _key()
        _, client_pem = _key()
        (folder / "id").write_bytes(client_pem)
        (folder / "id").chmod(0o600)
        self.listener = socket.create_server(("127.0.0.1", 0))
        port = self.listener.getsockname()[1]
        (folder / "known_hosts").write_text(f"[127.0.0.1]:{port} {server_key.get_name()} {server_key.get_base64()}\n")
        self.uri = (
            f"qemu+ssh://root@127.0.0.1:{port}/system?keyfile={folder / 'id'}&known_hosts={folder / 'known_hosts'}"
        )
        self.transports: list[paramiko.Transport] = []

        def accept() -> None:
            while True:
                try:
                    conn, _ = self.listener.accept()
                except OSError:
                    return
                transport = paramiko.Transport(conn)
                transport.add_server_key(server_key)
                transport.start_server(server=_Hostile())
                self.transports.append(transport)

        threading.Thread(target=accept, daemon=True).start()

    @property
    def transport(self) -> paramiko.Transport:
        return self.transports[-1]

    def forwarded(self, port: int) -> paramiko.Channel:
        """A ``forwarded-tcpip`` channel to the controller, as if someone connected to ``port`` on the host."""
        return self.transport.open_channel(
            "forwarded-tcpip", ("127.0.0.1", port), ("127.0.0.1", 50000), window_size=1 << 16, timeout=10
        )

    def close(self) -> None:
        self.listener.close()
        for t in self.transports:
            t.close()


class Taker:
    """The controller's local service behind the offer: accepts connections and holds them."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for c in self.held:
            c.close()


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[Host]:
    host = Host(tmp_path)
    try:
        yield host
    finally:
        tunnel.close_all()
        host.close()
        deadline = time.monotonic() + 30  # the relays end with their channels: none is left for the next test
        while _relays() and time.monotonic() < deadline:
            time.sleep(0.05)


def _relays() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith(("tdxvm-offer", "tdxvm-tunnel")))


def test_a_host_cannot_open_channels_the_controller_did_not_ask_for(hostile):
    taker = Taker()
    try:
        with tunnel.offer(hostile.uri, "127.0.0.1", taker.port) as port:
            assert port == OFFERED
            for open_one in (
                lambda: hostile.forwarded(OFFERED + 1),  # a port the controller never offered
                lambda: hostile.transport.open_session(timeout=10),
                lambda: hostile.transport.open_x11_channel(("127.0.0.1", 6000)),
                lambda: hostile.transport.open_channel("auth-agent@openssh.com", timeout=10),
            ):
                error = raised_by(open_one, within=30)
                assert isinstance(error, paramiko.ChannelException), error
            chan = hostile.forwarded(OFFERED)  # the offered port still works
            chan.close()
    finally:
        taker.close()


def test_a_host_cannot_open_unbounded_forwarded_channels(hostile):
    """More channels than the cap, to the offered port, held open: the cap's worth are
    relayed, every further one is refused at once; once some end, new ones are taken again."""
    cap = sshhost.MAX_FORWARDED
    taker = Taker()
    before = _relays()
    opened: list[paramiko.Channel] = []
    refused = 0
    try:
        with tunnel.offer(hostile.uri, "127.0.0.1", taker.port):

            def flood() -> None:
                nonlocal refused
                for _ in range(cap + 20):
                    try:
                        opened.append(hostile.forwarded(OFFERED))
                    except paramiko.ChannelException:
                        refused += 1

            assert raised_by(flood, within=90) is None
            assert (len(opened), refused) == (cap, 20)
            deadline = time.monotonic() + 30
            while len(taker.held) < cap and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(taker.held) == cap  # every accepted channel reached the local service
            assert _relays() - before <= 2 * cap + 2  # two threads per relayed channel, no more
            for chan in opened[:5]:  # five end: five new ones are taken, the next is refused
                chan.close()
            deadline = time.monotonic() + 30
            again: list[paramiko.Channel] = []
            while len(again) < 5 and time.monotonic() < deadline:
                try:
                    again.append(hostile.forwarded(OFFERED))
                except paramiko.ChannelException:
                    time.sleep(0.1)  # the relays of the closed ones are still ending
            assert len(again) == 5
            assert isinstance(raised_by(lambda: hostile.forwarded(OFFERED), within=30), paramiko.ChannelException)
    finally:
        for chan in opened:
            chan.close()
        taker.close()
