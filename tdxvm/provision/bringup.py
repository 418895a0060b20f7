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
import hashlib
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt

from tdxvm.image.secrets import keyslot_passphrase
from tdxvm.launch.connection import is_test_driver
from tdxvm.launch.console import read_host_file, serial_log_tail
from tdxvm.launch.errors import ConsoleError, LaunchError
from tdxvm.launch.lifecycle import DomainHandle, lookup, prepare_domain, record_attestation, start
from tdxvm.launch.manifest import ImageManifest, load_manifest
from tdxvm.launch.spec import VmSpec
from tdxvm.launch.volumes import content_name
from tdxvm.provision import handshake, ssh
from tdxvm.provision.trust import Trust, for_backend
from tdxvm.secretstore import SecretStore
from tdxvm.sshkey import controller_key
import contextlib

PHASES = ("define", "boot", "quote", "verify", "unlock", "ready")
BOOT_TIMEOUT = 300.0  # seconds until the initramfs answers (TCG boots are slow)
READY_TIMEOUT = 300.0


class BringUpError(Exception):
    """The guest did not come up: which phase, why, and its serial log's tail."""

    code = "bring-up"

    def __init__(self, message: str, *, phase: str, serial_tail: str = "") -> None:
        self.phase, self.serial_tail = phase, serial_tail
        tail = f"\nlast lines of the serial console:\n{serial_tail}" if serial_tail else ""
        super().__init__(f"{phase}: {message}{tail}")


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

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "uri": self.uri, "state": "serving" if self.provision else "ready",
                "timings": {k: round(v, 3) for k, v in self.timings.items()},
                "ssh": f"{self.ssh[0]}:{self.ssh[1]}" if self.ssh else None,
                "agent": f"{self.agent[0]}:{self.agent[1]}" if self.agent else None,
                "service": f"{self.service[0]}:{self.service[1]}" if self.service else None,
                "ssh_host_key": self.ssh_host_key, "attestation": self.verdict, "provision": self.provision}  # fmt: skip


Progress = Callable[[PhaseEvent], None]


def _quiet(_: PhaseEvent) -> None:
    pass


class _Phases:
    def __init__(self, progress: Progress, timings: dict[str, float]) -> None:
        self.progress, self.timings = progress, timings

    def begin(self, phase: str) -> float:
        self.progress(PhaseEvent(phase, "start"))
        return time.monotonic()

    def end(self, phase: str, started: float, detail: str = "", seconds: float | None = None) -> None:
        took = time.monotonic() - started if seconds is None else seconds
        self.timings[phase] = took
        self.progress(PhaseEvent(phase, "done", took, detail))


def _wait_for_agent(conn: libvirt.virConnect, name: str, address: tuple[str, int], *, needs: str, deadline: float,
                    phase: str, poll: float = 1.0) -> None:  # fmt: skip
    """Until the agent at ``address`` answers and would bind ``needs`` (the initramfs'
    unlock step binds only x25519; the booted system's agent also its SSH host key)."""
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
    raise BringUpError(f"the guest agent at {address[0]}:{address[1]} did not answer in time ({last})", phase=phase,
                       serial_tail=_tail(conn, name))  # fmt: skip


def attest(conn: libvirt.virConnect, name: str, address: tuple[str, int], trust: Trust, policy: Any, *,
           require_keys: tuple[str, ...], manifest: ImageManifest | None = None) -> handshake.AttestedGuest:  # fmt: skip
    """One attestation of the running domain ``name`` (emulated: with its quote service up).

    On libvirt's test driver (``test:///``), which keeps no file contents and runs no
    guest, the emulated quote service reads what the domain boots from ``manifest``'s
    local artifacts (checked against their hashes), and the guest's agent runs on this
    machine, so it is sent the service's loopback address. Every other URI reads the
    files through libvirt as the host has them.
    """
    uri = conn.getURI()
    xml = conn.lookupByName(name).XMLDesc()
    test_host = is_test_driver(uri)
    if test_host and manifest is not None:
        read = _test_driver_reader(manifest)
    else:
        read = lambda path: read_host_file(conn, path)  # noqa: E731
    with trust.quote_service(xml, read, guest_on_host=test_host) as qgs:
        return handshake.attest_guest(address, collateral=trust.collateral, policy=policy, trust_anchor=trust.trust_anchor,
                                      qgs_address=qgs, timeout=120, require_keys=require_keys)  # fmt: skip


def _test_driver_reader(manifest: ImageManifest) -> Callable[[str], bytes]:
    """For ``test:///`` hosts only: the domain's kernel, initrd and firmware paths mapped to
    the manifest's local files (volumes are named by the artifact's SHA-256; each file is
    checked against it before it is measured)."""
    by_name = {content_name(role, a.sha256): a for role, a in (("kernel", manifest.kernel), ("initrd", manifest.initrd),
                                                               ("disk", manifest.disk))}  # fmt: skip

    def read(path: str) -> bytes:
        artifact = by_name.get(path.rpartition("/")[2])
        if artifact is not None:
            try:
                data = artifact.path.read_bytes()
            except OSError as exc:
                raise ConsoleError(f"{artifact.path}: {exc.strerror or exc}") from None
            if hashlib.sha256(data).hexdigest() != artifact.sha256:
                raise ConsoleError(f"{artifact.path} differs from its manifest {manifest.path} (sha256)")
            return data
        if manifest.firmware_path is not None and path == manifest.firmware_path:
            data = Path(path).read_bytes()
            if manifest.firmware_sha256 is not None and hashlib.sha256(data).hexdigest() != manifest.firmware_sha256:
                raise ConsoleError(f"firmware {path} differs from its manifest {manifest.path} (sha256)")
            return data
        raise ConsoleError(f"{path} is not an artifact of image manifest {manifest.path} (test driver host)")

    return read


def _tail(conn: libvirt.virConnect, name: str) -> str:
    try:
        return serial_log_tail(conn, name, lines=20)
    except LaunchError:
        return ""


def _power_off(conn: libvirt.virConnect, name: str) -> None:
    try:
        dom = conn.lookupByName(name)
        if dom.isActive():
            dom.destroy()
    except libvirt.libvirtError:
        pass


def bring_up(spec: VmSpec, manifest: ImageManifest, conn: libvirt.virConnect, *, trust: Trust,
             secrets: SecretStore, progress: Progress = _quiet, boot_timeout: float = BOOT_TIMEOUT,
             ready_timeout: float = READY_TIMEOUT, labels: dict[str, str] | None = None,
             define_lock: AbstractContextManager[Any] | None = None, login_check: bool = True,
             poll: float = 1.0) -> LaunchResult:  # fmt: skip
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
    disk_secret = manifest.raw.get("luks", {}).get("key_secret")
    if not disk_secret:
        raise BringUpError("the image manifest names no disk key (luks.key_secret)", phase="define")
    volume_key = secrets.get(disk_secret)  # refuse before defining anything if the key is not here
    if spec.model is not None:
        if manifest.service_port is None:
            raise BringUpError(f"model: image {manifest.name} serves no model (build it with profile: model-server)", phase="define")
        if is_test_driver(conn.getURI()):
            raise BringUpError("model: provisioning needs a running guest, and libvirt's test driver runs none", phase="define")
        secrets.get(f"weights/{spec.model.key_name}")  # the model key too

    t = phases.begin("define")
    with define_lock if define_lock is not None else nullcontext():
        handle: DomainHandle = prepare_domain(spec, manifest, conn, labels=labels)
    phases.end("define", t, f"{handle.backend}, {spec.vcpus} vCPU, {spec.memory_mib} MiB")

    t = phases.begin("boot")
    start(handle)
    agent = handle.agent
    result.agent = agent
    try:
        _wait_for_agent(conn, spec.name, agent, needs="x25519", deadline=time.monotonic() + boot_timeout, phase="boot",
                        poll=poll)  # fmt: skip
        phases.end("boot", t, "the unlock step answers")
        t = phases.begin("quote")
        unlock = attest(conn, spec.name, agent, trust, handle.policy, require_keys=("x25519",), manifest=manifest)
    except handshake.AttestationRefused as refused:
        _refused(conn, spec.name, refused)
        raise
    except BaseException:
        _power_off(conn, spec.name)
        raise
    phases.end("quote", t, unlock.provider, seconds=unlock.timings["quote"])
    phases.end("verify", 0.0, f"accepted, TCB {unlock.verdict.to_dict()['tcb_status']}", seconds=unlock.timings["verify"])

    t = phases.begin("unlock")
    with unlock:
        unlock.release("disk", keyslot_passphrase(volume_key))
    del volume_key
    phases.end("unlock", t)

    t = phases.begin("ready")
    try:
        _wait_for_agent(conn, spec.name, agent, needs="ssh-host", deadline=time.monotonic() + ready_timeout, phase="ready",
                        poll=poll)  # fmt: skip
        system = attest(conn, spec.name, agent, trust, handle.policy, require_keys=("x25519", "ssh-host"),
                        manifest=manifest)  # fmt: skip
    except handshake.AttestationRefused as refused:
        _refused(conn, spec.name, refused)
        raise
    with system:
        record_attestation(handle.domain(), system.verdict.to_dict())
        result.verdict = system.verdict.to_dict()
        host_key = system.keys["ssh-host"]
    ssh_forward = handle.forward(manifest.ssh_port)
    if ssh_forward is not None:
        result.ssh = (ssh_forward.host_address, ssh_forward.host_port)
        if login_check:
            client = _ssh_until(result.ssh, host_key, secrets, deadline=time.monotonic() + ready_timeout)
            with client:
                ssh.run(client, "true")
    if manifest.service_port and (fwd := handle.forward(manifest.service_port)) is not None:
        result.service = (fwd.host_address, fwd.host_port)
    result.ssh_host_key = base64.b64encode(host_key).decode()
    phases.end("ready", t, f"ssh {result.ssh[0]}:{result.ssh[1]}" if result.ssh else "")
    if spec.model is not None:
        from tdxvm.provision.model import provision  # it builds on this module (reattest)

        t = phases.begin("provision")
        served = provision(conn, spec.name, spec.model, trust=trust, secrets=secrets)
        result.provision = served.to_dict()
        phases.end("provision", t, f"{served.model} at {served.url}")
    return result


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
    raise BringUpError(f"no SSH login within the time allowed ({last})", phase="ready")


def _refused(conn: libvirt.virConnect, name: str, refused: handshake.AttestationRefused) -> None:
    """A refused quote: nothing was released; the VM is powered off and the verdict kept."""
    _power_off(conn, name)
    if refused.verdict is not None:
        with contextlib.suppress(LaunchError, libvirt.libvirtError):
            record_attestation(lookup(conn, name)[0], refused.verdict.to_dict() | {"reasons": [
                {"code": r.code, "message": r.message} for r in refused.reasons]})


def launch(spec: VmSpec, *, output: str = "text", secrets: SecretStore | None = None, trust: Trust | None = None) -> int:
    """The ``tdxvm launch VM.yaml`` command (``cli/vm.py`` calls it): returns the exit code."""
    import sys

    import click

    from tdxvm.cli.output import EXIT_REFUSED, emit_json
    from tdxvm.launch.connection import connection
    from tdxvm.provision.endpoint import EndpointRefused

    manifest = load_manifest(spec.image)
    trust = trust or for_backend(spec.backend)
    show = output == "text"

    def progress(event: PhaseEvent) -> None:
        if not show:
            return
        if event.status == "start":
            if sys.stderr.isatty():
                click.echo(f"  {event.phase:<7} ...", err=True, nl=False)
            return
        line = f"  {event.phase:<7} {event.seconds:6.1f} s" + (f"  {event.detail}" if event.detail else "")
        click.echo(("\r" if sys.stderr.isatty() else "") + line, err=True)

    with connection(spec.uri) as conn:
        try:
            result = bring_up(spec, manifest, conn, trust=trust, secrets=secrets or SecretStore(), progress=progress)
        except handshake.AttestationRefused as refused:
            _report_refused(spec.name, "refused", f"{spec.name} did not attest; nothing was released and the VM is stopped",
                            refused.reasons, output)  # fmt: skip
            return EXIT_REFUSED
        except EndpointRefused as refused:  # the model's service, attested on its TLS key after provisioning
            _report_refused(spec.name, "service-refused", f"the service of {spec.name} did not attest on its TLS key; "
                            "do not send it prompts", refused.reasons, output)  # fmt: skip
            return EXIT_REFUSED
    if output == "json":
        emit_json(result.to_dict())
    else:
        click.echo(f"{spec.name} is ready: attested ({result.verdict['tcb_status'] if result.verdict else '?'}), "
                   f"disk unlocked, ssh root@{result.ssh[0]} -p {result.ssh[1]}" if result.ssh else f"{spec.name} is ready")  # fmt: skip
        if result.provision:
            click.echo(f"{spec.name} serves {result.provision['model']} at {result.provision['url']} (TLS key attested); "
                       f"try: tdxvm verify-endpoint --vm {spec.name} --complete 'Once upon a time'")  # fmt: skip
    return 0


def _report_refused(name: str, state: str, message: str, reasons: Any, output: str) -> None:
    import click

    from tdxvm.cli.output import emit_json

    if output == "json":
        emit_json({"name": name, "state": state, "reasons": [{"code": r.code, "message": r.message} for r in reasons]})
        return
    click.echo(f"refused: {message}", err=True)
    for r in reasons:
        click.echo(f"  - [{r.code}] {r.message}", err=True)


def reattest(conn: libvirt.virConnect, name: str, *, trust: Trust | None = None) -> handshake.AttestedGuest:
    """``tdxvm attest NAME``: attest the running guest again with a fresh nonce, against the
    policy it was launched with; the verdict goes into its metadata either way."""
    from tdxvm.launch.lifecycle import status

    vm = status(conn, name)[0]
    if vm.state != "running":
        raise BringUpError(f"{name} is {vm.state}, not running", phase="attest")
    if vm.agent_port is None or vm.policy is None:
        raise BringUpError(f"{name}'s metadata names no agent port or policy (not launched by this tdxvm?)", phase="attest")
    fwd = vm.forward(vm.agent_port)
    if fwd is None:
        raise BringUpError(f"{name} has no forward to its agent port {vm.agent_port}", phase="attest")
    address = (fwd.host_address, fwd.host_port)
    trust = trust or for_backend(vm.backend)
    dom = conn.lookupByName(name)
    try:
        guest = attest(conn, name, address, trust, vm.policy, require_keys=("x25519", "ssh-host"))
    except handshake.AttestationRefused as refused:
        if refused.verdict is not None:
            record_attestation(dom, refused.verdict.to_dict())
        raise
    record_attestation(dom, guest.verdict.to_dict())
    return guest
