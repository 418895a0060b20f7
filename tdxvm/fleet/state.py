"""What tdxvm keeps about a fleet on the controller, and the lock that serialises applies.

The fleet's VMs carry their ownership in libvirt's domain metadata (labels ``fleet``,
``deployment``, ``spec_hash``, ``image_sha``…), which is the record of what exists. The
state file keeps what libvirt cannot:

* the URI of every host the fleet has VMs on (the one it last launched on), so that a
  host removed from the file is still found and emptied; a host of the file whose URI
  changed leaves its old URI behind as host ``NAME@OLD-URI``
  (:meth:`FleetState.relocate_moved`), emptied the same way unless it turns out to be
  the same libvirt;
* VMs an apply started and did not finish (``phase: creating``): a crash can leave one
  with no domain but with volumes, which the next apply removes;
* the spec each VM was last applied with, so a plan can say which keys changed;
* the last outcome per VM (ready, refused with its reasons, failed with the error).

Nothing secret is ever written here. The file is JSON, written atomically (mode 0600)
after every change, at ``<state dir>/<fleet>.json``; the state dir is ``--state-dir``,
``$TDXVM_STATE_DIR``, or ``$XDG_STATE_HOME/tdxvm/fleets`` (``~/.local/state/…``).

:class:`FleetLock` is an exclusive ``flock`` on ``<fleet>.lock`` beside it, held for a
whole apply or destroy. A second one is refused at once with who holds it (pid, host,
command, since when). The kernel drops the lock when its holder exits, crash included,
so a stale lock cannot block anyone.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tdxvm.errors import TdxvmError
from tdxvm.fileio import write_atomic
from tdxvm.xdg import state_home

FORMAT = "tdxvm-fleet-state/1"


class FleetStateError(TdxvmError):
    """The state file or lock cannot be used; the message names the file."""

    code = "fleet-state"


class FleetLocked(FleetStateError):
    """Another apply or destroy of the same fleet is running."""

    code = "fleet-locked"


def now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def default_state_dir() -> Path:
    if os.environ.get("TDXVM_STATE_DIR"):
        return Path(os.environ["TDXVM_STATE_DIR"])
    return state_home() / "fleets"


class FleetLock:
    """``with FleetLock(folder, fleet, "apply"):`` — held for one apply or destroy."""

    def __init__(self, folder: Path, fleet: str, command: str) -> None:
        self.path = Path(folder) / f"{fleet}.lock"
        self.fleet, self.command = fleet, command
        self._fd: int | None = None

    def acquire(self) -> FleetLock:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise FleetStateError(f"cannot open the lock file {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise FleetStateError(f"cannot lock {self.path}: {exc.strerror or exc}") from None
            raise FleetLocked(
                f"fleet {self.fleet} is locked: another {holder.get('command', 'apply')} holds {self.path} "
                f"(pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since "
                f"{holder.get('since', '?')}); wait for it to finish. The lock goes away with its "
                "process, so it is never stale"
            ) from None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": now(), "command": f"tdxvm {self.command}"}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FleetLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# the JSON types of the entry fields tdxvm writes (tdxvm/fleet/executor.py); others are kept as read
_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "phase": str,
    "host": str,
    "uri": str,
    "deployment": str,
    "replica": int,
    "template": str,
    "spec": dict,
    "reasons": list,
    "error": str,
    "endpoint": str,
    "tcb_status": str,
    "measurements_digest": str,
    "spec_hash": str,
    "image_sha": str,
    "model_digest": str,
    "uuid": str,
}


def _shape_problem(data: dict[str, Any]) -> str | None:
    """What is wrong with the shape of a state file's ``hosts`` and ``vms`` (None: nothing)."""
    hosts, vms = data["hosts"], data["vms"]
    if not isinstance(hosts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in hosts.items()):
        return '"hosts" is not an object of host names and URIs'
    if not isinstance(vms, dict) or not all(isinstance(v, dict) for v in vms.values()):
        return '"vms" is not an object of VM names and their entries'
    for name, entry in vms.items():
        for key, value in entry.items():
            if value is not None and not isinstance(value, _FIELD_TYPES.get(key, object)):
                return f'"vms.{name}.{key}" is a JSON {type(value).__name__}, not what tdxvm writes there'
    return None


def moved_name(host: str, old_uri: str) -> str:
    """The name of the place a host of the file left when its URI changed (host names are
    DNS labels: no file host is named so)."""
    return f"{host}@{old_uri}"


def moved_from(name: str) -> tuple[str, str] | None:
    """(host, old URI) of a name :func:`moved_name` made; None for a host's own name."""
    host, at, uri = name.partition("@")
    return (host, uri) if at else None


class FleetState:
    """The state file of one fleet; thread-safe (the reconcile's workers update it).

    ``read_only``: changes stay in memory (``tdxvm plan`` and ``status`` read the fleet
    as an apply would, and write nothing)."""

    def __init__(self, path: Path, data: dict[str, Any], *, read_only: bool = False) -> None:
        self.path = path
        self._data = data
        self._lock = threading.Lock()
        self.read_only = read_only

    @classmethod
    def load(cls, folder: Path, fleet: str, *, read_only: bool = False) -> FleetState:
        path = Path(folder) / f"{fleet}.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return cls(path, {"format": FORMAT, "fleet": fleet, "hosts": {}, "vms": {}}, read_only=read_only)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise FleetStateError(
                f"fleet state {path} cannot be read ({exc}); move it away to start from what libvirt "
                "holds (VMs that are still defined are found by their labels)"
            ) from None
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("fleet") != fleet:
            raise FleetStateError(f"fleet state {path} is not the state of fleet {fleet} (format {FORMAT})")
        data.setdefault("hosts", {})
        data.setdefault("vms", {})
        problem = _shape_problem(data)
        if problem is not None:
            raise FleetStateError(
                f"fleet state {path}: {problem}; move it away to start from what libvirt holds "
                "(VMs that are still defined are found by their labels)"
            )
        return cls(path, data, read_only=read_only)

    # -- reading ---------------------------------------------------------------------------

    @property
    def hosts(self) -> dict[str, str]:
        with self._lock:
            return dict(self._data["hosts"])

    def vms(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {k: dict(v) for k, v in self._data["vms"].items()}

    def vm(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            entry = self._data["vms"].get(name)
            return dict(entry) if entry is not None else None

    # -- changing (each change is saved at once) -------------------------------------------

    def remember_host(self, name: str, uri: str) -> None:
        with self._lock:
            if self._data["hosts"].get(name) == uri:
                return
            self._data["hosts"][name] = uri
            self._save()

    def forget_host(self, name: str) -> None:
        with self._lock:
            if self._data["hosts"].pop(name, None) is not None:
                self._save()

    def drop_host(self, name: str) -> list[str]:
        """Forget host ``name`` and the entries of the VMs on it; their names."""
        with self._lock:
            vms = sorted(vm for vm, entry in self._data["vms"].items() if entry.get("host") == name)
            for vm in vms:
                del self._data["vms"][vm]
            self._data["hosts"].pop(name, None)
            self._save()
            return vms

    def relocate_moved(self, file_hosts: dict[str, str]) -> None:
        """Give each VM entry, and each URI the fleet launched on, the host that has its
        URI now, the file's hosts first.

        * A host out of the file whose URI a host of the file has (renamed, or a URI put
          back as it was) is that host: its entries go to it.
        * Host X of the file, last launched on (``remember_host``) or with entries at a URI
          A the file no longer gives it: A goes to the host out of the file remembered
          with it, or else to ``X@A`` (:func:`moved_name`), a host out of the file from
          now on. Its VMs are deleted as those of any host that left the file (or
          forgotten with ``--forget-host X@A``), unless A turns out to be a libvirt of the
          file's hosts (:meth:`fold_host`).

        Idempotent. Kept in memory until the next change is saved (an apply's first
        outcome, or its end): a cancelled apply changes nothing."""
        with self._lock:
            hosts, vms = self._data["hosts"], self._data["vms"]
            in_file = {uri: name for name, uri in file_hosts.items()}
            for name, uri in list(hosts.items()):
                if name not in file_hosts and uri in in_file:
                    self._fold(name, in_file[uri], uri)
            out_of_file = {uri: name for name, uri in hosts.items() if name not in file_hosts}

            def place(host: str, uri: str) -> str:
                if uri in in_file:
                    return in_file[uri]
                if uri not in out_of_file:
                    out_of_file[uri] = moved_name(host, uri)
                    hosts[out_of_file[uri]] = uri
                return out_of_file[uri]

            for name, uri in list(hosts.items()):
                if name in file_hosts and uri != file_hosts[name]:
                    place(name, uri)  # the URI it was launched on: VMs may run there without an entry
            for entry in vms.values():
                host, uri = entry.get("host"), entry.get("uri")
                if isinstance(host, str) and isinstance(uri, str) and host in file_hosts and uri != file_hosts[host]:
                    entry["host"] = place(host, uri)

    def fold_host(self, name: str, into: str, uri: str) -> None:
        """Make host ``name``, out of the file, the host ``into`` of the file: the same
        libvirt, which ``into`` reaches at ``uri``. In memory until the next save, as
        :meth:`relocate_moved`."""
        with self._lock:
            self._fold(name, into, uri)

    def _fold(self, name: str, into: str, uri: str) -> None:
        hosts = self._data["hosts"]
        hosts.pop(name, None)
        hosts[into] = uri
        for entry in self._data["vms"].values():
            if entry.get("host") == name:
                entry["host"], entry["uri"] = into, uri

    def update_vm(self, name: str, **fields: Any) -> None:
        with self._lock:
            entry = self._data["vms"].setdefault(name, {})
            entry.update(fields)
            entry["updated_at"] = now()
            self._save()

    def replace_vm(self, name: str, entry: dict[str, Any]) -> None:
        with self._lock:
            self._data["vms"][name] = {**entry, "updated_at": now()}
            self._save()

    def drop_vm(self, name: str) -> None:
        with self._lock:
            if self._data["vms"].pop(name, None) is not None:
                self._save()

    def save(self, **top: Any) -> None:
        with self._lock:
            self._data.update(top)
            self._save()

    def _save(self) -> None:
        if self.read_only:
            return
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._data["updated_at"] = now()
            write_atomic(self.path, (json.dumps(self._data, indent=1, sort_keys=True) + "\n").encode(), mode=0o600)
        except OSError as exc:
            raise FleetStateError(f"cannot write fleet state {self.path}: {exc.strerror or exc}") from None
