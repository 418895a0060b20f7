"""Fixtures for the fleet tests: attestable images, test-driver hosts (one file per host),
the emulated trust, the disk key, and the guests' side (:mod:`tests.fleet.guests`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tdxvm.fleet.inventory import Connector
from tdxvm.fleet.spec import Fleet, load_fleet
from tdxvm.provision.trust import Trust, for_backend
from tdxvm.secretstore import SecretStore

from ..attested_guest import INITRD
from .guests import TestDriverGuests, make_attestable_image, put_test_secrets, write_host


@dataclass
class Images:
    good: Path  # attests
    v2: Path  # attests; another initramfs (image drift)
    tampered: Path  # its initramfs was swapped after the build: RTMR2 differs, refused

    @property
    def all(self) -> list[Path]:
        return [self.good, self.v2, self.tampered]


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> Images:
    base = tmp_path_factory.mktemp("fleet-images")
    return Images(
        good=make_attestable_image(base / "good"),
        v2=make_attestable_image(base / "v2", name="fleet-v2", initrd=INITRD + b"\x00v2"),
        tampered=make_attestable_image(
            base / "tampered", name="fleet-tampered", initrd=INITRD + b"evil", measured_initrd=INITRD
        ),
    )


@pytest.fixture(scope="session")
def trust(tmp_path_factory) -> Trust:
    return for_backend("emulated", emulated_dir=tmp_path_factory.mktemp("emulated"))


@pytest.fixture
def store(tmp_path) -> SecretStore:
    s = SecretStore(directory=tmp_path / "secrets")
    put_test_secrets(s)
    return s


@pytest.fixture
def connector() -> Iterator[Connector]:
    c = Connector(timeout=10)
    yield c
    c.close()


@dataclass
class Lab:
    """Test hosts, the fleet file, and what a test needs to apply it."""

    folder: Path
    images: Images
    connector: Connector
    trust: Trust
    store: SecretStore
    hosts: dict[str, str] = field(default_factory=dict)

    def host(self, name: str, *, domains: list[str] = ()) -> str:
        uri = write_host(self.folder / f"{name}.xml", self.images.all, domains=domains)
        self.hosts[name] = uri
        return uri

    def unreachable(self, name: str) -> str:
        """A host whose libvirt cannot be reached (its test-driver file does not exist yet)."""
        uri = f"test://{self.folder / f'{name}.xml'}"
        self.hosts[name] = uri
        return uri

    def write(
        self, deployments: str, *, templates: str | None = None, name: str = "demo", hosts: dict[str, str] | None = None
    ) -> Path:
        hosts = self.hosts if hosts is None else hosts
        host_lines = "".join(f"    {h}: {u}\n" for h, u in hosts.items())
        templates = templates or (
            f"    small:\n      image: {self.images.good}\n"
            "      backend: emulated\n      vcpus: 1\n      memory: 256MiB\n"
            f"    bad:\n      image: {self.images.tampered}\n"
            "      backend: emulated\n      vcpus: 1\n      memory: 256MiB\n"
        )
        text = (
            f"apiVersion: tdxvm/v1\nkind: Fleet\nmetadata:\n  name: {name}\nspec:\n  hosts:\n{host_lines}"
            f"  templates:\n{templates}  deployments:\n{deployments}"
        )
        path = self.folder / f"{name}.yaml"
        path.write_text(text)
        return path

    def load(self, path: Path) -> Fleet:
        return load_fleet(path)

    def guests(self) -> TestDriverGuests:
        return TestDriverGuests(self.connector, self.hosts.values(), self.folder / "guests")  # hosts added later too


@pytest.fixture
def lab(tmp_path, images, connector, trust, store) -> Lab:
    return Lab(folder=tmp_path, images=images, connector=connector, trust=trust, store=store)
