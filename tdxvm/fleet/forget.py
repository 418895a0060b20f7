"""Forgetting a host that is gone for good: ``tdxvm apply -f FLEET.yaml --forget-host NAME``.

The state file remembers every host the fleet has VMs on, so that a host taken out of the
file is still emptied. A host that will never answer again (decommissioned, its disks
wiped) keeps every apply at exit 5 ("not asked for any more, but host … is
unreachable"). Forgetting it drops the host and its VMs' entries from the state file,
under the fleet's lock, before the plan. Only a host that is out of the file and does not
answer can be forgotten: a host that answers is emptied by the apply itself, and one
that answers but refuses (its SSH key changed, a permission) is not gone. The VM
records stay (``tdxvm destroy NAME --uri URI`` still works if the host comes back,
whose VMs then run untracked).
"""

from __future__ import annotations

import shlex
from typing import Any

from tdxvm.errors import TdxvmError, Unreachable
from tdxvm.fleet import inventory as inv
from tdxvm.fleet.executor import FleetError
from tdxvm.fleet.spec import Fleet
from tdxvm.fleet.state import FleetState, moved_from
from tdxvm.launch.connection import is_test_driver


def forget_gone_hosts(
    fleet: Fleet, state: FleetState, names: tuple[str, ...], connector: inv.Connector
) -> dict[str, dict[str, Any]]:
    """Forget each host of ``names`` (see the module doc); host -> its URI and the VMs
    forgotten with it. Every name is checked before anything is forgotten."""
    known = state.hosts
    for name in names:
        if name in fleet.hosts:
            old = sorted(h for h in known if (moved := moved_from(h)) is not None and moved[0] == name)
            also = f" (its old URI is host {', '.join(shlex.quote(h) for h in old)})" if old else ""
            raise FleetError(
                f"--forget-host {name}: {fleet.source} still names host {name}; take it out of the file first{also}",
                code="forget-host",
            )
        if name not in known:
            others = ", ".join(sorted(h for h in known if h not in fleet.hosts)) or "none"
            raise FleetError(
                f"--forget-host {name}: fleet {fleet.name} has no VMs on a host {name} that the file left "
                f"(hosts it still remembers out of the file: {others})",
                code="forget-host",
            )
        try:
            connector.get(known[name])
        except Unreachable:
            continue  # no answer: gone
        except TdxvmError as exc:  # it answered, and refused (its key changed, a permission): not gone
            if is_test_driver(known[name]):  # libvirt's test driver: a host file that is gone is a host gone
                continue
            raise FleetError(
                f"--forget-host {name}: host {name} ({known[name]}) answers, but refused the connection: "
                f"{str(exc).splitlines()[0]}; forget only a host that is gone for good",
                code="forget-host",
            ) from None
        raise FleetError(
            f"--forget-host {name}: host {name} ({known[name]}) answers: an apply without --forget-host deletes "
            "its VMs; forget only a host that is gone for good",
            code="forget-host",
        )
    return {name: {"uri": known[name], "vms": state.drop_host(name)} for name in names}
