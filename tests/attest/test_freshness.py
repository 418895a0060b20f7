"""Fresh collateral: min_tcb_evaluation_data_number, max_collateral_age, the collateral's
number and date in every verdict, and cached collateral listed as a policy exception.

The attack: whoever blocks the PCS/PCCS holds the verifier on cached collateral up to
its nextUpdate (~30 days), across an Intel TCB recovery. Real vectors (README): the v4
collateral has TCB evaluation data number 17, TCB info issued 2025-06-19T10:16:03Z, QE
identity issued 2025-06-19T10:32:27Z; the v5 collateral has number 18.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from tdxvm.attest.collateral import CollateralOrigin, load_bundle
from tdxvm.attest.duration import format_duration, parse_duration
from tdxvm.attest.errors import PolicyFileError
from tdxvm.attest.freshness import freshness_reasons
from tdxvm.attest.policy import Policy, evaluate, load_policy, parse_policy
from tdxvm.attest.quote import parse_quote
from tdxvm.attest.result import TcbEvaluation, VerificationResult
from tdxvm.attest.verdict import appraise

from ..conftest import utc

V4_TCB_ISSUED = utc("2025-06-19T10:16:03Z")
V4_QE_ISSUED = utc("2025-06-19T10:32:27Z")
V4_PCK_CRL_ISSUED = utc("2025-06-19T10:00:35Z")  # its thisUpdate
V4_AT = utc("2025-06-20T00:00:00Z")
V5_AT = utc("2026-02-19T00:00:00Z")


def _v4(testdata):
    d = testdata / "dcap-qvl-v4"
    return (d / "quote.bin").read_bytes(), load_bundle(d / "collateral.json")


def codes(verdict):
    return [r.code for r in verdict.reasons]


# -- durations ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("7d", 7 * 86400),
        ("36h", 36 * 3600),
        ("1d12h", 36 * 3600),
        ("90m", 5400),
        ("2w", 14 * 86400),
        ("45s", 45),
        (" 1h30m ", 5400),
    ],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == timedelta(seconds=seconds)
    assert parse_duration(format_duration(parse_duration(text))) == parse_duration(text)


@pytest.mark.parametrize("text", ["", "7", "d", "7x", "1h1d", "1d1d", "-1d", "0d", "0h0m", "1.5d", "7 d", "101000d"])
def test_parse_duration_refuses(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_format_duration():
    assert format_duration(timedelta(hours=36)) == "1d12h"
    assert format_duration(timedelta(days=14)) == "14d"
    assert format_duration(timedelta(hours=13, minutes=43, seconds=57)) == "13h43m57s"


# -- the policy keys: strict YAML, round trips --------------------------------------------


def test_policy_keys_from_yaml(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("min_tcb_evaluation_data_number: 17\nmax_collateral_age: 36h\n")
    policy = load_policy(path)
    assert policy.min_tcb_evaluation_data_number == 17
    assert policy.max_collateral_age == timedelta(hours=36)
    assert policy.loosened() == Policy().loosened()  # stricter than the default: no exception
    for mode in ("json", "python"):  # records and launch specs dump and reload policies
        dumped = policy.model_dump(mode=mode, exclude_none=True)
        assert dumped["max_collateral_age"] == "1d12h"
        assert Policy.model_validate(dumped) == policy


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        ("max_collateral_age: 7x\n", 1, "is not a duration"),
        ("max_collateral_age: 0d\n", 1, "longer than zero"),
        ("max_collateral_age: 7\n", 1, "is not a duration"),
        ("max_collateral_age:\n", 1, "null is not allowed"),
        ("max_collateral_age: 7d\nmax_collateral_age: 30d\n", 2, "duplicate key"),
        ("min_tcb_evaluation_data_number: -1\n", 1, "whole number"),
        ("min_tcb_evaluation_data_number: true\n", 1, "whole number"),
        ("min_tcb_evaluation_data_number: 1.5\n", 1, "whole number"),
        ("min_tcb_evaluation_data_number: null\n", 1, "null is not allowed"),
        ("max_colateral_age: 7d\n", 1, "max_colateral_age"),
    ],
)
def test_policy_keys_refused_with_line(text, line, needle):
    with pytest.raises(PolicyFileError) as info:
        parse_policy(text, source="p.yaml")
    assert f"p.yaml:{line}:" in str(info.value) and needle in str(info.value)


# -- the rules on real collateral --------------------------------------------------------


def test_minimum_evaluation_data_number(testdata):
    quote, coll = _v4(testdata)
    assert appraise(quote, coll, at=V4_AT, policy=Policy(min_tcb_evaluation_data_number=17)).accepted
    v = appraise(quote, coll, at=V4_AT, policy=Policy(min_tcb_evaluation_data_number=18))
    assert not v.accepted
    assert codes(v) == ["tcb-evaluation-data-number", "tcb-evaluation-data-number"]  # TCB info and QE identity
    assert "TCB info has TCB evaluation data number 17, below the policy's minimum 18" in v.reasons[0].message
    d = testdata / "go-tdx-guest-v5"
    v5 = appraise(
        (d / "quote.bin").read_bytes(),
        load_bundle(d / "collateral.json"),
        at=V5_AT,
        policy=Policy(min_tcb_evaluation_data_number=18),
    )
    assert v5.accepted, v5.reasons


def test_maximum_collateral_age(testdata):
    quote, coll = _v4(testdata)
    policy = Policy(max_collateral_age="1d")
    assert appraise(quote, coll, at=V4_PCK_CRL_ISSUED + timedelta(hours=23), policy=policy).accepted
    # 1d after the PCK CRL's thisUpdate but not yet after the TCB info's: only the CRL is too old (a PCCS
    # serving fresh TCB info beside an old CRL would hide a revocation since)
    v = appraise(quote, coll, at=V4_PCK_CRL_ISSUED + timedelta(days=1, minutes=1), policy=policy)
    assert codes(v) == ["collateral-too-old"]
    assert v.reasons[0].message.startswith(
        "the PCK CRL was issued at 2025-06-19T10:00:35Z, 1d1m before the verification time"
    )
    v = appraise(quote, coll, at=V4_TCB_ISSUED + timedelta(days=1, minutes=1), policy=policy)
    assert codes(v) == ["collateral-too-old"] * 2
    assert v.reasons[0].message.startswith(
        "the TCB info was issued at 2025-06-19T10:16:03Z, 1d1m before the verification time"
    )
    v = appraise(quote, coll, at=V4_QE_ISSUED + timedelta(days=2), policy=policy)
    assert codes(v) == ["collateral-too-old"] * 3
    assert "the QE identity was issued at 2025-06-19T10:32:27Z" in v.reasons[1].message
    # without the rule the same collateral passes: it is inside its nextUpdate window
    assert appraise(quote, coll, at=V4_QE_ISSUED + timedelta(days=2)).accepted


def test_rules_without_verified_collateral_refuse(testdata):
    """A result that carries no verified dates cannot satisfy a freshness rule."""
    q = parse_quote((testdata / "dcap-qvl-v4" / "quote.bin").read_bytes())
    tcb = TcbEvaluation(
        status="UpToDate",
        advisory_ids=(),
        platform_status="UpToDate",
        tdx_module_status=None,
        qe_status="UpToDate",
        tcb_date=V4_AT,
        tcb_evaluation_data_number=17,
    )
    result = VerificationResult(quote=q, at=V4_AT, fmspc="B0C06F000000", tcb=tcb)
    assert evaluate(Policy(), result) == []
    assert [r.code for r in evaluate(Policy(max_collateral_age="7d"), result)] == ["collateral-freshness-unknown"] * 3
    assert freshness_reasons(None, None, result) == []


def test_tampered_tcb_info_reports_no_dates(testdata):
    """Dates and numbers come only from items whose signature verified."""
    import dataclasses

    quote, coll = _v4(testdata)
    forged = dataclasses.replace(
        coll, tcb_info=coll.tcb_info.replace('"tcbEvaluationDataNumber":17', '"tcbEvaluationDataNumber":99')
    )
    assert forged.tcb_info != coll.tcb_info
    v = appraise(quote, forged, at=V4_AT, policy=Policy(min_tcb_evaluation_data_number=99))
    assert "tcb-info-signature" in codes(v) and not v.accepted
    doc = v.to_dict()["collateral"]
    assert doc["tcb_info"] is None and doc["tcb_evaluation_data_number"] == 17  # the QE identity's, verified


# -- every verdict reports number, dates and origin ---------------------------------------


def test_verdict_reports_collateral(testdata):
    quote, coll = _v4(testdata)
    doc = appraise(quote, coll, at=V4_AT).to_dict()
    assert doc["collateral"] == {
        "source": None,
        "tcb_evaluation_data_number": 17,
        "issue_date": "2025-06-19T10:16:03Z",
        "next_update": "2025-07-19T10:16:03Z",
        "tcb_info": {
            "issue_date": "2025-06-19T10:16:03Z",
            "next_update": "2025-07-19T10:16:03Z",
            "tcb_evaluation_data_number": 17,
        },
        "qe_identity": {
            "issue_date": "2025-06-19T10:32:27Z",
            "next_update": "2025-07-19T10:32:27Z",
            "tcb_evaluation_data_number": 17,
        },
        "pck_crl": {"this_update": "2025-06-19T10:00:35Z", "next_update": "2025-07-19T10:00:35Z"},
    }
    refused = appraise(quote, coll, at=V4_AT + timedelta(days=40)).to_dict()  # expired: refused, still reported
    assert refused["verdict"] == "reject" and refused["collateral"]["issue_date"] == "2025-06-19T10:16:03Z"


def test_cached_collateral_is_a_policy_exception(testdata):
    quote, coll = _v4(testdata)
    why = (
        "TCB info: GET https://pccs.example/tdx/certification/v4/tcb?fmspc=B0C06F000000 failed, "
        "no HTTP response: Connection refused"
    )
    cached = appraise(quote, coll, at=V4_AT, origin=CollateralOrigin("cache", "https://pccs.example", why))
    doc = cached.to_dict()
    assert cached.accepted  # an exception is listed, not a refusal: max_collateral_age is the rule that refuses
    assert (
        doc["policy_exceptions"][0] == f"collateral from the cache: https://pccs.example could not be reached ({why})"
    )
    assert doc["policy_exceptions"][1:] == Policy().loosened()
    assert doc["collateral"]["source"] == "cache from https://pccs.example"
    for how in ("fetched", "bundle"):
        doc = appraise(quote, coll, at=V4_AT, origin=CollateralOrigin(how, "https://pccs.example")).to_dict()
        assert doc["policy_exceptions"] == Policy().loosened()
