"""Volumes a crash left behind: a VM's overlay, serial log and scratch disk in tdxvm's
pool with no domain of that name (the crash came between creating them and defining
the domain). A delete or a fleet destroy of such a VM removes them."""

from __future__ import annotations

import libvirt

from tdxvm.launch.volumes import POOL_NAME, overlay_name, scratch_name, serial_log_name


def sweep_volumes(conn: libvirt.virConnect, vm: str, *, pool: str = POOL_NAME) -> list[str]:
    """Delete the VM's overlay, serial log and scratch disk from tdxvm's pool when no
    domain has its name; the paths deleted."""
    try:
        conn.lookupByName(vm)
        return []  # a domain has the name: its volumes are its own
    except libvirt.libvirtError:
        pass
    deleted = []
    try:
        p = conn.storagePoolLookupByName(pool)
    except libvirt.libvirtError:
        return []
    for name in (overlay_name(vm), serial_log_name(vm), scratch_name(vm)):
        try:
            vol = p.storageVolLookupByName(name)
            path = vol.path()
            vol.delete(0)
            deleted.append(path)
        except libvirt.libvirtError:
            continue
    return deleted
