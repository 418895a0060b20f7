"""SSH to a guest accepts only the host key its attestation bound (a real sshd on loopback)."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from tdxvm.provision import ssh

from .sshd import LocalSshd, unavailable

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))


def _blob(pub: Path) -> bytes:
    return base64.b64decode(pub.read_text().split()[1])


def _client_key(sshd: LocalSshd):
    return serialization.load_ssh_private_key(sshd.client_key.read_bytes(), password=None)


def test_login_with_the_attested_host_key():
    with LocalSshd() as sshd:
        client = ssh.connect(
            ("127.0.0.1", sshd.port),
            host_key=_blob(Path(f"{sshd.host_key}.pub")),
            client_key=_client_key(sshd),
            user=sshd.user,
        )
        with client:
            assert ssh.run(client, "echo attested").strip() == "attested"
            with pytest.raises(ssh.SshError, match="exited 3"):
                ssh.run(client, "exit 3")


def test_another_host_key_is_refused_before_login(tmp_path):
    """A man in the middle (here: the real sshd with a key the guest never bound)."""
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    with LocalSshd() as sshd, pytest.raises(ssh.HostKeyMismatch, match="not the key this guest bound"):
        ssh.connect(
            ("127.0.0.1", sshd.port), host_key=_blob(Path(f"{other}.pub")), client_key=_client_key(sshd), user=sshd.user
        )
