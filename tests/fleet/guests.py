"""Fleets on libvirt's test driver: attestable images, host files, and the guests' side.

libvirt's test driver runs no guest. For each tdxvm domain that is running on a test
host, :class:`TestDriverGuests` runs what that guest would: the real guest agent
(:mod:`tdxvm.guest.agent`), on 127.0.0.1 at the host port the domain's agent forward
names, first as the initramfs unlock step (:mod:`tdxvm.guest.unlock`'s ``DiskSecret``
and agent, the composition ``serve_until_unlocked`` runs, so that it can also stop when
the domain is destroyed before it is unlocked), then, once the disk secret is delivered,
as the booted system's agent binding its own SSH host key (made at "boot", as the image's
first boot does). Quotes come from the emulated quote service whose address the
controller sends, as for an emulated guest. Nothing here decides a verdict: the
controller attests these agents exactly as it attests a VM.

The image (:func:`make_attestable_image`) is a build folder with a manifest whose
artifacts the emulated quote service can measure: the small PE kernel and TDVF of
``tests/attested_guest.py``, and the measurements predicted from them. Also used by
``bench/fleet.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import libvirt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tdxvm.fleet.inventory import Connector
from tdxvm.guest.agent import Agent, AgentServer, SecretsDir, system_keys
from tdxvm.guest.unlock import DiskSecret
from tdxvm.image.measure import predict
from tdxvm.launch import metadata as md
from tdxvm.launch.errors import LaunchError
from tdxvm.launch.manifest import FORMAT, load_manifest
from tdxvm.launch.volumes import content_name
from tdxvm.releasekey import SECRET as RELEASE_SECRET
from tdxvm.secretstore import SecretStore

from ..attested_guest import CMDLINE, CONTROLLER, CONTROLLER_PUBLIC, INITRD, firmware, kernel
from ..launch.conftest import host_xml

DISK_SECRET = "disk/0f0e0d0c-0b0a-4908-8706-050403020100"  # disk/<the manifest's luks.uuid>


def put_test_secrets(store: SecretStore) -> None:
    """What the build of these images leaves in the controller's store: the disk key, and
    the release key whose public half the images carry (and their guests check)."""
    store.put(DISK_SECRET, os.urandom(64))
    store.put(RELEASE_SECRET, CONTROLLER.private_bytes_raw())


def make_attestable_image(
    folder: Path, *, name: str = "fleet", initrd: bytes = INITRD, measured_initrd: bytes | None = None
) -> Path:
    """A build folder the emulated quote service can measure; returns the manifest path.

    ``measured_initrd``: predict the measurements for this initrd instead of the one in
    the folder (an image whose initramfs was swapped after the build)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"vmlinuz": kernel(), "initrd.img": initrd, "disk.img": hashlib.sha256(name.encode()).digest() * 2048}
    artifacts = {}
    for fname, data in files.items():
        (folder / fname).write_bytes(data)
        artifacts[fname] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    fw = folder / "OVMF.inteltdx.fd"
    fw.write_bytes(firmware())
    m = predict(
        firmware=firmware(),
        kernel=kernel(),
        initrd=measured_initrd if measured_initrd is not None else initrd,
        cmdline=CMDLINE,
    )
    manifest = {
        "format": FORMAT,
        "name": name,
        "cmdline": CMDLINE,
        "artifacts": artifacts,
        "luks": {
            "uuid": "0f0e0d0c-0b0a-4908-8706-050403020100",
            "cipher": "aes-xts-plain64",
            "key_secret": DISK_SECRET,
        },
        "release_key": CONTROLLER_PUBLIC.hex(),
        "firmware": {"path": str(fw), "sha256": hashlib.sha256(fw.read_bytes()).hexdigest()},
        "measurements": {"mrtd": m.mrtd, "rtmr0": None, "rtmr1": m.rtmr1, "rtmr2": m.rtmr2, "rtmr3": None},
        "guest_agent_port": 7300,
        "ssh_port": 22,
    }
    path = folder / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2))
    return path


def volumes_of(manifests: Iterable[Path]) -> list[tuple[str, int]]:
    """The content volumes a test host's tdxvm pool holds for these images (the test driver cannot upload)."""
    out: dict[str, int] = {}
    for path in manifests:
        m = load_manifest(path)
        for role, a in (("kernel", m.kernel), ("initrd", m.initrd), ("disk", m.disk)):
            out[content_name(role, a.sha256)] = a.size
    return sorted(out.items())


def write_host(path: Path, manifests: Iterable[Path], *, domains: Iterable[str] = ()) -> str:
    """A test-driver host file with the images' volumes (and ``domains``); returns its URI."""
    path.write_text(host_xml(pool_volumes=volumes_of(manifests), domains=list(domains)))
    return f"test://{os.path.abspath(path)}"


def ssh_host_key(folder: Path) -> Path:
    """A fresh Ed25519 host key's public line, as the guest's first boot makes it."""
    key = Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    path = folder / "ssh_host_ed25519_key.pub"
    path.write_text(pub.decode() + " root@guest\n")
    return path


@dataclass
class GuestRecord:
    name: str
    uuid: str
    port: int
    unlocked: str | None = None  # SHA-256 of the disk's volume key this boot received (never the value)
    system_up: bool = False
    errors: list[str] = field(default_factory=list)


class TestDriverGuests:
    """Runs the guest side of every running tdxvm domain on ``uris`` (see the module doc)."""

    __test__ = False  # not a test class

    def __init__(self, connector: Connector, uris: Iterable[str], workdir: Path, *, poll: float = 0.02) -> None:
        self.connector, self.uris, self.workdir, self.poll = connector, uris, Path(workdir), poll  # a live view is fine
        self.guests: dict[str, GuestRecord] = {}  # by domain UUID
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._watcher = threading.Thread(target=self._watch, name="test-guests", daemon=True)

    def __enter__(self) -> TestDriverGuests:
        self._watcher.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._watcher.join(10)
        for t in self._threads:
            t.join(10)

    def by_name(self, name: str) -> list[GuestRecord]:
        with self._lock:
            return [g for g in self.guests.values() if g.name == name]

    def _watch(self) -> None:
        while not self._stop.is_set():
            for uri in list(self.uris):
                try:
                    conn = self.connector.get(uri)
                    domains = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
                except (LaunchError, libvirt.libvirtError):
                    continue
                for dom in domains:
                    try:
                        uuid = dom.UUIDString()
                        if uuid in self.guests:
                            continue
                        meta = md.from_domain_xml(dom.XMLDesc(0))
                    except libvirt.libvirtError:
                        continue
                    if meta is None:
                        continue
                    agent = int(meta.labels.get("agent_port", "7300"))
                    port = next((f.host_port for f in meta.forwards() if f.guest_port == agent), None)
                    if port is None:
                        continue
                    record = GuestRecord(dom.name(), uuid, port)
                    with self._lock:
                        self.guests[uuid] = record
                    t = threading.Thread(
                        target=self._guest, args=(conn, record), name=f"guest {record.name}", daemon=True
                    )
                    self._threads.append(t)
                    t.start()
            time.sleep(self.poll)

    def _alive(self, conn: libvirt.virConnect, uuid: str) -> bool:
        if self._stop.is_set():
            return False
        try:
            return bool(conn.lookupByUUIDString(uuid).isActive())
        except libvirt.libvirtError:
            return False

    def _guest(self, conn: libvirt.virConnect, g: GuestRecord) -> None:
        root = self.workdir / g.uuid
        (root / "root").mkdir(parents=True, exist_ok=True)  # no configfs-tsm, no /dev/tdx_guest: emulated quotes
        try:
            disk = DiskSecret()  # the initramfs unlock step
            unlock = Agent(
                on_secret=disk.accept, controller_key=CONTROLLER_PUBLIC, on_delivered=disk.delivered, root=root / "root"
            )
            with AgentServer(unlock, "127.0.0.1", g.port):
                while not disk.ready.wait(self.poll):
                    if not self._alive(conn, g.uuid):
                        return
            assert disk.value is not None
            g.unlocked = hashlib.sha256(disk.value).hexdigest()
            system = Agent(
                on_secret=SecretsDir(root / "secrets"),
                controller_key=CONTROLLER_PUBLIC,
                public_keys=system_keys(ssh_host_key(root), None),
                root=root / "root",
            )
            with AgentServer(system, "127.0.0.1", g.port):
                g.system_up = True
                while self._alive(conn, g.uuid):
                    time.sleep(self.poll * 5)
        except Exception as exc:  # noqa: BLE001 - shown by the test that reads it
            g.errors.append(f"{type(exc).__name__}: {exc}")
