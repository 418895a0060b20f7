"""The controller's own record of each VM it launched: every trust decision reads this.

The host writes libvirt's metadata, the domain XML and its port forwards, so none of
them may decide what is trusted. At launch the controller keeps, for each VM, what it
decided itself: the effective attestation policy, the backend, the trust anchor, the
image manifest (path and SHA-256), the port forwards it chose, and later the keys it
attested (the SSH host key, the service's TLS key) and the model it provisioned (its
name, and the model digest the service's RTMR3 model event was checked to name, which
``verify-endpoint --vm`` then requires).
``tdxvm attest``, ``provision``, ``verify-endpoint --vm``, ``status`` and fleets read
the record; the domain's metadata is a display copy for people using ``virsh``.

Records are JSON files ``<folder>/<domain UUID>.json`` (folder 0700, files 0600, written
atomically; changed and deleted under the folder's ``.lock``, so commands changing one
record at once take turns), the folder beside the secret store
(``$XDG_DATA_HOME/tdxvm/vms``), and
:meth:`VmRecords.trusted` finds the record of a libvirt domain by its UUID and refuses:

- a domain with no record (not launched by this controller: attest it with an explicit
  ``--policy FILE`` instead);
- a record whose name or libvirt URI differs from the domain's;
- metadata that disagrees with the record on the backend or the port forwards (the host
  rewrote it): a clear refusal, not a silent choice of either.

Nothing secret is kept here: policies, public keys and digests only.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from tdxvm.attest.policy import Policy
from tdxvm.errors import Refused
from tdxvm.fileio import lock_exclusive, write_atomic
from tdxvm.launch import tunnel
from tdxvm.launch.domain import PortForward
from tdxvm.launch.errors import LaunchError
from tdxvm.launch.metadata import VmMetadata
from tdxvm.secretstore import SecretStore

FORMAT = 1
LOCK_TIMEOUT = 60.0  # seconds a change waits for another command's change of the records


class RecordError(LaunchError):
    """No controller record for a VM, or one that is unreadable."""

    code = "vm-record"


class RecordMismatch(LaunchError, Refused):
    """What libvirt says of a VM disagrees with the controller's record of it: a refusal
    (exit 1), since the host changed the VM behind the controller's back."""

    code = "vm-record-mismatch"


@dataclass(frozen=True)
class VmRecord:
    """What the controller decided and attested for one VM (see the module doc)."""

    name: str
    uuid: str
    uri: str
    backend: str
    policy: Policy
    manifest: str
    manifest_sha256: str
    trust_anchor_sha256: str | None  # the root CA's DER; None: Intel's pinned root
    forwards: tuple[PortForward, ...]
    agent_port: int
    ssh_port: int
    service_port: int | None = None
    defined_at: str = ""
    ssh_host_key: str | None = None  # base64 OpenSSH blob, as last attested
    attestation: dict[str, Any] | None = None  # the latest verdict (verdict, tcb_status, reasons, …, recorded_at)
    model: dict[str, Any] | None = None  # `tdxvm provision`: name, url, tls_spki_sha256, at, digest, dtype, api_keys

    def forward(self, guest_port: int | None) -> PortForward | None:
        return next((f for f in self.forwards if f.guest_port == guest_port), None) if guest_port is not None else None

    def address(self, guest_port: int | None, what: str) -> tuple[str, int]:
        """(host address, host port) of the forward to ``guest_port``, or a clear error."""
        f = self.forward(guest_port)
        if f is None:
            raise RecordError(
                f"VM {self.name} has no port forward to its {what} (guest port {guest_port})", code="no-forward"
            )
        return f.host_address, f.host_port

    def reach(self, guest_port: int | None, what: str) -> tuple[str, int]:
        """Where the controller connects to ``guest_port``: the forward itself on a local
        host, a tunnel through the host's SSH on a ``qemu+ssh://`` one (:func:`tunnel.reach`)."""
        return tunnel.reach(self.uri, *self.address(guest_port, what))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["format"] = FORMAT
        d["policy"] = self.policy.model_dump(mode="json", exclude_none=True)
        d["forwards"] = [{"address": f.host_address, "host": f.host_port, "guest": f.guest_port} for f in self.forwards]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str) -> VmRecord:
        try:
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
            forwards = tuple(
                PortForward(host_port=int(f["host"]), guest_port=int(f["guest"]), host_address=str(f["address"]))
                for f in data["forwards"]
            )
            values = {k: v for k, v in data.items() if k not in ("format", "policy", "forwards")}
            return cls(policy=Policy.model_validate(data["policy"]), forwards=forwards, **values)
        except (KeyError, TypeError, ValueError) as exc:
            raise RecordError(f"VM record {source} is not readable: {exc}") from None


def manifest_sha256(path: str | Path) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as exc:
        raise RecordError(f"image manifest {path}: {exc.strerror or exc}") from None


class VmRecords:
    """The folder of VM records (see the module doc)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    @classmethod
    def beside(cls, store: SecretStore) -> VmRecords:
        """The records kept beside ``store`` (its parent folder's ``vms``)."""
        return cls(store.directory.parent / "vms")

    def _path(self, uuid: str) -> Path:
        if not uuid or any(c not in "0123456789abcdef-" for c in uuid.lower()):
            raise RecordError(f"{uuid!r} is not a domain UUID")
        return self.directory / f"{uuid.lower()}.json"

    def put(self, record: VmRecord) -> None:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            mode = self.directory.stat().st_mode
            if mode & 0o077:
                raise RecordError(
                    f"{self.directory}: VM record folder mode is {stat.filemode(mode)}; it must be private (chmod 700)"
                )
            text = json.dumps(record.to_dict(), indent=2, sort_keys=True).encode() + b"\n"
            write_atomic(self._path(record.uuid), text, mode=0o600)
        except OSError as exc:  # a full disk, a read-only folder
            raise RecordError(
                f"cannot keep the record of VM {record.name} in {self.directory}: {exc.strerror or exc}"
            ) from None

    def get(self, uuid: str) -> VmRecord | None:
        path = self._path(uuid)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise RecordError(f"VM record {path}: {exc.strerror or exc}") from None
        with os.fdopen(fd, "rb") as f:
            if os.fstat(f.fileno()).st_mode & 0o022:
                raise RecordError(f"VM record {path} is writable by others; it must be 0600")
            try:
                data = json.loads(f.read())
            except ValueError as exc:
                raise RecordError(f"VM record {path} is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise RecordError(f"VM record {path} is not a JSON object")
        return VmRecord.from_dict(data, source=str(path))

    def update(self, uuid: str, **changes: Any) -> VmRecord:
        """Change fields of the record of ``uuid`` (read, changed and written under the
        folder's lock: :meth:`_locked`); :class:`RecordError` if there is none (any more)."""
        with self._locked():
            record = self.get(uuid)
            if record is None:
                raise RecordError(f"no VM record for domain {uuid} in {self.directory}")
            record = replace(record, **changes)
            self.put(record)
            return record

    def delete(self, uuid: str) -> None:
        path = self._path(uuid)
        if not self.directory.is_dir():
            return
        with self._locked():
            path.unlink(missing_ok=True)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The folder's lock (``.lock``, an exclusive ``flock``): commands changing one record
        at once (``attest`` beside ``provision``, ``destroy`` beside ``attest``) take turns,
        so no change is lost and no record is written back after its deletion."""
        try:
            fd = lock_exclusive(self.directory / ".lock", LOCK_TIMEOUT)
        except (TimeoutError, OSError) as exc:
            raise RecordError(f"cannot lock the VM records in {self.directory}: {exc}") from None
        try:
            yield
        finally:
            os.close(fd)

    def trusted(self, *, name: str, uuid: str, uri: str, meta: VmMetadata | None) -> VmRecord:
        """The record of the domain ``uuid`` called ``name`` on ``uri``, checked against what
        libvirt says of it (``meta``, its tdxvm metadata); see the module doc."""
        record = self.get(uuid)
        if record is None:
            raise RecordError(
                f"VM {name} ({uuid}) on {uri} was not launched by this controller (no record in "
                f"{self.directory}): nothing the host says about it is trusted; give --policy FILE "
                "to attest it against a policy of yours"
            )
        problems = []
        if record.name != name:
            problems.append(f"name: libvirt says {name!r}, the record {record.name!r}")
        if record.uri != uri:
            problems.append(f"libvirt URI: connected to {uri}, the record says {record.uri}")
        if meta is None:
            problems.append("the domain no longer carries tdxvm's metadata")
        else:
            if meta.backend != record.backend:
                problems.append(f"backend: metadata says {meta.backend!r}, the record {record.backend!r}")
            if set(meta.forwards()) != set(record.forwards):
                problems.append(
                    "port forwards: metadata says "
                    f"{_forwards_text(meta.forwards())}, the record {_forwards_text(record.forwards)}"
                )
        if problems:
            raise RecordMismatch(
                f"VM {name} on {uri} does not match the controller's record of it (the host changed "
                "its definition or metadata); refused:\n" + "\n".join(f"  - {p}" for p in problems)
            )
        return record


def _forwards_text(forwards: tuple[PortForward, ...]) -> str:
    return (
        ", ".join(
            f"{f.host_address}:{f.host_port}->{f.guest_port}" for f in sorted(forwards, key=lambda f: f.guest_port)
        )
        or "none"
    )
