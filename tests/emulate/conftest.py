"""Fixtures for the emulated platform: one platform per test module, at a fixed time."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from tdxvm.emulate import EmulatedPlatform

# Every test issues and verifies at this instant; nothing reads the clock.
AT = datetime(2025, 7, 1, 12, 0, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def platform() -> EmulatedPlatform:
    return EmulatedPlatform(at=AT, seed="tests/emulate")
