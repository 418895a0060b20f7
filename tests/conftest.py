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
