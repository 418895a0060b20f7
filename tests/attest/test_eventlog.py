"""Event-log parsing and RTMR replay on the real vectors, on broken logs, and fuzzed.

Vectors (see ../shared/testdata/tdx/README.md): go-tdx-guest-ccel (Google Cloud TD:
CCEL table + log + quote), dstack-eventlog (JSON log with runtime events in RTMR3),
cc-api-preprod-root (a CCEL log whose RTMR2 does not replay to the quote's).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
from functools import cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tdxvm.attest.errors import EventLogError
from tdxvm.attest.eventlog import (
    ALG_SHA1,
    ALG_SHA384,
    EV_EFI_ACTION,
    EV_EVENT_TAG,
    EV_IPL,
    EV_NO_ACTION,
    EV_RUNTIME_EVENT,
    LINUX_INITRD_TAG_ID,
    LINUX_LOAD_OPTIONS_TAG_ID,
    Event,
    compare_rtmrs,
    parse_json_event_log,
    parse_spec_id_event,
    parse_tcg_event_log,
    replay,
    runtime_event_digest,
)
from tdxvm.attest.eventtext import describe_event, event_text, event_type_name, tagged_event
from tdxvm.attest.quote import parse_quote

from ..conftest import TESTDATA as TDX

ZERO48 = bytes(48)


@cache
def _read(rel: str) -> bytes:
    path = TDX / rel
    if not path.is_file():
        pytest.fail(f"TDX test vector {path} not found (set TDXVM_TESTDATA)")
    return path.read_bytes()


def _quote_rtmrs(name: str) -> tuple[bytes, ...]:
    return parse_quote(_read(f"{name}/quote.bin")).body.rtmrs


def _dstack() -> dict:
    return json.loads(_read("dstack-eventlog/getquote.json"))


def _event_end(ev: Event) -> int:
    """Byte offset just past a binary TCG_PCR_EVENT2."""
    return ev.offset + 12 + sum(2 + len(d) for d in ev.digests.values()) + 4 + len(ev.data)


def _event2(mr: int, etype: int, digest: bytes, data: bytes, alg: int = ALG_SHA384) -> bytes:
    return struct.pack("<III", mr, etype, 1) + struct.pack("<H", alg) + digest + struct.pack("<I", len(data)) + data


def _ccel_log() -> bytes:
    return _read("go-tdx-guest-ccel/ccel_data.bin")


def _spec_id_prefix() -> bytes:
    """The real log's spec-ID event (65 bytes), to build synthetic logs on."""
    return _ccel_log()[:65]


# --- Real vectors ---------------------------------------------------------------------


def test_go_tdx_guest_ccel_replays_to_quote():
    events = parse_tcg_event_log(_ccel_log())
    assert len(events) == 44
    assert events[0].event_type == EV_NO_ACTION and events[0].mr_index is None
    assert events[0].log_mr_index == 1  # TDVF writes PCR index 1 in the spec-ID event
    spec = parse_spec_id_event(events[0].data)
    assert spec.digest_sizes == {ALG_SHA384: 48} and spec.spec_version == (2, 0, 0)
    assert all(set(e.digests) == {ALG_SHA384} for e in events[1:])
    replayed = replay(events)
    assert replayed == _quote_rtmrs("go-tdx-guest-ccel")
    assert replayed[3] == ZERO48  # nothing extends RTMR3 in this boot
    assert all(c.matches for c in compare_rtmrs(replayed, _quote_rtmrs("go-tdx-guest-ccel")))


def test_go_tdx_guest_ccel_padding_is_0xff():
    raw = _ccel_log()
    end = _event_end(parse_tcg_event_log(raw)[-1])
    assert end == 18101 and set(raw[end:]) == {0xFF}


def test_go_tdx_guest_kernel_cmdline_is_in_grub_ipl_events():
    events = parse_tcg_event_log(_ccel_log())
    texts = [(e.mr_index, e.event_type, event_text(e)) for e in events]
    cmdlines = [t for mr, et, t in texts if t and t.startswith("kernel_cmdline: ")]
    assert len(cmdlines) == 1
    assert cmdlines[0].startswith("kernel_cmdline: /syslinux/vmlinuz.A init=/usr/lib/systemd/systemd")
    assert all(mr == 2 and et == EV_IPL for mr, et, t in texts if t and t.startswith(("grub_cmd:", "kernel_cmdline:")))
    assert all(t is not None for mr, et, t in texts if et == EV_IPL)  # multi-line menuentry events included
    assert "EV_EFI_ACTION" in describe_event(events[-1])
    assert event_text(events[-1]) == "Exit Boot Services Returned with Success"


def test_dstack_json_replays_all_four_rtmrs():
    doc = _dstack()
    events = parse_json_event_log(doc["event_log"])
    quoted = parse_quote(bytes.fromhex(doc["quote"])).body.rtmrs
    replayed = replay(events)
    assert replayed == quoted
    assert replayed[3] != ZERO48
    # The same log given as a decoded list, as bytes, or inside the GetQuote response.
    assert replay(parse_json_event_log(json.loads(doc["event_log"]))) == quoted
    assert replay(parse_json_event_log(doc["event_log"].encode())) == quoted
    assert replay(parse_json_event_log(doc)) == quoted


def test_dstack_runtime_event_digests_recompute():
    entries = json.loads(_dstack()["event_log"])
    events = parse_json_event_log(entries)
    runtime = [(e, ev) for e, ev in zip(entries, events, strict=True) if e["event_type"] == EV_RUNTIME_EVENT]
    assert [ev.name for _, ev in runtime][:2] == ["system-preparing", "app-id"]
    assert all(ev.mr_index == 3 for _, ev in runtime) and len(runtime) == 9
    for entry, ev in runtime:
        expected = hashlib.sha384(
            struct.pack("<I", 0x08000001)
            + b":"
            + entry["event"].encode()
            + b":"
            + bytes.fromhex(entry["event_payload"])
        ).digest()
        assert ev.digests[ALG_SHA384] == expected == runtime_event_digest(entry["event"], ev.data)
        if entry["digest"]:
            assert bytes.fromhex(entry["digest"]) == expected
    assert event_text(runtime[-2][1]) == "storage-fs: zfs"


def test_cc_api_log_flags_exactly_rtmr2():
    events = parse_tcg_event_log(_read("cc-api-preprod-root/ccel_data.bin"))
    result = compare_rtmrs(replay(events), _quote_rtmrs("cc-api-preprod-root"))
    assert [c.index for c in result] == [0, 1, 2, 3]
    assert [c.index for c in result if not c.matches] == [2]
    assert result[2].replayed != result[2].quoted and len(result[2].quoted) == 48


# --- Tampering ------------------------------------------------------------------------


def test_flipping_a_digest_byte_changes_exactly_one_rtmr():
    raw = _ccel_log()
    events = parse_tcg_event_log(raw)
    base = replay(events)
    for mr in range(3):  # this log extends RTMR0..2
        ev = next(e for e in events if e.mr_index == mr)
        pos = ev.offset + 12 + 2 + 17  # a byte inside the SHA-384 digest
        mutated = bytearray(raw)
        mutated[pos] ^= 0x01
        changed = [
            i for i, (a, b) in enumerate(zip(base, replay(parse_tcg_event_log(bytes(mutated))), strict=True)) if a != b
        ]
        assert changed == [mr]


def test_json_runtime_event_with_altered_payload_is_reported():
    entries = json.loads(_dstack()["event_log"])
    i = next(n for n, e in enumerate(entries) if e["event"] == "compose-hash")
    entries[i]["digest"] = runtime_event_digest("compose-hash", bytes.fromhex(entries[i]["event_payload"])).hex()
    parse_json_event_log(entries)  # a stated digest that matches is fine
    entries[i]["event_payload"] = "00" + entries[i]["event_payload"][2:]
    with pytest.raises(EventLogError, match=rf"event_log\[{i}\]\.digest: runtime event 'compose-hash'"):
        parse_json_event_log(entries)
    # Without a stated digest the altered payload shows up as an RTMR3 mismatch.
    entries[i]["digest"] = ""
    quoted = parse_quote(bytes.fromhex(_dstack()["quote"])).body.rtmrs
    result = compare_rtmrs(replay(parse_json_event_log(entries)), quoted)
    assert [c.index for c in result if not c.matches] == [3]


# --- Malformed binary logs ------------------------------------------------------------


def test_truncated_mid_event_names_the_offset():
    raw = _ccel_log()
    ev = parse_tcg_event_log(raw)[10]
    with pytest.raises(EventLogError, match=rf"event 10 \(at byte offset {ev.offset}\).*byte offset {ev.offset + 14}"):
        parse_tcg_event_log(raw[: ev.offset + 20])
    with pytest.raises(
        EventLogError, match=rf"event size {len(ev.data)} at byte offset {_event_end(ev) - len(ev.data) - 4}"
    ):
        parse_tcg_event_log(raw[: _event_end(ev) - 1])


def test_trailing_zero_padding_and_no_padding():
    raw = _ccel_log()
    end = _event_end(parse_tcg_event_log(raw)[-1])
    ref = replay(parse_tcg_event_log(raw))
    assert replay(parse_tcg_event_log(raw[:end])) == ref
    assert replay(parse_tcg_event_log(raw[:end] + bytes(100) + b"\xff" * 10)) == ref


def test_garbage_after_padding_is_an_error():
    raw = _ccel_log()
    end = _event_end(parse_tcg_event_log(raw)[-1])
    with pytest.raises(EventLogError, match=rf"event 44 \(at byte offset {end}\).*MR index 4294967295"):
        parse_tcg_event_log(raw[: end + 64] + b"junk" + raw[end + 68 :])


@pytest.mark.parametrize(
    ("tail", "message"),
    [
        (struct.pack("<III", 1, 4, 2), r"digest count 2 at byte offset 73 is not in 1\.\.1"),
        (struct.pack("<III", 1, 4, 0), r"digest count 0 at byte offset 73"),
        (struct.pack("<IIIH", 1, 4, 1, 0x000B), r"digest algorithm 0x000b at byte offset 77 has no size"),
        (
            _event2(1, 4, ZERO48, b"")[:-4] + struct.pack("<I", 1000) + b"x",
            r"event size 1000 at byte offset 127 runs past",
        ),
        (_event2(7, 4, ZERO48, b"abcd"), r"MR index 7 at byte offset 65 is out of range"),
        (_event2(1, 4, bytes(20), b"\0" * 40, alg=ALG_SHA1), r"digest algorithm 0x0004 at byte offset 77 has no size"),
        (b"\x01\x00\x00", r"MR index at byte offset 65: needs 4 bytes, only 3 remain"),
    ],
    ids=[
        "count-too-large",
        "count-zero",
        "undeclared-alg",
        "size-past-end",
        "bad-mr-index",
        "sha1-only",
        "short-header",
    ],
)
def test_malformed_events(tail, message):
    with pytest.raises(EventLogError, match=message):
        parse_tcg_event_log(_spec_id_prefix() + tail)


def test_synthetic_log_extends_and_skips():
    d1, d2 = hashlib.sha384(b"1").digest(), hashlib.sha384(b"2").digest()
    log = (
        _spec_id_prefix()
        + _event2(0, 0x80000008, d1, b"mrtd")  # MR index 0 = MRTD: not replayed
        + _event2(2, EV_NO_ACTION, d1, b"info")  # EV_NO_ACTION: not extended
        + _event2(4, EV_IPL, d2, b"x")  # RTMR3
        + b"\xff" * 32
    )
    events = parse_tcg_event_log(log)
    assert [e.mr_index for e in events] == [None, None, None, 3]
    assert replay(events) == (ZERO48, ZERO48, ZERO48, hashlib.sha384(ZERO48 + d2).digest())
    assert describe_event(events[1]).startswith("#1 MRTD EV_EFI_PLATFORM_FIRMWARE_BLOB")


def test_not_a_crypto_agile_log():
    with pytest.raises(EventLogError, match="empty"):
        parse_tcg_event_log(b"\xff" * 64)
    bad = bytearray(_spec_id_prefix())
    bad[32:36] = b"Spex"
    with pytest.raises(EventLogError, match=r"not \"Spec ID Event03\".*byte offset 32"):
        parse_tcg_event_log(bytes(bad))
    bad = bytearray(_spec_id_prefix())
    bad[4] = 5
    with pytest.raises(EventLogError, match="expected EV_NO_ACTION"):
        parse_tcg_event_log(bytes(bad))


# --- Malformed JSON -------------------------------------------------------------------


def _entry(**over) -> dict:
    entry = {"imr": 0, "event_type": 4, "digest": "00" * 48, "event": "", "event_payload": ""}
    entry.update(over)
    return entry


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ("{not json", r"JSON at character offset 1"),
        (b"\xff\xfe", r"event log JSON"),
        ({"x": 1}, r"expected a JSON list"),
        ([_entry(), 3], r"event_log\[1\]: expected an object"),
        ([_entry(imr=4)], r"event_log\[0\]\.imr: expected an integer in 0\.\.3, got 4"),
        ([_entry(imr=True)], r"event_log\[0\]\.imr"),
        ([_entry(event_type="4")], r"event_log\[0\]\.event_type"),
        ([{"imr": 0}], r"event_log\[0\]\.event_type: .* got None"),
        ([_entry(digest="zz")], r"event_log\[0\]\.digest: not hex"),
        ([_entry(digest="00" * 20)], r"event_log\[0\]\.digest: expected a 48-byte"),
        ([_entry(event_payload=5)], r"event_log\[0\]\.event_payload: expected a hex string"),
        ([_entry(event=["a"])], r"event_log\[0\]\.event: expected a string"),
        ([_entry(event_type=EV_RUNTIME_EVENT, event="\ud800")], r"event_log\[0\]\.event: not valid Unicode"),
    ],
)
def test_malformed_json(obj, message):
    with pytest.raises(EventLogError, match=message):
        parse_json_event_log(obj)


# --- Descriptions ---------------------------------------------------------------------


def test_event_type_names():
    assert event_type_name(0x80000003) == "EV_EFI_BOOT_SERVICES_APPLICATION"
    assert event_type_name(0x80000001) == "EV_EFI_VARIABLE_DRIVER_CONFIG"
    assert event_type_name(6) == "EV_EVENT_TAG" and event_type_name(4) == "EV_SEPARATOR"
    assert event_type_name(0xD) == "EV_IPL" and event_type_name(0x8000000B) == "EV_EFI_HANDOFF_TABLES2"
    assert event_type_name(0x8000000A) == "EV_EFI_PLATFORM_FIRMWARE_BLOB2"
    assert event_type_name(0x800000E0) == "EV_EFI_VARIABLE_AUTHORITY"
    assert event_type_name(0x80000002) == "EV_EFI_VARIABLE_BOOT" and event_type_name(0x80000006) == "EV_EFI_GPT_EVENT"
    assert event_type_name(0x1234) == "0x1234"


def test_event_text_utf16_and_tagged():
    cmdline = "console=ttyS0 root=/dev/vda1\0".encode("utf-16-le")
    ipl = Event(0, 2, EV_IPL, {ALG_SHA384: ZERO48}, cmdline, 0)
    assert event_text(ipl) == "console=ttyS0 root=/dev/vda1"
    initrd = struct.pack("<II", LINUX_INITRD_TAG_ID, 12) + b"Linux initrd"
    tag = Event(1, 2, EV_EVENT_TAG, {ALG_SHA384: ZERO48}, initrd, 0)
    assert tagged_event(tag) == (0x8F3B22EC, b"Linux initrd")
    assert event_text(tag) == "Linux initrd"
    assert "tag 0x8f3b22ec" in describe_event(tag)
    opts = "quiet\0".encode("utf-16-le")
    tag2 = Event(2, 2, EV_EVENT_TAG, {}, struct.pack("<II", LINUX_LOAD_OPTIONS_TAG_ID, len(opts)) + opts, 0)
    assert event_text(tag2) == "quiet"
    assert event_text(Event(3, 1, EV_EFI_ACTION, {}, b"\x01\x02binary", 0)) is None
    assert event_text(Event(4, 0, 0x80000001, {}, b"text", 0)) is None


# --- Only EventLogError escapes --------------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _only_event_log_error(fn, arg) -> None:
    with contextlib.suppress(EventLogError):
        fn(arg)


@FUZZ
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(data):
    _only_event_log_error(parse_tcg_event_log, data)
    _only_event_log_error(parse_tcg_event_log, _spec_id_prefix() + data)
    _only_event_log_error(parse_json_event_log, data)


@FUZZ
@given(
    st.data(),
    st.lists(st.tuples(st.integers(0, 18300), st.integers(0, 255)), max_size=6),
    st.integers(0, 18400),
)
def test_fuzz_mutated_real_log(data, flips, cut):
    raw = _ccel_log()[:18400]  # all events plus some padding
    events = parse_tcg_event_log(raw)
    buf = bytearray(raw)
    for pos, val in flips:
        buf[pos] = val
    # Also overwrite one header field (index, type, count, algorithm, size) with a random value.
    ev = data.draw(st.sampled_from(events[1:]))
    field = data.draw(st.sampled_from([0, 4, 8, 12, 14 + 48]))
    buf[ev.offset + field : ev.offset + field + 4] = struct.pack("<I", data.draw(st.integers(0, 2**32 - 1)))
    with contextlib.suppress(EventLogError):
        replay(parse_tcg_event_log(bytes(buf[:cut])))


_json_scalar = st.none() | st.booleans() | st.integers() | st.text(max_size=20) | st.floats(allow_nan=False)
_json_value = st.recursive(
    _json_scalar, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12
)
_json_entry = st.fixed_dictionaries(
    {},
    optional={
        "imr": st.integers(-1, 5) | _json_scalar,
        "event_type": st.sampled_from([4, EV_RUNTIME_EVENT, EV_NO_ACTION, 2**32]) | _json_scalar,
        "digest": st.sampled_from(["", "00" * 48, "0"]) | _json_scalar,
        "event": st.text(max_size=10) | _json_value,
        "event_payload": st.sampled_from(["", "abcd", "x"]) | _json_scalar,
    },
)


@FUZZ
@given(st.lists(_json_entry | _json_value, max_size=5) | _json_value)
def test_fuzz_json(obj):
    _only_event_log_error(parse_json_event_log, obj)
    try:
        text = json.dumps(obj)
    except (ValueError, TypeError):
        return
    with contextlib.suppress(EventLogError):
        replay(parse_json_event_log(text))
