"""A private OpenSSH server on loopback for tests and benchmarks (never the system's sshd).

It runs ``/usr/sbin/sshd -D`` with its own configuration, host key and authorized key
in a temporary folder, on a free port of 127.0.0.1, as the current user (root in CI,
which is what sshd needs to accept logins for root). Clients pin its host key: a
paramiko client from :meth:`LocalSshd.client` refuses any other, as the controller
does with a guest's attested key.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import paramiko

SSHD = Path("/usr/sbin/sshd")


def unavailable() -> str | None:
    """Why a private sshd cannot run here, or None."""
    if not SSHD.is_file():
        return f"{SSHD} is missing (apt-get install openssh-server; .ci/setup installs it)"
    if shutil.which("ssh-keygen") is None:
        return "ssh-keygen is missing (openssh-client)"
    if os.geteuid() == 0 and not Path("/run/sshd").is_dir():
        try:  # sshd's privilege-separation directory; its systemd unit would create it
            Path("/run/sshd").mkdir(mode=0o755)
        except OSError as exc:
            return f"/run/sshd is missing and cannot be created: {exc}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalSshd:
    """``with LocalSshd() as sshd:`` — a running sshd; ``sshd.client()`` logs in to it."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tdxvm-sshd-"))
        self.user = (
            os.environ.get("USER")
            or subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
        )
        self.port = 0
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> LocalSshd:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def host_key(self) -> Path:
        return self.dir / "host_ed25519"

    @property
    def client_key(self) -> Path:
        return self.dir / "client_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    def start(self) -> None:
        for key in (self.host_key, self.client_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        (self.dir / "authorized_keys").write_text(Path(f"{self.client_key}.pub").read_text())
        (self.dir / "authorized_keys").chmod(0o600)
        for _ in range(5):
            self.port = _free_port()
            host_pub = Path(f"{self.host_key}.pub").read_text().split()
            self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")
            config = self.dir / "sshd_config"
            config.write_text(
                f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.host_key}\n"
                f"AuthorizedKeysFile {self.dir}/authorized_keys\nPidFile {self.dir}/sshd.pid\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                "PermitRootLogin prohibit-password\nAllowTcpForwarding yes\nSubsystem sftp internal-sftp\n"
                "LogLevel ERROR\n"
            )
            log = (self.dir / "sshd.log").open("ab")
            self.proc = subprocess.Popen(
                [str(SSHD), "-D", "-e", "-f", str(config)], stdout=log, stderr=log, stdin=subprocess.DEVNULL
            )
            log.close()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                    return
                except OSError:
                    time.sleep(0.05)
            self.proc.kill()
            self.proc.wait()
        raise RuntimeError(f"sshd did not start; its log: {(self.dir / 'sshd.log').read_text()[-2000:]}")

    def client(self) -> paramiko.SSHClient:
        """A paramiko client logged in with the host key pinned (any other key is refused)."""
        c = paramiko.SSHClient()
        c.set_missing_host_key_policy(paramiko.RejectPolicy())
        c.load_host_keys(str(self.known_hosts))
        c.connect(
            "127.0.0.1",
            port=self.port,
            username=self.user,
            key_filename=str(self.client_key),
            allow_agent=False,
            look_for_keys=False,
            timeout=10,
        )
        return c

    def ssh_options(self) -> list[str]:
        """OpenSSH client options (``ssh``, ``scp``) for this server, host key pinned."""
        return [
            "-i",
            str(self.client_key),
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
        ]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
