"""``tdxvm launch``: define, boot, attest, unlock, and log in — or refuse and stop the VM.

Phases, each reported with its time:

``define``  preflight, the image's artifacts onto the libvirt host, the domain defined;
``boot``    the domain started, until the unlock step in its initramfs answers;
``quote``   a fresh nonce out, a quote back (REPORTDATA binds the nonce and the guest's
            ephemeral X25519 key);
``verify``  the quote against the trust anchor and collateral, then the effective policy
            (the image's predicted MRTD/RTMR1/RTMR2 unless the spec says otherwise);
``unlock``  the disk's keyslot passphrase sealed (HPKE) to the attested X25519 key;
``ready``   the booted system re-attested with a new nonce, this time binding its SSH
            host key (made inside the TD); an SSH login that accepts only that key.

Nothing secret leaves the controller before ``verify`` accepts. A refused quote stops
the VM (powered off, still defined, so its serial log can be read) and every reason is
reported; a guest that never answers times out with the tail of its serial log.
"""

from __future__ import annotations

import base64
import contextlib
import time
import uuid as uuidlib
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import libvirt

from tdxvm.image import secrets as disk_secrets
from tdxvm.launch import tunnel
from tdxvm.launch.connection import close, is_alive, is_test_driver, libvirt_message, open_connection, stalled
from tdxvm.launch.console import serial_log_tail
from tdxvm.launch.errors import LaunchError, LibvirtConnectionLost, LibvirtHostStalled
from tdxvm.launch.lifecycle import DomainHandle, destroy, prepare_domain, record_attestation, start
from tdxvm.launch.manifest import ImageManifest
from tdxvm.launch.ownership import controller_label
from tdxvm.launch.records import VmRecord, VmRecords, manifest_sha256
from tdxvm.launch.spec import VmSpec
from tdxvm.launch.volumes import sweep_vm_volumes
from tdxvm.provision import handshake, ssh
from tdxvm.provision.attestation import (
    BringUpError,
    BringUpTimeout,
    anchor_sha256,
    attest,
    kept_verdict,
    refused_verdict,
    timestamp,
)
from tdxvm.provision.model import provision
from tdxvm.provision.trust import Trust
from tdxvm.releasekey import SECRET as RELEASE_SECRET
from tdxvm.releasekey import public_hex, release_key
from tdxvm.secretstore import SecretStore
from tdxvm.sshkey import controller_key

PHASES = ("define", "boot", "quote", "verify", "unlock", "ready")
BOOT_TIMEOUT = 300.0  # seconds until the initramfs answers (TCG boots are slow)
READY_TIMEOUT = 300.0


@dataclass(frozen=True, slots=True)
class PhaseEvent:
    phase: str
    status: str  # "start" or "done"
    seconds: float = 0.0
    detail: str = ""


@dataclass
class LaunchResult:
    name: str
    uri: str
    timings: dict[str, float] = field(default_factory=dict)
    verdict: dict[str, Any] | None = None
    ssh: tuple[str, int] | None = None
    agent: tuple[str, int] | None = None
    service: tuple[str, int] | None = None
    ssh_host_key: str | None = None
    provision: dict[str, Any] | None = None  # ProvisionResult.to_dict() when the spec names a model
    rtmr0: dict[str, Any] | None = None  # Rtmr0Pin.to_dict(): the value the policy pins and its events, or why none

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "uri": self.uri,
            "state": "serving" if self.provision else "ready",
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "ssh": f"{self.ssh[0]}:{self.ssh[1]}" if self.ssh else None,
            "agent": f"{self.agent[0]}:{self.agent[1]}" if self.agent else None,
            "service": f"{self.service[0]}:{self.service[1]}" if self.service else None,
            "ssh_host_key": self.ssh_host_key,
            "attestation": self.verdict,
            "rtmr0": self.rtmr0,
            "provision": self.provision,
        }


Progress = Callable[[PhaseEvent], None]


def _quiet(_: PhaseEvent) -> None:
    pass


class _Phases:
    def __init__(self, progress: Progress, timings: dict[str, float]) -> None:
        self.progress, self.timings = progress, timings
        self.current = "define"

    def begin(self, phase: str) -> float:
        self.current = phase
        self.progress(PhaseEvent(phase, "start"))
        return time.monotonic()

    def end(self, phase: str, started: float, detail: str = "", seconds: float | None = None) -> None:
        took = time.monotonic() - started if seconds is None else seconds
        self.timings[phase] = took
        self.progress(PhaseEvent(phase, "done", took, detail))


def _wait_for_agent(
    conn: libvirt.virConnect,
    name: str,
    address: tuple[str, int],
    *,
    needs: str,
    deadline: float,
    phase: str,
    poll: float = 1.0,
    where: str = "",
) -> None:
    """Until the agent at ``address`` answers and would bind ``needs`` (the initramfs'
    unlock step binds only x25519; the booted system's agent also its SSH host key);
    ``where`` names it in errors (the forward on its host, when ``address`` is a tunnel)."""
    dom = conn.lookupByName(name)
    last: Exception | str = "no answer"
    while time.monotonic() < deadline:
        if not dom.isActive():
            raise BringUpError("the VM stopped", phase=phase, serial_tail=_tail(conn, name))
        try:
            keys = handshake.hello(address, timeout=10)
            if needs in keys:
                return
            last = f"the agent binds only {', '.join(keys)} so far"
        except handshake.HandshakeError as exc:
            last = exc
        time.sleep(poll)
    raise BringUpTimeout(
        f"the guest agent at {where or f'{address[0]}:{address[1]}'} did not answer in time ({last})",
        phase=phase,
        serial_tail=_tail(conn, name),
    )


def _tail(conn: libvirt.virConnect, name: str) -> str:
    try:
        return serial_log_tail(conn, name, lines=20)
    except LaunchError:
        return ""


def check_release_key(manifest: ImageManifest, secrets: SecretStore) -> None:
    """Refuse an image built for another controller's release key (or before images had one):
    its guest would refuse every secret this controller releases."""
    built_for = manifest.release_key
    if not secrets.exists(RELEASE_SECRET):
        raise BringUpError(
            f"the secret store {secrets.directory} holds no release key ({RELEASE_SECRET}): it built no "
            f"image, so it cannot release secrets to image {manifest.name}'s guests",
            phase="define",
        )
    ours = public_hex(release_key(secrets))
    if built_for != ours:
        which = (
            "before tdxvm authenticated released secrets"
            if built_for is None
            else f"for another controller (release key {str(built_for)[:16]}…)"
        )
        raise BringUpError(
            f"image {manifest.name} ({manifest.path}) was built {which}; its guest accepts secrets only from "
            f"the controller that built it: rebuild it with this controller's secret store ({secrets.directory})",
            phase="define",
        )


def _record(handle: DomainHandle, manifest: ImageManifest, trust: Trust) -> VmRecord:
    return VmRecord(
        name=handle.name,
        uuid=handle.uuid,
        uri=handle.uri,
        backend=handle.backend,
        policy=handle.policy,
        manifest=str(manifest.path),
        manifest_sha256=manifest_sha256(manifest.path),
        trust_anchor_sha256=anchor_sha256(trust),
        forwards=handle.forwards,
        agent_port=manifest.guest_agent_port,
        ssh_port=manifest.ssh_port,
        service_port=manifest.service_port,
        defined_at=timestamp(),
    )


def _power_off(conn: libvirt.virConnect, name: str) -> None:
    try:
        dom = conn.lookupByName(name)
        if dom.isActive():
            dom.destroy()
    except libvirt.libvirtError:
        pass


def bring_up(
    spec: VmSpec,
    manifest: ImageManifest,
    conn: libvirt.virConnect,
    *,
    trust: Trust,
    secrets: SecretStore,
    progress: Progress = _quiet,
    boot_timeout: float = BOOT_TIMEOUT,
    ready_timeout: float = READY_TIMEOUT,
    labels: dict[str, str] | None = None,
    define_lock: AbstractContextManager[Any] | None = None,
    login_check: bool = True,
    poll: float = 1.0,
) -> LaunchResult:
    """Launch ``spec`` on ``conn`` and take it through every phase (see the module doc).

    For callers that launch many VMs (:mod:`tdxvm.fleet`): ``labels`` go into the
    domain's tdxvm metadata at define time; ``define_lock`` is held around the define
    phase (volumes and port choice on one host, one VM at a time); ``login_check=False``
    skips the final SSH login where no sshd can answer (libvirt's test driver runs no
    guest) — the SSH host key is still attested; ``poll`` is the interval of the
    agent's readiness checks.
    """
    result = LaunchResult(name=spec.name, uri=conn.getURI())
    phases = _Phases(progress, result.timings)
    if manifest.luks is None:
        raise BringUpError("the image manifest names no disk key (luks.key_secret)", phase="define")
    # disk/<the volume's uuid> (the manifest refuses any other name), 64 bytes: refused before
    # defining anything if the key is not here
    volume_key = disk_secrets.load(manifest.luks.uuid, directory=secrets.directory)
    check_release_key(manifest, secrets)
    records = VmRecords.beside(secrets)
    labels = {**controller_label(secrets), **(labels or {})}  # whose VM it is (tdxvm.launch.ownership)
    if spec.model is not None:
        if manifest.service_port is None:
            raise BringUpError(
                f"model: image {manifest.name} serves no model (build it with profile: model-server)", phase="define"
            )
        if is_test_driver(conn.getURI()):
            raise BringUpError(
                "model: provisioning needs a running guest, and libvirt's test driver runs none", phase="define"
            )
        secrets.get(f"weights/{spec.model.key_name}")  # the model key too

    tunnel.prepare(result.uri)  # a host whose guests cannot be reached, or whose SSH refuses us: stop here
    vm_uuid = str(uuidlib.uuid4())
    try:
        return _bring_up(
            spec,
            manifest,
            conn,
            result=result,
            phases=phases,
            uuid=vm_uuid,
            volume_key=volume_key,
            records=records,
            trust=trust,
            secrets=secrets,
            boot_timeout=boot_timeout,
            ready_timeout=ready_timeout,
            labels=labels,
            define_lock=define_lock,
            login_check=login_check,
            poll=poll,
        )
    except Exception as exc:
        if is_alive(conn):
            raise
        lost = connection_lost(result.uri, spec.name, vm_uuid, phases.current, exc, records, stalled=stalled(conn))
        raise lost from None


def _bring_up(
    spec: VmSpec,
    manifest: ImageManifest,
    conn: libvirt.virConnect,
    *,
    result: LaunchResult,
    phases: _Phases,
    uuid: str,
    volume_key: bytes,
    records: VmRecords,
    trust: Trust,
    secrets: SecretStore,
    boot_timeout: float,
    ready_timeout: float,
    labels: dict[str, str] | None,
    define_lock: AbstractContextManager[Any] | None,
    login_check: bool,
    poll: float,
) -> LaunchResult:
    t = phases.begin("define")
    with define_lock if define_lock is not None else nullcontext():
        handle: DomainHandle = prepare_domain(spec, manifest, conn, labels=labels, uuid=uuid)
        try:
            records.put(_record(handle, manifest, trust))
        except BaseException:
            with contextlib.suppress(LaunchError):
                destroy(conn, spec.name)
            raise
    result.rtmr0 = handle.rtmr0.to_dict() if handle.rtmr0 else None
    pinned = "RTMR0 pinned" if handle.rtmr0 and handle.rtmr0.value else "RTMR0 not pinned"
    phases.end("define", t, f"{handle.backend}, {spec.vcpus} vCPU, {spec.memory_mib} MiB, {pinned}")

    t = phases.begin("boot")
    start(handle)
    result.agent = handle.agent  # on the host; the controller connects through `agent` (a tunnel for a remote host)
    try:
        agent = tunnel.reach(handle.uri, *handle.agent)
        where = "" if agent == handle.agent else f"{handle.agent[0]}:{handle.agent[1]} of {handle.uri} (through SSH)"
        _wait_for_agent(
            conn,
            spec.name,
            agent,
            needs="x25519",
            deadline=time.monotonic() + boot_timeout,
            phase="boot",
            poll=poll,
            where=where,
        )
        phases.end("boot", t, "the unlock step answers")
        t = phases.begin("quote")
        unlock = attest(conn, spec.name, agent, trust, handle.policy, require_keys=("x25519",), manifest=manifest)
    except handshake.AttestationRefused as refused:
        _refused(conn, handle, records, refused)
        raise
    except BaseException:
        _power_off(conn, spec.name)
        raise
    phases.end("quote", t, unlock.provider, seconds=unlock.timings["quote"])
    phases.end(
        "verify", 0.0, f"accepted, TCB {unlock.verdict.to_dict()['tcb_status']}", seconds=unlock.timings["verify"]
    )

    t = phases.begin("unlock")
    with unlock:
        unlock.release("disk", volume_key, sender=release_key(secrets))  # the initramfs maps the disk with it
    del volume_key
    phases.end("unlock", t)

    t = phases.begin("ready")
    try:
        _wait_for_agent(
            conn,
            spec.name,
            agent,
            needs="ssh-host",
            deadline=time.monotonic() + ready_timeout,
            phase="ready",
            poll=poll,
            where=where,
        )
        system = attest(
            conn, spec.name, agent, trust, handle.policy, require_keys=("x25519", "ssh-host"), manifest=manifest
        )
    except handshake.AttestationRefused as refused:
        _refused(conn, handle, records, refused)
        raise
    with system:
        record_attestation(handle.domain(), system.verdict.to_dict())
        result.verdict = system.verdict.to_dict()
        host_key = system.keys["ssh-host"]
    records.update(
        handle.uuid,
        ssh_host_key=base64.b64encode(host_key).decode(),
        attestation=kept_verdict(system.verdict.to_dict()),
    )
    ssh_forward = handle.forward(manifest.ssh_port)
    if ssh_forward is not None:
        result.ssh = (ssh_forward.host_address, ssh_forward.host_port)
        if login_check:
            address = tunnel.reach(handle.uri, *result.ssh)
            client = _ssh_until(address, host_key, secrets, deadline=time.monotonic() + ready_timeout)
            with client:
                ssh.run(client, "true")
    if manifest.service_port and (fwd := handle.forward(manifest.service_port)) is not None:
        result.service = (fwd.host_address, fwd.host_port)
    result.ssh_host_key = base64.b64encode(host_key).decode()
    phases.end("ready", t, f"ssh {result.ssh[0]}:{result.ssh[1]}" if result.ssh else "")
    if spec.model is not None:
        t = phases.begin("provision")
        served = provision(conn, spec.name, spec.model, trust=trust, secrets=secrets)
        result.provision = served.to_dict()
        phases.end("provision", t, f"{served.model} at {served.url}")
    return result


def connection_lost(
    uri: str,
    name: str,
    uuid: str,
    phase: str,
    cause: BaseException,
    records: VmRecords,
    *,
    stalled: LibvirtHostStalled | None = None,
) -> LibvirtConnectionLost:
    """The error for a launch whose libvirt connection ended during ``phase``, after
    undoing what a fresh connection can reach: a VM caught in ``define`` is removed whole
    (domain, volumes, record), a later one powered off as any failed launch is; a domain
    of that name that is not this launch's (``uuid``) is not touched. ``stalled``: the
    connection's keepalive closed it (the host stopped answering), so it is that error."""
    why = libvirt_message(cause) if isinstance(cause, libvirt.libvirtError) else str(cause).splitlines()[0]
    try:
        fresh = open_connection(uri)
    except LaunchError as exc:
        left = (
            f"the host does not answer now ({str(exc).splitlines()[0]}), so VM {name} may still be on it: "
            f"`tdxvm destroy {name} --uri {uri}` removes it once the host answers"
        )
    else:
        try:
            left = _undo(fresh, name, uuid, phase, records)
        finally:
            close(fresh)
    if stalled is not None:
        return LibvirtHostStalled(
            f"libvirt at {uri} stopped answering during {phase} ({str(stalled).splitlines()[0].partition(': ')[2]}); "
            f"{left}\nfix: check the host and its network (`virsh -c {uri} list --all`), then launch again"
        )
    return LibvirtConnectionLost(
        f"lost the connection to libvirt at {uri} during {phase} ({why}): the host's libvirtd restarted or the SSH "
        f"session to it ended; {left}\nfix: check the host (`virsh -c {uri} list --all`), then launch again"
    )


def _undo(conn: libvirt.virConnect, name: str, uuid: str, phase: str, records: VmRecords) -> str:
    """Undo a launch on a fresh connection (see :func:`connection_lost`); what is left, in words."""
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        swept = sweep_vm_volumes(conn, name)
        records.delete(uuid)
        return "nothing of VM " + name + " is left on the host" + (f" ({len(swept)} volumes removed)" if swept else "")
    try:
        ours = dom.UUIDString() == uuid
    except libvirt.libvirtError:
        ours = False
    if not ours:
        return f"a domain named {name} that this launch did not define is there; it was not touched"
    if phase == "define":
        try:
            destroy(conn, name, records=records)
        except LaunchError as exc:
            return f"VM {name} could not be removed ({str(exc).splitlines()[0]}): `tdxvm destroy {name}` removes it"
        return f"the VM it was defining ({name}) was removed, volumes and record too"
    _power_off(conn, name)
    return f"VM {name} is defined and powered off (its serial log kept): `tdxvm destroy {name}` removes it"


def _ssh_until(address: tuple[str, int], host_key: bytes, secrets: SecretStore, *, deadline: float) -> Any:
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            return ssh.connect(address, host_key=host_key, client_key=controller_key(secrets), timeout=30)
        except ssh.HostKeyMismatch:
            raise
        except ssh.SshError as exc:
            last = exc
            time.sleep(1.0)
    raise BringUpTimeout(f"no SSH login within the time allowed ({last})", phase="ready")


def _refused(
    conn: libvirt.virConnect, handle: DomainHandle, records: VmRecords, refused: handshake.AttestationRefused
) -> None:
    """A refused quote: nothing was released; the VM is powered off and the verdict kept."""
    _power_off(conn, handle.name)
    if refused.verdict is not None:
        verdict = refused_verdict(refused)
        with contextlib.suppress(LaunchError, libvirt.libvirtError):
            record_attestation(handle.domain(), verdict)
        records.update(handle.uuid, attestation=kept_verdict(verdict))
