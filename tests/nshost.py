"""A second libvirt host on this machine, for the tests of remote hosts (issue #14).

:class:`NamespaceHost` starts a libvirt host that shares nothing with the machine's own
but the kernel and the installed programs, and that the controller (this process, in the
root namespaces) reaches only as ``qemu+ssh://root@10.231.N.2/system``:

- its own network namespace: a veth pair, ``10.231.N.1/30`` on the controller's side and
  ``10.231.N.2/30`` on the host's, plus ``lo``; no other address and no route, so the
  host can talk to the controller's address and to itself, nothing else;
- its own mount namespace (propagation private, so no mount is ever seen outside it)
  where fresh folders are bound over ``/run``, ``/tmp``, ``/etc/libvirt``, ``/var/lib``
  (which holds ``libvirt`` and tdxvm's pool folder ``tdxvm``), ``/var/cache`` and
  ``/var/log``: its own sockets, pid files, domains, pools, volumes and logs;
- its own UTS namespace (host name ``tdxvm-<id>``) and PID namespace, whose init (the
  "holder", a small reaper) keeps the namespaces alive; killing it makes the kernel kill
  every process in the host, QEMU included;
- its own virtlogd, libvirtd (a minimal configuration: no pool, no network) and sshd
  (listening only on ``10.231.N.2:22``, a fresh ed25519 host key, root by the freshly
  generated controller key only, no other authentication).

Nothing is mounted in the root mount namespace: the network namespace is not named with
``ip netns add`` (that would leave a ``/run/netns`` bind mount behind) but held by the
holder process; ``tdxvm-<id>`` names its folder, its holder and its veth pair instead.
The host's files live under one temporary folder on the controller's side
(:meth:`NamespaceHost.path` maps a path inside the host to it). :meth:`close` tears
everything down, even after a failed start; if the test process dies without closing,
the kernel kills the host (unshare, and with it the holder, dies with the thread that
started it: start hosts from the main thread, as pytest fixtures are) and the next
start removes the folder left behind.

libvirt 9.0's ``ssh`` transport runs OpenSSH and passes it ``keyfile`` but ignores
``known_hosts`` (only the libssh/libssh2 transports read it; OpenSSH would consult
``~/.ssh/known_hosts``). So :attr:`NamespaceHost.uri` also names, as libvirt's
``command`` parameter (the ssh client to run), a small script that runs ``/usr/bin/ssh``
with this host's known_hosts file, strict host key checking and no configuration file
or agent of the machine's user. The URI's ``known_hosts`` parameter names the same file,
for readers other than libvirt's ssh transport.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import pwd
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

PREFIX = "tdxvm-"
SUBNET = "10.231"  # 10.231.N.0/30 per host, N free on this machine
TOOLS = ("ip", "unshare", "nsenter", "mount", "ssh", "ssh-keygen", "virsh")
SBIN = {"sshd": "/usr/sbin/sshd", "libvirtd": "/usr/sbin/libvirtd", "virtlogd": "/usr/sbin/virtlogd"}
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}
INSIDE = "/run/tdxvm-nshost"  # the host's sshd configuration and keys, inside the host
# The holder's namespaces: network, UTS (its own host name), mount (private propagation,
# its own /proc) and PID
# (--kill-child: the holder dies with unshare, which dies with the test process).
UNSHARE = (
    "unshare",
    "--net",
    "--uts",
    "--mount",
    "--pid",
    "--fork",
    "--kill-child",
    "--mount-proc",
    "--propagation",
    "private",
    "--",
)

# Folders of the host's own, bound over the machine's: (path inside, folder under ns/, mode).
BINDS = (
    ("/run", "run", 0o755),
    ("/tmp", "tmp", 0o1777),
    ("/etc/libvirt", "etc-libvirt", 0o755),
    ("/var/lib", "var-lib", 0o755),
    ("/var/cache", "var-cache", 0o755),
    ("/var/log", "var-log", 0o755),
)

# The machine's /etc/libvirt/qemu.conf and libvirtd.conf are Debian's stock files (only
# comments; .ci/setup changes neither), so the host keeps libvirt's defaults (QEMU as
# libvirt-qemu, DAC labels, stdio through virtlogd, a mount namespace per QEMU) except
# where two daemons on one machine would share state: cgroups (both would create
# machine/qemu-ID-NAME.libvirt-qemu in the same hierarchy).
QEMU_CONF = """\
# tdxvm test host (tests/nshost.py): libvirt's defaults, as on the machine, except cgroups.
cgroup_controllers = [ ]
"""
LIBVIRTD_CONF = """\
# tdxvm test host (tests/nshost.py): its own UUID; sockets for root only (they live in the
# host's private /run); logs to stderr, which the controller keeps.
host_uuid = "{host_uuid}"
unix_sock_group = "root"
unix_sock_ro_perms = "0700"
unix_sock_rw_perms = "0700"
auth_unix_ro = "none"
auth_unix_rw = "none"
log_outputs = "3:stderr"
"""
VIRTLOGD_CONF = 'log_outputs = "3:stderr"\n'
SSHD_CONFIG = """\
# tdxvm test host (tests/nshost.py): root by the controller's key, nothing else.
ListenAddress {address}:22
AddressFamily inet
HostKey {inside}/ssh_host_ed25519_key
PidFile {inside}/sshd.pid
AuthorizedKeysFile {inside}/authorized_keys
AuthorizedKeysCommand none
AllowUsers root
PermitRootLogin prohibit-password
AuthenticationMethods publickey
PubkeyAuthentication yes
PasswordAuthentication no
PermitEmptyPasswords no
KbdInteractiveAuthentication no
HostbasedAuthentication no
GSSAPIAuthentication no
KerberosAuthentication no
UsePAM no
X11Forwarding no
PrintMotd no
PrintLastLog no
UseDNS no
MaxStartups 100:30:200
LogLevel VERBOSE
Subsystem sftp internal-sftp
"""
SSH_WRAPPER = """\
#!/bin/sh
# The ssh client libvirt runs for {uri_host} (its ssh transport's command= parameter):
# this host's known_hosts only, strict, and no configuration file or agent of the user.
exec /usr/bin/ssh -F none -o UserKnownHostsFile={known_hosts} -o GlobalKnownHostsFile=/dev/null \\
    -o StrictHostKeyChecking=yes -o CheckHostIP=no -o IdentitiesOnly=yes -o IdentityAgent=none \\
    -o IdentityFile={keyfile} -o PasswordAuthentication=no -o KbdInteractiveAuthentication=no \\
    -o ConnectTimeout=10 -o LogLevel=ERROR "$@"
"""

# PID 1 of the host: binds its folders (opened first, so that a bind over /tmp cannot
# hide the folders still to bind when they live under /tmp), mounts a sysfs of its own
# (the network devices of its namespace, as `ip netns exec` does; the machine's cgroup
# mounts bound back under it), names the host, then reaps orphans (QEMU processes, which
# libvirtd forks away) until it is killed, and with it everything inside.
HOLDER = """\
import ctypes, json, os, socket, sys, time
libc = ctypes.CDLL(None, use_errno=True)
MS_BIND, MS_REC = 4096, 16384

def mount(source, target, fstype, flags):
    if libc.mount(source.encode(), target.encode(), fstype and fstype.encode(), flags, None) != 0:
        sys.exit(f"mount {source} on {target}: {os.strerror(ctypes.get_errno())}")

folders = [(os.open(src, os.O_PATH | os.O_DIRECTORY), dst) for src, dst in json.loads(sys.argv[1])]
cgroup = os.open("/sys/fs/cgroup", os.O_PATH | os.O_DIRECTORY)
for fd, dst in folders:
    mount(f"/proc/self/fd/{fd}", dst, None, MS_BIND)
mount("sysfs", "/sys", "sysfs", 0)
mount(f"/proc/self/fd/{cgroup}", "/sys/fs/cgroup", None, MS_BIND | MS_REC)
for fd in [cgroup] + [fd for fd, _ in folders]:
    os.close(fd)
socket.sethostname(sys.argv[2])
print("ready", flush=True)
while True:
    try:
        os.waitpid(-1, 0)
    except ChildProcessError:
        time.sleep(0.2)
"""


class Unavailable(Exception):
    """This machine cannot run a namespace host (not root, or namespaces refused): skip."""


class NamespaceHostError(Exception):
    """The namespace host failed to start or to do what a test asked; the message has its logs."""


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child before exec
    """Die with the process that started us (prctl PR_SET_PDEATHSIG, SIGKILL)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)


def _sh(argv: Sequence[str], *, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, env=ENV, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise NamespaceHostError(f"{' '.join(argv)} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()}")
    return proc


def _keygen(path: Path, comment: str) -> None:
    _sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])


def unavailable_reason() -> str | None:
    """Why this machine cannot run a namespace host, or None when it can."""
    if os.geteuid() != 0:
        return "a namespace host needs root (network, mount and PID namespaces, libvirtd, sshd)"
    missing = [t for t in TOOLS if shutil.which(t, path=ENV["PATH"]) is None]
    missing += [p for p in SBIN.values() if not os.access(p, os.X_OK)]
    if missing:
        return f"a namespace host needs {', '.join(missing)} (Debian: iproute2, util-linux, openssh-*, libvirt-*)"
    try:
        probe = _sh([*UNSHARE, "true"], check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare is unusable here: {exc}"
    if probe.returncode != 0:
        return f"unshare cannot create network, UTS, mount and PID namespaces here: {probe.stderr.strip()}"
    return None


def _root_not_locked() -> None:
    """The host's sshd runs without PAM, and OpenSSH without PAM refuses every login, keys
    included, to an account whose password is locked ('!...' in /etc/shadow)."""
    with contextlib.suppress(OSError):
        for line in Path("/etc/shadow").read_text().splitlines():
            if line.startswith("root:") and line.split(":")[1].startswith("!"):
                raise NamespaceHostError(
                    "root's password is locked in /etc/shadow ('!'): the namespace host's sshd (no PAM) would refuse "
                    "root's key; give root no password instead of a locked one: usermod -p '*' root"
                )


def _ns_inode(pid: int, kind: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/{kind}").st_ino
    except OSError:
        return None


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _descendants(pid: int) -> list[int]:
    found, todo = [], _children(pid)
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(_children(child))
    return found


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def cmdline(pid: int) -> str:
    """Process ``pid``'s command line, spaces between its arguments ("" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _wait_gone(pids: Sequence[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    left = [p for p in pids if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if alive(p)]
    return left


def _sweep_stale() -> None:
    """Remove folders of hosts whose test process died without closing them (the kernel
    already killed their processes: the holder dies with its parent)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{PREFIX}*-nshost"):
        try:
            owner = int((folder / "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        if not Path(f"/proc/{owner}").exists():
            shutil.rmtree(folder, ignore_errors=True)


class _Daemon:
    """A program started inside the host through nsenter (which forks into the host's PID
    namespace and waits): ``pid`` is the program itself, as the controller sees it."""

    def __init__(self, name: str, popen: subprocess.Popen, pid: int, log: Path) -> None:
        self.name, self.popen, self.pid, self.log = name, popen, pid, log

    def running(self) -> bool:
        # the program itself, not nsenter: nsenter dies with the thread that started it
        # (PR_SET_PDEATHSIG follows the forking thread), the program lives on in the host
        self.popen.poll()  # reaps nsenter once it is gone
        return self.pid > 0 and alive(self.pid)

    def stop(self, timeout: float = 10) -> None:
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            if _wait_gone([self.pid], timeout):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout)
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)


class NamespaceHost:
    """A libvirt host in its own network, mount and PID namespaces, reached over SSH.

    Use as a context manager (``with NamespaceHost() as host:``) or ``start()``/``close()``.
    ``start()`` raises :class:`Unavailable` when the machine cannot run one (not root, no
    namespaces), and :class:`NamespaceHostError` (with the daemons' logs) when it fails."""

    def __init__(self, *, subnet: int | None = None) -> None:
        self.id = secrets.token_hex(3)
        self.name = f"{PREFIX}{self.id}"
        self._subnet = subnet
        self.address = self.controller_address = ""
        self.veth = (f"tx{self.id}c", f"tx{self.id}h")  # controller side, host side (<= 15 chars)
        self.folder: Path | None = None
        self.controller_key = self.known_hosts = Path()
        self.host_key = ""
        self.host_uuid = str(uuid.uuid4())
        self._holder: subprocess.Popen | None = None
        self.holder_pid = 0
        self._netns = self._mntns = 0
        self._daemons: dict[str, _Daemon] = {}
        self._closed = False

    # -- life ---------------------------------------------------------------------------
    def __enter__(self) -> NamespaceHost:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def start(self) -> NamespaceHost:
        reason = unavailable_reason()
        if reason:
            raise Unavailable(reason)
        _root_not_locked()
        _sweep_stale()
        atexit.register(self.close)
        try:
            self._make_folder()
            self._start_holder()
            self._wire_network()
            self._start_daemon("virtlogd", [SBIN["virtlogd"]], ready=self.path("/run/libvirt/virtlogd-sock").exists)
            self.start_libvirtd()
            self.start_sshd()
        except BaseException:
            with contextlib.suppress(NamespaceHostError):
                self.close()
            raise
        return self

    def close(self) -> None:
        """Stop everything in the host and remove its veth pair and folder. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        problems = []
        for daemon in reversed(list(self._daemons.values())):
            try:
                daemon.stop(timeout=5)
            except Exception as exc:  # noqa: BLE001 - keep tearing down
                problems.append(f"{daemon.name}: {exc}")
        left = self._kill_all()
        if self._holder is not None:
            with contextlib.suppress(ProcessLookupError):
                self._holder.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._holder.wait(10)
        if self._link_exists(self.veth[0]):
            deadline = time.monotonic() + 5  # the pair goes with the namespace, a moment later
            while self._link_exists(self.veth[0]) and time.monotonic() < deadline:
                time.sleep(0.05)
            if self._link_exists(self.veth[0]):
                _sh(["ip", "link", "del", self.veth[0]], check=False)
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        if left:
            problems.append(f"processes still alive after SIGKILL: {left}")
        if problems:
            raise NamespaceHostError(f"{self.name}: teardown: {'; '.join(problems)}")

    def pids(self) -> list[int]:
        """Every process in the host (its network or mount namespace), as the controller sees them;
        what ``ip netns pids`` would list."""
        if not self._netns:
            return []
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                pid = int(entry)
                if _ns_inode(pid, "net") == self._netns or _ns_inode(pid, "mnt") == self._mntns:
                    found.append(pid)
        return found

    def _kill_all(self) -> list[int]:
        if self.holder_pid and alive(self.holder_pid):
            os.kill(self.holder_pid, signal.SIGKILL)  # init of the PID namespace: the kernel kills the rest
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return _wait_gone(self.pids(), 10)

    # -- setup --------------------------------------------------------------------------
    def _make_folder(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix=f"{self.name}-", suffix="-nshost"))
        (self.folder / "owner.pid").write_text(str(os.getpid()))
        for sub in ("controller", "logs"):
            (self.folder / sub).mkdir(mode=0o700)
        ns = self.folder / "ns"
        ns.mkdir(mode=0o755)
        for _inside, sub, mode in BINDS:
            (ns / sub).mkdir()
            (ns / sub).chmod(mode)
        try:
            qemu = pwd.getpwnam("libvirt-qemu")
            qemu_ids = (qemu.pw_uid, qemu.pw_gid)
        except KeyError:
            qemu_ids = (0, 0)
        # The layout Debian's packages give these folders (libvirt creates the rest).
        for inside, mode, owner in (
            ("/run/libvirt", 0o755, (0, 0)),
            ("/run/sshd", 0o755, (0, 0)),
            (INSIDE, 0o755, (0, 0)),
            ("/etc/libvirt/qemu/networks/autostart", 0o755, (0, 0)),
            ("/etc/libvirt/storage/autostart", 0o755, (0, 0)),
            ("/etc/libvirt/secrets", 0o700, (0, 0)),
            ("/var/lib/libvirt/images", 0o711, (0, 0)),
            ("/var/lib/libvirt/boot", 0o711, (0, 0)),
            ("/var/lib/libvirt/qemu", 0o750, qemu_ids),
            ("/var/lib/tdxvm", 0o755, (0, 0)),
            ("/var/cache/libvirt/qemu", 0o711, (0, 0)),
            ("/var/log/libvirt/qemu", 0o755, (0, 0)),
        ):
            path = self.path(inside)
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(mode)
            os.chown(path, *owner)
        self.path("/var/cache/libvirt").chmod(0o711)
        self.path("/etc/libvirt/qemu.conf").write_text(QEMU_CONF)
        self.path("/etc/libvirt/libvirtd.conf").write_text(LIBVIRTD_CONF.format(host_uuid=self.host_uuid))
        self.path("/etc/libvirt/virtlogd.conf").write_text(VIRTLOGD_CONF)
        self.controller_key = self.folder / "controller" / "id_ed25519"
        self.known_hosts = self.folder / "controller" / "known_hosts"
        _keygen(self.controller_key, f"{self.name}-controller")
        authorized = self.path(f"{INSIDE}/authorized_keys")
        authorized.write_text(self.controller_key.with_suffix(".pub").read_text())
        authorized.chmod(0o600)
        self._new_host_key()

    def _new_host_key(self) -> str:
        key = self.path(f"{INSIDE}/ssh_host_ed25519_key")
        for old in (key, key.with_suffix(".pub")):
            old.unlink(missing_ok=True)
        _keygen(key, f"{self.name}-host")
        kind, blob = key.with_suffix(".pub").read_text().split()[:2]
        self.host_key = f"{kind} {blob}"
        return self.host_key

    def _pick_subnet(self) -> int:
        addresses = _sh(["ip", "-4", "-o", "addr", "show"]).stdout
        used = addresses + _sh(["ip", "-4", "route", "show", "table", "all"]).stdout
        if self._subnet is not None:
            if f"{SUBNET}.{self._subnet}." in used:
                raise NamespaceHostError(f"{SUBNET}.{self._subnet}.0/24 is already in use on this machine")
            return self._subnet
        free = [n for n in range(1, 255) if f"{SUBNET}.{n}." not in used]
        if not free:
            raise NamespaceHostError(f"no free {SUBNET}.N.0/30 on this machine")
        return random.choice(free)

    def _start_holder(self) -> None:
        assert self.folder is not None
        binds = [[str(self.folder / "ns" / sub), inside] for inside, sub, _mode in BINDS]
        argv = [*UNSHARE, sys.executable, "-I", "-c", HOLDER, json.dumps(binds), self.name]
        with (self.folder / "logs" / "holder.log").open("wb") as log:
            self._holder = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                env=ENV,
                cwd="/",
                preexec_fn=_set_pdeathsig,
                text=True,
            )
        line = self._holder.stdout.readline()  # "ready" once the binds are in place, "" on failure
        if line.strip() != "ready":
            self._holder.wait(10)
            raise NamespaceHostError(f"{self.name}: the holder did not start:\n{self._log('holder')}")
        self._holder.stdout.close()
        children = _children(self._holder.pid)
        if len(children) != 1:
            raise NamespaceHostError(f"{self.name}: unshare has children {children}, expected the holder alone")
        self.holder_pid = children[0]
        self._netns = _ns_inode(self.holder_pid, "net") or 0
        self._mntns = _ns_inode(self.holder_pid, "mnt") or 0
        if self._netns in (0, _ns_inode(os.getpid(), "net")) or self._mntns in (0, _ns_inode(os.getpid(), "mnt")):
            raise NamespaceHostError(f"{self.name}: the holder is not in namespaces of its own")

    def _wire_network(self) -> None:
        n = self._pick_subnet()
        self.controller_address, self.address = f"{SUBNET}.{n}.1", f"{SUBNET}.{n}.2"
        outer, inner = self.veth
        _sh(["ip", "link", "add", outer, "type", "veth", "peer", "name", inner, "netns", str(self.holder_pid)])
        _sh(["ip", "addr", "add", f"{self.controller_address}/30", "dev", outer])
        _sh(["ip", "link", "set", outer, "up"])
        for argv in (
            ["ip", "link", "set", "lo", "up"],
            ["ip", "addr", "add", f"{self.address}/30", "dev", inner],
            ["ip", "link", "set", inner, "up"],
        ):
            self.run(argv)
        assert self.folder is not None
        self._wrapper(self.known_hosts, self.controller_key)
        self.trust_host_key()

    # -- inside the host ----------------------------------------------------------------
    def _enter(self) -> list[str]:
        return ["nsenter", f"--target={self.holder_pid}", "--mount", "--net", "--uts", "--pid", "--wdns=/", "--"]

    def run(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the host (as root, in its namespaces); raise on failure when ``check``."""
        proc = subprocess.run(
            [*self._enter(), *argv], capture_output=True, text=True, env=ENV, timeout=timeout, input=input, check=False
        )
        if check and proc.returncode != 0:
            raise NamespaceHostError(
                f"{self.name}: {' '.join(argv)} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()}"
            )
        return proc

    def path(self, inside: str) -> Path:
        """Where the host's file ``inside`` (under one of its own folders) lies on the controller."""
        assert self.folder is not None
        for root, sub, _mode in sorted(BINDS, key=lambda b: -len(b[0])):
            if inside == root or inside.startswith(root + "/"):
                return self.folder / "ns" / sub / inside[len(root) :].lstrip("/")
        raise ValueError(f"{inside} is the machine's, not a folder of the host's own ({[b[0] for b in BINDS]})")

    def _log(self, name: str, lines: int = 40) -> str:
        assert self.folder is not None
        try:
            text = (self.folder / "logs" / f"{name}.log").read_text(errors="replace")
        except OSError:
            return f"(no {name} log)"
        return "\n".join(text.splitlines()[-lines:])

    def _start_daemon(self, name: str, argv: list[str], *, ready, timeout: float = 30) -> _Daemon:
        assert self.folder is not None
        log = self.folder / "logs" / f"{name}.log"
        with log.open("ab") as out:
            popen = subprocess.Popen(
                [*self._enter(), *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=ENV,
                cwd="/",
                preexec_fn=_set_pdeathsig,
            )
        deadline = time.monotonic() + timeout
        pid = 0
        while time.monotonic() < deadline and popen.poll() is None:
            kids = _children(popen.pid)
            if kids:
                pid = kids[0]
                break
            time.sleep(0.01)
        daemon = _Daemon(name, popen, pid, log)
        self._daemons[name] = daemon
        while time.monotonic() < deadline:
            if not daemon.running():
                raise NamespaceHostError(f"{self.name}: {name} exited at start:\n{self._log(name)}")
            if ready():
                return daemon
            time.sleep(0.05)
        raise NamespaceHostError(f"{self.name}: {name} not ready after {timeout:.0f} s:\n{self._log(name)}")

    def _libvirtd_answers(self) -> bool:
        if not self.path("/run/libvirt/libvirt-sock").exists():
            return False
        return self.run(["virsh", "-q", "-c", "qemu:///system", "uri"], check=False, timeout=30).returncode == 0

    def _sshd_listens(self) -> bool:
        try:
            with socket.create_connection((self.address, 22), timeout=1):
                return True
        except OSError:
            return False

    # -- what fault tests use -----------------------------------------------------------
    @property
    def libvirtd_pid(self) -> int:
        return self._daemons["libvirtd"].pid

    @property
    def sshd_pid(self) -> int:
        return self._daemons["sshd"].pid

    def start_libvirtd(self) -> None:
        self._start_daemon("libvirtd", [SBIN["libvirtd"]], ready=self._libvirtd_answers, timeout=60)

    def stop_libvirtd(self) -> None:
        self._daemons.pop("libvirtd").stop()

    def restart_libvirtd(self) -> None:
        """Stop libvirtd (SIGTERM; its QEMU processes keep running, as under systemd) and start it again."""
        self.stop_libvirtd()
        self.start_libvirtd()

    @property
    def sshd_running(self) -> bool:
        return "sshd" in self._daemons and self._daemons["sshd"].running()

    def start_sshd(self) -> None:
        config = self.path(f"{INSIDE}/sshd_config")
        config.write_text(SSHD_CONFIG.format(address=self.address, inside=INSIDE))
        self.run([SBIN["sshd"], "-t", "-f", f"{INSIDE}/sshd_config"])
        self._start_daemon(
            "sshd", [SBIN["sshd"], "-D", "-e", "-f", f"{INSIDE}/sshd_config"], ready=self._sshd_listens, timeout=20
        )

    def stop_sshd(self, *, sessions: bool = True) -> None:
        """Stop sshd: new connections are refused; with ``sessions``, the open ones (a libvirt
        connection's ssh, tunnels) end too, else they go on as after a real sshd restart."""
        daemon = self._daemons.pop("sshd")
        doomed = _descendants(daemon.pid) if sessions else []
        daemon.stop()
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in _wait_gone(doomed, 5):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def replace_host_key(self) -> str:
        """Give the host's sshd a fresh host key (sshd restarts); the controller's known_hosts keeps
        the old one, so connections then fail as for a host whose key changed. Returns the new key."""
        self.stop_sshd()
        key = self._new_host_key()
        self.start_sshd()
        return key

    def trust_host_key(self) -> None:
        """Write the host's current key, for its address, into the controller's known_hosts."""
        self.known_hosts.write_text(f"{self.address} {self.host_key}\n")

    # -- how the controller reaches it --------------------------------------------------
    def _wrapper(self, known_hosts: Path, keyfile: Path) -> Path:
        assert self.folder is not None
        digest = secrets.token_hex(4) if known_hosts != self.known_hosts or keyfile != self.controller_key else ""
        script = self.folder / "controller" / (f"ssh-{digest}" if digest else "ssh")
        script.write_text(SSH_WRAPPER.format(uri_host=self.address, known_hosts=known_hosts, keyfile=keyfile))
        script.chmod(0o700)
        return script

    def uri_with(self, *, known_hosts: Path | None = None, keyfile: Path | None = None) -> str:
        """The host's URI, verifying its key against ``known_hosts`` and logging in with ``keyfile``
        (by default the controller's files)."""
        known_hosts = Path(known_hosts or self.known_hosts)
        keyfile = Path(keyfile or self.controller_key)
        if known_hosts == self.known_hosts and keyfile == self.controller_key:
            command = self.folder / "controller" / "ssh"  # type: ignore[operator]
        else:
            command = self._wrapper(known_hosts, keyfile)
        params = {"keyfile": keyfile, "known_hosts": known_hosts, "no_tty": "1", "command": command}
        query = "&".join(f"{k}={quote(str(v), safe='/')}" for k, v in params.items())
        return f"qemu+ssh://root@{self.address}/system?{query}"

    @property
    def uri(self) -> str:
        return self.uri_with()

    def ssh_argv(self, *command: str) -> list[str]:
        """``ssh`` to the host as root with the controller's key and known_hosts (for tests)."""
        return [str(self.folder / "controller" / "ssh"), "-T", f"root@{self.address}", *command]  # type: ignore[operator]

    @staticmethod
    def _link_exists(name: str) -> bool:
        return Path(f"/sys/class/net/{name}").exists()

    def __repr__(self) -> str:
        return f"NamespaceHost({self.name}, {self.address or 'not started'})"
