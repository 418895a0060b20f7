"""Shared test fixtures: the real TDX test vectors beside the repository."""

from __future__ import annotations

import json
import os
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


@pytest.fixture(scope="session")
def smoke_build(tmp_path_factory) -> SmokeBuild:
    from tdxvm.image.build import build
    from tdxvm.image.cache import StepCache
    from tdxvm.image.recipe import load_recipe
    from tdxvm.secretstore import SecretStore

    if os.geteuid() != 0:
        pytest.fail("the image build needs root (debootstrap, chroot); CI runs as root")
    base = tmp_path_factory.mktemp("smoke-build")
    secrets = base / "secrets"
    events: list = []
    manifest = build(load_recipe(REPO / "images" / "smoke.yaml"), output=base / "smoke",
                     cache=StepCache(test_cache_root() / "image"), secret_store=SecretStore(directory=secrets),
                     progress=events.append)  # fmt: skip
    return SmokeBuild(base / "smoke", secrets, manifest, events)
