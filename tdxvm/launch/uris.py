"""The one check of a libvirt URI tdxvm is given (a VM spec's ``uri:``, a fleet's hosts,
``--uri``, ``$TDXVM_URI``). Standard library only: commands that never contact libvirt
check ``--uri`` without importing it."""

from __future__ import annotations

from urllib.parse import urlsplit

URI_EXAMPLES = "e.g. qemu:///system, qemu+ssh://user@host/system, test:///abs/path/host.xml"
_LOCAL_TRANSPORTS = ("", "unix")
_REMOTE_TRANSPORTS = ("ssh", "libssh", "libssh2", "tcp", "tls")


def uri_problem(uri: object) -> str | None:
    """Why ``uri`` is not a libvirt URI tdxvm can use; None when it is. The one check for a
    VM spec's ``uri:``, a fleet's hosts, ``--uri`` and ``$TDXVM_URI``: driver ``qemu``
    (any transport) or ``test``; a remote transport names a host; ``qemu`` names
    ``/system`` or ``/session``."""
    if not isinstance(uri, str) or "://" not in uri:
        return f"{uri!r} is not a libvirt URI ({URI_EXAMPLES})"
    parts = urlsplit(uri)
    driver, _, transport = parts.scheme.partition("+")
    if driver not in ("qemu", "test") or transport not in (*_LOCAL_TRANSPORTS, *_REMOTE_TRANSPORTS):
        return (
            f"{uri!r} is not a libvirt URI tdxvm uses: the driver must be qemu (or test), "
            f"over ssh, libssh, libssh2, tcp, tls or locally ({URI_EXAMPLES})"
        )
    if transport in _REMOTE_TRANSPORTS and not parts.hostname:
        return f"{uri!r} names no host to reach over {transport} (e.g. qemu+ssh://user@host/system)"
    if driver == "qemu" and parts.path.rstrip("/") not in ("/system", "/session"):
        return f"{uri!r}: a qemu URI ends in /system or /session, not {parts.path or '(nothing)'!r}"
    return None
