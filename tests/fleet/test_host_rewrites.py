"""The host rewrites a VM's libvirt metadata after the launch: nothing the controller
trusts changes, and nothing is released on its word (libvirt's test driver, the real
guest agents of :mod:`tests.fleet.guests`, the real attestation path).

The host writes the domain's ``<metadata>``: its own policy (DEBUG allowed, its own
MRTD), another backend, other forwards. ``tdxvm attest``, ``provision``, ``verify-endpoint
--vm`` and ``status`` read the controller's record of the VM instead, and refuse a VM
whose metadata disagrees with it on the backend or the forwards."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from tdxvm.cli import main
from tdxvm.launch import lifecycle
from tdxvm.launch.domain import PortForward
from tdxvm.launch.manifest import load_manifest
from tdxvm.launch.metadata import forwards_label
from tdxvm.launch.records import RecordError, RecordMismatch, VmRecords
from tdxvm.launch.spec import ModelRef, VmSpec
from tdxvm.provision import attestation, bringup
from tdxvm.provision.model import provision
from tdxvm.secretstore import SecretStore

from .guests import put_test_secrets, write_host

FORGED_MRTD = "ee" * 48


@pytest.fixture
def launched(lab, tmp_path, monkeypatch):
    """VM ``solo`` brought up on a test host; the controller's store under $XDG_DATA_HOME (as the CLI finds it)."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    store = SecretStore()
    put_test_secrets(store)
    uri = write_host(tmp_path / "host.xml", lab.images.all)
    lab.hosts["h"] = uri
    conn = lab.connector.get(uri)
    spec = VmSpec(name="solo", uri=uri, image=lab.images.good, backend="emulated", vcpus=1, memory=256)
    with lab.guests() as guests:
        bringup.bring_up(
            spec, load_manifest(lab.images.good), conn, trust=lab.trust, secrets=store, login_check=False, poll=0.02
        )
        yield conn, store, guests


def same_connection(monkeypatch, conn) -> None:
    """The CLI opens its own connection; a test-driver host lives in one: give it this one."""
    import tdxvm.launch.connection as connection_module

    @contextlib.contextmanager
    def connection(uri: str = ""):
        yield conn

    monkeypatch.setattr(connection_module, "connection", connection)


def rewrite(conn, name: str, *, backend: str | None = None, **labels: str) -> None:
    """What the host can do with ``virsh metadata``: rewrite tdxvm's element."""
    dom, meta = lifecycle.lookup(conn, name)
    if backend is not None:
        meta.backend = backend
    meta.labels.update(labels)
    lifecycle._write_metadata(dom, meta)


def forged_policy() -> str:
    return json.dumps({"allow_debug": True, "mrtd": [FORGED_MRTD], "rtmr1": ["00" * 48], "rtmr2": ["00" * 48]})


def test_a_rewritten_policy_label_is_ignored(launched, lab):
    conn, store, _ = launched
    record = VmRecords.beside(store).get(conn.lookupByName("solo").UUIDString())
    assert record is not None and not record.policy.allow_debug and record.policy.mrtd != (FORGED_MRTD,)
    rewrite(conn, "solo", policy=forged_policy(), policy_exceptions="[]")
    with attestation.reattest(conn, "solo", records=VmRecords.beside(store), trust=lab.trust) as guest:
        assert guest.verdict.accepted and guest.verdict.policy == record.policy  # the record's, not the label's
    [vm] = lifecycle.status(conn, "solo", records=VmRecords.beside(store))
    assert vm.record == "ok" and vm.policy == record.policy
    assert any(line.startswith("rtmr0 not pinned") for line in vm.policy_exceptions)  # not the forged "[]"


@pytest.mark.parametrize("change", ["backend", "forwards"])
def test_a_rewritten_backend_or_forward_refuses_attest_provision_and_verify_endpoint(
    launched, lab, tmp_path, capsys, monkeypatch, change
):
    conn, store, guests = launched
    same_connection(monkeypatch, conn)
    if change == "backend":  # "tdx": the controller would trust Intel's root and the host's QGS
        rewrite(conn, "solo", backend="tdx")
    else:  # the agent "moved" to a port the host listens on
        forwards = (PortForward(host_port=40999, guest_port=7300), PortForward(host_port=40998, guest_port=22))
        rewrite(conn, "solo", forwards=forwards_label(forwards))
    records = VmRecords.beside(store)
    with pytest.raises(RecordMismatch, match="does not match the controller's record") as err:
        attestation.reattest(conn, "solo", records=records, trust=lab.trust)
    assert change in str(err.value)
    (tmp_path / "model").mkdir()
    store.put("weights/model", b"k" * 32)
    with pytest.raises(RecordMismatch):
        provision(conn, "solo", ModelRef(path=tmp_path / "model"), trust=lab.trust, secrets=store)
    [guest] = guests.by_name("solo")
    secrets_dir = Path(guests.workdir) / guest.uuid / "secrets"
    assert not list(secrets_dir.glob("model-*"))  # no model key released
    uri = conn.getURI()
    assert main(["verify-endpoint", "--vm", "solo", "--uri", uri]) == 1  # refused, nothing contacted
    assert "does not match the controller's record" in capsys.readouterr().err
    assert main(["attest", "solo", "--uri", uri, "-o", "json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["error"]["code"] == "vm-record-mismatch"


def test_a_vm_without_a_record_is_refused_unless_a_policy_is_given(launched, lab, tmp_path, capsys, monkeypatch):
    conn, store, _ = launched
    same_connection(monkeypatch, conn)
    records = VmRecords.beside(store)
    uuid = conn.lookupByName("solo").UUIDString()
    record = records.get(uuid)
    assert record is not None
    records.delete(uuid)  # launched by another controller, as far as this one knows
    with pytest.raises(RecordError, match="was not launched by this controller"):
        attestation.reattest(conn, "solo", records=records, trust=lab.trust)
    # --policy: the user's own policy, the trust of the backend the user names
    with attestation.reattest(conn, "solo", records=records, trust=lab.trust, policy=record.policy) as guest:
        assert guest.verdict.accepted
    uri = conn.getURI()
    assert main(["attest", "solo", "--uri", uri]) == 2
    assert "not launched by this controller" in capsys.readouterr().err
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"mrtd: {record.policy.mrtd[0]}\nrtmr1: {record.policy.rtmr1[0]}\nrtmr2: {record.policy.rtmr2[0]}\n"
    )
    assert main(["attest", "solo", "--uri", uri, "--policy", str(policy), "--backend", "emulated"]) == 0
    assert "solo: accepted" in capsys.readouterr().out


def test_destroy_removes_the_record(launched):
    conn, store, _ = launched
    records = VmRecords.beside(store)
    uuid = conn.lookupByName("solo").UUIDString()
    assert records.get(uuid) is not None
    assert (records.directory.stat().st_mode & 0o777) == 0o700 and (
        records.directory / f"{uuid}.json"
    ).stat().st_mode & 0o777 == 0o600
    lifecycle.destroy(conn, "solo", records=records)
    assert records.get(uuid) is None
