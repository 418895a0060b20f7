"""One attestation of a running guest, and the controller's record it is checked against.

:func:`attest` asks the guest's agent for a quote over a fresh nonce (with the emulated
quote service up for an emulated guest) and checks it against a trust and a policy;
:func:`trusted_vm` is the controller's own record of a VM (checked against what libvirt
says of it) with the trust it was launched under; :func:`reattest` (``tdxvm attest``)
attests a running VM again under that record. :mod:`tdxvm.provision.bringup` (the
launch) and :mod:`tdxvm.provision.model` (provisioning) both build on this module.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import libvirt

from tdxvm.attest.policy import Policy
from tdxvm.errors import TdxvmError, Unreachable
from tdxvm.launch import tunnel
from tdxvm.launch.connection import is_test_driver
from tdxvm.launch.console import read_host_file
from tdxvm.launch.errors import ConsoleError
from tdxvm.launch.lifecycle import lookup, record_attestation
from tdxvm.launch.manifest import ImageManifest, load_manifest
from tdxvm.launch.metadata import ATTESTATION_KEYS, port_number
from tdxvm.launch.records import RecordMismatch, VmRecord, VmRecords
from tdxvm.launch.rtmr0pin import running_machine
from tdxvm.launch.volumes import content_name
from tdxvm.provision import handshake
from tdxvm.provision.trust import Trust, for_backend


class BringUpError(TdxvmError):
    """The guest did not come up: which phase, why, and its serial log's tail."""

    code = "bring-up"

    def __init__(self, message: str, *, phase: str, serial_tail: str = "") -> None:
        self.phase, self.serial_tail = phase, serial_tail
        tail = f"\nlast lines of the serial console:\n{serial_tail}" if serial_tail else ""
        super().__init__(f"{phase}: {message}{tail}")


class BringUpTimeout(BringUpError, Unreachable):
    """The guest's agent or its SSH did not answer within the time allowed (exit 3)."""


def attest(
    conn: libvirt.virConnect,
    name: str,
    address: tuple[str, int],
    trust: Trust,
    policy: Any,
    *,
    require_keys: tuple[str, ...],
    manifest: ImageManifest | None = None,
) -> handshake.AttestedGuest:
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
    emulated = trust.backend == "emulated"  # only an emulated TD's quote service reads the QEMU the host runs
    argv, qemu = running_machine(conn, name) if emulated else (None, None)
    with trust.quote_service(xml, read, guest_on_host=test_host, argv=argv, qemu=qemu, uri=uri) as qgs:
        return handshake.attest_guest(
            address,
            collateral=trust.collateral,
            policy=policy,
            trust_anchor=trust.trust_anchor,
            qgs_address=qgs,
            timeout=120,
            require_keys=require_keys,
        )


def _test_driver_reader(manifest: ImageManifest) -> Callable[[str], bytes]:
    """For ``test:///`` hosts only: the domain's kernel, initrd and firmware paths mapped to
    the manifest's local files (volumes are named by the artifact's SHA-256; each file is
    checked against it before it is measured)."""
    by_name = {
        content_name(role, a.sha256): a
        for role, a in (("kernel", manifest.kernel), ("initrd", manifest.initrd), ("disk", manifest.disk))
    }

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


def anchor_sha256(trust: Trust) -> str | None:
    """The hex SHA-256 of ``trust``'s anchor as a VM record keeps it (None: Intel's root)."""
    return trust.trust_anchor.sha256.hex() if trust.trust_anchor is not None else None


def timestamp() -> str:
    """Now, as VM records write times (UTC, seconds, ``Z``)."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def kept_verdict(verdict: dict[str, Any]) -> dict[str, Any]:
    """The part of a verdict a VM record keeps (what status shows)."""
    return {**{k: verdict[k] for k in ATTESTATION_KEYS if k in verdict}, "recorded_at": timestamp()}


def refused_verdict(refused: handshake.AttestationRefused) -> dict[str, Any]:
    """A refusal's verdict with every reason (the handshake's own as well as the policy's)."""
    assert refused.verdict is not None
    return refused.verdict.to_dict() | {"reasons": [{"code": r.code, "message": r.message} for r in refused.reasons]}


def trusted_vm(
    conn: libvirt.virConnect, name: str, records: VmRecords, *, trust: Trust | None = None
) -> tuple[VmRecord, Trust]:
    """The controller's record of VM ``name`` (checked against what libvirt says of it) and
    the trust it was launched under; refuses a trust anchor other than the launch's."""
    dom, meta = lookup(conn, name)
    record = records.trusted(name=dom.name(), uuid=dom.UUIDString(), uri=conn.getURI(), meta=meta)
    trust = trust or for_backend(record.backend)
    if trust.backend != record.backend or anchor_sha256(trust) != record.trust_anchor_sha256:
        raise RecordMismatch(
            f"VM {name} was launched under the {record.backend} backend with trust anchor "
            f"{record.trust_anchor_sha256 or 'Intel SGX Root CA'}; the controller now has "
            f"{trust.backend} with {anchor_sha256(trust) or 'Intel SGX Root CA'}; refused"
        )
    return record, trust


def reattest(
    conn: libvirt.virConnect,
    name: str,
    *,
    records: VmRecords,
    trust: Trust | None = None,
    policy: Policy | None = None,
    backend: str = "tdx",
) -> handshake.AttestedGuest:
    """``tdxvm attest NAME``: attest the running guest again with a fresh nonce.

    Against the policy, backend and trust anchor of the controller's record of it (never
    what the domain's metadata says); the record gets the verdict and the attested SSH host
    key, the metadata a display copy. With ``policy`` (``--policy FILE``) a VM this
    controller did not launch can be attested too: under that policy and ``backend``, its
    agent reached where libvirt's metadata says (transport only: the verdict binds the
    keys and the policy is the caller's)."""
    dom, meta = lookup(conn, name)
    if not dom.isActive():
        raise BringUpError(f"{name} is not running", phase="attest")
    record: VmRecord | None = None
    if policy is None:
        record, trust = trusted_vm(conn, name, records, trust=trust)
        policy = record.policy
        address = record.reach(record.agent_port, "guest agent")
    else:
        trust = trust or for_backend(backend)
        agent_port = port_number(meta.labels.get("agent_port") or "7300") or 7300  # a VM of no record: the host's label
        fwd = next((f for f in meta.forwards() if f.guest_port == agent_port), None)
        if fwd is None:
            raise BringUpError(f"{name} has no forward to its agent port {agent_port}", phase="attest")
        address = tunnel.reach(conn.getURI(), fwd.host_address, fwd.host_port)
    manifest = None
    if is_test_driver(conn.getURI()):  # no files on such a host: the emulated quote service measures the build's
        manifest = load_manifest(record.manifest if record is not None else meta.labels.get("manifest", ""))
    try:
        guest = attest(conn, name, address, trust, policy, require_keys=("x25519", "ssh-host"), manifest=manifest)
    except handshake.AttestationRefused as refused:
        if refused.verdict is not None:
            verdict = refused_verdict(refused)
            record_attestation(dom, verdict)
            if record is not None:
                records.update(record.uuid, attestation=kept_verdict(verdict))
        raise
    verdict = guest.verdict.to_dict()
    record_attestation(dom, verdict)
    if record is not None:
        records.update(
            record.uuid,
            attestation=kept_verdict(verdict),
            ssh_host_key=base64.b64encode(guest.keys["ssh-host"]).decode(),
        )
    return guest
