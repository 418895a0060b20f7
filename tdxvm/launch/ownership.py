"""Which controller a VM belongs to: its ``controller`` label against this controller's id.

A controller (its secret store, VM records and fleet state) owns the VMs it launches.
Each carries the label ``controller`` (:data:`tdxvm.launch.metadata.CONTROLLER`) with
the id of the controller's key (:func:`tdxvm.sshkey.controller_id`), written at define.
A VM labelled with another id is another controller's: a fleet apply never replaces or
deletes it and counts it as a name clash; ``tdxvm stop`` and ``destroy`` refuse it
(:class:`OtherControllerError`, exit 1).

A VM with no label was launched by a tdxvm older than the label. A fleet takes it as its
own only while the controller keeps a record of it (:mod:`tdxvm.launch.records`);
single-VM commands accept it, as they did before.

The host can write the label like any metadata, so it only keeps honest controllers from
destroying each other's VMs by accident. It decides nothing about trust: attestation,
policies and forwards still come from the controller's records.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tdxvm.errors import Refused
from tdxvm.launch.errors import LaunchError
from tdxvm.launch.metadata import CONTROLLER, VmMetadata
from tdxvm.secretstore import SecretStore
from tdxvm.sshkey import controller_id, known_controller_id


class OtherControllerError(LaunchError, Refused):
    """The VM belongs to another controller: this one does not stop, replace or delete it."""

    code = "other-controller"


def controller_label(store: SecretStore) -> dict[str, str]:
    """The label a launch writes: this controller's id (its key made on first use)."""
    return {CONTROLLER: controller_id(store)}


@dataclass(frozen=True)
class Controller:
    """This controller as the label names it. ``id`` is None while its store holds no key
    yet: it launched nothing then, so every labelled VM is another's."""

    id: str | None

    @classmethod
    def of(cls, store: SecretStore) -> Controller:
        """The controller of ``store``, read without making a key."""
        return cls(known_controller_id(store))

    @property
    def this(self) -> str:
        """For messages: "this controller is <id>", or that it has no key yet."""
        return f"this controller is {self.id}" if self.id else "this controller has no key yet"

    def claim(self, meta: VmMetadata, *, has_record: Callable[[], bool] | None = None) -> str | None:
        """None when the VM of ``meta`` is this controller's; otherwise whose it is, as a
        phrase for messages ("controller 0123…'s (this controller is …)").

        A VM with no label is this controller's when ``has_record()`` says the controller
        keeps a record of it; without ``has_record`` (single-VM commands), always."""
        theirs = meta.labels.get(CONTROLLER)
        if theirs:
            return None if theirs == self.id else f"controller {theirs}'s ({self.this})"
        if has_record is None or has_record():
            return None
        return (
            "not this controller's: it has no controller label (an older tdxvm launched it) and this "
            "controller keeps no record of it"
        )

    def require(self, name: str, uri: str, meta: VmMetadata, verb: str) -> None:
        """Refuse (:class:`OtherControllerError`) to ``verb`` a VM another controller launched."""
        theirs = meta.labels.get(CONTROLLER)
        if self.claim(meta) is None:
            return
        raise OtherControllerError(
            f"VM {name} on {uri} was launched by controller {theirs} ({self.this}); tdxvm does "
            f"not {verb} another controller's VM. Run the command on the controller whose secret store holds "
            f"key {theirs} (docs/fleet.md, 'One controller per fleet', says how a controller moves to another "
            "machine); if that controller is gone for good, remove the VM with virsh"
        )
