"""The CLI's one refusal printer (tdxvm/cli/refusal.py), and the commands that use it:
every reason with its code, message and where, on stdout; the JSON documents unchanged."""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

from tdxvm.attest.result import Reason
from tdxvm.cli.refusal import print_refusal, reason_dicts, reason_fields, reason_lines
from tdxvm.provision.handshake import AttestationRefused
from tests.clirun import run

REASONS = (
    Reason("measurement-mismatch", "quote field RTMR2 is 00, expected 11"),
    Reason("tcb-status", "TCB OutOfDate"),
)


def test_text_names_every_reason(capsys):
    print_refusal("smoke did not attest", REASONS, "text", document={"never": "shown"})
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "REFUSED  smoke did not attest",
        "  - [measurement-mismatch] quote field RTMR2 is 00, expected 11",
        "  - [tcb-status] TCB OutOfDate",
    ]
    assert err == ""


def test_json_is_the_document_as_given(capsys):
    doc = {"name": "smoke", "state": "refused", "reasons": reason_dicts(REASONS)}
    print_refusal("smoke did not attest", REASONS, "json", document=doc)
    assert json.loads(capsys.readouterr().out) == {
        "name": "smoke",
        "state": "refused",
        "reasons": [
            {"code": "measurement-mismatch", "message": "quote field RTMR2 is 00, expected 11"},
            {"code": "tcb-status", "message": "TCB OutOfDate"},
        ],
    }


def test_where_is_shown_unless_the_message_says_it():
    quote = {
        "code": "quote-format",
        "message": "header.tee_type at byte offset 4: TEE type 0x0 (SGX) is not TDX (0x81)",
        "field": "header.tee_type",
        "offset": 4,
    }
    placed = {"code": "rtmr3-log-missing", "message": "no RTMR3 event log", "where": "https://10.0.0.5:8443"}
    assert reason_fields(quote) == ("quote-format", quote["message"], "header.tee_type at byte offset 4")
    assert reason_lines([quote, placed]) == [
        "  - [quote-format] header.tee_type at byte offset 4: TEE type 0x0 (SGX) is not TDX (0x81)",
        "  - [rtmr3-log-missing] no RTMR3 event log (https://10.0.0.5:8443)",
    ]
    assert reason_fields(REASONS[0]) == ("measurement-mismatch", REASONS[0].message, None)


def test_host_text_is_escaped_and_long_messages_stay_under_their_reason():
    lines = reason_lines([Reason("agent", "the guest said \x1b[2J\x1b]52;c;cGF3bmVk\x07\nsecond line")])
    assert lines == ["  - [agent] the guest said \\x1b[2J\\x1b]52;c;cGF3bmVk\\x07\n      second line"]


@pytest.mark.parametrize("no_color", [None, "1"])
def test_refused_in_red_only_without_no_color(monkeypatch, no_color):
    if no_color is None:
        monkeypatch.delenv("NO_COLOR", raising=False)
    else:
        monkeypatch.setenv("NO_COLOR", no_color)

    @click.command()
    def cmd() -> None:
        print_refusal("no", REASONS, "text", document={})

    out = CliRunner().invoke(cmd, [], color=True).stdout
    assert ("\x1b[31m\x1b[1mREFUSED\x1b[0m  no" in out) == (no_color is None)
    if no_color is not None:
        assert out.splitlines()[0] == "REFUSED  no"


# -- the commands -------------------------------------------------------------------------------


def _refused(*_args, **_kwargs):
    raise AttestationRefused("127.0.0.1:20001", REASONS, verdict=None, provider=None)


def test_provision_refusal(capsys, monkeypatch, tmp_path):
    import tdxvm.provision.model

    monkeypatch.setattr(tdxvm.provision.model, "provision", _refused)
    base = ("provision", "smoke", "--model", tmp_path, "--uri", "test:///default")
    code, out, err = run(capsys, *base)
    assert code == 1 and err == ""
    assert out.splitlines() == [
        "REFUSED  smoke did not attest; the model key was not released to it",
        "  - [measurement-mismatch] quote field RTMR2 is 00, expected 11",
        "  - [tcb-status] TCB OutOfDate",
    ]
    code, out, _ = run(capsys, *base, "-o", "json")
    assert code == 1 and json.loads(out) == {"name": "smoke", "state": "refused", "reasons": reason_dicts(REASONS)}


def test_attest_refusal(capsys, monkeypatch, tmp_path):
    from tdxvm.provision import attestation

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    monkeypatch.setattr(attestation, "reattest", _refused)
    code, out, _ = run(capsys, "attest", "smoke", "--uri", "test:///default")
    assert code == 1 and out.startswith("REFUSED  smoke did not attest against its launch policy\n")
    assert "  - [tcb-status] TCB OutOfDate" in out
    code, out, _ = run(capsys, "attest", "smoke", "--uri", "test:///default", "-o", "json")
    assert code == 1 and json.loads(out) == {"name": "smoke", "verdict": "reject", "reasons": reason_dicts(REASONS)}


def test_launch_refusal_document(capsys):
    from tdxvm.cli.vm import _report_refused

    _report_refused("smoke", "service-refused", "the service of smoke did not attest", REASONS, "json")
    assert json.loads(capsys.readouterr().out) == {
        "name": "smoke",
        "state": "service-refused",
        "reasons": reason_dicts(REASONS),
    }
    _report_refused("smoke", "refused", "smoke did not attest", REASONS, "text")
    assert capsys.readouterr().out.splitlines()[:2] == [
        "REFUSED  smoke did not attest",
        "  - [measurement-mismatch] quote field RTMR2 is 00, expected 11",
    ]
