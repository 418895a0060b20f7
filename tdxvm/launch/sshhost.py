"""One SSH session per libvirt host, shared by every tunnel to that host's guest ports.

:func:`session` returns the process-wide :class:`HostSession` of an
:class:`~tdxvm.launch.sshtarget.SshTarget` (thread-safe). It connects the way ``ssh``
does for libvirt's ``qemu+ssh://`` transport: the host key first, checked against the
target's known_hosts files (:mod:`tdxvm.launch.knownhosts`; an unknown, changed or revoked
key is :class:`~tdxvm.launch.sshtarget.HostKeyRefused` before any key or byte of ours is
sent, except that ``no_verify=1`` accepts an unknown key with an
:class:`InsecureHostKeyWarning`), then public-key authentication with the target's key
file, ssh-agent's keys and the default identities (:mod:`tdxvm.launch.sshauth`).
Nothing here trusts the host: the session only transports, and everything sent through
it to a guest is authenticated end to end to keys the guest's quote binds.

:meth:`HostSession.open_channel` opens a ``direct-tcpip`` channel with a large window
(bulk uploads go through it); a session whose connection died reconnects on the next
channel, once per channel asked for.

:meth:`HostSession.offer` is the other direction (``ssh -R``): the host's sshd listens on
a port of the host's loopback and hands each connection made there to the controller as
a ``forwarded-tcpip`` channel (how a remote host's emulated guests reach the controller's
emulated quote service, :func:`tdxvm.launch.tunnel.offer`). paramiko keeps one handler
per transport, so the session dispatches every forwarded channel by the port it came
in on; a reconnect asks for every offer again, on the same port (the guests were told
it). The host opens only what the controller asked for: a channel to an offered port, at
most :data:`MAX_FORWARDED` at a time per host (each is relayed by two threads and a
connection on this machine); any other channel, of any kind, and each one past the cap is
refused as the host sends it (:mod:`tdxvm.launch.sshadmit`), never queued.
"""

from __future__ import annotations

import contextlib
import shlex
import socket
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import paramiko

from tdxvm.errors import TdxvmError
from tdxvm.launch import knownhosts, sshadmit
from tdxvm.launch.sshauth import authenticate
from tdxvm.launch.sshtarget import HostForwardRefused, HostKeyRefused, HostSshError, HostSshUnreachable, SshTarget

WINDOW = 16 << 20  # per channel: the upload streams push gigabytes (tdxvm.provision.transfer.SSH_WINDOW)
MAX_PACKET = 256 << 10  # what the host may send us per packet (OpenSSH's limit): fewer, larger packets
CONNECT_TIMEOUT = 20.0
CHANNEL_TIMEOUT = 30.0
KEEPALIVE = 15  # seconds between keepalives: a dead connection is noticed, and reconnected
MAX_FORWARDED = 64  # forwarded connections the host may have relayed to the controller at once; more are refused
_KINDS = {"ssh-ed25519": "ED25519", "ssh-rsa": "RSA", "ssh-dss": "DSA"}
_SIGNATURES = {"ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa")}  # host key type -> algorithms

Accept = Callable[[paramiko.Channel], None]  # takes one forwarded connection (runs in a thread of its own)


class InsecureHostKeyWarning(TdxvmError, UserWarning):
    """A host key accepted without being in known_hosts, because the URI says ``no_verify=1``:
    a warning (``warnings.warn``; the CLI prints it as one ``warning:`` line), never raised."""

    code = "host-key-unverified"


def _kind(key_type: str) -> str:
    return _KINDS.get(key_type) or ("ECDSA" if key_type.startswith("ecdsa") else key_type)


def _prefer(transport: paramiko.Transport, known: list[str]) -> None:
    """Ask for the host key types known_hosts holds first, as ``ssh`` does; and for AES-GCM
    where paramiko has it (one pass instead of AES-CTR plus HMAC: bench/tunnel.py)."""
    options = transport.get_security_options()
    ciphers = list(options.ciphers)
    options.ciphers = [c for c in ciphers if "-gcm@" in c] + [c for c in ciphers if "-gcm@" not in c]
    supported = list(options.key_types)
    wanted = [a for t in known for a in _SIGNATURES.get(t, (t,)) if a in supported]
    wanted = list(dict.fromkeys(wanted))
    options.key_types = wanted + [a for a in supported if a not in wanted]


def _check_host_key(target: SshTarget, entries: list[knownhosts.Entry], key: paramiko.PKey) -> None:
    blob, key_type = key.asbytes(), key.get_name()
    found = knownhosts.check(entries, target.known_name, key_type, blob)
    if found.status == "known":
        return
    name, kind, fp = target.known_name, _kind(key_type), knownhosts.fingerprint(blob)
    files = ", ".join(target.known_hosts)
    first = target.known_hosts[0] if target.known_hosts else "~/.ssh/known_hosts"
    add = f"ssh-keyscan -t {key_type} -p {target.port} {target.host}"
    add += f" | sed 's/^[^ ]*/{target.key_alias}/' >> {first}" if target.key_alias else f" >> {first}"
    if found.status == "unknown" and target.no_verify:
        warnings.warn(
            InsecureHostKeyWarning(
                f"host {name}: its {kind} key {fp} is not in {files}; accepted unchecked because the libvirt URI "
                f"says no_verify=1 (whoever answered at {target.host}:{target.port} is trusted to transport); "
                f"check the fingerprint on the host, add it (`{add}`) and drop no_verify"
            ),
            stacklevel=2,
        )
        return
    if found.status == "revoked":
        e = found.entries[0]
        why = f"its {kind} key {fp} is marked @revoked in {e.source}:{e.line}"
        fix = "the host must get a new key; add that one to known_hosts once its fingerprint is checked"
    elif found.status == "changed":
        held = "; ".join(f"{e.source}:{e.line} ({knownhosts.fingerprint(e.blob)})" for e in found.entries)
        why = (
            f"REMOTE HOST IDENTIFICATION HAS CHANGED: it presented the {kind} key {fp}, but known_hosts holds "
            f"another {kind} key for it at {held}; someone could be intercepting the connection (a man in "
            "the middle), or the host's key was replaced"
        )
        fix = (
            f"only if the key was replaced on purpose (check {fp} on the host: `ssh-keygen -lf "
            f"/etc/ssh/ssh_host_{kind.lower()}_key.pub`), remove the old entry (`ssh-keygen -R '{name}' -f "
            f"{found.entries[0].source}`) and add the new one (`{add}`)"
        )
    else:
        others = f" (known_hosts holds only its {', '.join(found.other_types)} key)" if found.other_types else ""
        why = f"its authenticity can't be established: its {kind} key {fp} is not in {files}{others}"
        fix = (
            f"check the fingerprint on the host (`ssh-keygen -lf /etc/ssh/ssh_host_{kind.lower()}_key.pub`), "
            f"then add it (`{add}`, or `{target.ssh_command()}` once and answer yes)"
        )
    raise HostKeyRefused(
        f"host {name}: {why}; refused, nothing was sent\nfix: {fix}",
        host=name,
        key_type=key_type,
        fingerprint=fp,
        files=target.known_hosts,
    )


def connect(target: SshTarget) -> paramiko.Transport:
    """A new authenticated transport to ``target`` (see the module doc)."""
    try:
        sock = socket.create_connection((target.host, target.port), timeout=CONNECT_TIMEOUT)
    except OSError as exc:
        raise HostSshUnreachable(
            f"cannot reach {target.where}: {exc.strerror or exc}\nfix: check that {target.host} is reachable and "
            f"runs sshd (`{target.ssh_command()} true`)"
        ) from None
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    transport = sshadmit.Transport(sock, default_window_size=WINDOW)
    try:
        entries = knownhosts.read_files([Path(p) for p in target.known_hosts])
        _prefer(transport, knownhosts.known_types(entries, target.known_name))
        try:
            transport.start_client(timeout=CONNECT_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - paramiko re-raises whatever its thread hit on the host's bytes
            raise HostSshUnreachable(f"ssh {target.where}: no SSH session: {type(exc).__name__}: {exc}") from None
        _check_host_key(target, entries, transport.get_remote_server_key())
        authenticate(transport, target)
    except BaseException:
        transport.close()
        raise
    transport.set_keepalive(KEEPALIVE)
    return transport


class HostSession:
    """The shared, reconnecting SSH session to one host (see the module doc)."""

    def __init__(self, target: SshTarget) -> None:
        self.target = target
        self.connects = 0  # how many transports were opened: 1 plus the reconnects
        self._lock = threading.Lock()
        self._transport: paramiko.Transport | None = None
        self._offers: dict[int, tuple[str, Accept]] = {}  # port on the host -> (its bind address, taker)
        self._relaying = 0  # forwarded channels being relayed now (at most MAX_FORWARDED)
        self._relaying_lock = threading.Lock()  # never self._lock: the transport's thread takes it

    def _live(self) -> tuple[paramiko.Transport, bool]:
        """The transport, and whether it was opened now (held under the lock: one connect at a time)."""
        with self._lock:
            if self._transport is not None and self._transport.is_active():
                return self._transport, False
            self._reconnect(self._transport)
            assert self._transport is not None
            return self._transport, True

    def _reconnect(self, dead: paramiko.Transport | None) -> None:
        if dead is not None:
            dead.close()
        self._transport = None
        self._transport = connect(self.target)
        self._transport.admit = self._admit
        self.connects += 1
        for port, (bind, _accept) in list(self._offers.items()):  # same ports: the guests were told them
            with contextlib.suppress(paramiko.SSHException, EOFError, OSError):
                self._transport.request_port_forward(bind, port, handler=self._forwarded)

    def ensure(self) -> paramiko.Transport:
        """The live transport, connecting if there is none or it died (typed errors if that fails)."""
        return self._live()[0]

    def open_channel(self, dest: tuple[str, int], *, timeout: float = CHANNEL_TIMEOUT) -> paramiko.Channel:
        """A ``direct-tcpip`` channel to ``dest`` as the host sees it; reconnects once if the
        session died. :class:`HostSshUnreachable` if nothing answers there or no session."""
        transport, fresh = self._live()
        try:
            return self._direct(transport, dest, timeout)
        except paramiko.ChannelException as exc:  # the host answered: nothing listens at dest
            raise self._refused(dest, exc) from None
        except (paramiko.SSHException, EOFError, OSError) as exc:
            if fresh:
                raise HostSshUnreachable(f"ssh {self.target.where}: no channel to {dest[0]}:{dest[1]}: {exc}") from None
        with self._lock:
            if self._transport is transport:  # no other thread replaced it meanwhile
                self._reconnect(transport)
            transport = self._transport
            assert transport is not None
        try:
            return self._direct(transport, dest, timeout)
        except paramiko.ChannelException as exc:
            raise self._refused(dest, exc) from None
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise HostSshUnreachable(f"ssh {self.target.where}: no channel to {dest[0]}:{dest[1]}: {exc}") from None

    def read_file(self, path: str, *, limit: int = 1 << 20, timeout: float = CHANNEL_TIMEOUT) -> bytes:
        """A small file of the host as its ``cat`` gives it over an exec channel, at most
        ``limit`` bytes: for the emulated quote service, which reads the argv of the QEMU a
        remote host runs (:func:`tdxvm.launch.rtmr0pin.running_argv`). :class:`HostSshError`
        when it cannot be read."""
        transport = self.ensure()
        try:
            chan = transport.open_session(timeout=timeout)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise HostSshUnreachable(f"ssh {self.target.where}: no session to read {path}: {exc}") from None
        deadline = time.monotonic() + timeout  # for the whole read: a host sending a byte at a time stops there
        try:
            chan.settimeout(timeout)
            chan.exec_command(shlex.join(["cat", "--", path]))
            data = bytearray()
            while chunk := chan.recv(1 << 16):
                data += chunk
                if len(data) > limit:
                    raise HostSshError(f"{path} on {self.target.where} is larger than {limit} bytes")
                chan.settimeout(max(deadline - time.monotonic(), 0.001))
            if not chan.status_event.wait(max(deadline - time.monotonic(), 0.001)):
                raise HostSshUnreachable(
                    f"ssh {self.target.where}: reading {path}: no exit status within {timeout:g} s"
                )
            if chan.recv_exit_status() != 0:
                why = chan.recv_stderr(1024).decode(errors="replace").strip()
                raise HostSshError(f"cannot read {path} on {self.target.where}: {why or 'cat failed'}")
            return bytes(data)
        except (paramiko.SSHException, EOFError, OSError) as exc:  # socket.timeout included
            raise HostSshUnreachable(f"ssh {self.target.where}: reading {path}: {exc}") from None
        finally:
            chan.close()

    @staticmethod
    def _direct(transport: paramiko.Transport, dest: tuple[str, int], timeout: float) -> paramiko.Channel:
        return transport.open_channel(
            "direct-tcpip", dest, ("127.0.0.1", 0), window_size=WINDOW, max_packet_size=MAX_PACKET, timeout=timeout
        )

    def _refused(self, dest: tuple[str, int], exc: paramiko.ChannelException) -> HostSshUnreachable:
        return HostSshUnreachable(f"{self.target.host} could not connect to {dest[0]}:{dest[1]}: {exc.text}")

    def offer(self, accept: Accept, *, bind: str = "127.0.0.1", port: int = 0) -> int:
        """Ask the host's sshd to listen on ``bind:port`` of the host (``port`` 0: a free port
        it picks) and hand each connection made there to ``accept``, as ``ssh -R`` does;
        returns the port on the host. Asked again on the same port after a reconnect, until
        :meth:`withdraw`. :class:`HostForwardRefused` if the sshd says no."""
        with self._lock:
            if self._transport is None or not self._transport.is_active():
                self._reconnect(self._transport)
            transport = self._transport
            assert transport is not None
            try:
                got = _within(
                    CHANNEL_TIMEOUT, lambda: transport.request_port_forward(bind, port, handler=self._forwarded)
                )
            except TimeoutError:  # paramiko waits for the answer as long as the session lives: end it
                transport.close()
                raise HostSshUnreachable(
                    f"ssh {self.target.where}: no answer to the request to listen on {bind}:{port or '<any port>'} "
                    f"within {CHANNEL_TIMEOUT:g} s"
                ) from None
            except (paramiko.SSHException, EOFError, OSError) as exc:
                if not transport.is_active():
                    raise HostSshUnreachable(f"ssh {self.target.where}: the session ended: {exc}") from None
                raise HostForwardRefused(
                    f"{self.target.where} refused to listen on {bind}:{port or '<any port>'} for the controller (an "
                    f"SSH remote forward, as `ssh -R`): {exc}\nfix: the host's sshd must allow remote forwards "
                    "(`AllowTcpForwarding yes` or `remote` in sshd_config, the default; no `DisableForwarding`, "
                    "and no `restrict`/`permitlisten` on the key in authorized_keys)"
                ) from None
            self._offers[got] = (bind, accept)
        return got

    def withdraw(self, port: int) -> None:
        """End the offer of ``port`` (:meth:`offer`): the host's sshd stops listening there."""
        with self._lock:
            found = self._offers.pop(port, None)
            transport = self._transport
        if found is not None and transport is not None and transport.is_active():
            # not Transport.cancel_port_forward: it drops the handler of every other offer too
            with contextlib.suppress(paramiko.SSHException, EOFError, OSError):  # TimeoutError included
                _within(CHANNEL_TIMEOUT, lambda: transport.global_request("cancel-tcpip-forward", (found[0], port)))

    @property
    def offered(self) -> list[int]:
        """The ports on the host offered now (:meth:`offer`)."""
        with self._lock:
            return sorted(self._offers)

    def _admit(self, kind: str, port: int) -> bool:
        """Whether to open a channel the host opens (in the transport's thread): only a
        forwarded connection to an offered port, and only while fewer than MAX_FORWARDED are relayed."""
        return kind == "forwarded-tcpip" and port in self._offers and self._relaying < MAX_FORWARDED

    def _forwarded(self, chan: paramiko.Channel, origin: tuple[str, int], server: tuple[str, int]) -> None:
        """paramiko's one handler of forwarded connections (in its transport's thread: hand on, never block)."""
        found = self._offers.get(server[1])
        with self._relaying_lock:
            room = found is not None and self._relaying < MAX_FORWARDED
            if room:
                self._relaying += 1
        if not room:  # withdrawn, or the cap reached, since it was admitted
            chan.close()
            return
        name = f"tdxvm-offer {self.target.where} {server[0]}:{server[1]}"
        threading.Thread(target=self._relay, args=(found[1], chan), name=name, daemon=True).start()

    def _relay(self, accept: Accept, chan: paramiko.Channel) -> None:
        try:
            accept(chan)
        finally:
            with self._relaying_lock:
                self._relaying -= 1

    @property
    def transport(self) -> paramiko.Transport | None:
        """The current transport (None before the first connect)."""
        return self._transport

    def close(self) -> None:
        with self._lock:
            self._offers.clear()
            if self._transport is not None:
                self._transport.close()
                self._transport = None


T = TypeVar("T")


def _within(seconds: float, call: Callable[[], T]) -> T:
    """``call()``, run on a thread and waited for at most ``seconds`` (paramiko's global
    requests wait for the host's answer without a limit); ``TimeoutError`` after that."""
    outcome: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller
            outcome.append((False, exc))

    worker = threading.Thread(target=run, name="tdxvm-ssh-request", daemon=True)
    worker.start()
    worker.join(seconds)
    if not outcome:
        raise TimeoutError(f"no answer within {seconds:g} s")
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


_sessions: dict[SshTarget, HostSession] = {}
_sessions_lock = threading.Lock()


def session(target: SshTarget) -> HostSession:
    """The process-wide session of ``target`` (created unconnected on first use)."""
    with _sessions_lock:
        found = _sessions.get(target)
        if found is None:
            found = _sessions[target] = HostSession(target)
        return found


def close_sessions() -> None:
    """Close every host session (the CLI's exit, tests)."""
    with _sessions_lock:
        sessions = list(_sessions.values())
        _sessions.clear()
    for s in sessions:
        s.close()
