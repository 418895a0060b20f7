"""Connections to local or remote libvirt, with refusals that say which URI and the fix.

Any libvirt URI works: ``qemu:///system``, ``qemu+ssh://user@host/system``,
``test:///abs/path/host.xml`` (libvirt's test driver, for tests). Importing this module
registers a libvirt error handler that keeps libvirt from printing to stderr; every
libvirt failure reaches the caller as an exception and is reported once, by tdxvm.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from urllib.parse import parse_qs, urlsplit

import libvirt

from tdxvm.launch.errors import (
    ConnectError,
    LibvirtdNotRunningError,
    LibvirtHostKeyRefused,
    LibvirtPermissionError,
    LibvirtUnreachable,
    SshTransportError,
)
from tdxvm.launch.uris import uri_problem

DEFAULT_URI = "qemu:///system"


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


def is_test_driver(uri: str) -> bool:
    return urlsplit(uri).scheme == "test"


def open_connection(uri: str = DEFAULT_URI) -> libvirt.virConnect:
    """Open ``uri`` read-write; raise a :class:`ConnectError` subclass with the fix."""
    parts = urlsplit(uri)
    problem = uri_problem(uri)
    if problem is not None:
        raise ConnectError(problem)
    if parts.scheme == "test" and parts.path not in ("", "/default") and not os.path.isfile(parts.path):
        raise ConnectError(
            f"libvirt test driver {uri}: no such file {parts.path} (give test:///default or the "
            "absolute path of a test driver XML file)"
        )
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise explain_connect_error(uri, exc) from None
    if conn is None:  # pragma: no cover - older bindings returned None instead of raising
        raise LibvirtUnreachable(f"cannot connect to libvirt at {uri}")
    return conn


@contextmanager
def connection(uri: str = DEFAULT_URI) -> Iterator[libvirt.virConnect]:
    conn = open_connection(uri)
    try:
        yield conn
    finally:
        with suppress(libvirt.libvirtError):
            conn.close()


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
