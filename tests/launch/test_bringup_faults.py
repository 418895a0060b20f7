"""Bring-up faults on libvirt's test driver (no guest runs there): a guest that never
answers times out in the boot phase, is powered off, and no secret is read out; a
missing disk key is refused before anything is defined."""

from __future__ import annotations

import pytest

from tdxvm.launch.connection import open_connection
from tdxvm.launch.spec import VmSpec
from tdxvm.provision import bringup
from tdxvm.provision.trust import for_backend
from tdxvm.secretstore import SecretStore, SecretStoreError


def _spec(image, uri: str) -> VmSpec:
    return VmSpec(name="silent", uri=uri, image=image.manifest_path, backend="emulated", vcpus=1, memory=1024)


def test_guest_that_never_answers_times_out_and_is_stopped(image, host, tmp_path):
    store = SecretStore(directory=tmp_path / "secrets")
    store.put("disk/x", bytes(64))
    conn = open_connection(host)
    events: list = []
    with pytest.raises(bringup.BringUpError) as err:
        bringup.bring_up(_spec(image, host), image.manifest(), conn, trust=for_backend("emulated", emulated_dir=tmp_path / "em"),
                         secrets=store, progress=events.append, boot_timeout=2)  # fmt: skip
    assert err.value.phase == "boot" and "did not answer in time" in str(err.value)
    assert [e.phase for e in events if e.status == "done"] == ["define"]  # never reached quote/unlock
    assert not conn.lookupByName("silent").isActive()  # powered off, still defined for its log


def test_missing_disk_key_is_refused_before_defining(image, host, tmp_path):
    conn = open_connection(host)
    with pytest.raises(SecretStoreError, match="disk/x is not in"):
        bringup.bring_up(_spec(image, host), image.manifest(), conn, trust=for_backend("emulated", emulated_dir=tmp_path / "em"),
                         secrets=SecretStore(directory=tmp_path / "empty"))  # fmt: skip
    assert "silent" not in [d.name() for d in conn.listAllDomains()]
