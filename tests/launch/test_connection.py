"""Connection refusals name the URI and the fix; libvirt itself prints nothing."""

from __future__ import annotations

import shutil
import subprocess
import sys

import libvirt
import pytest

from tdxvm.launch.connection import explain_connect_error, is_local, open_connection
from tdxvm.launch.errors import (
    ConnectError,
    LibvirtdNotRunningError,
    LibvirtHostKeyRefused,
    LibvirtPermissionError,
    SshTransportError,
)
from tdxvm.launch.uris import uri_problem


def test_daemon_not_running():
    uri = "qemu:///system?socket=/nonexistent/libvirt-sock"
    with pytest.raises(LibvirtdNotRunningError) as info:
        open_connection(uri)
    text = str(info.value)
    assert uri in text and "/nonexistent/libvirt-sock" in text and "systemctl start libvirtd" in text
    assert "libvirtd -d" in text and info.value.code == "libvirtd-not-running"


@pytest.mark.skipif(shutil.which("ssh") is None, reason="needs the ssh client libvirt's ssh transport runs")
def test_ssh_transport_failure():
    uri = "qemu+ssh://nobody@127.0.0.1:1/system?no_tty=1"
    with pytest.raises(SshTransportError) as info:
        open_connection(uri)
    assert uri in str(info.value) and "Connection refused" in str(info.value) and "runs sshd" in str(info.value)


def test_unknown_driver_and_missing_test_file(tmp_path):
    with pytest.raises(ConnectError, match="the driver must be qemu") as info:
        open_connection("nosuchdriver:///x")
    assert "qemu:///system" in str(info.value)
    with pytest.raises(ConnectError, match="no such file"):
        open_connection(f"test://{tmp_path}/missing.xml")
    with pytest.raises(ConnectError, match="not a libvirt URI"):
        open_connection("localhost")


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("http://host/system", "the driver must be qemu"),
        ("qemu+ftp://host/system", "the driver must be qemu"),
        ("qemu+ssh:///system", "names no host to reach over ssh"),
        ("qemu+tls:///system", "names no host to reach over tls"),
        ("qemu:///bogus", "ends in /system or /session"),
        ("qemu://", "ends in /system or /session"),
        ("localhost", "not a libvirt URI"),
    ],
)
def test_one_uri_check_for_specs_fleets_and_the_command_line(uri, problem):
    assert problem in uri_problem(uri)
    for good in (
        "qemu:///system",
        "qemu+ssh://root@h.example/system",
        "qemu:///session",
        "test:///default",
        "qemu+unix:///system",
        "qemu+tcp://10.0.0.2/system",
    ):
        assert uri_problem(good) is None, good


def test_permission_error_type_is_a_connect_error():
    assert issubclass(LibvirtPermissionError, ConnectError) and LibvirtPermissionError.code == "libvirt-permission"


def test_libvirt_prints_nothing_to_stderr(tmp_path):
    code = (
        "from tdxvm.launch.connection import open_connection\n"
        "try:\n    open_connection('qemu:///system?socket=/nonexistent/sock')\nexcept Exception:\n    pass\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == ""


@pytest.mark.parametrize(
    ("uri", "local"),
    [
        ("qemu:///system", True),
        ("qemu+unix:///system", True),
        ("test:///default", True),
        ("qemu+ssh://user@host/system", False),
        ("qemu+ssh://localhost/system", False),
        ("qemu+tcp://h/system", False),
    ],
)
def test_is_local(uri, local):
    assert is_local(uri) is local


class _SshSaid(libvirt.libvirtError):
    """What libvirt raises when its ssh transport exits, with ssh's own words."""

    def __init__(self, text: str) -> None:
        Exception.__init__(self, text)
        self.text = text

    def get_error_message(self) -> str:
        return self.text

    def get_error_code(self) -> int:
        return libvirt.VIR_ERR_SYSTEM_ERROR


@pytest.mark.parametrize(
    ("ssh_said", "says"),
    [
        (
            "End of file while reading data: @@@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @@@\n"
            "Offending ED25519 key in /k/known_hosts:1\nHost key verification failed.: Input/output error",
            ["not the one /k/known_hosts holds", "ssh-keygen -R h.example -f /k/known_hosts", "do not connect"],
        ),
        (
            "End of file while reading data: No ED25519 host key is known for h.example and you have requested "
            "strict checking.\nHost key verification failed.: Input/output error",
            ["/k/known_hosts holds no key for h.example", "ssh-keyscan h.example >> /k/known_hosts"],
        ),
    ],
)
def test_a_host_key_ssh_refused_is_a_refusal_with_what_to_do(ssh_said, says):
    uri = "qemu+ssh://root@h.example/system?known_hosts=/k/known_hosts&no_tty=1"
    err = explain_connect_error(uri, _SshSaid(ssh_said))
    assert isinstance(err, LibvirtHostKeyRefused) and err.exit_status == 1 and err.code == "host-key"
    assert all(s in str(err) for s in says) and "ssh-keygen -lf" in str(err)
    # without known_hosts= in the URI, ssh's own file is the one to fix
    assert "~/.ssh/known_hosts" in str(explain_connect_error("qemu+ssh://root@h.example/system", _SshSaid(ssh_said)))


def test_close_frees_a_connection_kept_alive():
    """A remote connection's close callback holds it: ``conn.close()`` alone leaves its
    socket (and, over ssh, its ssh) open; :func:`close` frees it. Shown on the local
    libvirtd with what a remote connection gets (the control leaks, the fix does not)."""
    from tdxvm.launch import connection

    def kept_alive() -> libvirt.virConnect:
        try:
            conn = libvirt.open("qemu:///system")
        except libvirt.libvirtError as exc:
            pytest.skip(f"no libvirtd: {exc}")
        connection.ensure_event_loop()
        connection._keep_alive(conn)  # what open_connection does for a remote URI
        return conn

    assert kept_alive().close() == 1  # the control: a plain close leaves a reference (the callback's)
    assert connection.close(kept_alive()) == 0  # freed: socket closed
