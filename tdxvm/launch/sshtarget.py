"""Which SSH server, user, key and known_hosts a ``qemu+ssh://`` libvirt URI means.

libvirt's ``ssh`` transport runs the system's ``ssh`` (https://libvirt.org/uri.html,
"ssh transport"), so a host's SSH identity is what ``ssh`` would use for it:

- ``[user@]host[:port]`` from the URI, else ``User``/``HostName``/``Port`` from
  ``~/.ssh/config`` (with the files it ``Include``s), else this user's login name and
  port 22;
- ``?keyfile=PATH`` (``ssh -i``), else the config's ``IdentityFile`` lines, else the
  default identities ``~/.ssh/id_ed25519``, ``id_ecdsa``, ``id_rsa``; keys in
  ``ssh-agent`` are offered too unless ``IdentitiesOnly yes``;
- the host key checked against ``?known_hosts=PATH`` (libvirt documents it for its
  libssh transports; tdxvm honours it for ``ssh`` too), else the config's
  ``UserKnownHostsFile``, else ``~/.ssh/known_hosts`` and the system's
  ``/etc/ssh/ssh_known_hosts``;
- ``?no_verify=1`` (libvirt: ``StrictHostKeyChecking=no``): an unknown host key is
  accepted, with a warning; a changed or revoked one is still refused.

``ProxyJump``/``ProxyCommand`` are not followed (a clear error says so). Other remote
transports (``tcp``, ``tls``, ``libssh``, ``libssh2``) carry libvirt's protocol only: a
guest port on such a host cannot be reached, and :func:`needs_ssh` says so.
"""

from __future__ import annotations

import getpass
import glob
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import paramiko

from tdxvm.errors import Refused, Unreachable
from tdxvm.launch.errors import LaunchError
from tdxvm.launch.knownhosts import DEFAULT_PORT, lookup_name
from tdxvm.launch.uris import uri_problem

DEFAULT_IDENTITIES = ("id_ed25519", "id_ecdsa", "id_rsa")
GLOBAL_KNOWN_HOSTS = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")


class HostSshError(LaunchError):
    """The SSH connection to a libvirt host cannot be used as given (exit 2): the URI, a key
    file or the SSH configuration needs a fix, which the message names."""

    code = "host-ssh"


class HostSshUnreachable(HostSshError, Unreachable):
    """The libvirt host's sshd did not answer, the connection broke, or the host could not
    connect to the guest port (exit 3)."""

    code = "host-ssh-unreachable"


class HostSshAuthError(HostSshError):
    """The host's sshd took none of the keys offered (exit 2, with the fix)."""

    code = "host-ssh-auth"


class HostKeyRefused(HostSshError, Refused):
    """The host presented a key that known_hosts does not hold for it (unknown, changed or
    revoked): refused before anything was sent (exit 1)."""

    code = "host-key"

    def __init__(self, message: str, *, host: str, key_type: str, fingerprint: str, files: tuple[str, ...]) -> None:
        super().__init__(message)
        self.host, self.key_type, self.fingerprint, self.files = host, key_type, fingerprint, files


class HostForwardRefused(HostSshError):
    """The host's sshd refused to listen for us (a ``tcpip-forward`` request, as ``ssh -R``):
    its configuration forbids remote forwards, or the port is taken (exit 2, with the fix)."""

    code = "host-ssh-forward"


class TransportUnsupported(HostSshError):
    """A remote libvirt URI whose transport is not ssh: its guests' ports cannot be reached."""

    code = "tunnel-transport"


@dataclass(frozen=True, slots=True)
class SshTarget:
    """One SSH identity for one host: the key of the shared session (:mod:`tdxvm.launch.sshhost`)."""

    user: str
    host: str  # what is connected to (the config's HostName applied)
    port: int
    keyfile: str | None  # ?keyfile=
    known_hosts: tuple[str, ...]  # files checked, in order
    no_verify: bool = False
    key_alias: str | None = None  # HostKeyAlias: the name known_hosts is searched for
    identity_files: tuple[str, ...] = ()  # the config's IdentityFile lines (no keyfile given)
    identities_only: bool = False

    @property
    def where(self) -> str:
        return f"{self.user}@{lookup_name(self.host, self.port)}"

    @property
    def known_name(self) -> str:
        """The name known_hosts holds the key under: the ``HostKeyAlias`` as it is (``ssh``
        adds no port to an alias), else the host, ``[host]:port`` off port 22."""
        return self.key_alias or lookup_name(self.host, self.port)

    def ssh_command(self) -> str:
        """The ``ssh`` command line that should log in to this host without a prompt."""
        args = ["ssh"]
        args += ["-i", self.keyfile] if self.keyfile else []
        args += ["-p", str(self.port)] if self.port != DEFAULT_PORT else []
        if self.known_hosts and self.known_hosts[0] != str(Path.home() / ".ssh" / "known_hosts"):
            args += ["-o", f"UserKnownHostsFile={self.known_hosts[0]}"]
        return shlex.join([*args, f"{self.user}@{self.host}"])


def needs_ssh(uri: str) -> bool:
    """False for a URI of this machine (its forwards are reached directly), True for
    ``qemu+ssh://``; :class:`TransportUnsupported` for any other remote transport."""
    problem = uri_problem(uri)
    if problem is not None:
        raise HostSshError(problem)
    parts = urlsplit(uri)
    driver, _, transport = parts.scheme.partition("+")
    host = parts.hostname or ""
    if transport in ("", "unix") and host in ("", "localhost"):
        return False
    if transport == "ssh":
        return True
    raise TransportUnsupported(
        f"{uri}: tdxvm reaches the guests of a remote host over SSH only, and this URI connects over "
        f"{transport or 'tls'} (libvirt's protocol, which carries no guest ports); use "
        f"{driver}+ssh://[user@]{host}{parts.path} (the host's sshd, the same for libvirt and the guests)"
    )


MAX_INCLUDE_DEPTH = 16  # OpenSSH's (readconf.c, READCONF_MAX_DEPTH)


def _config_text(path: Path, host: str, depth: int = 0) -> str:
    """``path``'s text for a lookup of ``host``, each ``Include`` expanded in place as
    ``ssh`` reads it (ssh_config(5); paramiko ignores ``Include``): only where the block
    it sits in applies to ``host`` (conditional inclusion), glob patterns with matches in
    sorted order, relative paths from ``~/.ssh``, a pattern that matches nothing skipped;
    after the included text, the block the ``Include`` sat in goes on."""
    out: list[str] = []
    block = ""  # the Host or Match line in force ("": the global section, for every host)
    for line in path.read_text(encoding="utf-8").splitlines():
        words = line.strip().replace("=", " ", 1).split(None, 1)
        key = words[0].lower() if words else ""
        if key in ("host", "match"):
            block = line
        if key != "include":
            out.append(line)
            continue
        if depth >= MAX_INCLUDE_DEPTH:
            raise ValueError(f"Include nested more than {MAX_INCLUDE_DEPTH} deep")
        if block and not _applies(block, host):
            continue
        for pattern in shlex.split(words[1]) if len(words) > 1 else []:
            full = Path(pattern).expanduser()
            if not full.is_absolute():
                full = Path.home() / ".ssh" / full
            for match in sorted(glob.glob(str(full))):
                if Path(match).is_file():
                    out.append(_config_text(Path(match), host, depth + 1))
        out.append(block or "Host *")
    return "\n".join(out) + "\n"


def _applies(block: str, host: str) -> bool:
    """Whether the ``Host`` or ``Match`` line ``block`` applies to ``host`` (paramiko's
    matching, negated patterns included)."""
    probe = paramiko.SSHConfig.from_text(f"{block}\n  HostName tdxvm-probe\n").lookup(host)
    return probe.get("hostname") == "tdxvm-probe"


def _ssh_config(host: str) -> dict[str, Any]:
    path = Path.home() / ".ssh" / "config"
    if not path.is_file():
        return {"hostname": host}
    try:
        return dict(paramiko.SSHConfig.from_text(_config_text(path, host)).lookup(host))
    except (paramiko.SSHException, OSError, ValueError, ImportError) as exc:
        raise HostSshError(f"{path}: cannot read the SSH settings for {host}: {exc}") from None


def _flag(uri: str, name: str, value: str) -> bool:
    try:
        return int(value.strip() or "0") != 0
    except ValueError:
        raise HostSshError(f"{uri}: {name}={value!r} is not a number (libvirt reads non-zero as yes)") from None


def ssh_target(uri: str) -> SshTarget:
    """The SSH identity of the host of ``uri``, a ``qemu+ssh://`` URI (see the module doc)."""
    parts = urlsplit(uri)
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    name = parts.hostname or ""
    try:
        uri_port = parts.port
    except ValueError:
        raise HostSshError(f"{uri}: the port is not a number in 1..65535") from None
    config = _ssh_config(name)
    for option in ("proxyjump", "proxycommand"):
        if config.get(option) and str(config[option]).lower() != "none":
            raise HostSshError(
                f"~/.ssh/config sends {name} through {option} {config[option]}: tdxvm's tunnels to guest ports "
                "do not follow it; give libvirt a host this machine reaches directly"
            )
    keyfile = params.get("keyfile")
    if "known_hosts" in params:
        known = (str(Path(params["known_hosts"]).expanduser()),)
    elif config.get("userknownhostsfile"):
        known = tuple(str(Path(p).expanduser()) for p in str(config["userknownhostsfile"]).split())
    else:
        known = (str(Path.home() / ".ssh" / "known_hosts"), str(Path.home() / ".ssh" / "known_hosts2"))
        known += GLOBAL_KNOWN_HOSTS
    try:
        port = uri_port or int(config.get("port") or DEFAULT_PORT)
    except ValueError:
        raise HostSshError(f"~/.ssh/config: Port {config.get('port')!r} for {name} is not a number") from None
    return SshTarget(
        user=unquote(parts.username) if parts.username else str(config.get("user") or getpass.getuser()),
        host=str(config.get("hostname") or name),
        port=port,
        keyfile=str(Path(keyfile).expanduser()) if keyfile else None,
        known_hosts=known,
        no_verify=_flag(uri, "no_verify", params.get("no_verify", "0")),
        key_alias=str(config["hostkeyalias"]) if config.get("hostkeyalias") else None,
        identity_files=() if keyfile else tuple(str(Path(p).expanduser()) for p in config.get("identityfile", ())),
        identities_only=str(config.get("identitiesonly", "no")).lower() == "yes",
    )
