"""Shared test fixtures: the real TDX test vectors beside the repository."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# ../shared/testdata/tdx beside the checkout (here and in CI); TDXVM_TESTDATA overrides.
TESTDATA = Path(os.environ.get("TDXVM_TESTDATA", REPO.parent / "shared" / "testdata" / "tdx"))


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.fixture(scope="session")
def testdata() -> Path:
    if not TESTDATA.is_dir():
        pytest.fail(f"real TDX test vectors not found at {TESTDATA} (set TDXVM_TESTDATA)")
    return TESTDATA


@pytest.fixture(scope="session", autouse=True)
def _verified_collateral_cache_apart(tmp_path_factory) -> Iterator[None]:
    """verify-quote remembers verified collateral (~/.cache/tdxvm/verified); tests keep
    theirs in a folder of their own, shared by the session."""
    old = os.environ.get("TDXVM_VERIFIED_CACHE")
    os.environ["TDXVM_VERIFIED_CACHE"] = str(tmp_path_factory.mktemp("verified-collateral"))
    yield
    if old is None:
        os.environ.pop("TDXVM_VERIFIED_CACHE", None)
    else:
        os.environ["TDXVM_VERIFIED_CACHE"] = old


def read_json(path: Path):
    return json.loads(path.read_text())


# -- the smoke image, built once per test session --------------------------------------
# Real: debootstrap, apt, mkinitramfs in a private mount namespace, mkfs.ext4 -d, LUKS2
# (needs root, as CI runs). The step cache persists across runs in
# ~/.cache/tdxvm-test/image (or $TDXVM_TEST_CACHE/image), so a warm rerun redoes only
# configure, ext4, encrypt and measure.
def test_cache_root() -> Path:
    return Path(os.environ.get("TDXVM_TEST_CACHE") or Path.home() / ".cache" / "tdxvm-test")


test_cache_root.__test__ = False  # a helper, not a test


class SmokeBuild:
    def __init__(self, folder: Path, secrets: Path, manifest: dict, events: list) -> None:
        self.folder, self.secrets, self.manifest, self.events = folder, secrets, manifest, events


def _build_recipe(recipe: str, base: Path) -> tuple[SmokeBuild, dict]:
    from tdxvm.image.build import build
    from tdxvm.image.cache import StepCache
    from tdxvm.image.recipe import load_recipe
    from tdxvm.secretstore import SecretStore

    if os.geteuid() != 0:
        pytest.fail("the image build needs root (debootstrap, chroot); CI runs as root")
    secrets = base / "secrets"
    events: list = []
    name = Path(recipe).stem
    manifest = build(
        load_recipe(REPO / "images" / recipe),
        output=base / name,
        cache=StepCache(test_cache_root() / "image"),
        secret_store=SecretStore(directory=secrets),
        progress=events.append,
    )
    return SmokeBuild(base / name, secrets, manifest, events), manifest


@pytest.fixture(scope="session")
def smoke_build(tmp_path_factory) -> Iterator[SmokeBuild]:
    built, manifest = _build_recipe("smoke.yaml", tmp_path_factory.mktemp("smoke-build"))
    yield built
    _remove_uploaded_volumes(manifest)


@pytest.fixture(scope="session")
def model_smoke_build(tmp_path_factory) -> Iterator[SmokeBuild]:
    """``images/model-smoke.yaml``: the smoke image with the model-server profile (torch,
    transformers, the service); its pip step is cached like the others."""
    built, manifest = _build_recipe("model-smoke.yaml", tmp_path_factory.mktemp("model-smoke-build"))
    yield built
    _remove_uploaded_volumes(manifest)
    shutil.rmtree(built.folder, ignore_errors=True)  # 3 GiB


def _remove_uploaded_volumes(manifest: dict) -> None:
    """The launches uploaded this build's kernel, initrd and 1 GiB disk into libvirt's
    tdxvm pool (content-addressed, kept for later launches); a test build is never
    launched again, so its volumes go (unless a domain still uses them)."""
    from .poolclean import image_volumes, remove_unused

    remove_unused(image_volumes(manifest))


@pytest.fixture(scope="session", autouse=True)
def _libvirt_host_left_clean() -> Iterator[None]:
    """What an earlier, killed session left on qemu:///system goes first; at the end, the
    volumes this session added that no domain uses go too. Neither while another session
    runs (see tests/poolclean.py)."""
    from .poolclean import Session, remove_leftover_domains, remove_unused, volume_names

    session = Session()
    with session.alone() as alone:
        if alone:
            remove_leftover_domains()
    before = volume_names()
    yield
    with session.alone() as alone:
        if alone:
            remove_unused(volume_names() - before)
    session.close()


# -- a second libvirt host, reached only over SSH (tests/nshost.py) ----------------------
@pytest.fixture(scope="session")
def ns_host():
    """A libvirt host in namespaces of its own on this machine, as
    ``qemu+ssh://root@10.231.N.2/system?...``; skipped where namespaces are not usable
    (not root), torn down at the session's end."""
    from .nshost import NamespaceHost, Unavailable

    try:
        host = NamespaceHost().start()
    except Unavailable as exc:
        pytest.skip(str(exc))
    try:
        yield host
    finally:
        host.close()
