"""The controller's id, the ``controller`` label, and single-VM verbs that refuse a VM
another controller launched (:mod:`tdxvm.launch.ownership`), on libvirt's test driver."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import serialization

from tdxvm.errors import EXIT_REFUSED
from tdxvm.launch import lifecycle
from tdxvm.launch import metadata as md
from tdxvm.launch.connection import open_connection
from tdxvm.launch.ownership import Controller, OtherControllerError, controller_label
from tdxvm.secretstore import SecretStore
from tdxvm.sshkey import SECRET, controller_id, controller_key, known_controller_id

from .test_lifecycle import spec_for

MINE, THEIRS = "1111111111111111", "2222222222222222"


def test_the_id_is_the_start_of_the_ssh_keys_digest_and_reading_it_makes_no_key(tmp_path):
    store = SecretStore(directory=tmp_path / "secrets")
    assert known_controller_id(store) is None and Controller.of(store) == Controller(None)
    assert not (tmp_path / "secrets").exists()  # read-only commands make nothing
    ident = controller_id(store)  # a launch makes the key, as the image build does
    raw = controller_key(store).public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert ident == hashlib.sha256(raw).hexdigest()[:16] and store.exists(SECRET)
    assert known_controller_id(store) == ident and controller_label(store) == {md.CONTROLLER: ident}
    other = SecretStore(directory=tmp_path / "other")
    assert controller_id(other) != ident
    assert md.CONTROLLER in md.LABELS


@pytest.mark.parametrize("verb", ["stop", "destroy"])
@pytest.mark.parametrize("me", [MINE, None], ids=["another-id", "no-key-yet"])
def test_stop_and_destroy_refuse_a_vm_of_another_controller(image, host, verb, me):
    conn = open_connection(host)
    handle = lifecycle.prepare_domain(spec_for(image, host), image.manifest(), conn, labels={md.CONTROLLER: THEIRS})
    lifecycle.start(handle)
    act = {
        "stop": lambda **kw: lifecycle.stop(conn, "smoke", poll=0.01, **kw),
        "destroy": lambda **kw: lifecycle.destroy(conn, "smoke", **kw),
    }[verb]
    with pytest.raises(OtherControllerError) as err:
        act(controller=Controller(me))
    assert err.value.exit_status == EXIT_REFUSED and err.value.code == "other-controller"
    this = f"this controller is {me}" if me else "this controller has no key yet"
    assert str(err.value).startswith(
        f"VM smoke on {host} was launched by controller {THEIRS} ({this}); tdxvm does not {verb} another "
        f"controller's VM. Run the command on the controller whose secret store holds key {THEIRS}"
    )
    assert conn.lookupByName("smoke").isActive()  # untouched
    act(controller=Controller(THEIRS))  # its own controller may


@pytest.mark.parametrize("labels", [{}, {md.CONTROLLER: MINE}], ids=["older-tdxvm", "mine"])
def test_stop_and_destroy_take_this_controllers_vms_and_unlabelled_ones(image, host, labels):
    conn = open_connection(host)
    lifecycle.start(lifecycle.prepare_domain(spec_for(image, host), image.manifest(), conn, labels=labels))
    assert lifecycle.stop(conn, "smoke", poll=0.01, controller=Controller(MINE)) == "shut down"
    assert not lifecycle.destroy(conn, "smoke", controller=Controller(MINE)).was_running
    assert conn.listAllDomains() == []
