"""Errors of the launch package: each says what was refused, where, and the likely fix.

Every error is a :class:`LaunchError` with a stable ``code`` (used by ``-o json`` and by
scripts); ``str(err)`` is the message for people.
"""

from __future__ import annotations


class LaunchError(Exception):
    """Base of every error raised by :mod:`tdxvm.launch`."""

    code = "launch"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class ManifestError(LaunchError):
    """The image manifest named by a VM spec is missing or not usable."""

    code = "manifest"


class LaunchPolicyError(LaunchError):
    """The effective attestation policy cannot be formed (e.g. no expected MRTD)."""

    code = "launch-policy"


class ConnectError(LaunchError):
    """libvirt could not be reached at a URI. Subclasses name the likely cause."""

    code = "libvirt-connect"


class LibvirtdNotRunningError(ConnectError):
    code = "libvirtd-not-running"


class LibvirtPermissionError(ConnectError):
    code = "libvirt-permission"


class SshTransportError(ConnectError):
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
