"""SSH to an attested guest: the host key must be the one its quote binds.

paramiko is given no known-hosts file and a host-key policy that accepts exactly the
key the guest bound into its attestation (``ssh-host``: the OpenSSH wire-format blob of
``/etc/ssh/ssh_host_ed25519_key.pub``, made inside the TD). Any other key, such as a
man in the middle's, ends the connection before authentication, so nothing is sent to
it. Never AutoAdd. The controller logs in with its own key (``ssh/controller``).
"""

from __future__ import annotations

import hmac
import io

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tdxvm.errors import Refused, TdxvmError, Unreachable


class SshError(TdxvmError):
    """A command over SSH failed (exit 2); its subclasses: no session, or the wrong host key."""

    code = "ssh"


class SshUnreachable(SshError, Unreachable):
    """No SSH session: the guest did not answer, or the connection broke (exit 3)."""


class HostKeyMismatch(SshError, Refused):
    """The server's host key is not the attested one (exit 1): nothing was sent to it."""

    code = "ssh-host-key"


class AttestedHostKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Accept the server's key only if it is the attested one."""

    def __init__(self, attested_blob: bytes) -> None:
        self.attested_blob = attested_blob

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        if not hmac.compare_digest(key.asbytes(), self.attested_blob):
            raise HostKeyMismatch(
                f"{hostname}: the SSH host key ({key.get_name()} {key.fingerprint}) is not the key "
                "this guest bound into its attestation quote: refusing (a man in the middle?)"
            )
        client.get_host_keys().add(hostname, key.get_name(), key)


def _paramiko_key(key: Ed25519PrivateKey) -> paramiko.PKey:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    return paramiko.Ed25519Key.from_private_key(io.StringIO(pem.decode()))


def connect(
    address: tuple[str, int],
    *,
    host_key: bytes,
    client_key: Ed25519PrivateKey,
    user: str = "root",
    timeout: float = 30.0,
) -> paramiko.SSHClient:
    """An SSH session to ``address`` whose server proved to hold ``host_key``."""
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(AttestedHostKeyPolicy(host_key))
    where = f"{address[0]}:{address[1]}"
    try:
        client.connect(
            address[0],
            port=address[1],
            username=user,
            pkey=_paramiko_key(client_key),
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
            allow_agent=False,
            look_for_keys=False,
        )
    except HostKeyMismatch:
        client.close()
        raise
    except paramiko.AuthenticationException as exc:  # it answered, and did not take the controller's key
        client.close()
        raise SshError(f"ssh {user}@{where}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - paramiko re-raises what its thread hit on the peer's bytes (EOFError…)
        client.close()
        raise SshUnreachable(f"ssh {user}@{where}: {str(exc) or type(exc).__name__}") from None
    return client


def run(client: paramiko.SSHClient, command: str, *, timeout: float = 60.0) -> str:
    """Run ``command``; its stdout, or :class:`SshError` with its stderr and exit status
    (:class:`SshUnreachable` when the session broke or the command outlived ``timeout``)."""
    try:
        _, stdout, stderr = client.exec_command(command, timeout=timeout)
        out = stdout.read().decode(errors="replace")
        status = stdout.channel.recv_exit_status()
    except (paramiko.SSHException, OSError) as exc:  # socket.timeout is an OSError
        raise SshUnreachable(f"`{command}`: {exc or type(exc).__name__}") from None
    if status != 0:
        raise SshError(f"`{command}` exited {status}: {stderr.read().decode(errors='replace').strip()}")
    return out
