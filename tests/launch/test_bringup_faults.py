"""Bring-up faults on libvirt's test driver (no guest runs there): a guest that never
answers times out in the boot phase, is powered off, and no secret is read out; a
missing disk key is refused before anything is defined."""

from __future__ import annotations

import pytest

from tdxvm.launch import metadata as md
from tdxvm.launch.connection import open_connection
from tdxvm.launch.spec import VmSpec
from tdxvm.provision import bringup
from tdxvm.provision.trust import for_backend
from tdxvm.releasekey import SECRET as RELEASE_SECRET
from tdxvm.secretstore import SecretStore, SecretStoreError
from tdxvm.sshkey import controller_id

from ..attested_guest import CONTROLLER


def _spec(image, uri: str) -> VmSpec:
    return VmSpec(name="silent", uri=uri, image=image.manifest_path, backend="emulated", vcpus=1, memory=1024)


def test_guest_that_never_answers_times_out_and_is_stopped(image, host, tmp_path):
    store = SecretStore(directory=tmp_path / "secrets")
    store.put("disk/0f0e0d0c-0b0a-4908-8706-050403020100", bytes(64))
    store.put(RELEASE_SECRET, CONTROLLER.private_bytes_raw())
    conn = open_connection(host)
    events: list = []
    with pytest.raises(bringup.BringUpError) as err:
        bringup.bring_up(
            _spec(image, host),
            image.manifest(),
            conn,
            trust=for_backend("emulated", emulated_dir=tmp_path / "em"),
            secrets=store,
            progress=events.append,
            boot_timeout=2,
        )
    assert err.value.phase == "boot" and "did not answer in time" in str(err.value)
    assert err.value.exit_status == 3  # unreachable, not the user's input
    assert [e.phase for e in events if e.status == "done"] == ["define"]  # never reached quote/unlock
    assert not conn.lookupByName("silent").isActive()  # powered off, still defined for its log
    meta = md.from_domain_xml(conn.lookupByName("silent").XMLDesc(0))
    assert meta.labels[md.CONTROLLER] == controller_id(store)  # a single launch says whose VM it is too


def test_missing_disk_key_is_refused_before_defining(image, host, tmp_path):
    conn = open_connection(host)
    with pytest.raises(SecretStoreError, match="disk/0f0e0d0c-0b0a-4908-8706-050403020100 is not in"):
        bringup.bring_up(
            _spec(image, host),
            image.manifest(),
            conn,
            trust=for_backend("emulated", emulated_dir=tmp_path / "em"),
            secrets=SecretStore(directory=tmp_path / "empty"),
        )
    assert "silent" not in [d.name() for d in conn.listAllDomains()]


@pytest.mark.parametrize("built_for", ["another", None])
def test_image_of_another_controller_is_refused_before_defining(image, host, tmp_path, built_for):
    """Its guest would refuse every secret this controller seals: say so before anything is defined."""
    data = image.data()
    if built_for is None:  # an image built before released secrets were authenticated
        del data["release_key"]
    else:
        data["release_key"] = "ab" * 32
    image.write(data)
    store = SecretStore(directory=tmp_path / "secrets")
    store.put("disk/0f0e0d0c-0b0a-4908-8706-050403020100", bytes(64))
    store.put(RELEASE_SECRET, CONTROLLER.private_bytes_raw())
    conn = open_connection(host)
    with pytest.raises(bringup.BringUpError, match="accepts secrets only from the controller that built it") as err:
        bringup.bring_up(
            _spec(image, host),
            image.manifest(),
            conn,
            trust=for_backend("emulated", emulated_dir=tmp_path / "em"),
            secrets=store,
        )
    assert err.value.phase == "define" and ("another controller" if built_for else "before tdxvm authenticated") in str(
        err.value
    )
    assert "silent" not in [d.name() for d in conn.listAllDomains()]
    empty = SecretStore(directory=tmp_path / "empty")
    empty.put("disk/0f0e0d0c-0b0a-4908-8706-050403020100", bytes(64))
    with pytest.raises(bringup.BringUpError, match="holds no release key"):
        bringup.bring_up(
            _spec(image, host),
            image.manifest(),
            conn,
            trust=for_backend("emulated", emulated_dir=tmp_path / "em"),
            secrets=empty,
        )
