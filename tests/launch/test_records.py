"""Commands changing one VM record at once take turns (``VmRecords``' folder lock): what
``tdxvm attest`` writes beside what ``tdxvm provision`` writes, and ``destroy`` beside
``attest``, as separate processes do it."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import uuid as uuids
from pathlib import Path

import pytest

from tdxvm.attest.policy import Policy
from tdxvm.fileio import lock_exclusive
from tdxvm.launch import records as module
from tdxvm.launch.domain import PortForward
from tdxvm.launch.records import RecordError, VmRecord, VmRecords

ROUNDS = 15
FORK = multiprocessing.get_context("fork")


def _record(uuid: str) -> VmRecord:
    return VmRecord(
        name="vm1",
        uuid=uuid,
        uri="test:///x",
        backend="emulated",
        policy=Policy(),
        manifest="/m.json",
        manifest_sha256="00" * 32,
        trust_anchor_sha256=None,
        forwards=(PortForward(host_port=20001, guest_port=7300, host_address="127.0.0.1"),),
        agent_port=7300,
        ssh_port=22,
    )


def _command(folder: Path, uuid: str, what: str, go: object) -> None:
    """One command's change of the record, as it makes it (provision/attestation.py,
    provision/model.py, launch/lifecycle.py)."""
    records = VmRecords(folder)
    go.wait()  # type: ignore[attr-defined]
    if what == "attest":
        with contextlib.suppress(RecordError):  # after the destroy: refused, as it should be
            records.update(uuid, attestation={"verdict": "accept"}, ssh_host_key="AAAA")
    elif what == "provision":
        records.update(uuid, model={"name": "m", "digest": "sha256:" + "ab" * 32})
    else:
        records.delete(uuid)


def _race(folder: Path, *commands: str) -> VmRecord | None:
    uuid = str(uuids.uuid4())
    VmRecords(folder).put(_record(uuid))
    go = FORK.Event()
    procs = [FORK.Process(target=_command, args=(folder, uuid, c, go)) for c in commands]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return VmRecords(folder).get(uuid)


def test_attest_and_provision_at_once_keep_both_changes(tmp_path):
    for _ in range(ROUNDS):
        record = _race(tmp_path / "vms", "attest", "provision")
        assert record is not None and record.attestation == {"verdict": "accept"} and record.model is not None


def test_a_destroyed_vms_record_is_not_written_back_by_an_attest(tmp_path):
    for _ in range(ROUNDS):
        assert _race(tmp_path / "vms", "destroy", "attest") is None


def test_a_lock_that_is_never_released_is_a_typed_error(tmp_path, monkeypatch):

    folder = tmp_path / "vms"
    VmRecords(folder).put(_record("0" * 8))
    held = lock_exclusive(folder / ".lock", 1)
    monkeypatch.setattr(module, "LOCK_TIMEOUT", 0.2)
    try:
        with pytest.raises(RecordError, match="cannot lock the VM records"):
            VmRecords(folder).update("0" * 8, ssh_host_key="AAAA")
    finally:
        os.close(held)
