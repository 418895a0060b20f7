"""VM lifecycle on libvirt: prepare (volumes + define), start, stop, destroy, status.

:func:`prepare_domain` is the entry point of a launch: it refuses a name in use, forms
the effective attestation policy, runs the host preflight, puts the image's volumes on
the host and defines the domain with tdxvm's metadata. If any step fails (or the
caller's progress callback raises, e.g. on Ctrl-C), nothing it created stays behind: the
domain is undefined and the VM's overlay and log volumes are deleted.

Every other verb finds the domain by name and first checks tdxvm's metadata in it: a
domain tdxvm did not create is never stopped, undefined or deleted; given this
controller (:class:`~tdxvm.launch.ownership.Controller`), neither is a VM another
controller launched (its ``controller`` label). The metadata also
keeps what a later ``tdxvm attest NAME`` needs without the VM spec: the agent's host
port, the image manifest's path and the effective attestation policy.
"""

from __future__ import annotations

import json
import time
import uuid as uuidlib
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import libvirt

from tdxvm.attest.policy import Policy
from tdxvm.launch import metadata as md
from tdxvm.launch import preflight as pf
from tdxvm.launch.connection import is_local, libvirt_message
from tdxvm.launch.domain import TDXVM_NS, DomainSpec, PortForward, domain_xml
from tdxvm.launch.errors import DomainError, LaunchError, NoSuchVmError, NotOurDomainError, VmExistsError, VolumeError
from tdxvm.launch.manifest import Artifact, ImageManifest
from tdxvm.launch.ownership import Controller
from tdxvm.launch.ports import choose_forwards
from tdxvm.launch.records import RecordError, RecordMismatch, VmRecords
from tdxvm.launch.rtmr0pin import Rtmr0Pin
from tdxvm.launch.rtmr0pin import predict as predict_rtmr0
from tdxvm.launch.spec import VmSpec, effective_policy, firmware_path
from tdxvm.launch.volumes import POOL_NAME, POOL_PATH, VmVolumes, VolumeEvent, delete_vm_volume, prepare_volumes

STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: "unknown",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutting-down",
    libvirt.VIR_DOMAIN_SHUTOFF: "shut-off",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
}


@dataclass(frozen=True, slots=True)
class StepEvent:
    step: Literal["preflight", "volumes", "define"]
    status: Literal["start", "done"]
    detail: str = ""


LaunchProgress = Callable[[StepEvent | VolumeEvent], None]


def _quiet(_event: StepEvent | VolumeEvent) -> None:
    pass


@dataclass(frozen=True)
class DomainHandle:
    """A domain tdxvm defined: what the bring-up needs to start, reach and attest it."""

    conn: libvirt.virConnect
    name: str
    uuid: str
    uri: str
    backend: str
    forwards: tuple[PortForward, ...]
    volumes: VmVolumes
    policy: Policy
    manifest: ImageManifest
    findings: tuple[pf.Finding, ...]
    xml: str
    rtmr0: Rtmr0Pin | None = None  # what the policy pins for RTMR0, or why nothing

    def domain(self) -> libvirt.virDomain:
        try:
            return self.conn.lookupByUUIDString(self.uuid)
        except libvirt.libvirtError as exc:
            raise NoSuchVmError(
                f"VM {self.name} ({self.uuid}) is no longer defined on {self.uri}: {libvirt_message(exc)}"
            ) from None

    def forward(self, guest_port: int) -> PortForward | None:
        return next((f for f in self.forwards if f.guest_port == guest_port), None)

    @property
    def agent(self) -> tuple[str, int]:
        """(host address, host port) where the guest agent is reached."""
        f = self.forward(self.manifest.guest_agent_port)
        if f is None:  # pragma: no cover - choose_forwards always adds it
            raise LaunchError(f"VM {self.name} has no port forward to the guest agent")
        return f.host_address, f.host_port


@dataclass
class VmStatus:
    name: str
    uuid: str
    uri: str
    state: str
    backend: str
    image: str | None
    forwards: tuple[PortForward, ...]
    agent_port: int | None
    started_at: str | None
    uptime_s: int | None
    attestation: dict[str, Any] | None
    policy_exceptions: list[str]
    serial_log: str | None
    manifest: str | None = None
    policy: Policy | None = None
    labels: dict[str, str] = field(default_factory=dict)
    record: str = "unchecked"  # the controller's record of this VM: ok, missing, mismatch (or unchecked)
    record_problem: str | None = None
    model: dict[str, str] | None = (
        None  # from the record: what `tdxvm provision` serves (name, url, tls_spki_sha256, at, digest, dtype)
    )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "uuid": self.uuid,
            "uri": self.uri,
            "state": self.state,
            "backend": self.backend,
            "image": self.image,
            "forwards": [
                {"address": f.host_address, "host": f.host_port, "guest": f.guest_port} for f in self.forwards
            ],
            "agent": self.agent_endpoint,
            "started_at": self.started_at,
            "uptime_s": self.uptime_s,
            "attestation": self.attestation,
            "policy_exceptions": self.policy_exceptions,
            "serial_log": self.serial_log,
            "manifest": self.manifest,
            "policy": self.policy.model_dump(mode="json", exclude_none=True) if self.policy else None,
            "model": self.model,
            "record": self.record,
            "record_problem": self.record_problem,
        }

    def forward(self, guest_port: int | None) -> PortForward | None:
        return next((f for f in self.forwards if f.guest_port == guest_port), None) if guest_port is not None else None

    @property
    def agent_endpoint(self) -> str | None:
        f = self.forward(self.agent_port)
        return f"{f.host_address}:{f.host_port}" if f else None


def ports_in_use(conn: libvirt.virConnect) -> set[int]:
    """Host ports forwarded by tdxvm domains on this connection (running or not)."""
    taken: set[int] = set()
    for dom in _all_domains(conn):
        meta = md.from_domain_xml(_xml(dom, inactive=True))
        if meta is not None:
            taken.update(f.host_port for f in meta.forwards())
    return taken


def build_domain_spec(
    spec: VmSpec,
    manifest: ImageManifest,
    *,
    volumes: VmVolumes,
    forwards: tuple[PortForward, ...],
    uuid: str,
    labels: dict[str, str],
) -> DomainSpec:
    """The libvirt domain for ``spec``, booting the manifest's artifacts from ``volumes``."""
    pins = spec.pinning.vcpus if spec.pinning else ()
    numa = str(spec.pinning.numa_node) if spec.pinning and spec.pinning.numa_node is not None else None
    extra: dict[str, Any] = {}
    if spec.qgs_socket is not None:
        extra["qgs_socket"] = spec.qgs_socket
    return DomainSpec(
        name=spec.name,
        uuid=uuid,
        backend=spec.backend,
        vcpus=spec.vcpus,
        memory_mib=spec.memory_mib,
        kernel=volumes.kernel,
        initrd=volumes.initrd,
        cmdline=manifest.cmdline,
        disk=volumes.overlay,
        disk_format="qcow2",
        firmware=volumes.firmware or firmware_path(spec, manifest),
        vcpu_pins=tuple(pins),
        numa_nodeset=numa,
        port_forwards=forwards,
        mr_config_id=spec.mr_config_id,
        mr_owner=spec.mr_owner,
        mr_owner_config=spec.mr_owner_config,
        qgs_form=spec.qgs_form,
        qgs_vsock_port=spec.qgs_vsock_port,
        serial_log=volumes.serial_log,
        scratch=volumes.scratch,
        owner=labels,
        **extra,
    )


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def metadata_labels(
    spec: VmSpec, manifest: ImageManifest, *, volumes: VmVolumes, forwards: tuple[PortForward, ...], policy: Policy
) -> dict[str, str]:
    labels = {
        "image": manifest.name,
        "manifest": str(manifest.path),
        "pool": volumes.pool,
        "overlay": volumes.overlay,
        "serial_log": volumes.serial_log,
        "scratch": volumes.scratch,
        "forwards": md.forwards_label(forwards),
        "agent_port": str(manifest.guest_agent_port),
        "ssh_port": str(manifest.ssh_port),
        "defined_at": _now(),
        "policy_exceptions": json.dumps(policy.loosened()),
        "policy": json.dumps(policy.model_dump(mode="json", exclude_none=True), sort_keys=True),
    }
    if manifest.service_port is not None:
        labels["service_port"] = str(manifest.service_port)
    return labels


def render_domain(
    spec: VmSpec,
    manifest: ImageManifest,
    *,
    volumes: VmVolumes,
    forwards: tuple[PortForward, ...],
    policy: Policy,
    uuid: str | None = None,
    extra_labels: dict[str, str] | None = None,
) -> str:
    """The domain XML a launch defines (also what ``tdxvm launch --dry-run`` prints).

    ``extra_labels`` (e.g. a fleet's ownership labels) go into tdxvm's metadata beside
    the launch's own; a name the launch itself sets is refused."""
    labels = metadata_labels(spec, manifest, volumes=volumes, forwards=forwards, policy=policy)
    clash = sorted(set(extra_labels or ()) & set(labels))
    if clash:
        raise LaunchError(
            f"VM {spec.name}: labels {', '.join(clash)} are set by the launch itself and cannot be given", code="labels"
        )
    labels.update(extra_labels or {})
    ds = build_domain_spec(
        spec, manifest, volumes=volumes, forwards=forwards, uuid=uuid or str(uuidlib.uuid4()), labels=labels
    )
    return domain_xml(ds)


def prepare_domain(
    spec: VmSpec,
    manifest: ImageManifest,
    conn: libvirt.virConnect,
    progress: LaunchProgress | None = None,
    *,
    preflight: bool = True,
    sysfs_root: Path = Path("/sys"),
    pool: str = POOL_NAME,
    pool_path: str = POOL_PATH,
    labels: dict[str, str] | None = None,
    uuid: str | None = None,
) -> DomainHandle:
    """Preflight, upload volumes and define (not start) the VM; all or nothing.

    ``progress`` gets :class:`StepEvent` and :class:`~tdxvm.launch.volumes.VolumeEvent`
    values; if it raises, the launch is undone and the exception propagates. ``labels``
    are extra metadata labels defined with the domain (a fleet's ownership); ``uuid`` the
    domain's UUID (new when None), known to a caller that must find the domain again
    after losing its connection mid-define.
    """
    progress = progress or _quiet
    uri = conn.getURI()
    _refuse_existing(conn, spec.name, uri)
    policy = effective_policy(spec, manifest)
    findings: list[pf.Finding] = []
    if preflight:
        progress(StepEvent("preflight", "start"))
        findings = pf.require(pf.run_preflight(conn, spec, manifest, sysfs_root=sysfs_root), vm=spec.name)
        warnings = "".join(
            f"; warning: {f.message}" + (f" (fix: {f.fix})" if f.fix else "") for f in findings if f.status == "warn"
        )
        progress(StepEvent("preflight", "done", f"{sum(f.status == 'ok' for f in findings)} checks passed{warnings}"))
    forwards = choose_forwards(spec, manifest, taken=ports_in_use(conn), local=is_local(uri))
    progress(StepEvent("volumes", "start"))
    volumes = prepare_volumes(
        conn,
        manifest,
        spec.name,
        progress,
        pool_name=pool,
        pool_target=pool_path,
        scratch_bytes=spec.scratch << 20,
        firmware=firmware_upload(spec, manifest, uri),
    )
    progress(StepEvent("volumes", "done"))
    dom: libvirt.virDomain | None = None
    try:
        progress(StepEvent("define", "start"))
        vm_uuid = uuid or str(uuidlib.uuid4())
        xml = render_domain(
            spec, manifest, volumes=volumes, forwards=forwards, policy=policy, uuid=vm_uuid, extra_labels=labels
        )
        copies = {volumes.kernel: str(manifest.kernel.path), volumes.initrd: str(manifest.initrd.path)}
        rtmr0 = predict_rtmr0(conn, xml, backend=spec.backend, firmware=local_firmware(spec, manifest), files=copies)
        if rtmr0.value is not None and policy.rtmr0 is None:  # the machine of this XML; a spec's own rtmr0 stays
            policy = effective_policy(spec, manifest, rtmr0=rtmr0.value)
            xml = render_domain(
                spec, manifest, volumes=volumes, forwards=forwards, policy=policy, uuid=vm_uuid, extra_labels=labels
            )
        try:
            dom = conn.defineXML(xml)
        except libvirt.libvirtError as exc:
            raise DomainError(f"libvirt on {uri} refused to define VM {spec.name}: {libvirt_message(exc)}") from None
        if md.from_domain_xml(_xml(dom, inactive=True)) is None:
            raise DomainError(f"libvirt on {uri} dropped tdxvm's metadata from VM {spec.name}")
        progress(StepEvent("define", "done", vm_uuid))
    except BaseException:
        if dom is not None:
            with suppress(libvirt.libvirtError):
                dom.undefineFlags(_UNDEFINE_FLAGS)
        for path in (volumes.overlay, volumes.serial_log, volumes.scratch):
            delete_vm_volume(conn, path, pool_name=volumes.pool)
        raise
    return DomainHandle(
        conn=conn,
        name=spec.name,
        uuid=vm_uuid,
        uri=uri,
        backend=spec.backend,
        forwards=forwards,
        volumes=volumes,
        policy=policy,
        manifest=manifest,
        findings=tuple(findings),
        xml=xml,
        rtmr0=rtmr0,
    )


def firmware_upload(spec: VmSpec, manifest: ImageManifest, uri: str) -> Artifact | None:
    """The TDVF to put into the host's pool with the image, or None (the domain names its path as it is).

    An emulated guest boots no TDVF: the controller's quote service reads the one it
    stands for back through libvirt and reports its MRTD. On this machine that is the
    manifest's file itself; a remote host has no such file (the manifest's path is the
    build machine's), so the manifest's TDVF goes into the host's pool like the kernel
    (checked against the manifest's SHA-256 as it streams). A VM spec's own
    ``firmware:`` is a path on the host and is named as it is."""
    if spec.backend != "emulated" or spec.firmware is not None or manifest.firmware is None or is_local(uri):
        return None
    path = Path(manifest.firmware.path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise VolumeError(
            f"TDVF {path}, which image {manifest.name}'s MRTD was predicted for and which the emulated guest on "
            f"{uri} stands for, cannot be read on this machine: {exc.strerror or exc}"
            "\nfix: restore it, or set firmware: in the VM spec to a TDVF that is a volume on the host"
        ) from None
    return Artifact(name=path.name, path=path, sha256=manifest.firmware.sha256, size=size)


def local_firmware(spec: VmSpec, manifest: ImageManifest) -> bytes | None:
    """The TDVF's bytes where this machine has the file (RTMR0 is predicted only for domains here)."""
    path = firmware_path(spec, manifest)
    try:
        return Path(path).read_bytes() if path else None
    except OSError:
        return None


def _refuse_existing(conn: libvirt.virConnect, name: str, uri: str) -> None:
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return
        raise DomainError(f"cannot look up {name} on {uri}: {libvirt_message(exc)}") from None
    if md.from_domain_xml(_xml(dom)) is None:
        raise VmExistsError(f"a domain named {name}, not created by tdxvm, exists on {uri}; give the VM another name")
    raise VmExistsError(f"VM {name} already exists on {uri} ({_state(dom)}); `tdxvm destroy {name}` removes it")


# ---------------------------------------------------------------------------- lifecycle

_UNDEFINE_FLAGS = libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA


def _xml(dom: libvirt.virDomain, *, inactive: bool = False) -> str:
    try:
        return dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0)
    except libvirt.libvirtError:
        return ""


def _all_domains(conn: libvirt.virConnect) -> list[libvirt.virDomain]:
    try:
        return conn.listAllDomains(0)
    except libvirt.libvirtError as exc:
        raise DomainError(f"cannot list domains on {conn.getURI()}: {libvirt_message(exc)}") from None


def _state(dom: libvirt.virDomain) -> str:
    try:
        return STATES.get(dom.state()[0], "unknown")
    except libvirt.libvirtError:
        return "unknown"


def lookup(
    conn: libvirt.virConnect, name: str, *, controller: Controller | None = None, verb: str = "change"
) -> tuple[libvirt.virDomain, md.VmMetadata]:
    """The tdxvm domain ``name``; refuses unknown names and domains tdxvm did not create,
    and, given ``controller``, VMs another controller launched (``verb`` says what the
    caller would do, for the message)."""
    uri = conn.getURI()
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            raise NoSuchVmError(f"no VM named {name} on {uri} (`tdxvm status --uri {uri}` lists tdxvm's VMs)") from None
        raise DomainError(f"cannot look up {name} on {uri}: {libvirt_message(exc)}") from None
    if dom.name() != name:  # libvirt answers for the host: another domain is not this one
        raise DomainError(f"{uri} answered the lookup of {name} with domain {dom.name()!r}: refused")
    meta = md.from_domain_xml(_xml(dom, inactive=True))
    if meta is None:
        raise NotOurDomainError(
            f"domain {name} on {uri} was not created by tdxvm (no tdxvm metadata); tdxvm never "
            "stops, changes or deletes it — use virsh for it"
        )
    if controller is not None:
        controller.require(name, uri, meta, verb)
    return dom, meta


def _write_metadata(dom: libvirt.virDomain, meta: md.VmMetadata) -> None:
    flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
    if dom.isActive():
        flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, md.to_element_xml(meta), md.KEY, TDXVM_NS, flags)


def start(handle: DomainHandle, *, cleanup_on_failure: bool = True) -> None:
    """Start the prepared VM. If libvirt refuses, the VM is destroyed (undefined, its volumes deleted)."""
    dom = handle.domain()
    try:
        dom.create()
    except libvirt.libvirtError as exc:
        message = f"libvirt on {handle.uri} could not start VM {handle.name}: {libvirt_message(exc)}"
        if cleanup_on_failure:
            with suppress(LaunchError):
                destroy(handle.conn, handle.name)
            message += " (the VM was removed again)"
        raise DomainError(message) from None
    with suppress(libvirt.libvirtError, LaunchError):
        _, meta = lookup(handle.conn, handle.name)
        meta.labels["started_at"] = _now()
        _write_metadata(dom, meta)


def stop(
    conn: libvirt.virConnect,
    name: str,
    *,
    timeout: float = 60.0,
    poll: float = 0.5,
    controller: Controller | None = None,
) -> str:
    """ACPI shutdown, then power off after ``timeout`` s. Returns what happened. Given
    ``controller``, another controller's VM is refused."""
    dom, _ = lookup(conn, name, controller=controller, verb="stop")
    if not dom.isActive():
        return "was not running"
    try:
        dom.shutdown()
    except libvirt.libvirtError as exc:
        if not dom.isActive():
            return "shut down"
        raise DomainError(f"cannot shut down {name} on {conn.getURI()}: {libvirt_message(exc)}") from None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not dom.isActive():
            return "shut down"
        time.sleep(poll)
    try:
        dom.destroy()
    except libvirt.libvirtError as exc:
        if not dom.isActive():
            return "shut down"
        raise DomainError(
            f"{name} ignored the shutdown request and cannot be powered off: {libvirt_message(exc)}"
        ) from None
    return f"powered off (no shutdown within {timeout:g} s)"


@dataclass(frozen=True)
class DestroyReport:
    name: str
    was_running: bool
    deleted_volumes: tuple[str, ...]


def destroy(
    conn: libvirt.virConnect, name: str, *, records: VmRecords | None = None, controller: Controller | None = None
) -> DestroyReport:
    """Power off (if running), undefine, and delete the VM's overlay and log volumes (and
    its controller record, from ``records``).

    The shared image volumes (kernel, initramfs, base disk) stay for other VMs and later
    launches. Refuses domains tdxvm did not create, and, given ``controller``, VMs
    another controller launched.
    """
    dom, meta = lookup(conn, name, controller=controller, verb="destroy")
    vm_uuid = dom.UUIDString()
    uri = conn.getURI()
    paths = [p for p in (meta.labels.get("overlay"), meta.labels.get("serial_log"), meta.labels.get("scratch")) if p]
    was_running = bool(dom.isActive())
    if was_running:
        try:
            dom.destroy()
        except libvirt.libvirtError as exc:
            if dom.isActive():
                raise DomainError(f"cannot power off {name} on {uri}: {libvirt_message(exc)}") from None
    try:
        dom.undefineFlags(_UNDEFINE_FLAGS)
    except libvirt.libvirtError as exc:
        raise DomainError(f"cannot undefine {name} on {uri}: {libvirt_message(exc)}") from None
    pool = meta.labels.get("pool", POOL_NAME)
    deleted = tuple(p for p in paths if delete_vm_volume(conn, p, pool_name=pool))
    if records is not None:
        record = records.get(vm_uuid)
        if record is not None and (record.name, record.uri) == (name, uri):  # the host reports the UUID: another
            records.delete(vm_uuid)  # VM's record, on another host or under another name, is not this one's
    return DestroyReport(name=name, was_running=was_running, deleted_volumes=deleted)


def set_labels(dom: libvirt.virDomain, labels: dict[str, str]) -> None:
    """Add or change labels in the domain's tdxvm metadata (the persistent definition, and
    the running one if active). Refuses domains tdxvm did not create."""
    meta = md.from_domain_xml(_xml(dom, inactive=True))
    if meta is None:
        raise NotOurDomainError(f"domain {dom.name()} was not created by tdxvm; its metadata is not changed")
    meta.labels.update(labels)
    try:
        _write_metadata(dom, meta)
    except libvirt.libvirtError as exc:
        raise DomainError(f"cannot write the labels of {dom.name()}: {libvirt_message(exc)}") from None


def record_attestation(dom: libvirt.virDomain, verdict: dict[str, Any], *, at: datetime | None = None) -> None:
    """Keep the verdict of the latest attestation (``Verdict.to_dict()``) in the domain's metadata."""
    meta = md.from_domain_xml(_xml(dom, inactive=True))
    if meta is None:
        raise NotOurDomainError(f"domain {dom.name()} was not created by tdxvm; its metadata is not changed")
    when = (at or datetime.now(timezone.utc)).astimezone(timezone.utc).replace(microsecond=0)
    meta.attestation = {**verdict, "recorded_at": when.isoformat().replace("+00:00", "Z")}
    try:
        _write_metadata(dom, meta)
    except libvirt.libvirtError as exc:
        raise DomainError(f"cannot record the attestation of {dom.name()}: {libvirt_message(exc)}") from None


def status(conn: libvirt.virConnect, name: str | None = None, *, records: VmRecords | None = None) -> list[VmStatus]:
    """tdxvm's VMs on this connection (or the one named), sorted by name.

    With ``records`` (the controller's VM records), each VM's backend, forwards, policy,
    policy exceptions, attestation and model come from its record, checked against
    libvirt: a VM without one, or whose metadata disagrees with it, says so in ``record``
    and shows no policy. Without ``records``, the policy fields stay empty (``record``
    is ``"unchecked"``): the metadata's copy of them is never taken for the truth."""
    if name is not None:
        dom, meta = lookup(conn, name)
        return [_status(conn, dom, meta, records)]
    out = []
    for dom in _all_domains(conn):
        meta = md.from_domain_xml(_xml(dom, inactive=True))
        if meta is not None:
            out.append(_status(conn, dom, meta, records))
    return sorted(out, key=lambda s: s.name)


def _status(
    conn: libvirt.virConnect, dom: libvirt.virDomain, meta: md.VmMetadata, records: VmRecords | None
) -> VmStatus:
    state = _state(dom)
    started = meta.labels.get("started_at")
    uptime = None
    if state == "running" and started:
        with suppress(ValueError, TypeError, OverflowError):  # the host writes the label: no zone, out of range
            uptime = int(
                (datetime.now(timezone.utc) - datetime.fromisoformat(started.replace("Z", "+00:00"))).total_seconds()
            )
    agent = meta.labels.get("agent_port", "")
    vm = VmStatus(
        name=dom.name(),
        uuid=dom.UUIDString(),
        uri=conn.getURI(),
        state=state,
        backend=meta.backend,
        image=meta.labels.get("image"),
        forwards=meta.forwards(),
        agent_port=md.port_number(agent),
        started_at=started,
        uptime_s=uptime,
        attestation=None,
        policy_exceptions=[],
        serial_log=meta.labels.get("serial_log"),
        manifest=meta.labels.get("manifest"),
        labels=dict(meta.labels),
    )
    if records is None:
        return vm
    try:
        record = records.trusted(name=vm.name, uuid=vm.uuid, uri=vm.uri, meta=meta)
    except (RecordError, RecordMismatch) as exc:
        vm.record = "mismatch" if isinstance(exc, RecordMismatch) else "missing"
        vm.record_problem = str(exc)
        return vm
    vm.record, vm.backend, vm.forwards, vm.agent_port = "ok", record.backend, record.forwards, record.agent_port
    kept = (record.attestation or {}).get("policy_exceptions")  # the last verdict's: collateral from the cache too
    last = [e for e in kept if isinstance(e, str)] if isinstance(kept, list) else []
    vm.policy, vm.policy_exceptions = record.policy, list(dict.fromkeys([*record.policy.loosened(), *last]))
    vm.attestation, vm.model, vm.manifest = record.attestation, record.model, record.manifest
    return vm
