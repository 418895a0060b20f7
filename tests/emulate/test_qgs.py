"""The emulated quote service: measurements from the booted bytes, the wire, the domain XML."""

from __future__ import annotations

import base64
import hashlib
import json
import socket

import pytest

from tdxvm.attest import appraise, parse_quote
from tdxvm.attest.quote import TD_ATTR_DEBUG, TD_ATTR_SEPT_VE_DISABLE
from tdxvm.emulate.qgs import MAX_REQUEST, LaunchArtifacts, QuoteService, QuoteServiceError, emulated_rtmr0
from tdxvm.image.measure import predict
from tdxvm.launch.domain import TDXVM_NS, DomainSpec, domain_xml

from ..attested_guest import AT, CMDLINE, INITRD, anchor, artifacts, firmware, kernel, platform, policy_for


def ask(service: QuoteService, payload: bytes, answers: int = 1) -> list[dict]:
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as s, s.makefile("rb") as f:
        s.sendall(payload)
        return [json.loads(f.readline()) for _ in range(answers)]


def test_quote_carries_the_measurements_of_the_booted_files():
    launch = artifacts()
    expected = predict(firmware=firmware(), kernel=kernel(), initrd=INITRD, cmdline=CMDLINE)
    rd = hashlib.sha512(b"nonce and keys").digest()
    with QuoteService(platform(), launch) as service:
        [answer] = ask(service, json.dumps({"report_data": rd.hex()}).encode() + b"\n")
    quote = base64.b64decode(answer["quote"])
    body = parse_quote(quote).body
    assert body.report_data == rd
    assert body.mr_td.hex() == expected.mrtd
    assert [r.hex() for r in body.rtmrs[1:3]] == [expected.rtmr1, expected.rtmr2]
    assert body.rtmrs[0] == bytes(48)  # a firmware of no known build (this test's own TDVF): RTMR0 not computed
    assert body.rtmrs[3] == bytes(48)
    assert int.from_bytes(body.td_attributes, "little") == TD_ATTR_SEPT_VE_DISABLE and not body.debug
    verdict = appraise(quote, platform().collateral(), at=AT, policy=policy_for(launch), trust_anchor=anchor())
    assert verdict.accepted, verdict.reasons


def test_the_machine_changes_rtmr0_and_nothing_else():
    a, b = QuoteService(platform(), artifacts()), QuoteService(platform(), artifacts(rtmr0=b"\x05" * 48))
    qa, qb = (parse_quote(s.sign(bytes(64))).body for s in (a, b))
    assert (qa.rtmrs[0], qb.rtmrs[0]) == (bytes(48), b"\x05" * 48)
    assert (qa.mr_td, qa.rtmrs[1:]) == (qb.mr_td, qb.rtmrs[1:])


def test_rtmr0_is_computed_only_for_a_known_firmware_with_the_qemu_argv():
    """No argv (libvirt's test driver runs no QEMU) or a firmware of no known build: zeros,
    and the launch pins nothing then either (tdxvm.launch.rtmr0pin)."""
    argv = ["/usr/bin/qemu-system-x86_64", "-machine", "q35", "-m", "1024"]
    assert emulated_rtmr0(None, argv) == bytes(48)
    assert emulated_rtmr0(firmware(), argv) == bytes(48)  # this test's TDVF is no known build


def test_without_firmware_mrtd_is_zero_and_a_policy_naming_it_refuses():
    service = QuoteService(platform(), artifacts(firmware=None))
    quote = service.sign(bytes(64))
    assert parse_quote(quote).body.mr_td == bytes(48)
    verdict = appraise(quote, platform().collateral(), at=AT, policy=policy_for(artifacts()), trust_anchor=anchor())
    assert [r.code for r in verdict.reasons] == ["measurement-mismatch"] and "MR_TD" in verdict.reasons[0].message


def test_refuses_debug_and_unpredictable_kernels():
    with pytest.raises(QuoteServiceError, match="DEBUG") as exc:
        artifacts(td_attributes=TD_ATTR_SEPT_VE_DISABLE | TD_ATTR_DEBUG)
    assert exc.value.code == "debug-td"
    no_stub_guids = (
        kernel().replace(bytes.fromhex("6c767f60"), b"\x00" * 4).replace(bytes.fromhex("3d1a7596"), b"\x00" * 4)
    )
    with pytest.raises(QuoteServiceError, match="RTMR2") as exc:
        QuoteService(platform(), artifacts(kernel=no_stub_guids))
    assert exc.value.code == "unpredictable"


@pytest.mark.parametrize(
    "payload",
    [b"not json\n", b'{"report_data": "00"}\n', b'["x"]\n', json.dumps({"report_data": "zz" * 64}).encode() + b"\n"],
)
def test_bad_requests_get_an_error_and_the_connection_goes_on(payload):
    with QuoteService(platform(), artifacts()) as service:
        bad, good = ask(service, payload + json.dumps({"report_data": "11" * 64}).encode() + b"\n", answers=2)
    assert set(bad) == {"error"} and "report_data" in bad["error"]
    assert parse_quote(base64.b64decode(good["quote"])).body.report_data == b"\x11" * 64


def test_oversized_request_is_refused_and_closed():
    with (
        QuoteService(platform(), artifacts()) as service,
        socket.create_connection(("127.0.0.1", service.port), timeout=10) as s,
    ):
        s.sendall(b"x" * (MAX_REQUEST + 10) + b"\n")
        with s.makefile("rb") as f:
            assert "longer than" in json.loads(f.readline())["error"]
            assert f.readline() == b""  # closed


def test_stopped_service_has_no_port():
    service = QuoteService(platform(), artifacts())
    with pytest.raises(QuoteServiceError, match="not running"):
        _ = service.port
    with service:
        assert service.guest_address() == f"10.0.2.2:{service.port}"
    with pytest.raises(QuoteServiceError):
        _ = service.port


EMULATED_XML = f"""<domain type='qemu' xmlns:tdxvm='{TDXVM_NS}'>
  <name>smoke</name>
  <metadata><tdxvm:owner backend='emulated'><tdxvm:firmware path='/img/OVMF.inteltdx.fd'/></tdxvm:owner></metadata>
  <memory unit='GiB'>1</memory>
  <vcpu placement='static'>2</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type><kernel>/img/vmlinuz</kernel><initrd>/img/initrd.img</initrd>
    <cmdline>{CMDLINE}</cmdline></os>
</domain>"""


def files(fail: dict[str, OSError] | None = None):
    """A reader of the libvirt host's files (here a table), recording what it was asked."""
    table = {"/img/vmlinuz": kernel(), "/img/initrd.img": INITRD, "/img/OVMF.inteltdx.fd": firmware()}
    read_paths: list[str] = []

    def read(path: str) -> bytes:
        read_paths.append(path)
        if fail and path in fail:
            raise fail[path]
        if path not in table:
            raise FileNotFoundError(2, "No such file or directory", path)
        return table[path]

    return read, read_paths


def test_from_emulated_domain_xml():
    read, paths = files()
    launch = LaunchArtifacts.from_domain_xml(EMULATED_XML, read=read)
    assert sorted(paths) == ["/img/OVMF.inteltdx.fd", "/img/initrd.img", "/img/vmlinuz"]
    assert launch == artifacts()  # the same bytes and command line
    assert launch.td_attributes == TD_ATTR_SEPT_VE_DISABLE


def test_from_tdx_domain_xml_takes_the_loader_and_launch_security():
    spec = DomainSpec(
        name="td1",
        uuid="6b1e3c4e-8a8e-4b84-9a47-2f7d0f6e8a11",
        backend="tdx",
        vcpus=4,
        memory_mib=4096,
        kernel="/img/vmlinuz",
        initrd="/img/initrd.img",
        cmdline=CMDLINE,
        disk="/img/disk.img",
        firmware="/img/OVMF.inteltdx.fd",
        mr_owner=b"\x07" * 48,
    )
    read, _ = files()
    launch = LaunchArtifacts.from_domain_xml(domain_xml(spec), read=read)
    assert launch.firmware == firmware() and launch.rtmr0 == bytes(48)
    assert launch.mr_owner == b"\x07" * 48 and launch.mr_config_id == bytes(48)
    assert launch.td_attributes == TD_ATTR_SEPT_VE_DISABLE


def test_emulated_domain_xml_without_a_firmware_record():
    spec = DomainSpec(
        name="e1",
        uuid="0c7c3b1e-2a55-4c1f-9d49-5a0d3f1e2b77",
        backend="emulated",
        vcpus=2,
        memory_mib=1024,
        kernel="/img/vmlinuz",
        initrd="/img/initrd.img",
        cmdline=CMDLINE,
        disk="/img/disk.img",
    )
    read, paths = files()
    launch = LaunchArtifacts.from_domain_xml(domain_xml(spec), read=read)
    assert launch == artifacts(firmware=None) and "/img/OVMF.inteltdx.fd" not in paths


def test_domain_xml_errors_name_the_element():
    read, _ = files()
    with pytest.raises(QuoteServiceError, match="no <os><kernel>"):
        LaunchArtifacts.from_domain_xml("<domain><name>x</name><os/></domain>", read=read)
    with pytest.raises(QuoteServiceError, match="cannot read <os><initrd> /img/initrd.img") as exc:
        LaunchArtifacts.from_domain_xml(
            EMULATED_XML, read=files({"/img/initrd.img": PermissionError(13, "Permission denied")})[0]
        )
    assert exc.value.code == "domain-file"
    with pytest.raises(QuoteServiceError, match="tdxvm:firmware"):
        LaunchArtifacts.from_domain_xml(EMULATED_XML.replace("/img/OVMF.inteltdx.fd", "OVMF.fd"), read=read)
    with pytest.raises(QuoteServiceError, match="domain XML"):
        LaunchArtifacts.from_domain_xml("<domain>", read=read)


def test_policy_from_predict_refuses_another_initrd():
    service = QuoteService(platform(), artifacts(initrd=INITRD + b"tampered"))
    verdict = appraise(
        service.sign(bytes(64)), platform().collateral(), at=AT, policy=policy_for(artifacts()), trust_anchor=anchor()
    )
    assert not verdict.accepted
    assert [r.message.split(" is ")[0] for r in verdict.reasons] == ["quote field RTMR2"]


def test_quote_version_5():
    quote = QuoteService(platform(), artifacts(), version=5).sign(b"\x01" * 64)
    assert parse_quote(quote).version == 5
    assert appraise(
        quote, platform().collateral(), at=AT, policy=policy_for(artifacts()), trust_anchor=anchor()
    ).accepted


# -- RTMR3: the guest's extends, kept as a TD's TDX module keeps them --------------------


def test_extend_requests_measure_rtmr3_into_later_quotes():
    d1, d2 = hashlib.sha384(b"model event 1").digest(), hashlib.sha384(b"model event 2").digest()
    with QuoteService(platform(), artifacts()) as service:
        first, second, read, quote = ask(
            service,
            b"".join(
                json.dumps(r).encode() + b"\n"
                for r in (
                    {"op": "extend", "rtmr": 3, "digest": d1.hex()},
                    {"op": "extend", "rtmr": 3, "digest": d2.hex()},
                    {"op": "read", "rtmr": 3},
                    {"report_data": "11" * 64},
                )
            ),
            answers=4,
        )
    after_one = hashlib.sha384(bytes(48) + d1).digest()
    assert first == {"rtmr": 3, "value": after_one.hex()}
    assert second["value"] == read["value"] == hashlib.sha384(after_one + d2).hexdigest()
    body = parse_quote(base64.b64decode(quote["quote"])).body
    assert (
        body.rtmrs[3].hex() == read["value"]
        and body.rtmrs[:3] == parse_quote(QuoteService(platform(), artifacts()).sign(bytes(64))).body.rtmrs[:3]
    )
    verdict = appraise(
        base64.b64decode(quote["quote"]),
        platform().collateral(),
        at=AT,
        policy=policy_for(artifacts()),
        trust_anchor=anchor(),
    )
    assert verdict.accepted  # RTMR3 is not in the launch policy: the model event log checks it (verify-endpoint)


def test_each_service_is_one_boot_rtmr3_starts_at_zero_and_reset_clears_it():
    a, b = QuoteService(platform(), artifacts()), QuoteService(platform(), artifacts())
    a.extend_rtmr(3, b"\x01" * 48)
    assert a.rtmr(3) != bytes(48) and b.rtmr(3) == bytes(48)  # per VM (per service), in memory
    assert parse_quote(a.sign(bytes(64))).body.rtmrs[3] == a.rtmr(3)
    a.reset()
    assert a.rtmr(3) == bytes(48) and parse_quote(a.sign(bytes(64))).body.rtmrs[3] == bytes(48)


@pytest.mark.parametrize(
    "request_, words",
    [
        ({"op": "extend", "rtmr": 2, "digest": "00" * 48}, "only RTMR3 can be extended"),
        ({"op": "extend", "rtmr": 3, "digest": "00" * 32}, "96 hex digits"),
        ({"op": "extend", "rtmr": "3", "digest": "00" * 48}, "an RTMR index"),
        ({"op": "read", "rtmr": 7}, "not 0..3"),
        ({"op": "reboot"}, "unknown op 'reboot'"),
    ],
)
def test_bad_extend_and_read_requests_are_refused(request_, words):
    with QuoteService(platform(), artifacts()) as service:
        [answer] = ask(service, json.dumps(request_).encode() + b"\n")
        assert set(answer) == {"error"} and words in answer["error"]
        assert service.rtmr(3) == bytes(48)


def test_a_guard_refuses_every_request_once_the_boot_is_gone():
    why: list[str] = []
    with QuoteService(platform(), artifacts(), guard=lambda: why[0] if why else None) as service:
        (ok,) = ask(service, json.dumps({"op": "extend", "rtmr": 3, "digest": "01" * 48}).encode() + b"\n")
        why.append("domain booted again")
        refused_quote, refused_extend = ask(
            service,
            json.dumps({"report_data": "00" * 64}).encode()
            + b"\n"
            + json.dumps({"op": "extend", "rtmr": 3, "digest": "01" * 48}).encode()
            + b"\n",
            answers=2,
        )
    assert "value" in ok and refused_quote == refused_extend == {"error": "domain booted again"}
