"""The RTMR rules checked against real TDX event logs (../shared/testdata/tdx).

* go-tdx-guest-ccel and cc-api-preprod-root: TDVF logs of TDs that booted through
  shim and GRUB (kernels 6.1 and 6.2). Their EV_EFI_ACTION and EV_SEPARATOR events
  carry payloads; their command-line events are GRUB's EV_IPL text, not the EFI stub's.
* dstack-eventlog: a direct kernel boot (QEMU 8.2.2, dstack 0.6.0) whose vm_config
  carries the image's measurement document (CBOR: kernel Authenticode, command-line and
  initrd digests, MRTD per page order); its quote's RTMRs are the ground truth.
"""

from __future__ import annotations

import base64
import glob
import json
import os
from pathlib import Path

import pytest

from tdxvm.attest.eventlog import (
    EV_EFI_ACTION,
    EV_EFI_BOOT_SERVICES_APPLICATION,
    EV_EVENT_TAG,
    EV_IPL,
    EV_SEPARATOR,
    parse_json_event_log,
    parse_tcg_event_log,
)
from tdxvm.attest.quote import parse_quote, read_quote_bytes
from tdxvm.image.measure import (
    CALLING_EFI_APPLICATION,
    EFI_CC_MEASUREMENT_PROTOCOL_GUID,
    EFI_TCG2_PROTOCOL_GUID,
    EXIT_BOOT_SERVICES_INVOCATION,
    EXIT_BOOT_SERVICES_SUCCEEDED,
    efi_stub_measures_cc,
    load_options,
    replay,
    rtmr1_events,
    sha384,
)
from tdxvm.image.measureerrors import MeasureError

BINARY_LOGS = ["go-tdx-guest-ccel/ccel_data.bin", "cc-api-preprod-root/ccel_data.bin"]
ACTIONS = {CALLING_EFI_APPLICATION, EXIT_BOOT_SERVICES_INVOCATION, EXIT_BOOT_SERVICES_SUCCEEDED}


def cbor(data: bytes, pos: int = 0) -> tuple[object, int]:
    """Just enough CBOR (RFC 8949) for dstack's measurement document."""
    major, info = data[pos] >> 5, data[pos] & 31
    pos += 1
    if info < 24:
        arg = info
    else:
        size = {24: 1, 25: 2, 26: 4, 27: 8}[info]
        arg, pos = int.from_bytes(data[pos : pos + size], "big"), pos + size
    if major == 0:
        return arg, pos
    if major in (2, 3):
        raw = data[pos : pos + arg]
        return (raw if major == 2 else raw.decode()), pos + arg
    if major == 4:
        items = []
        for _ in range(arg):
            item, pos = cbor(data, pos)
            items.append(item)
        return items, pos
    if major == 5:
        out = {}
        for _ in range(arg):
            key, pos = cbor(data, pos)
            out[key], pos = cbor(data, pos)
        return out, pos
    raise ValueError(f"CBOR major type {major} at {pos - 1}")


@pytest.fixture(scope="module")
def dstack(testdata):
    doc = json.loads((testdata / "dstack-eventlog" / "getquote.json").read_text())
    vm = json.loads(doc["vm_config"])
    measurement, _ = cbor(base64.b64decode(vm["tdx_measurement"]["measurement"]))
    quote = parse_quote(read_quote_bytes(doc["quote"].encode()))
    return parse_json_event_log(doc), measurement, quote.body, vm


@pytest.mark.parametrize("name", BINARY_LOGS)
def test_efi_action_and_separator_digests(testdata, name):
    events = parse_tcg_event_log((testdata / name).read_bytes())
    actions = [e for e in events if e.event_type == EV_EFI_ACTION]
    separators = [e for e in events if e.event_type == EV_SEPARATOR]
    assert {e.data for e in actions} == ACTIONS
    for e in actions:  # SHA-384 of the ASCII text, no NUL
        assert e.sha384 == sha384(e.data) and e.mr_index == 1
    assert separators
    for e in separators:  # SHA-384 of four zero bytes
        assert e.data == b"\0\0\0\0" and e.sha384 == sha384(b"\0\0\0\0")
    rtmr1 = [e.data for e in events if e.mr_index == 1 and e.event_type == EV_EFI_ACTION]
    assert rtmr1 == [CALLING_EFI_APPLICATION, EXIT_BOOT_SERVICES_INVOCATION, EXIT_BOOT_SERVICES_SUCCEEDED]
    assert all(e.mr_index == 1 for e in events if e.event_type == EV_EFI_BOOT_SERVICES_APPLICATION)


def test_ready_to_boot_separator_goes_to_rtmr1_in_current_tdvf(testdata):
    """TdTcg2Dxe OnReadyToBoot: "Calling EFI Application" then a separator into RTMR1.
    The older TDVF of the cc-api log still put that separator into RTMR0."""
    for name, rtmr in (("go-tdx-guest-ccel/ccel_data.bin", 1), ("cc-api-preprod-root/ccel_data.bin", 0)):
        events = parse_tcg_event_log((testdata / name).read_bytes())
        calling = next(i for i, e in enumerate(events) if e.data == CALLING_EFI_APPLICATION)
        assert events[calling + 1].event_type == EV_SEPARATOR and events[calling + 1].mr_index == rtmr


@pytest.mark.parametrize("name", BINARY_LOGS)
def test_grub_command_line_events_are_not_the_stub_rule(testdata, name):
    """These logs' command lines are GRUB's EV_IPL events: SHA-384 of the text after
    "kernel_cmdline: ", ASCII without NUL. The Linux EFI stub measures UCS-2 with a NUL
    instead, so these events check GRUB's rule, not ours; and a pre-6.9 stub in a TD
    logs no EV_EVENT_TAG at all."""
    events = parse_tcg_event_log((testdata / name).read_bytes())
    cmdlines = [e for e in events if e.event_type == EV_IPL and e.data.startswith(b"kernel_cmdline: ")]
    assert len(cmdlines) == 1
    text = cmdlines[0].data[len(b"kernel_cmdline: ") :].rstrip(b"\0")
    assert cmdlines[0].sha384 == sha384(text) and cmdlines[0].mr_index == 2
    assert cmdlines[0].sha384 != sha384(load_options(text.decode(), has_initrd=False))
    assert not [e for e in events if e.event_type == EV_EVENT_TAG]


def test_dstack_rtmr1_is_the_predicted_sequence(dstack):
    events, measurement, body, _ = dstack
    kernel = measurement["image"]["kernel_authenticode"]
    expected = rtmr1_events(kernel)
    got = [e for e in events if e.mr_index == 1]
    assert [e.event_type for e in got] == [e.event_type for e in expected]
    assert [e.sha384.hex() for e in got] == [e.digest for e in expected]
    assert replay(bytes.fromhex(e.digest) for e in expected) == body.rtmrs[1]


def test_dstack_rtmr2_is_load_options_then_initrd(dstack):
    events, measurement, body, _ = dstack
    image = measurement["image"]
    got = [e for e in events if e.mr_index == 2]
    assert [e.event_type for e in got] == [EV_EVENT_TAG, EV_EVENT_TAG]
    assert [e.sha384 for e in got] == [image["cmdline_sha384"], image["initrd_sha384"]]
    assert replay([image["cmdline_sha384"], image["initrd_sha384"]]) == body.rtmrs[2]


def test_dstack_mrtd_is_two_pass_on_qemu8(dstack):
    _, measurement, body, vm = dstack
    assert vm["qemu_version"].startswith("8.")
    assert body.mr_td == measurement["tdvf"]["mrtd"]["two_pass"] != measurement["tdvf"]["mrtd"]["single_pass"]


def test_load_options_encoding():
    utf16 = "initrd=initrd console=ttyS0".encode("utf-16-le") + b"\0\0"
    assert load_options("console=ttyS0", has_initrd=True) == utf16
    assert load_options("console=ttyS0", has_initrd=True, initrd_option="append") == (
        "console=ttyS0 initrd=initrd".encode("utf-16-le") + b"\0\0"
    )
    assert load_options("console=ttyS0", has_initrd=False) == "console=ttyS0".encode("utf-16-le") + b"\0\0"
    assert load_options("", has_initrd=False) == b""  # NULL LoadOptions: the stub measures nothing
    assert load_options("", has_initrd=True) == "initrd=initrd ".encode("utf-16-le") + b"\0\0"
    assert load_options("é", has_initrd=False) == b"\xc3\x00\xa9\x00\x00\x00"  # one CHAR16 per byte
    # a command line given in argv that is not UTF-8 (os.fsdecode): its bytes, as QEMU passes them
    assert load_options(os.fsdecode(b"a\xffb"), has_initrd=False) == b"a\x00\xff\x00b\x00\x00\x00"
    with pytest.raises(MeasureError, match="NUL"):
        load_options("a\0b", has_initrd=False)


def test_efi_stub_detection():
    cc, tcg2 = EFI_CC_MEASUREMENT_PROTOCOL_GUID.bytes_le, EFI_TCG2_PROTOCOL_GUID.bytes_le
    # On-stack GUIDs are built from immediates: their quarters appear, not always adjacent.
    assert efi_stub_measures_cc(b"x" + tcg2[:8] + b"\x48\xb8" + tcg2[8:] + cc[:8] + b"..." + cc[8:]) is True
    assert efi_stub_measures_cc(b"x" + tcg2[:8] + b"\x48\xb8" + tcg2[8:]) is False
    assert efi_stub_measures_cc(b"x" * 100) is None


def test_debian_unstable_kernel_stub_measures_cc(debian_kernel):
    assert efi_stub_measures_cc(debian_kernel.read_bytes()) is True


@pytest.mark.parametrize(
    "path",
    ([os.environ["TDXVM_TEST_KERNEL"]] if "TDXVM_TEST_KERNEL" in os.environ else [])
    + sorted(glob.glob("/boot/vmlinuz-*"))
    or [None],
)
def test_local_kernel_stub(path):
    """Debian 12's 6.1 kernels hold the TCG2 protocol GUID but not the CC one."""
    if path is None:
        pytest.skip("no kernel in /boot and TDXVM_TEST_KERNEL unset")
    verdict = efi_stub_measures_cc(Path(path).read_bytes())
    assert verdict is not None
    if "6.1.0-" in os.path.basename(path):
        assert verdict is False
