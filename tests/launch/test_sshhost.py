"""The shared SSH session to a remote libvirt host (tdxvm.launch.sshhost) against a host's
sshd that misbehaves: a paramiko server of the test's own, reached as qemu+ssh://."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tdxvm.launch import sshhost
from tdxvm.launch.sshtarget import HostSshUnreachable, ssh_target

from ..hangs import raised_by


def _key() -> tuple[paramiko.Ed25519Key, bytes]:
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    return paramiko.Ed25519Key.from_private_key(io.StringIO(pem.decode())), pem


class _Sshd(paramiko.ServerInterface):
    def __init__(self, answer: Callable[[paramiko.Channel], None]) -> None:
        self.answer = answer

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        return paramiko.AUTH_SUCCESSFUL

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return paramiko.OPEN_SUCCEEDED

    def check_port_forward_request(self, address: str, port: int) -> int:
        time.sleep(3600)  # a host that holds the request: no answer, the session stays up
        return port

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        def answer() -> None:
            time.sleep(0.2)  # after paramiko has told the client its exec was taken, as sshd's program would
            self.answer(channel)

        threading.Thread(target=answer, daemon=True).start()
        return True


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Callable[[Callable[[paramiko.Channel], None]], str]]:
    """host(answer) -> a qemu+ssh:// URI whose sshd runs ``answer(channel)`` for every exec."""
    server_key, _ = _key()
    _, client_pem = _key()
    (tmp_path / "id").write_bytes(client_pem)
    (tmp_path / "id").chmod(0o600)
    listeners: list[socket.socket] = []

    def start(answer: Callable[[paramiko.Channel], None]) -> str:
        listener = socket.create_server(("127.0.0.1", 0))
        listeners.append(listener)
        port = listener.getsockname()[1]
        (tmp_path / "known_hosts").write_text(f"[127.0.0.1]:{port} {server_key.get_name()} {server_key.get_base64()}\n")

        def accept() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                transport = paramiko.Transport(conn)
                transport.add_server_key(server_key)
                transport.start_server(server=_Sshd(answer))

        threading.Thread(target=accept, daemon=True).start()
        return (
            f"qemu+ssh://root@127.0.0.1:{port}/system?keyfile={tmp_path / 'id'}&known_hosts={tmp_path / 'known_hosts'}"
        )

    yield start
    for listener in listeners:
        listener.close()


def test_a_file_is_read_with_its_exit_status(host):
    def cat(channel: paramiko.Channel) -> None:
        channel.sendall(b"4242\n")
        channel.send_exit_status(0)
        channel.close()

    session = sshhost.HostSession(ssh_target(host(cat)))
    try:
        assert session.read_file("/run/libvirt/qemu/vm.pid", timeout=5) == b"4242\n"
    finally:
        session.close()


def test_a_host_that_never_sends_the_exit_status_cannot_hold_a_read(host):
    """It sends the file and EOF, then nothing: before, the read (and the attestation of an
    emulated TD that waited on it) waited forever; now it ends at its timeout."""

    def silent(channel: paramiko.Channel) -> None:
        channel.sendall(b"4242\n")
        channel.shutdown_write()

    def drip(channel: paramiko.Channel) -> None:
        for _ in range(50):
            try:
                channel.sendall(b"4")
            except OSError:  # the reader gave up and closed
                return
            time.sleep(0.5)

    for answer in (silent, drip):
        session = sshhost.HostSession(ssh_target(host(answer)))
        error = raised_by(lambda s=session: s.read_file("/run/libvirt/qemu/vm.pid", timeout=1.5))
        session.close()
        assert isinstance(error, HostSshUnreachable) and "reading /run/libvirt/qemu/vm.pid" in str(error)


def test_a_host_that_never_answers_a_port_offer_cannot_hold_the_session(host, monkeypatch):
    """paramiko waits for the answer to a remote-forward request as long as the session
    lives, holding the session's lock (every tunnel to that host) all along; now the
    offer ends at the channel timeout, and with it the session (the next use reconnects)."""
    monkeypatch.setattr(sshhost, "CHANNEL_TIMEOUT", 1.5)
    session = sshhost.HostSession(ssh_target(host(lambda channel: None)))
    error = raised_by(lambda: session.offer(lambda chan: chan.close()))
    assert isinstance(error, HostSshUnreachable) and "no answer to the request to listen on 127.0.0.1" in str(error)
    assert session.transport is not None and not session.transport.is_active()
    session.close()
