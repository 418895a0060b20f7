"""Port forward choice and tdxvm's domain metadata round trip."""

from __future__ import annotations

import random
import socket

import pytest

from tdxvm.launch.domain import PortForward
from tdxvm.launch.errors import LaunchError
from tdxvm.launch.metadata import VmMetadata, from_element_xml, parse_forwards, to_element_xml
from tdxvm.launch.ports import AUTO_PORTS, choose_forwards
from tdxvm.launch.spec import parse_vm_spec


def spec(image, forwards: str = ""):
    net = f"network:\n  forwards:\n{forwards}" if forwards else ""
    return parse_vm_spec(f"name: a\nimage: {image.manifest_path}\nbackend: emulated\n{net}")


def test_agent_and_ssh_get_free_ports_unless_given(image):
    got = choose_forwards(
        spec(image, "    - {guest: 22, host: 2222}\n"),
        image.manifest(),
        taken={25000},
        local=False,
        rng=random.Random(1),
    )
    assert got[0] == PortForward(host_port=2222, guest_port=22)
    assert [f.guest_port for f in got] == [22, 7300]
    assert got[1].host_port in AUTO_PORTS and got[1].host_port not in (25000, 2222)


def test_taken_and_busy_ports_refused(image):
    with pytest.raises(LaunchError, match="already forwarded to another tdxvm VM") as info:
        choose_forwards(spec(image, "    - {guest: 22, host: 25000}\n"), image.manifest(), taken={25000}, local=False)
    assert info.value.code == "port-in-use"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        with pytest.raises(LaunchError, match=f"127.0.0.1:{busy} is in use on this host"):
            choose_forwards(
                spec(image, f"    - {{guest: 22, host: {busy}}}\n"), image.manifest(), taken=set(), local=True
            )
        # On a remote host a local listener is irrelevant.
        assert (
            choose_forwards(
                spec(image, f"    - {{guest: 22, host: {busy}}}\n"), image.manifest(), taken=set(), local=False
            )[0].host_port
            == busy
        )


def test_auto_ports_skip_busy_local_ports(image):
    rng = random.Random(7)
    first = rng.choice(AUTO_PORTS)
    with socket.socket() as s:
        s.bind(("127.0.0.1", first))
        s.listen()
        got = choose_forwards(spec(image), image.manifest(), taken=set(), local=True, rng=random.Random(7))
    assert first not in {f.host_port for f in got}


def test_metadata_round_trip():
    meta = VmMetadata(
        backend="tdx",
        labels={"image": "llama2", "forwards": "0.0.0.0:8443-8443,127.0.0.1:20001-7300"},
        attestation={
            "verdict": "accept",
            "recorded_at": "2026-01-01T00:00:00Z",
            "tcb_status": "UpToDate",
            "reasons": [],
            "quote_version": 4,
        },
    )
    back = from_element_xml(to_element_xml(meta))
    assert back.backend == "tdx" and back.labels == meta.labels
    assert back.attestation == {
        "verdict": "accept",
        "recorded_at": "2026-01-01T00:00:00Z",
        "tcb_status": "UpToDate",
        "reasons": [],
    }
    assert back.forwards() == (
        PortForward(host_port=8443, guest_port=8443, host_address="0.0.0.0"),
        PortForward(host_port=20001, guest_port=7300),
    )
    assert parse_forwards("garbage,,1.2.3.4:x-1") == ()


def test_what_the_host_writes_into_the_metadata_never_crashes_a_reader():
    """Labels and the attestation element are the host's to write: odd numbers, absurd JSON."""
    assert parse_forwards("127.0.0.1:\u00b2-7300,127.0.0.1:\u0663-22,127.0.0.1:99999-22,127.0.0.1:0-22") == ()
    assert parse_forwards("127.0.0.1:" + "9" * 5000 + "-22,127.0.0.1:20001-7300") == (
        PortForward(host_port=20001, guest_port=7300),
    )
    xml = to_element_xml(VmMetadata(backend="emulated", labels={"image": "x"}))
    deep = xml.replace("</owner>", '<attestation verdict="accept">' + "[" * 100000 + "</attestation></owner>")
    assert deep != xml
    assert from_element_xml(deep).attestation == {"verdict": "accept", "recorded_at": None}
