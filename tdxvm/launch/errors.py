"""Errors of the launch package: each says what was refused, where, and the likely fix.

Every error is a :class:`LaunchError` with a stable ``code`` (used by ``-o json`` and by
scripts); ``str(err)`` is the message for people. A libvirt that does not answer is
:class:`LibvirtUnreachable` (exit 3); a controller record the host contradicts is a
refusal (:class:`tdxvm.launch.records.RecordMismatch`, exit 1); the rest is exit 2.
"""

from __future__ import annotations

from tdxvm.errors import Refused, TdxvmError, Unreachable


class LaunchError(TdxvmError):
    """Base of every error raised by :mod:`tdxvm.launch`."""

    code = "launch"


class ManifestError(LaunchError):
    """The image manifest named by a VM spec is missing or not usable."""

    code = "manifest"


class LaunchPolicyError(LaunchError):
    """The effective attestation policy cannot be formed (e.g. no expected MRTD)."""

    code = "launch-policy"


class ConnectError(LaunchError):
    """libvirt could not be used at a URI. Subclasses name the likely cause; as such (exit
    2) the URI itself or this user's rights are wrong, which only the user can fix."""

    code = "libvirt-connect"


class LibvirtUnreachable(ConnectError, Unreachable):
    """Nothing usable answered at the URI (exit 3): no daemon, no route, a failed transport."""


class LibvirtdNotRunningError(LibvirtUnreachable):
    code = "libvirtd-not-running"


class LibvirtConnectionLost(LibvirtUnreachable):
    """The connection ended in the middle of an operation (the host's libvirtd restarted, or
    the SSH session to it ended); the message says what was left on the host."""

    code = "libvirt-connection-lost"


class LibvirtHostStalled(LibvirtConnectionLost):
    """The host accepted the connection, then stopped answering (a dead network, a frozen
    libvirtd): its keepalive went unanswered, libvirt closed the connection and its calls
    failed (:data:`tdxvm.launch.connection.KEEPALIVE_INTERVAL`)."""

    code = "libvirt-host-stalled"


class LibvirtHostKeyRefused(ConnectError, Refused):
    """libvirt's ``ssh`` transport refused the host's key: unknown, or not the one in
    known_hosts (exit 1, as for tdxvm's own SSH: :class:`tdxvm.launch.sshtarget.HostKeyRefused`)."""

    code = "host-key"


class LibvirtPermissionError(ConnectError):
    code = "libvirt-permission"


class SshTransportError(LibvirtUnreachable):
    code = "libvirt-ssh"


class PreflightError(LaunchError):
    """The host cannot run the VM; ``findings`` holds every failed check."""

    code = "preflight"

    def __init__(self, message: str, findings: list) -> None:
        super().__init__(message)
        self.findings = findings


class VolumeError(LaunchError):
    """An image artifact could not be put onto the libvirt host."""

    code = "libvirt-volume"


class DomainError(LaunchError):
    """libvirt refused to define, start, stop or undefine a domain."""

    code = "libvirt-domain"


class NoSuchVmError(LaunchError):
    code = "no-such-vm"


class VmExistsError(LaunchError):
    code = "vm-exists"


class NotOurDomainError(LaunchError):
    """A domain that tdxvm did not create: tdxvm never changes it."""

    code = "not-tdxvm"


class ConsoleError(LaunchError):
    code = "console"
