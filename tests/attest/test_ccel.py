"""CCEL ACPI table parsing on the Google Cloud TD's table and on broken tables."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tdxvm.attest.ccel import CC_TYPE_TDX, CCEL_TABLE_SIZE, parse_ccel_table
from tdxvm.attest.errors import EventLogError

from ..conftest import TESTDATA as TDX


@pytest.fixture(scope="module")
def table() -> bytes:
    path = TDX / "go-tdx-guest-ccel" / "ccel_table.bin"
    if not path.is_file():
        pytest.fail(f"TDX test vector {path} not found (set TDXVM_TESTDATA)")
    return path.read_bytes()


def test_google_ccel_table(table):
    assert len(table) == CCEL_TABLE_SIZE == 56
    t = parse_ccel_table(table)
    assert t.cc_type == CC_TYPE_TDX and t.is_tdx and t.cc_subtype == 0
    assert (t.revision, t.oem_id, t.oem_table_id) == (1, b"INTEL ", b"EDK2    ")
    assert t.log_area_minimum_length == 0x40000 == (TDX / "go-tdx-guest-ccel" / "ccel_data.bin").stat().st_size
    assert t.log_area_start_address == 0xBEDBF000


def _fix_checksum(raw: bytearray) -> bytes:
    raw[9] = 0
    raw[9] = (-sum(raw)) % 256
    return bytes(raw)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t[:7], r"truncated header"),
        (lambda t: b"XCEL" + t[4:], r"signature at byte offset 0"),
        (lambda t: t[:4] + struct.pack("<I", 60) + t[8:], r"length at byte offset 4: 60"),
        (lambda t: t[:40], r"40 bytes, the length field says 56"),
        (lambda t: t + b"\0", r"57 bytes"),
        (lambda t: t[:9] + bytes([(t[9] + 1) % 256]) + t[10:], r"checksum at byte offset 9"),
        (lambda t: t[:40] + bytes([t[40] ^ 1]) + t[41:], r"checksum at byte offset 9"),
    ],
)
def test_broken_tables(table, mutate, message):
    with pytest.raises(EventLogError, match=message):
        parse_ccel_table(mutate(table))


def test_recomputed_checksum_is_accepted(table):
    raw = bytearray(table)
    raw[36] = 1  # another CC type, checksum fixed up
    assert parse_ccel_table(_fix_checksum(raw)).cc_type == 1


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=80))
def test_fuzz_only_event_log_error(data):
    with contextlib.suppress(EventLogError):
        parse_ccel_table(data)
