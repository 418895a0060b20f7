"""``tdxvm provision``: the encrypted model into an attested guest, its key, the service.

For a running VM launched by tdxvm from a ``model-server`` image:

1. attest: a fresh quote over a fresh nonce, the guest's X25519 key and its SSH host
   key, checked against the policy the VM was launched with, as the controller's own
   record of it keeps it (:func:`attestation.reattest`; never what libvirt's metadata says);
2. release the service's API key set (the hashes of the keys the spec's ``api_keys``
   name, :mod:`tdxvm.provision.apikeys`) and the model key (secret store
   ``weights/<name>``) sealed to that attested X25519 key: the guest agent keeps them in
   ``/run/tdxvm/secrets/api-keys`` and ``.../model-<upload id prefix>``, in TD memory;
   the key set goes on every run, so a running service takes a new one without a restart;
3. SSH in, with only the attested host key accepted, and upload the encrypted folder
   (:mod:`tdxvm.provision.transfer`: the bulk bytes on plain TCP through the VM's
   forward to the receiver port, else on ``direct-tcpip`` channels of that SSH
   session); an interrupted upload resumes from what the guest verified, and is
   retried here a few times before giving up;
4. in the guest, decrypt and authenticate all or nothing into the service's model
   folder (:mod:`tdxvm.guest.install`), then (re)start ``tdxvm-serve``;
5. attest the service itself as a client would (:func:`verify_endpoint`: a quote that
   binds its TLS key, checked against the same policy) once it answers, and require its
   RTMR3 event log to replay to the quote and its latest model event to name the model
   digest of these weights (recorded at encryption in their index): the service
   measured exactly this model. The digest goes into the VM's record, for
   ``verify-endpoint --vm`` and ``status``.

Provisioning the weights already installed skips 2–4 (the guest records the upload id).
Emulated VMs get their service's quotes from a per-VM emulated quote daemon on this
machine (:meth:`Trust.ensure_quote_daemon <tdxvm.provision.trust.Trust.ensure_quote_daemon>`).
"""

from __future__ import annotations

import contextlib
import json
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import libvirt
import requests

from tdxvm.errors import TdxvmError, Unreachable
from tdxvm.guest.apikeys import SECRET_NAME as API_KEYS_SECRET
from tdxvm.guest.apikeys import ApiKeysError
from tdxvm.guest.install import key_secret_name
from tdxvm.guest.modeldigest import show
from tdxvm.guest.transferwire import WireError, build_manifest
from tdxvm.guest.weights import WeightsError, model_digest, read_index
from tdxvm.launch import tunnel
from tdxvm.launch.lifecycle import lookup, set_labels
from tdxvm.launch.records import VmRecord, VmRecords
from tdxvm.launch.spec import ModelRef
from tdxvm.provision import apikeys, attestation, ssh, transfer
from tdxvm.provision.endpoint import AttestedEndpoint, EndpointError, EndpointRefused, verify_endpoint
from tdxvm.provision.trust import Trust
from tdxvm.releasekey import release_key
from tdxvm.secretstore import SecretStore
from tdxvm.sshkey import controller_key

GUEST_PYTHON = ("env", "PYTHONPATH=/usr/lib/tdxvm/python", "python3")
SERVICE_UNIT = "tdxvm-serve.service"
UPLOAD_TRIES = 3
SERVICE_TIMEOUT = 900.0  # loading torch and the model in a TCG guest takes minutes
SCRATCH_TIMEOUT = 3600.0  # the guest formats its scratch disk at boot: about a minute per GiB under TCG

Progress = Callable[[str, dict[str, Any]], None]  # (phase, details): "attest", "upload", "install", "service"


class ProvisionError(TdxvmError):
    """Provisioning stopped; ``phase`` says where, the message says why."""

    code = "provision"

    def __init__(self, message: str, *, phase: str, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.phase = phase


class ProvisionUnreachable(ProvisionError, Unreachable):
    """The guest or its service did not answer in time (exit 3)."""


@dataclass
class ProvisionResult:
    name: str
    model: str
    model_digest: str | None = None  # sha256:<hex>, what the service's RTMR3 model event names
    api_keys: list[str] = field(default_factory=list)  # names of the keys the service accepts (secrets api-keys/NAME)
    upload: dict[str, Any] | None = None  # TransferReport.to_dict(); None when already installed
    install: dict[str, Any] | None = None
    endpoint: dict[str, Any] | None = None  # AttestedEndpoint.to_dict()
    url: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    # what the verdicts of the agent and the service accepted beyond strict (loosening, cached collateral)
    policy_exceptions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model,
            "model_digest": self.model_digest,
            "api_keys": self.api_keys,
            "url": self.url,
            "upload": self.upload,
            "install": self.install,
            "endpoint": self.endpoint,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "policy_exceptions": self.policy_exceptions,
        }


def _quiet(_phase: str, _details: dict[str, Any]) -> None:
    pass


def _forward(vm: VmRecord, guest_port: int | None) -> tuple[str, int] | None:
    f = vm.forward(guest_port)
    return (f.host_address, f.host_port) if f else None


def _guest_json(client: Any, args: list[str], *, phase: str, timeout: float) -> dict[str, Any]:
    command = shlex.join([*GUEST_PYTHON, "-m", "tdxvm.guest.install", *args])
    _, stdout, stderr = client.exec_command(command, timeout=timeout)
    out = stdout.read().decode(errors="replace").strip()
    code = stdout.channel.recv_exit_status()
    try:
        doc = json.loads(out.splitlines()[-1]) if out else {}
    except (ValueError, RecursionError):  # RecursionError: absurd nesting
        doc = {}
    if code != 0 or not doc.get("ok"):
        err = doc.get("error") or stderr.read().decode(errors="replace").strip()[-1500:] or out[-500:]
        raise ProvisionError(
            f"guest install step failed (exit {code}): {err}", phase=phase, code=doc.get("code") or "guest"
        )
    return doc


def _active(client: Any) -> bool:
    try:
        return ssh.run(client, f"systemctl is-active {SERVICE_UNIT}", timeout=30).strip() == "active"
    except ssh.SshError:
        return False


def _journal(client: Any, lines: int = 25) -> str:
    try:
        return ssh.run(client, f"journalctl -u {SERVICE_UNIT} -n {lines} --no-pager -o cat", timeout=30).strip()
    except (ssh.SshError, OSError) as exc:
        return f"(journal unavailable: {exc})"


def _url(address: tuple[str, int]) -> str:
    host, port = address
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def _service_forward(vm: VmRecord) -> tuple[str, int]:
    fwd = _forward(vm, vm.service_port)
    if fwd is None:
        raise ProvisionError(
            f"{vm.name} forwards no service port (is its image a model-server profile?)",
            phase="check",
            code="no-service",
        )
    return fwd


def service_url(vm: VmRecord) -> str:
    """The service's URL for clients: its forward as the host publishes it
    (:func:`tunnel.published`), what the record and ``status`` show."""
    return _url(tunnel.published(vm.uri, *_service_forward(vm)))


def controller_service_url(vm: VmRecord) -> str:
    """Where this controller reaches the service: :func:`service_url` on a local host, a
    tunnel through the host's SSH on a ``qemu+ssh://`` one (:func:`tunnel.reach`)."""
    return _url(tunnel.reach(vm.uri, *_service_forward(vm)))


def checked_service_url(vm: VmRecord) -> str:
    """Where ``verify-endpoint --vm`` checks the service as its clients reach it: the
    published URL, except that a service the host publishes on its own loopback (which
    only the host reaches) is checked through the host's SSH (:func:`tunnel.reach`)."""
    host, _ = _service_forward(vm)
    return controller_service_url(vm) if tunnel.is_loopback(host) else service_url(vm)


def recorded_digest(vm: VmRecord) -> bytes | None:
    """The model digest the controller recorded when it provisioned ``vm`` (None: none recorded)."""
    text = (vm.model or {}).get("digest")
    return bytes.fromhex(text.removeprefix("sha256:")) if text else None


def attest_service(
    vm: VmRecord, trust: Trust, *, timeout: float = 30.0, model_digest: bytes | None = None
) -> AttestedEndpoint:
    """The VM's inference endpoint, attested against the policy it was launched with (its record's),
    serving the model ``model_digest`` names if given."""
    return verify_endpoint(
        controller_service_url(vm),
        collateral=trust.collateral,
        policy=vm.policy,
        trust_anchor=trust.trust_anchor,
        timeout=timeout,
        model_digest=model_digest,
    )


def wait_for_service(
    vm: VmRecord, trust: Trust, *, deadline: float, poll: float = 2.0, model_digest: bytes | None = None
) -> AttestedEndpoint:
    """Attest the endpoint and wait until it reports the model loaded (``/health`` 200)."""
    last: Exception | str = "no answer yet"
    while time.monotonic() < deadline:
        try:
            endpoint = attest_service(vm, trust, timeout=30.0, model_digest=model_digest)
        except EndpointRefused:
            raise
        except EndpointError as exc:
            last = exc
            time.sleep(poll)
            continue
        with endpoint.session(timeout=(10, 30)) as session:
            while time.monotonic() < deadline:
                try:
                    r = session.get(f"{endpoint.url}/health")
                except requests.RequestException as exc:  # the service restarting under us: attest it again
                    last = exc
                    break
                if r.status_code == 200:
                    return endpoint
                last = f"/health {r.status_code}: {r.text[:200]}"
                time.sleep(poll)
    raise ProvisionUnreachable(
        f"the service of {vm.name} did not become ready in time ({last})", phase="service", code="timeout"
    )


def _upload(
    enc_dir: Path, client: Any, vm: VmRecord, progress: Progress, *, via: str | None, streams: int
) -> transfer.TransferReport:
    fwd = _forward(vm, transfer.GUEST_PORT)
    chosen = via or ("tcp" if fwd else "ssh")
    if chosen == "tcp" and fwd is None:
        raise ProvisionError(
            f"{vm.name} has no forward to the receiver port {transfer.GUEST_PORT}; use via ssh",
            phase="upload",
            code="no-forward",
        )
    kwargs: dict[str, Any] = (  # a remote host's forward through its SSH (tunnel.reach), streams and all
        {"guest_address": tunnel.reach(vm.uri, *fwd), "listen": f"0.0.0.0:{transfer.GUEST_PORT}"}
        if chosen == "tcp" and fwd is not None
        else {"guest_address": None}
    )
    started = time.monotonic()

    def report(held: int, total: int) -> None:
        progress("upload", {"held": held, "total": total, "seconds": time.monotonic() - started})

    last: transfer.TransferError | None = None
    for attempt in range(1, UPLOAD_TRIES + 1):
        try:
            return transfer.upload(
                enc_dir, ssh_client=client, via=chosen, streams=streams, python=GUEST_PYTHON, progress=report, **kwargs
            )
        except transfer.TransferError as exc:
            if exc.code in ("bad-folder", "changed"):  # this machine's folder: a retry cannot help
                raise
            last = exc
            progress("retry", {"attempt": attempt, "error": str(exc)})
            time.sleep(1.0)
    assert last is not None
    raise last


def provision(
    conn: libvirt.virConnect,
    name: str,
    model: ModelRef,
    *,
    trust: Trust | None = None,
    secrets: SecretStore | None = None,
    progress: Progress = _quiet,
    via: str | None = None,
    streams: int = transfer.DEFAULT_STREAMS,
    service_timeout: float = SERVICE_TIMEOUT,
) -> ProvisionResult:
    """Provision ``model`` into the running VM ``name``; see the module doc."""
    secrets = secrets or SecretStore()
    records = VmRecords.beside(secrets)
    result = ProvisionResult(name=name, model=model.served_name, api_keys=list(model.api_key_names))
    vm, trust = attestation.trusted_vm(
        conn, name, records, trust=trust
    )  # policy, backend, forwards: the controller's own
    if not lookup(conn, name)[0].isActive():
        raise ProvisionError(f"{name} is not running", phase="check", code="not-running")
    url = service_url(vm)
    ssh_addr = _forward(vm, vm.ssh_port)
    if ssh_addr is None:
        raise ProvisionError(f"{name} forwards no SSH port", phase="check", code="no-ssh")
    key = secrets.get(f"weights/{model.key_name}")  # refuse before anything is sent if the key is not here
    try:  # hashes only; a missing name is refused here, before anything is sent
        api_key_set, made = apikeys.release_set(secrets, model.api_key_names)
    except ApiKeysError as exc:
        raise ProvisionError(str(exc), phase="check", code="api-keys") from None
    if made:
        progress("api-keys", {"made": made, "store": str(secrets.directory)})
    try:  # the key opens this folder's index, and the folder is a model: checked before anything is sent
        entries = read_index(model.path, key)
        files, expected = [e.path for e in entries], model_digest(entries)
        upload_id = build_manifest(model.path).upload_id
    except (WeightsError, WireError) as exc:
        raise ProvisionError(f"{exc} (key weights/{model.key_name})", phase="check", code="bad-folder") from None
    except OSError as exc:
        raise ProvisionError(f"{model.path}: {exc.strerror or exc}", phase="check", code="bad-folder") from None
    if "config.json" not in files:
        raise ProvisionError(
            f"{model.path}: the encrypted model has no config.json (not a Hugging Face model folder)",
            phase="check",
            code="bad-folder",
        )
    # emulated: the quote daemon of this boot of the domain (its RTMR3 is this boot's); TDX: None, the guest's own
    qgs = trust.ensure_quote_daemon(conn.getURI(), vm.uuid, boot_id=lookup(conn, name)[0].ID())

    t = time.monotonic()
    progress("attest", {})
    guest = attestation.reattest(conn, name, records=records, trust=trust)
    result.timings["attest"] = time.monotonic() - t
    result.policy_exceptions = guest.verdict.exceptions()
    with (
        guest,
        contextlib.closing(
            ssh.connect(
                tunnel.reach(vm.uri, *ssh_addr), host_key=guest.keys["ssh-host"], client_key=controller_key(secrets)
            )
        ) as client,
    ):
        # every run: the service reads the set again when it changes, so this rotates keys without a restart
        guest.release(API_KEYS_SECRET, api_key_set, sender=release_key(secrets))  # /run/tdxvm/secrets/api-keys
        serve_args = ["--name", model.served_name, "--dtype", model.dtype]
        serve_args += ["--threads", str(model.threads)] if model.threads else []
        serve_args += ["--max-batch", str(model.max_batch)] if model.max_batch else []
        serve_args += ["--kv-cache-mib", str(model.kv_cache_mib)] if model.kv_cache_mib else []
        serve_args += ["--qgs", qgs] if qgs else []
        progress("scratch", {})  # the guest's install waits until its scratch disk is formatted and mounted
        installed = _guest_json(client, ["--check", upload_id], phase="install", timeout=SCRATCH_TIMEOUT)["installed"]
        if installed:
            progress("install", {"skipped": True})
            result.install = _guest_json(client, serve_args, phase="install", timeout=120) | {"skipped": True}
        else:
            guest.release(
                key_secret_name(upload_id), key, sender=release_key(secrets)
            )  # /run/tdxvm/secrets/model-<upload id prefix>
            t = time.monotonic()
            report = _upload(model.path, client, vm, progress, via=via, streams=streams)
            result.upload = report.to_dict()
            result.timings["upload"] = time.monotonic() - t
            t = time.monotonic()
            progress("install", {})
            result.install = _guest_json(
                client,
                ["--upload", report.remote_path, *serve_args],
                phase="install",
                timeout=600 + report.total_bytes / 20e6,
            )
            result.timings["install"] = time.monotonic() - t
        del key
        t = time.monotonic()
        installed_now = result.install
        restart = not (installed_now.get("skipped") and not installed_now.get("changed") and _active(client))
        progress("service", {"url": url, "restart": restart})
        try:
            if restart:
                ssh.run(client, f"systemctl restart {SERVICE_UNIT}", timeout=120)
            endpoint = wait_for_service(vm, trust, deadline=time.monotonic() + service_timeout, model_digest=expected)
        except (ssh.SshError, ProvisionError) as exc:
            kind = ProvisionUnreachable if isinstance(exc, Unreachable) else ProvisionError
            raise kind(
                f"{SERVICE_UNIT} did not come up: {exc}; its log:\n{_journal(client)}", phase="service", code=exc.code
            ) from None
    result.timings["service"] = time.monotonic() - t
    # what clients use is the published URL; the endpoint was attested where this controller reaches it
    result.endpoint, result.url, result.model_digest = {**endpoint.to_dict(), "url": url}, url, show(expected)
    result.policy_exceptions = list(dict.fromkeys([*result.policy_exceptions, *endpoint.verdict.exceptions()]))
    at = datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    served = {
        "name": model.served_name,
        "url": url,
        "tls_spki_sha256": endpoint.tls_spki_sha256,
        "at": at,
        "digest": show(expected),
        "dtype": model.dtype,
        "api_keys": list(model.api_key_names),
    }
    records.update(vm.uuid, model=served)
    set_labels(
        conn.lookupByUUIDString(vm.uuid),
        {
            "model": model.served_name,
            "model_url": url,  # display copy
            "model_tls_spki": endpoint.tls_spki_sha256,
            "model_at": at,
            "model_digest": show(expected),
        },
    )
    return result
