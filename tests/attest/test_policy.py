"""Attestation policy: YAML loading with located errors, and every rule's effect."""

from __future__ import annotations

import dataclasses

import pytest

from tdxvm.attest.errors import PolicyFileError
from tdxvm.attest.policy import Policy, evaluate, load_policy, parse_policy
from tdxvm.attest.quote import TD_ATTR_DEBUG, TD_ATTR_SEPT_VE_DISABLE, parse_quote
from tdxvm.attest.result import TcbEvaluation, VerificationResult

from ..conftest import utc

AT = utc("2025-06-20T00:00:00Z")


@pytest.fixture
def quote(testdata):
    return parse_quote((testdata / "dcap-qvl-v4" / "quote.bin").read_bytes())


def result_for(quote, status="UpToDate", advisories=(), **body_changes):
    if body_changes:
        quote = dataclasses.replace(quote, body=dataclasses.replace(quote.body, **body_changes))
    tcb = TcbEvaluation(
        status=status,
        advisory_ids=tuple(advisories),
        platform_status=status,
        tdx_module_status=None,
        qe_status="UpToDate",
        tcb_date=AT,
        tcb_evaluation_data_number=17,
    )
    return VerificationResult(quote=quote, at=AT, fmspc="B0C06F000000", tcb=tcb)


def codes(reasons):
    return [r.code for r in reasons]


def test_strict_default_accepts_clean_quote(quote):
    assert evaluate(Policy(), result_for(quote)) == []


@pytest.mark.parametrize("status", ["OutOfDate", "SWHardeningNeeded", "ConfigurationNeeded", "Revoked"])
def test_default_accepts_only_up_to_date(quote, status):
    assert codes(evaluate(Policy(), result_for(quote, status=status))) == ["tcb-status"]


def test_accepted_statuses_can_be_widened(quote):
    p = parse_policy("accepted_tcb_statuses: [UpToDate, SWHardeningNeeded]\n")
    assert evaluate(p, result_for(quote, status="SWHardeningNeeded")) == []
    assert any("accepted_tcb_statuses" in line for line in p.loosened())


def test_rejected_advisory(quote):
    p = Policy(accepted_tcb_statuses=("UpToDate", "SWHardeningNeeded"), rejected_advisory_ids=("INTEL-SA-00615",))
    reasons = evaluate(p, result_for(quote, status="SWHardeningNeeded", advisories=["INTEL-SA-00615", "INTEL-SA-00001"]))
    assert codes(reasons) == ["advisory"]
    assert "INTEL-SA-00615" in reasons[0].message and "INTEL-SA-00001" not in reasons[0].message


def test_debug_and_sept_ve(quote):
    attrs = (TD_ATTR_DEBUG).to_bytes(8, "little")
    reasons = evaluate(Policy(), result_for(quote, td_attributes=attrs))
    assert set(codes(reasons)) == {"debug-td", "sept-ve-disable"}
    relaxed = Policy(allow_debug=True, require_sept_ve_disable=False)
    assert evaluate(relaxed, result_for(quote, td_attributes=attrs)) == []
    assert len(relaxed.loosened()) == 2


def test_mr_service_td_must_be_zero(quote):
    reasons = evaluate(Policy(), result_for(quote, mr_service_td=b"\x01" * 48))
    assert codes(reasons) == ["measurement-mismatch"]
    assert "MR_SERVICETD" in reasons[0].message


def test_every_measurement_mismatch_is_reported_at_once(quote):
    wrong = "ab" * 48
    p = Policy(mrtd=wrong, rtmr0=wrong, rtmr1=wrong, rtmr2=wrong, rtmr3=wrong, mr_config_id=wrong, mr_owner=wrong, mr_owner_config=wrong, allowed_mr_seam=[wrong])
    reasons = evaluate(p, result_for(quote))
    labels = [r.message.split()[2] for r in reasons]
    assert labels == ["MR_TD", "RTMR0", "RTMR1", "RTMR2", "RTMR3", "MR_CONFIG_ID", "MR_OWNER", "MR_OWNER_CONFIG", "MR_SEAM"]
    assert reasons[0].message == f"quote field MR_TD is {quote.body.mr_td.hex()}, expected {wrong}"


def test_measurement_lists_and_case(quote):
    good = quote.body.mr_td.hex().upper()
    assert evaluate(Policy(mrtd=["00" * 48, good]), result_for(quote)) == []
    assert evaluate(Policy(mrtd="0x" + good), result_for(quote)) == []


def test_xfam_attributes_svn_report_data(quote):
    b = quote.body
    exact = Policy(xfam=b.xfam.hex(), td_attributes=b.td_attributes.hex(), min_tee_tcb_svn=b.tee_tcb_svn.hex(), report_data=b.report_data.hex())
    assert evaluate(exact, result_for(quote)) == []
    higher = bytes(min(x + 1, 255) for x in b.tee_tcb_svn)
    wrong = Policy(xfam="00" * 8, td_attributes=(TD_ATTR_SEPT_VE_DISABLE | 2).to_bytes(8, "little").hex(), min_tee_tcb_svn=higher.hex(), report_data="11" * 64)
    assert codes(evaluate(wrong, result_for(quote))) == ["measurement-mismatch", "measurement-mismatch", "tee-tcb-svn", "report-data"]


def test_policy_file_roundtrip(tmp_path, quote):
    f = tmp_path / "policy.yaml"
    f.write_text(f"accepted_tcb_statuses: [UpToDate]\nmrtd:\n  - {quote.body.mr_td.hex()}\nallow_debug: false\n")
    assert evaluate(load_policy(f), result_for(quote)) == []


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        ("allow_debug: false\nmrdt: " + "00" * 48 + "\n", 2, "mrdt: unknown key"),
        ("mrtd: abcd\n", 1, "mrtd: expected 48 bytes"),
        ("accepted_tcb_statuses:\n  - UpToDate\n  - Fine\n", 2, "'Fine' is not a TCB status"),
        ("rtmr1:\n  - " + "00" * 48 + "\n  - zz\n", 2, "rtmr1"),
        ("allow_debug: [\n", 2, "not valid YAML"),
        ("- a\n- b\n", 1, "expected a mapping"),
        ("allow_debug: maybe\n", 1, "allow_debug"),
    ],
)
def test_bad_policy_names_file_line_and_key(tmp_path, text, line, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(PolicyFileError) as err:
        load_policy(f)
    msg = str(err.value)
    assert f"{f}:{line}" in msg, msg
    assert needle in msg, msg


def test_missing_policy_file(tmp_path):
    with pytest.raises(PolicyFileError, match="cannot read"):
        load_policy(tmp_path / "nope.yaml")


def test_digits_only_hex_keeps_its_width(tmp_path, quote):
    """YAML would read 000…0 as the integer 0; the policy must keep it as 48 bytes."""
    f = tmp_path / "p.yaml"
    f.write_text("mr_config_id: " + "0" * 96 + "\nmr_owner: " + "0" * 96 + "\n")
    p = load_policy(f)
    assert p.mr_config_id == ("0" * 96,)
    assert evaluate(p, result_for(quote)) == []
