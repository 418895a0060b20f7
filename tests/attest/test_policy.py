"""Attestation policy: YAML loading with located errors, and every rule's effect."""

from __future__ import annotations

import dataclasses

import pytest

from tdxvm.attest.errors import PolicyFileError
from tdxvm.attest.policy import Policy, evaluate, load_policy, parse_policy
from tdxvm.attest.quote import (
    TD_ATTR_DEBUG,
    TD_ATTR_MIGRATABLE,
    TD_ATTR_PERFMON,
    TD_ATTR_PKS,
    TD_ATTR_SEPT_VE_DISABLE,
    parse_quote,
)
from tdxvm.attest.result import TcbEvaluation, VerificationResult

from ..conftest import utc

AT = utc("2025-06-20T00:00:00Z")
ZERO48 = "00" * 48
UNPINNED = ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3")


def attrs(bits: int) -> bytes:
    return bits.to_bytes(8, "little")


@pytest.fixture
def quote(testdata):
    return parse_quote((testdata / "dcap-qvl-v4" / "quote.bin").read_bytes())


@pytest.fixture
def quote_v5(testdata):
    return parse_quote((testdata / "go-tdx-guest-v5" / "quote.bin").read_bytes())


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
    reasons = evaluate(
        p, result_for(quote, status="SWHardeningNeeded", advisories=["INTEL-SA-00615", "INTEL-SA-00001"])
    )
    assert codes(reasons) == ["advisory"]
    assert "INTEL-SA-00615" in reasons[0].message and "INTEL-SA-00001" not in reasons[0].message


def test_an_advisory_written_in_lower_case_still_rejects(quote):
    """A typo of case must not fail open: the IDs are Intel's, upper-cased on load."""
    p = parse_policy(
        "accepted_tcb_statuses: [UpToDate, SWHardeningNeeded]\nrejected_advisory_ids: [' intel-sa-00615']\n"
    )
    assert p.rejected_advisory_ids == ("INTEL-SA-00615",)
    reasons = evaluate(p, result_for(quote, status="SWHardeningNeeded", advisories=["INTEL-SA-00615"]))
    assert codes(reasons) == ["advisory"]


def test_debug_and_sept_ve(quote):
    attrs = (TD_ATTR_DEBUG).to_bytes(8, "little")
    reasons = evaluate(Policy(), result_for(quote, td_attributes=attrs))
    assert set(codes(reasons)) == {"debug-td", "sept-ve-disable"}
    relaxed = Policy(allow_debug=True, require_sept_ve_disable=False)
    assert evaluate(relaxed, result_for(quote, td_attributes=attrs)) == []
    assert relaxed.loosened()[:2] == [
        "allow_debug: true (the host can read this TD's memory)",
        "require_sept_ve_disable: false",
    ]


@pytest.mark.parametrize(
    ("bit", "named"), [(4, "HGS_PLUS"), (5, "PERF_PROF"), (6, "PMT_PROF"), (1, "bit 1"), (7, "bit 7")]
)
def test_every_td_under_debug_attribute_is_refused(quote, bit, named):
    """Bits 7:0 are TDX's TUD group (debug and profiling): any of them makes the TD untrusted."""
    reasons = evaluate(Policy(), result_for(quote, td_attributes=attrs(TD_ATTR_SEPT_VE_DISABLE | 1 << bit)))
    assert codes(reasons) == ["debug-td"] and f"has {named} of the TD-under-debug attributes" in reasons[0].message
    assert (
        evaluate(Policy(allow_debug=True), result_for(quote, td_attributes=attrs(TD_ATTR_SEPT_VE_DISABLE | 1 << bit)))
        == []
    )


def test_debug_refused_even_with_sept_ve_disable(quote):
    reasons = evaluate(Policy(), result_for(quote, td_attributes=attrs(TD_ATTR_SEPT_VE_DISABLE | TD_ATTR_DEBUG)))
    assert codes(reasons) == ["debug-td"]


def test_migratable_td_refused_by_default(quote):
    migratable = attrs(TD_ATTR_SEPT_VE_DISABLE | TD_ATTR_MIGRATABLE)
    reasons = evaluate(Policy(), result_for(quote, td_attributes=migratable))
    assert codes(reasons) == ["migratable-td"] and "MIGRATABLE" in reasons[0].message
    allowed = parse_policy("allow_migratable: true\n")
    assert evaluate(allowed, result_for(quote, td_attributes=migratable)) == []
    assert any(line.startswith("allow_migratable: true") for line in allowed.loosened())
    assert not any("migratable" in line for line in Policy().loosened())


def test_td_attributes_pinned_names_the_bits_that_differ(quote):
    launched = attrs(TD_ATTR_SEPT_VE_DISABLE).hex()
    p = Policy(td_attributes=launched)
    extra = attrs(TD_ATTR_SEPT_VE_DISABLE | TD_ATTR_PKS | TD_ATTR_PERFMON)
    reasons = evaluate(p, result_for(quote, td_attributes=extra))
    assert codes(reasons) == ["td-attributes"]
    assert reasons[0].message == (
        f"quote field TD_ATTRIBUTES is {extra.hex()} (SEPT_VE_DISABLE, PKS, PERFMON), expected "
        f"{launched}: set but not expected: PKS, PERFMON"
    )
    missing = evaluate(Policy(td_attributes=attrs(TD_ATTR_SEPT_VE_DISABLE | TD_ATTR_PKS).hex()), result_for(quote))
    assert codes(missing) == ["td-attributes"] and missing[0].message.endswith("expected but not set: PKS")
    assert evaluate(Policy(td_attributes=["00" * 8, extra.hex()]), result_for(quote, td_attributes=extra)) == []


def test_td_attributes_mask_compares_only_its_bits(quote):
    mask = attrs(~(TD_ATTR_PKS | TD_ATTR_PERFMON) & (1 << 64) - 1).hex()
    p = parse_policy(f"td_attributes: {attrs(TD_ATTR_SEPT_VE_DISABLE).hex()}\ntd_attributes_mask: {mask}\n")
    for bits in (TD_ATTR_SEPT_VE_DISABLE, TD_ATTR_SEPT_VE_DISABLE | TD_ATTR_PKS | TD_ATTR_PERFMON):
        assert evaluate(p, result_for(quote, td_attributes=attrs(bits))) == []
    reasons = evaluate(p, result_for(quote, td_attributes=attrs(TD_ATTR_SEPT_VE_DISABLE | TD_ATTR_PKS | 1 << 20)))
    assert codes(reasons) == ["td-attributes"]
    assert f"under mask {mask}" in reasons[0].message and reasons[0].message.endswith("set but not expected: bit 20")
    assert "td_attributes_mask: TD attributes not compared: PKS, PERFMON" in p.loosened()
    full = Policy(td_attributes=attrs(TD_ATTR_SEPT_VE_DISABLE).hex(), td_attributes_mask="ff" * 8)
    assert not any("mask" in line for line in full.loosened())
    assert codes(evaluate(full, result_for(quote, td_attributes=attrs(TD_ATTR_SEPT_VE_DISABLE | TD_ATTR_PKS)))) == [
        "td-attributes"
    ]


def test_mr_service_td_must_be_zero(quote):
    reasons = evaluate(Policy(), result_for(quote, mr_service_td=b"\x01" * 48))
    assert codes(reasons) == ["measurement-mismatch"]
    assert "MR_SERVICETD" in reasons[0].message


def test_v4_quote_has_no_service_td_field(quote):
    """TD report 1.0 (every v4 quote) has no MR_SERVICETD: the default accepts that (TDX
    1.0 has no service TDs); a policy that pins mr_service_td does not."""
    assert quote.version == 4 and quote.body.mr_service_td is None
    assert evaluate(Policy(), result_for(quote)) == []
    reasons = evaluate(parse_policy(f"mr_service_td: {ZERO48}\n"), result_for(quote))
    assert codes(reasons) == ["measurement-mismatch"]
    assert "v4 quote has no MR_SERVICETD field" in reasons[0].message


def test_v5_service_td(quote_v5):
    assert quote_v5.body.mr_service_td == bytes(48)
    assert evaluate(Policy(), result_for(quote_v5)) == []
    assert evaluate(Policy(mr_service_td=ZERO48), result_for(quote_v5)) == []
    bound = b"\x01" * 48
    reasons = evaluate(Policy(), result_for(quote_v5, mr_service_td=bound))
    assert codes(reasons) == ["measurement-mismatch"] and f"MR_SERVICETD is {bound.hex()}" in reasons[0].message
    allowed = Policy(mr_service_td=[ZERO48, bound.hex()])
    assert evaluate(allowed, result_for(quote_v5, mr_service_td=bound)) == []
    assert "mr_service_td: non-zero service TD allowed" in allowed.loosened()
    assert "mr_service_td: non-zero service TD allowed" not in Policy(mr_service_td=ZERO48).loosened()


def test_zero_rtmr_policy_needs_allow_zero_rtmrs(tmp_path, quote):
    f = tmp_path / "p.yaml"
    f.write_text(f"allow_debug: false\nrtmr2: {ZERO48}\n")
    with pytest.raises(PolicyFileError) as err:
        load_policy(f)
    assert f"{f}:2: rtmr2: an all-zero RTMR2 means the kernel's EFI stub measured no command line" in str(err.value)
    assert "allow_zero_rtmrs: true" in str(err.value)
    f.write_text(f"rtmr1:\n  - {'ab' * 48}\n  - {ZERO48}\n")
    with pytest.raises(PolicyFileError, match=f"{f}:2: rtmr1: an all-zero RTMR1"):
        load_policy(f)
    f.write_text(f"rtmr2: {ZERO48}\nallow_zero_rtmrs: true\n")
    p = load_policy(f)
    assert p.rtmr2 == (ZERO48,) and any(line.startswith("allow_zero_rtmrs: true") for line in p.loosened())
    assert evaluate(p, result_for(quote, rtmrs=quote.body.rtmrs[:2] + (bytes(48), quote.body.rtmrs[3]))) == []
    assert Policy(rtmr0=ZERO48, rtmr3=ZERO48).rtmr3 == (ZERO48,)  # only RTMR1 and RTMR2 must measure something


def test_unpinned_registers_are_exceptions():
    lines = Policy().loosened()
    assert [line.split(" not pinned: ")[0] for line in lines] == list(UNPINNED)
    assert "rtmr0 not pinned: the host chooses the TD's ACPI tables, TD HOB and firmware variables" in lines[1]
    assert lines[4] == "rtmr3 not pinned: run-time measurements (the served model) are not checked"
    pinned = Policy(mrtd="ab" * 48, rtmr1=["cd" * 48, "ef" * 48], rtmr2="12" * 48)
    assert pinned.unpinned() == [lines[1], lines[4]] and pinned.loosened() == pinned.unpinned()
    every = Policy(**{r: "ab" * 48 for r in UNPINNED})
    assert every.loosened() == []


def test_policy_roundtrips_through_its_json_dump():
    """A launch records the policy as JSON (model_dump); reloading it must mean the same."""
    p = Policy(mrtd="ab" * 48, td_attributes=attrs(TD_ATTR_SEPT_VE_DISABLE).hex(), allow_zero_rtmrs=True, rtmr2=ZERO48)
    assert Policy.model_validate(p.model_dump(mode="json", exclude_none=True)) == p
    assert Policy.model_validate(Policy().model_dump(mode="json", exclude_none=True)).mr_service_td is None


def test_every_measurement_mismatch_is_reported_at_once(quote):
    wrong = "ab" * 48
    p = Policy(
        mrtd=wrong,
        rtmr0=wrong,
        rtmr1=wrong,
        rtmr2=wrong,
        rtmr3=wrong,
        mr_config_id=wrong,
        mr_owner=wrong,
        mr_owner_config=wrong,
        allowed_mr_seam=[wrong],
    )
    reasons = evaluate(p, result_for(quote))
    labels = [r.message.split()[2] for r in reasons]
    assert labels == [
        "MR_TD",
        "RTMR0",
        "RTMR1",
        "RTMR2",
        "RTMR3",
        "MR_CONFIG_ID",
        "MR_OWNER",
        "MR_OWNER_CONFIG",
        "MR_SEAM",
    ]
    assert reasons[0].message == f"quote field MR_TD is {quote.body.mr_td.hex()}, expected {wrong}"


def test_measurement_lists_and_case(quote):
    good = quote.body.mr_td.hex().upper()
    assert evaluate(Policy(mrtd=["00" * 48, good]), result_for(quote)) == []
    assert evaluate(Policy(mrtd="0x" + good), result_for(quote)) == []


def test_xfam_attributes_svn_report_data(quote):
    b = quote.body
    exact = Policy(
        xfam=b.xfam.hex(),
        td_attributes=b.td_attributes.hex(),
        min_tee_tcb_svn=b.tee_tcb_svn.hex(),
        report_data=b.report_data.hex(),
    )
    assert evaluate(exact, result_for(quote)) == []
    higher = bytes(min(x + 1, 255) for x in b.tee_tcb_svn)
    wrong = Policy(
        xfam="00" * 8,
        td_attributes=(TD_ATTR_SEPT_VE_DISABLE | 2).to_bytes(8, "little").hex(),
        min_tee_tcb_svn=higher.hex(),
        report_data="11" * 64,
    )
    assert codes(evaluate(wrong, result_for(quote))) == [
        "measurement-mismatch",
        "td-attributes",
        "tee-tcb-svn",
        "report-data",
    ]


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
        ("accepted_tcb_statuses: [UpToDate, Revoked]\n", 1, "'Revoked' cannot be accepted"),
        ("rejected_advisory_ids: [intel-sa-615]\n", 1, "'intel-sa-615' is not an Intel advisory ID"),
        ("rtmr1:\n  - " + "00" * 48 + "\n  - zz\n", 2, "rtmr1"),
        ("allow_debug: [\n", 2, "not valid YAML"),
        ("- a\n- b\n", 1, "expected a mapping"),
        ("allow_debug: maybe\n", 1, "allow_debug"),
        ("allow_migratable: sometimes\n", 1, "allow_migratable"),
        ("td_attributes: 0000001000000000\ntd_attributes_mask: ffff\n", 2, "td_attributes_mask: expected 8 bytes"),
        ("allow_debug: false\n\nrtmr2: " + "0" * 96 + "\n", 3, "rtmr2: an all-zero RTMR2"),
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


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mrtd: null\n", "<policy>:1: mrtd: null is not allowed; remove the key to allow any value"),
        ("accepted_tcb_statuses: [UpToDate, ~]\n", "<policy>:1: accepted_tcb_statuses.1: null list item"),
        ("allow_debug: false\nallow_debug: true\n", "<policy>:2: allow_debug: duplicate key (first at line 1)"),
    ],
)
def test_null_or_duplicate_never_loosens_the_policy(text, expected):
    """``mrtd: null`` would pin nothing and a second ``allow_debug`` would win: both refused."""
    with pytest.raises(PolicyFileError) as err:
        parse_policy(text)
    assert str(err.value).splitlines()[1:] == [expected]


def test_strict_policy_is_the_default_policy_without_pydantic(quote, quote_v5):
    """verify-quote without --policy applies StrictPolicy (no pydantic): the same fields,
    defaults, lines and reasons as Policy()."""
    from tdxvm.attest.policyrules import StrictPolicy

    strict, default = StrictPolicy(), Policy()
    assert [f.name for f in dataclasses.fields(StrictPolicy)] == list(Policy.model_fields)
    assert {k: getattr(strict, k) for k in Policy.model_fields} == {k: getattr(default, k) for k in Policy.model_fields}
    assert strict.loosened() == default.loosened() and strict.unpinned() == default.unpinned()
    results = [
        result_for(quote),
        result_for(quote_v5),
        result_for(quote, status="OutOfDate", advisories=("INTEL-SA-00001",)),
        result_for(quote, td_attributes=attrs(TD_ATTR_DEBUG | TD_ATTR_MIGRATABLE)),
        result_for(quote, td_attributes=attrs(0)),
    ]
    for result in results:
        assert evaluate(strict, result) == evaluate(default, result)
    assert any(evaluate(strict, r) for r in results)
