"""Where the controller connects to a guest port: directly, or through the host's SSH.

QEMU user networking forwards a guest's ports onto its libvirt host (``hostfwd``,
:mod:`tdxvm.launch.ports`), onto the host's loopback unless a spec says otherwise. For a
host that is this machine (``qemu:///system``, ``test:///…``) :func:`reach` returns the
forward's own address and opens nothing. For a ``qemu+ssh://`` host it returns a
listener on this machine's 127.0.0.1 (an ephemeral port, made once per host forward and
reused) whose every connection is relayed, both ways and with half-close, through a
``direct-tcpip`` channel of the host's one shared SSH session: the SSH identity and
known_hosts of the libvirt URI (:mod:`tdxvm.launch.sshtarget`, :mod:`tdxvm.launch.sshhost`),
reconnected when it dies. :func:`reach` connects that session first, so a refused host
key, a refused login or an unreachable host is a typed error there; later, a connection
whose channel cannot be opened (nothing listens on the host, or the one reconnect
failed) is closed. Other remote transports are refused
(:class:`~tdxvm.launch.sshtarget.TransportUnsupported`).

:func:`offer` is the other direction: a port on the remote host's loopback whose every
connection is relayed, through the same session (``ssh -R``), to a port on this
machine's loopback, for as long as its context lasts. The emulated backend offers its
quote service to a remote host's guests this way: the platform's keys stay on the
controller, the guest (QEMU user networking) asks ``10.0.2.2:<offered port>``.

The tunnels only transport. What the controller sends a guest through them is
authenticated end to end to keys its quote binds (the agent's X25519 key, the attested
SSH host key and TLS key, the upload's session MAC key), so neither the host nor another
user of this machine's loopback can read or alter it unnoticed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import paramiko

from tdxvm.launch import sshhost
from tdxvm.launch.sshtarget import HostSshError, SshTarget, needs_ssh, ssh_target

CHUNK = 256 << 10
CLOSED_POLL = 1.0  # seconds: how soon a relay notices its channel was closed while it waits on the socket
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # bind-all forwards, connected to on loopback


@dataclass(frozen=True, slots=True)
class Tunnel:
    """One open tunnel: ``local`` on this machine relays to ``dest`` as the host ``host`` sees it."""

    host: str
    local: tuple[str, int]
    dest: tuple[str, int]


def relay(sock: socket.socket, chan: paramiko.Channel) -> None:
    """Copy bytes both ways between ``sock`` and ``chan`` until both sides have ended; an end
    of one direction (EOF) is passed on as a half-close; an error, or the channel closed by
    the other side, closes both (so a relay lasts no longer than its channel)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    chan.settimeout(None)

    def close_channel() -> None:  # the transport may be gone already: then so is the channel
        with contextlib.suppress(EOFError, OSError, paramiko.SSHException):
            chan.close()

    def abort() -> None:
        close_channel()
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    outbound = threading.Thread(
        target=_pump, args=(sock.recv, chan.sendall, chan.shutdown_write, abort), name="tdxvm-tunnel-out", daemon=True
    )
    outbound.start()
    _pump(chan.recv, sock.sendall, lambda: sock.shutdown(socket.SHUT_WR), abort)
    while outbound.is_alive():  # a channel the other side closed (not only half) ends the relay
        outbound.join(CLOSED_POLL)
        if chan.closed:
            abort()
    close_channel()
    sock.close()


def _pump(
    read: Callable[[int], bytes], write: Callable[[bytes], object], end: Callable[[], object], abort: Callable[[], None]
) -> None:
    try:
        while data := read(CHUNK):
            write(data)
        end()
    except (OSError, EOFError, paramiko.SSHException):
        abort()


class _Listener:
    """127.0.0.1:<ephemeral> on this machine, relayed to ``dest`` through ``host``'s session."""

    def __init__(self, host: sshhost.HostSession, dest: tuple[str, int]) -> None:
        self.host, self.dest = host, dest
        self.last_error: HostSshError | None = None  # why the latest connection could not be relayed
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.address: tuple[str, int] = self.sock.getsockname()[:2]
        self.closed = False
        name = f"tdxvm-tunnel {host.target.where} {dest[0]}:{dest[1]}"
        threading.Thread(target=self._accept, name=name, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(conn,), name="tdxvm-tunnel-in", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            chan = self.host.open_channel(self.dest)
        except HostSshError as exc:
            self.last_error = exc
            conn.close()
            return
        except BaseException:
            conn.close()
            raise
        relay(conn, chan)

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept
        self.sock.close()


_listeners: dict[tuple[SshTarget, str, int], _Listener] = {}
_lock = threading.Lock()


def reach(uri: str, host_address: str, host_port: int) -> tuple[str, int]:
    """The address the controller connects to for the forward ``host_address:host_port`` of
    a VM on the libvirt host ``uri`` (see the module doc)."""
    if not needs_ssh(uri):
        return host_address, host_port
    target = ssh_target(uri)
    host = sshhost.session(target)
    host.ensure()
    key = (target, _WILDCARDS.get(host_address, host_address), host_port)
    with _lock:
        listener = _listeners.get(key)
        if listener is None or listener.closed:
            listener = _listeners[key] = _Listener(host, key[1:])
        return listener.address


@contextlib.contextmanager
def offer(uri: str, local_address: str, local_port: int) -> Iterator[int]:
    """The port on the loopback of ``uri``'s host whose connections reach
    ``local_address:local_port`` on this machine, while the context lasts (see the module
    doc); for a host that is this machine, ``local_port`` itself. Raises
    :class:`~tdxvm.launch.sshtarget.HostForwardRefused` when the host's sshd allows no
    remote forwards."""
    if not needs_ssh(uri):
        yield local_port
        return
    host = sshhost.session(ssh_target(uri))
    port = host.offer(lambda chan: _relay_to((local_address, local_port), chan))
    try:
        yield port
    finally:
        host.withdraw(port)


def _relay_to(local: tuple[str, int], chan: paramiko.Channel) -> None:
    """One connection the host forwarded to us: relayed to ``local``, or closed if nothing answers there."""
    try:
        sock = socket.create_connection(local, timeout=sshhost.CONNECT_TIMEOUT)
    except OSError:
        chan.close()
        return
    sock.settimeout(None)
    relay(sock, chan)


def prepare(uri: str) -> None:
    """Connect the SSH session of ``uri``'s host now, if its guests need one, so that a host
    whose guests cannot be reached (a non-ssh remote transport), a refused host key or a
    refused login stops a launch before anything is defined."""
    if needs_ssh(uri):
        sshhost.session(ssh_target(uri)).ensure()


def is_loopback(address: str) -> bool:
    """Whether a forward bound to ``address`` is reachable only from its host itself."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def published(uri: str, host_address: str, host_port: int) -> tuple[str, int]:
    """Where a client reaches a forward: its address on the host, except that a remote
    host's bind-all forward (``0.0.0.0``, ``::``) is reached at the host's name."""
    if host_address not in _WILDCARDS:
        return host_address, host_port
    parts = urlsplit(uri)
    if (parts.hostname or "") in ("", "localhost"):
        return host_address, host_port
    return (ssh_target(uri).host if parts.scheme.endswith("+ssh") else str(parts.hostname)), host_port


def tunnels() -> list[Tunnel]:
    """The tunnels open in this process."""
    with _lock:
        return [Tunnel(k[0].where, v.address, k[1:]) for k, v in _listeners.items() if not v.closed]


def close_all() -> None:
    """Close every tunnel and host session (the CLI's exit, tests); :func:`reach` opens anew."""
    with _lock:
        listeners = list(_listeners.values())
        _listeners.clear()
    for listener in listeners:
        listener.close()
    sshhost.close_sessions()
