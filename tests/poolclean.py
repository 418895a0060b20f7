"""What the tests leave on the real libvirtd (qemu:///system), removed.

Test launches upload images into tdxvm's pool (content-addressed, 1 to 3 GiB each, and
every test build is new) and define domains named ``e2e…``. A session removes what it
made; one killed part-way (CI's time limit, Ctrl-C twice) leaves domains and volumes,
which the next session removes at its start. On a host that keeps its disk between
runs, that is what stops the pool from growing run after run.

Sessions running at once (a unit run beside CI) must not remove each other's domains
and uploads: each holds :data:`LOCK` shared while it runs, and cleans only when it can
take the lock alone (no other session is running).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator

import libvirt

from tdxvm.launch.connection import open_connection
from tdxvm.launch.volumes import content_name, delete_unused, sweep_vm_volumes, unused_volumes

URI = "qemu:///system"
TEST_DOMAINS = "e2e"  # every domain the tests define on qemu:///system is named so
LOCK = "/tmp/tdxvm-tests.lock"


class Session:
    """This session's share of :data:`LOCK`; :meth:`alone` says whether no other session
    runs now (taking the lock alone for a moment, then sharing it again)."""

    def __init__(self) -> None:
        self._fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_SH)

    @contextlib.contextmanager
    def alone(self) -> Iterator[bool]:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fcntl.flock(self._fd, fcntl.LOCK_SH)  # a failed conversion may have dropped the shared lock (flock(2))
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_SH)

    def close(self) -> None:
        os.close(self._fd)


@contextlib.contextmanager
def _host() -> Iterator[libvirt.virConnect | None]:
    try:
        conn = open_connection(URI)
    except Exception:  # noqa: BLE001 - no libvirtd: nothing was made there
        yield None
        return
    try:
        yield conn
    finally:
        conn.close()


def volume_names() -> set[str]:
    """The pool's volumes now (empty where no libvirtd answers)."""
    with _host() as conn:
        if conn is None:
            return set()
        try:
            return set(conn.storagePoolLookupByName("tdxvm").listVolumes())
        except libvirt.libvirtError:
            return set()


def remove_leftover_domains() -> list[str]:
    """Power off and undefine the test domains an earlier, killed session left, with their
    own volumes and the image volumes only they used; the names removed."""
    removed, paths = [], set()
    with _host() as conn:
        if conn is None:
            return []
        for dom in conn.listAllDomains(0):
            name = dom.name()
            if not name.startswith(TEST_DOMAINS):
                continue
            with contextlib.suppress(libvirt.libvirtError):
                paths |= _uses(conn, dom)
                if dom.isActive():
                    dom.destroy()
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
                sweep_vm_volumes(conn, name)
                removed.append(name)
        delete_unused(conn, [u for u in unused_volumes(conn) if u.path in paths])
    return removed


def _uses(conn: libvirt.virConnect, dom: libvirt.virDomain) -> set[str]:
    """The paths a domain's XML names, and what the volumes at those paths back onto."""
    paths = set()
    for el in ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)).iter():
        paths.update(el.attrib.values())
        paths.add((el.text or "").strip())
    for path in list(paths):
        with contextlib.suppress(libvirt.libvirtError):
            backing = ET.fromstring(conn.storageVolLookupByPath(path).XMLDesc(0)).findtext("backingStore/path")
            if backing:
                paths.add(backing)
    return paths


def remove_unused(names: Iterable[str] | None = None) -> int:
    """Delete the pool's unused volumes among ``names`` (all unused ones when None); how many."""
    with _host() as conn:
        if conn is None:
            return 0
        wanted = None if names is None else set(names)
        unused = [u for u in unused_volumes(conn) if wanted is None or u.name in wanted]
        return len(delete_unused(conn, unused))


def image_volumes(manifest: dict) -> list[str]:
    """The content volumes a launch of the build ``manifest`` (its JSON) uploads."""
    artifacts = manifest["artifacts"]
    roles = (("kernel", "vmlinuz"), ("initrd", "initrd.img"), ("disk", "disk.img"))
    return [content_name(role, artifacts[name]["sha256"]) for role, name in roles]
