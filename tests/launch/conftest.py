"""Fixtures for the launch tests: a small image build folder and libvirt test-driver hosts.

The image folder has the layout and manifest ``tdxvm image build`` writes, with small
random artifacts (their real SHA-256 and sizes) and measurement values derived from
them; nothing here boots. Each test host is libvirt's test driver opened from its own
XML file (``test:///abs/path``), so every test gets a fresh, private host; the
``tdxvm`` pool in it already holds the image's content volumes (the test driver cannot
upload), so a launch exercises the reuse path and creates only the VM's own volumes.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from tdxvm.launch.manifest import FORMAT, ImageManifest, load_manifest
from tdxvm.launch.volumes import POOL_PATH, content_name

from ..attested_guest import CONTROLLER_PUBLIC


@dataclass
class Image:
    folder: Path
    manifest_path: Path
    firmware: Path

    def manifest(self) -> ImageManifest:
        return load_manifest(self.manifest_path)

    def data(self) -> dict:
        return json.loads(self.manifest_path.read_text())

    def write(self, data: dict) -> None:
        self.manifest_path.write_text(json.dumps(data, indent=2))


def make_image(folder: Path, *, name: str = "smoke", service_port: int | None = None, seed: bytes = b"") -> Image:
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {"vmlinuz": 3000, "initrd.img": 2000, "disk.img": 64 * 1024 + 17}
    artifacts = {}
    for fname, size in sizes.items():
        data = (hashlib.sha256(seed + fname.encode()).digest() * (size // 32 + 1))[:size]
        (folder / fname).write_bytes(data)
        artifacts[fname] = {"sha256": hashlib.sha256(data).hexdigest(), "size": size}
    firmware = folder / "OVMF.inteltdx.fd"
    firmware.write_bytes(b"TDVF" * 1024)

    def sha384(tag: str) -> str:
        return hashlib.sha384(seed + tag.encode()).hexdigest()

    manifest = {
        "format": FORMAT,
        "name": name,
        "profile": "smoke",
        "cmdline": "console=ttyS0 root=/dev/mapper/root ro ip=dhcp panic=-1",
        "artifacts": artifacts,
        "rootfs_uuid": "8b1c6a52-7a0e-4c1b-9d8e-2f3a4b5c6d7e",
        "luks": {
            "uuid": "0f0e0d0c-0b0a-4908-8706-050403020100",
            "cipher": "aes-xts-plain64",
            "key_secret": "disk/0f0e0d0c-0b0a-4908-8706-050403020100",
        },
        "release_key": CONTROLLER_PUBLIC.hex(),  # built by the tests' controller (tests/attested_guest.py)
        "firmware": {"path": str(firmware), "sha256": hashlib.sha256(firmware.read_bytes()).hexdigest()},
        "measurements": {
            "profile": "upstream",
            "mrtd": sha384("mrtd"),
            "rtmr0": None,
            "rtmr1": sha384("rtmr1"),
            "rtmr2": sha384("rtmr2"),
            "rtmr3": None,
            "predicted": {},
            "notes": {},
        },
        "guest_agent_port": 7300,
        "ssh_port": 22,
        "service_port": service_port,
    }
    path = folder / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2))
    return Image(folder=folder, manifest_path=path, firmware=firmware)


@pytest.fixture
def image(tmp_path: Path) -> Image:
    return make_image(tmp_path / "build" / "smoke")


def host_xml(
    *,
    pool_volumes: list[tuple[str, int]] = (),
    domains: list[str] = (),
    pool: bool = True,
    pool_name: str = "tdxvm",
    pool_path: str = POOL_PATH,
) -> str:
    """A test-driver node: 8 CPUs, 16 GiB, optionally a pool (tdxvm's) with volumes, and domains."""
    vols = "".join(
        f"<volume type='file'><name>{n}</name><capacity unit='bytes'>{size}</capacity>"
        f"<target><path>{pool_path}/{n}</path><format type='raw'/></target></volume>"
        for n, size in pool_volumes
    )
    pool_xml = (
        f"<pool type='dir'><name>{pool_name}</name><uuid>35bb2ad9-388a-cdfe-461a-b8907f6e53fe</uuid>"
        f"<target><path>{pool_path}</path></target>{vols}</pool>"
        if pool
        else ""
    )
    return (
        "<node><cpu><mhz>3000</mhz><model>x86_64</model><active>8</active><nodes>1</nodes><sockets>1</sockets>"
        "<cores>4</cores><threads>2</threads></cpu><memory>16777216</memory>" + "".join(domains) + pool_xml + "</node>"
    )


def image_volumes(manifest: ImageManifest) -> list[tuple[str, int]]:
    return [
        (content_name("kernel", manifest.kernel.sha256), manifest.kernel.size),
        (content_name("initrd", manifest.initrd.sha256), manifest.initrd.size),
        (content_name("disk", manifest.disk.sha256), manifest.disk.size),
    ]


@pytest.fixture
def make_host(tmp_path: Path):
    """make_host(xml) -> a test:/// URI private to the test."""
    counter = iter(range(1000))

    def make(xml: str) -> str:
        path = tmp_path / f"host-{next(counter)}.xml"
        path.write_text(xml)
        return f"test://{os.path.abspath(path)}"

    return make


@pytest.fixture
def host(image: Image, make_host) -> str:
    """A test host whose tdxvm pool already holds ``image``'s content volumes."""
    return make_host(host_xml(pool_volumes=image_volumes(image.manifest())))
