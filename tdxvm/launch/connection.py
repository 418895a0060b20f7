"""Connections to local or remote libvirt, with refusals that say which URI and the fix.

Any libvirt URI works: ``qemu:///system``, ``qemu+ssh://user@host/system``,
``test:///abs/path/host.xml`` (libvirt's test driver, for tests). Importing this module
registers a libvirt error handler that keeps libvirt from printing to stderr; every
libvirt failure reaches the caller as an exception and is reported once, by tdxvm.

A remote host that accepted the connection and then stops answering (a dead network, a
frozen libvirtd) must not hold its caller forever. libvirt's client only runs keepalive
with an event loop, so the first :func:`open_connection` of a remote URI registers
libvirt's default one (once per process, a daemon thread runs it); every remote
connection then sends a keepalive every :data:`KEEPALIVE_INTERVAL` s, and after
:data:`KEEPALIVE_COUNT` of them go unanswered libvirt closes it: the pending call and
every later one fail (close such a connection with :func:`close`). Such a
failure reaches the user as :class:`LibvirtHostStalled` (exit 3) naming the URI, through
:func:`lost_to_keepalive` where errors leave a connection's work (:func:`connection`, a
fleet's worker, a launch). Opening a remote connection waits at most
:data:`OPEN_TIMEOUT` s (libvirt's open has no limit of its own, and no keepalive yet).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from urllib.parse import parse_qs, urlsplit

import libvirt

from tdxvm.launch.errors import (
    ConnectError,
    LibvirtConnectionLost,
    LibvirtdNotRunningError,
    LibvirtHostKeyRefused,
    LibvirtHostStalled,
    LibvirtPermissionError,
    LibvirtUnreachable,
    SshTransportError,
)
from tdxvm.launch.uris import uri_problem

DEFAULT_URI = "qemu:///system"
# A remote connection whose host does not answer KEEPALIVE_COUNT keepalives sent
# KEEPALIVE_INTERVAL s apart is closed by libvirt (libvirtd's own defaults are 5 and 5):
# its calls fail after about (KEEPALIVE_COUNT + 1) * KEEPALIVE_INTERVAL = 35 s of silence.
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 6
OPEN_TIMEOUT = 30.0  # seconds for opening a remote connection (as a fleet's inventory.CONNECT_TIMEOUT)


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt's default handler prints every error to stderr; tdxvm reports them itself."""


libvirt.registerErrorHandler(_quiet, None)

_AUTH_CODES = {
    getattr(libvirt, name)
    for name in ("VIR_ERR_AUTH_FAILED", "VIR_ERR_AUTH_CANCELLED", "VIR_ERR_AUTH_UNAVAILABLE")
    if hasattr(libvirt, name)
}


def libvirt_message(exc: libvirt.libvirtError) -> str:
    """libvirt's own text for an error (without the Python wrapper's 'virXxx() failed')."""
    return exc.get_error_message() or str(exc)


def is_local(uri: str) -> bool:
    """True when ``uri`` names this machine (no host part, or localhost over a local transport)."""
    parts = urlsplit(uri)
    transport = parts.scheme.partition("+")[2]
    host = parts.hostname or ""
    return host in ("", "localhost") and transport in ("", "unix")


def is_alive(conn: libvirt.virConnect) -> bool:
    """Whether ``conn`` still reaches its libvirt (False once it broke or was closed)."""
    try:
        return bool(conn.isAlive())
    except libvirt.libvirtError:
        return False


def is_test_driver(uri: str) -> bool:
    return urlsplit(uri).scheme == "test"


_events_lock = threading.Lock()
_events_running = False
_keepalive: weakref.WeakKeyDictionary[libvirt.virConnect, tuple[int, int]] = weakref.WeakKeyDictionary()
_watched: weakref.WeakSet[libvirt.virConnect] = weakref.WeakSet()  # a close callback registered (close() drops it)
_stalled: weakref.WeakSet[libvirt.virConnect] = weakref.WeakSet()  # closed by their keepalive


def _run_events() -> None:  # pragma: no cover - runs for the life of the process
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except libvirt.libvirtError:
            time.sleep(0.1)  # never a busy loop


def ensure_event_loop() -> None:
    """Register libvirt's default event loop and run it on a daemon thread, once per process
    (before any connection is opened, or those opened earlier get no keepalive)."""
    global _events_running
    with _events_lock:
        if _events_running:
            return
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=_run_events, name="tdxvm-libvirt-events", daemon=True).start()
        _events_running = True


def _closed(conn: libvirt.virConnect, reason: int, _opaque: object) -> None:
    """libvirt's close callback (on the event loop's thread): remember a keepalive's close."""
    if reason == libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE:
        _stalled.add(conn)


def _keep_alive(conn: libvirt.virConnect) -> None:
    """Keepalive for ``conn``, and a close callback that notes a keepalive's close. The
    callback holds the connection: only :func:`close` (which drops it first) frees it."""
    with suppress(libvirt.libvirtError):
        conn.registerCloseCallback(_closed, None)
        _watched.add(conn)
    with suppress(libvirt.libvirtError):  # a peer without keepalive support: nothing to enable
        conn.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
        _keepalive[conn] = (KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)


def stalled(conn: libvirt.virConnect | None) -> LibvirtHostStalled | None:
    """The error for ``conn`` if its keepalive closed it (its host stopped answering), else None."""
    if conn is None or conn not in _stalled:
        return None
    interval, count = _keepalive.get(conn, (KEEPALIVE_INTERVAL, KEEPALIVE_COUNT))
    try:
        uri = conn.getURI()
    except libvirt.libvirtError:
        uri = "the remote host"
    return LibvirtHostStalled(
        f"libvirt at {uri} stopped answering: {count} keepalive messages sent {interval} s apart went unanswered, "
        "so the connection was closed and its calls failed (a dead network, or a frozen libvirtd on the host)\n"
        f"fix: check the host and its network (`virsh -c {uri} list --all`), then try again"
    )


def lost_to_keepalive(conn: libvirt.virConnect | None, exc: BaseException) -> BaseException:
    """``exc`` as the user should see it: a failure on a connection its keepalive closed is
    :class:`LibvirtHostStalled`, unless ``exc`` already says the connection was lost."""
    error = stalled(conn)
    if error is None or isinstance(exc, LibvirtConnectionLost):
        return exc
    return error


def _open(uri: str) -> libvirt.virConnect:
    """``libvirt.open``; for a remote URI on a thread, waited for at most OPEN_TIMEOUT s."""
    if is_local(uri) or is_test_driver(uri):
        return libvirt.open(uri)
    box: dict[str, object] = {}
    handover = threading.Lock()  # the result is the caller's, or (once it gave up) the worker closes it

    def run() -> None:
        try:
            conn = libvirt.open(uri)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            with handover:
                box["error"] = exc
            return
        with handover:
            if "late" not in box:
                box["conn"] = conn
                return
        with suppress(libvirt.libvirtError):  # opened after the caller gave up: nobody else will close it
            conn.close()

    worker = threading.Thread(target=run, name=f"tdxvm-open {uri}", daemon=True)
    worker.start()
    worker.join(OPEN_TIMEOUT)
    with handover:
        if "conn" not in box and "error" not in box:
            box["late"] = True
    if "late" in box:
        raise LibvirtUnreachable(
            f"cannot connect to libvirt at {uri}: no answer within {OPEN_TIMEOUT:g} s (the host accepted the "
            f"connection, then said nothing: a dead network, or a frozen libvirtd)\nfix: check the host and its "
            f"network (`virsh -c {uri} list --all`)"
        )
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["conn"]  # type: ignore[return-value]


def open_connection(uri: str = DEFAULT_URI) -> libvirt.virConnect:
    """Open ``uri`` read-write; raise a :class:`ConnectError` subclass with the fix. A remote
    connection gets keepalive (see the module doc)."""
    parts = urlsplit(uri)
    problem = uri_problem(uri)
    if problem is not None:
        raise ConnectError(problem)
    if parts.scheme == "test" and parts.path not in ("", "/default") and not os.path.isfile(parts.path):
        raise ConnectError(
            f"libvirt test driver {uri}: no such file {parts.path} (give test:///default or the "
            "absolute path of a test driver XML file)"
        )
    remote = not is_local(uri) and not is_test_driver(uri)
    if remote:
        ensure_event_loop()  # local connections stay as libvirt makes them: no keepalive to lose
    try:
        conn = _open(uri)
    except libvirt.libvirtError as exc:
        raise explain_connect_error(uri, exc) from None
    if conn is None:  # pragma: no cover - older bindings returned None instead of raising
        raise LibvirtUnreachable(f"cannot connect to libvirt at {uri}")
    if remote:
        _keep_alive(conn)
    return conn


def close(conn: libvirt.virConnect) -> int | None:
    """Close ``conn`` (and drop its close callback, which holds it: a plain ``conn.close()``
    of a remote connection frees neither its socket nor its ``ssh``); libvirt's errors
    ignored. Every connection :func:`open_connection` made is closed here. Returns what
    libvirt's close does: the references left (0: freed), or None on an error."""
    if conn in _watched:
        _watched.discard(conn)
        with suppress(libvirt.libvirtError):
            conn.unregisterCloseCallback()
    try:
        return int(conn.close())
    except libvirt.libvirtError:
        return None


@contextmanager
def connection(uri: str = DEFAULT_URI) -> Iterator[libvirt.virConnect]:
    """An open connection to ``uri``, closed at the end; an error raised inside because the
    host stopped answering comes out as :class:`LibvirtHostStalled`."""
    conn = open_connection(uri)
    try:
        yield conn
    except Exception as exc:
        error = lost_to_keepalive(conn, exc)
        if error is exc:
            raise
        raise error from None
    finally:
        close(conn)


def explain_connect_error(uri: str, exc: libvirt.libvirtError) -> ConnectError:
    """Map a failed ``virConnectOpen`` to the error type and fix a person needs."""
    text = libvirt_message(exc)
    low = text.lower()
    transport = urlsplit(uri).scheme.partition("+")[2]
    host = urlsplit(uri).hostname or "the host"
    where = f"cannot connect to libvirt at {uri}: {text}"
    if transport == "ssh":
        if "host key verification failed" in low:
            return LibvirtHostKeyRefused(f"{where}\nfix: {_host_key_fix(uri, low)}")
        if "permission denied" in low:
            fix = (
                f"libvirt runs ssh without a terminal, so it cannot ask for a password: check that "
                f"`ssh {urlsplit(uri).netloc} true` works without prompting (a key loaded in ssh-agent, or "
                "keyfile= in the URI)"
            )
        elif "could not resolve" in low or "connection refused" in low or "timed out" in low or "no route" in low:
            fix = f"check that {host} is reachable and runs sshd (`ssh {urlsplit(uri).netloc} true`)"
        else:
            fix = (
                f"check `ssh {urlsplit(uri).netloc} true`, and that {host} runs libvirtd (or virtqemud) and has "
                "`nc` or `virt-ssh-helper` for libvirt's ssh transport"
            )
        return SshTransportError(f"{where}\nfix: {fix}")
    if exc.get_error_code() in _AUTH_CODES or "permission denied" in low or "authentication" in low:
        return LibvirtPermissionError(
            f"{where}\nfix: run as root, or add your user to the 'libvirt' group (`sudo usermod -aG libvirt "
            f"$USER`, then log in again); qemu:///session needs no privileges but has no system networking"
        )
    if "no such file or directory" in low or "connection refused" in low:
        if transport in ("", "unix"):
            fix = (
                "start the libvirt daemon: `systemctl start libvirtd` (or `systemctl start virtqemud.socket` on "
                "hosts with modular daemons); without systemd, `libvirtd -d`"
            )
        else:
            fix = f"check that libvirtd on {host} listens for {transport} connections"
        return LibvirtdNotRunningError(f"{where}\nfix: {fix}")
    if exc.get_error_code() == libvirt.VIR_ERR_NO_CONNECT:
        return ConnectError(
            f"{where}\nfix: use a URI whose driver this libvirt client knows, e.g. qemu:///system, "
            "qemu+ssh://user@host/system or test:///default"
        )
    return LibvirtUnreachable(where)


def _host_key_fix(uri: str, low: str) -> str:
    """What to do about a host key libvirt's ssh refused (``low``: its message, lowercased)."""
    parts = urlsplit(uri)
    host = parts.hostname or "the host"
    files = parse_qs(parts.query).get("known_hosts") or ["~/.ssh/known_hosts"]
    check = (
        f"check the key's fingerprint out of band (on {host}'s console: `ssh-keygen -lf "
        "/etc/ssh/ssh_host_ed25519_key.pub`)"
    )
    if "has changed" in low:
        return (
            f"{host}'s SSH key is not the one {files[0]} holds for it. If the host was reinstalled or its key "
            f"rotated, {check}, then remove the old line (`ssh-keygen -R {host} -f {files[0]}`) and add the new "
            "key; otherwise something between you and the host answers in its place: do not connect"
        )
    return f"{files[0]} holds no key for {host}: {check}, then add it (`ssh-keyscan {host} >> {files[0]}`)"
