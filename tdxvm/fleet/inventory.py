"""What exists: the fleet's VMs on each host, read from libvirt, hosts in parallel.

A fleet VM is a domain whose tdxvm metadata (:mod:`tdxvm.launch.metadata`) carries the
label ``fleet`` with the fleet's name; its other labels say which deployment and replica
it is, the hash of the spec it was launched with and the digest of its image manifest.
Every other domain on a host — tdxvm's own single VMs, another fleet's, anything not
created by tdxvm — is *foreign*: listed only so that a name clash is reported, never
touched.

One controller owns a fleet (:mod:`tdxvm.launch.ownership`). A domain with the fleet's
label is the fleet's only when it is this controller's too: its ``controller`` label is
this controller's id, or it has no such label (an older tdxvm) and the controller keeps
a record of it. Any other is *contested*: foreign, and also listed on its own so that
plans and reports say that another controller acts on the fleet's hosts.

:class:`Connector` opens one connection per URI and keeps it for the life of the process
(a long-running controller reuses them; libvirt's test driver keeps a host's state only
while a connection to it is open). A host that does not answer within ``timeout`` is
reported unreachable; the others go on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import libvirt

from tdxvm.launch import metadata as md
from tdxvm.launch.connection import close, is_alive, libvirt_message, open_connection, stalled
from tdxvm.launch.errors import LaunchError, LibvirtUnreachable
from tdxvm.launch.lifecycle import STATES
from tdxvm.launch.ownership import Controller
from tdxvm.launch.records import RecordError, RecordMismatch, VmRecords

CONNECT_TIMEOUT = 30.0

# Labels a fleet adds to tdxvm's metadata of its VMs.
FLEET = "fleet"
DEPLOYMENT = "deployment"
REPLICA = "replica"
TEMPLATE = "template"
HOST = "fleet_host"
SPEC_HASH = "spec_hash"
IMAGE_SHA = "image_sha"
MODEL_DIGEST = "model_digest"  # a state file entry's, never a label
READY_AT = "ready_at"
MEASUREMENTS = "measurements_digest"
ENDPOINT = "endpoint"


class HostUnreachable(LibvirtUnreachable):
    """No answer from a host's libvirt within the connect timeout."""

    code = "host-unreachable"


class Connector:
    """Connections by URI, opened on first use (at most ``timeout`` s) and kept open."""

    def __init__(
        self, *, timeout: float = CONNECT_TIMEOUT, opener: Callable[[str], libvirt.virConnect] = open_connection
    ) -> None:
        self.timeout, self.opener = timeout, opener
        self._conns: dict[str, libvirt.virConnect] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def get(self, uri: str) -> libvirt.virConnect:
        with self._guard:
            lock = self._locks.setdefault(uri, threading.Lock())
        with lock:
            conn = self._conns.get(uri)
            if conn is not None and is_alive(conn):
                return conn
            if conn is not None:  # dead: its socket (and ssh) freed before another is opened
                close(conn)
            conn = self._open(uri)
            self._conns[uri] = conn
            return conn

    def _open(self, uri: str) -> libvirt.virConnect:
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["conn"] = self.opener(uri)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                box["error"] = exc

        worker = threading.Thread(target=run, name=f"tdxvm-connect {uri}", daemon=True)
        worker.start()
        worker.join(self.timeout)
        if worker.is_alive():
            raise HostUnreachable(f"cannot connect to libvirt at {uri}: no answer within {self.timeout:g} s")
        if "error" in box:
            raise box["error"]
        return box["conn"]

    def close(self) -> None:
        with self._guard:
            conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            close(conn)


_shared: Connector | None = None
_shared_guard = threading.Lock()


def shared_connector() -> Connector:
    """The process's connector (the CLI's)."""
    global _shared
    with _shared_guard:
        if _shared is None:
            _shared = Connector()
        return _shared


def reset_shared_connector() -> None:
    """Close the process's connections (tests: a fresh start for test-driver hosts)."""
    global _shared
    with _shared_guard:
        old, _shared = _shared, None
    if old is not None:
        old.close()


@dataclass(frozen=True)
class ActualVm:
    """A fleet VM as libvirt has it."""

    name: str
    host: str
    uri: str
    state: str
    labels: dict[str, str]
    attestation: dict[str, Any] | None
    forwards: tuple[Any, ...] = ()
    uuid: str = ""  # the domain's: the same domain seen through two URIs is one libvirt

    @property
    def deployment(self) -> str:
        return self.labels.get(DEPLOYMENT, "")

    @property
    def verdict(self) -> str | None:
        return (self.attestation or {}).get("verdict")

    @property
    def serving(self) -> bool:
        """Running, its last attestation accepted, and brought up to the end by an apply."""
        return self.state == "running" and self.verdict == "accept" and bool(self.labels.get(READY_AT))


@dataclass(frozen=True)
class ContestedVm:
    """A domain with the fleet's label that is not this controller's: never touched."""

    name: str
    host: str
    state: str
    deployment: str
    owner: str  # whose it is, a phrase (Controller.claim)


@dataclass(frozen=True)
class HostView:
    """One host: reachable with the fleet's VMs on it and the names of foreign domains, or not."""

    name: str
    uri: str
    error: str | None = None
    error_code: str | None = None
    vms: dict[str, ActualVm] = field(default_factory=dict)
    foreign: dict[str, str] = field(default_factory=dict)  # name -> whose ("not tdxvm's", "fleet x", "tdxvm VM")
    contested: dict[str, ContestedVm] = field(default_factory=dict)  # also in foreign: the fleet's label, not ours
    domains: frozenset[str] = frozenset()  # the UUID of every domain listed, the fleet's or not

    @property
    def reachable(self) -> bool:
        return self.error is None


def has_record(records: VmRecords, uuid: str) -> bool:
    """Whether the controller keeps a record of the domain ``uuid`` (an unreadable one counts)."""
    try:
        return records.get(uuid) is not None
    except RecordError:
        return True


def read_host(
    conn: libvirt.virConnect, fleet: str, host: str, uri: str, records: VmRecords, *, controller: Controller
) -> HostView:
    """The fleet's VMs on ``conn`` and the names of every other domain there.

    Only ``controller``'s VMs are the fleet's (see the module doc). A VM's attestation and
    forwards come from the controller's record of it (``records``), never from its
    metadata; a VM of this controller without a record, or whose metadata disagrees with
    it, counts as refused (the reasons say why), so an apply replaces it."""
    try:
        domains = conn.listAllDomains(0)
    except libvirt.libvirtError as exc:
        lost = stalled(conn)  # its host stopped answering
        if lost is not None:
            return HostView(host, uri, error=str(lost), error_code=lost.code)
        return HostView(
            host, uri, error=f"cannot list domains on {uri}: {libvirt_message(exc)}", error_code="libvirt-domain"
        )
    vms: dict[str, ActualVm] = {}
    foreign: dict[str, str] = {}
    contested: dict[str, ContestedVm] = {}
    uuids: set[str] = set()
    for dom in domains:
        try:
            uuid = dom.UUIDString()
            uuids.add(uuid)
            name = dom.name()
            meta = md.from_domain_xml(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            state = STATES.get(dom.state()[0], "unknown")
        except libvirt.libvirtError:
            continue  # undefined while we looked
        if meta is None:
            foreign[name] = "not created by tdxvm"
        elif meta.labels.get(FLEET) != fleet:
            owner = meta.labels.get(FLEET)
            foreign[name] = f"fleet {owner}'s" if owner else "a tdxvm VM outside any fleet"
        elif (whose := controller.claim(meta, has_record=partial(has_record, records, uuid))) is not None:
            foreign[name] = whose
            contested[name] = ContestedVm(name, host, state, meta.labels.get(DEPLOYMENT, ""), whose)
        else:
            try:
                record = records.trusted(name=name, uuid=uuid, uri=conn.getURI(), meta=meta)
                attestation, forwards = record.attestation, record.forwards
            except (RecordError, RecordMismatch, libvirt.libvirtError) as exc:
                code = getattr(exc, "code", "vm-record")
                attestation = {"verdict": "reject", "reasons": [{"code": code, "message": str(exc)}]}
                forwards = ()
            vms[name] = ActualVm(
                name=name,
                host=host,
                uri=uri,
                state=state,
                labels=dict(meta.labels),
                attestation=attestation,
                forwards=forwards,
                uuid=uuid,
            )
    return HostView(host, uri, vms=vms, foreign=foreign, contested=contested, domains=frozenset(uuids))


def survey(
    connector: Connector,
    fleet: str,
    hosts: dict[str, str],
    *,
    records: VmRecords,
    controller: Controller,
    parallel: int = 8,
) -> dict[str, HostView]:
    """Every host of ``hosts`` (name -> URI) read at once, as ``controller`` owns the fleet;
    unreachable ones carry the error."""

    def one(item: tuple[str, str]) -> HostView:
        host, uri = item
        try:
            conn = connector.get(uri)
        except LaunchError as exc:
            return HostView(host, uri, error=str(exc), error_code=exc.code)
        return read_host(conn, fleet, host, uri, records, controller=controller)

    items: Iterable[tuple[str, str]] = sorted(hosts.items())
    with ThreadPoolExecutor(
        max_workers=max(1, min(parallel, len(hosts) or 1)), thread_name_prefix="tdxvm-survey"
    ) as pool:
        return {view.name: view for view in pool.map(one, items)}
