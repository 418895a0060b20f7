"""TDX 1.5: the relaunch rule, the statuses it adds to the policy, the real v5 quote."""

from __future__ import annotations

import pytest

from tdxvm.attest.collateral import load_bundle
from tdxvm.attest.errors import PolicyFileError
from tdxvm.attest.policy import Policy, parse_policy
from tdxvm.attest.tcb import EVALUATED_TCB_STATUSES, TD_RELAUNCH_STATUSES, check_for_relaunch
from tdxvm.attest.tcbinfo import TCB_STATUSES
from tdxvm.attest.verdict import appraise

from ..conftest import utc

# (launch, current, status): dcap-qvl 0.7's test_check_for_relaunch_matches_intel rows,
# then the rest of Intel's conditions (launch out of date, current not out of date).
RULE = [
    ("OutOfDate", "UpToDate", "TDRelaunchAdvised"),
    ("OutOfDate", "SWHardeningNeeded", "TDRelaunchAdvised"),
    ("OutOfDate", "ConfigurationNeeded", "TDRelaunchAdvisedConfigurationNeeded"),
    ("OutOfDateConfigurationNeeded", "UpToDate", "TDRelaunchAdvisedConfigurationNeeded"),
    ("OutOfDate", "OutOfDate", "OutOfDate"),
    ("UpToDate", "UpToDate", "UpToDate"),
    ("ConfigurationNeeded", "UpToDate", "ConfigurationNeeded"),
    ("OutOfDate", "ConfigurationAndSWHardeningNeeded", "TDRelaunchAdvisedConfigurationNeeded"),
    ("OutOfDateConfigurationNeeded", "OutOfDateConfigurationNeeded", "OutOfDateConfigurationNeeded"),
    ("UpToDate", "OutOfDate", "UpToDate"),
    ("SWHardeningNeeded", "UpToDate", "SWHardeningNeeded"),
    ("Revoked", "UpToDate", "Revoked"),
    # dcap-qvl refuses a revoked current TCB outright; tdxvm reports it Revoked.
    ("OutOfDate", "Revoked", "Revoked"),
    ("UpToDate", "Revoked", "Revoked"),
]


@pytest.mark.parametrize(("launch", "current", "status"), RULE)
def test_check_for_relaunch(launch, current, status):
    assert check_for_relaunch(launch, current) == status


def test_relaunch_statuses_are_policy_statuses_not_collateral_ones():
    assert set(TD_RELAUNCH_STATUSES) == {"TDRelaunchAdvised", "TDRelaunchAdvisedConfigurationNeeded"}
    assert set(EVALUATED_TCB_STATUSES) == set(TCB_STATUSES) | set(TD_RELAUNCH_STATUSES)
    assert not set(TD_RELAUNCH_STATUSES) & set(TCB_STATUSES)  # a TCB info level never carries them


def test_policy_accepts_relaunch_statuses():
    p = parse_policy("accepted_tcb_statuses: [UpToDate, TDRelaunchAdvised, TDRelaunchAdvisedConfigurationNeeded]\n")
    assert "TDRelaunchAdvised" in p.accepted_tcb_statuses
    assert any(line.startswith("accepted_tcb_statuses:") for line in p.loosened())
    assert Policy().accepted_tcb_statuses == ("UpToDate",)
    with pytest.raises(PolicyFileError, match="'TDRelaunchNeeded' is not a TCB status .*TDRelaunchAdvised"):
        parse_policy("accepted_tcb_statuses: [TDRelaunchNeeded]\n")


def test_real_v5_quote_launched_and_running_up_to_date(testdata):
    """go-tdx-guest's v5 quote launched on TDX module SVN 11 and runs SVN 13 now, both
    UpToDate in its collateral: no relaunch advice."""
    d = testdata / "go-tdx-guest-v5"
    v = appraise((d / "quote.bin").read_bytes(), load_bundle(d / "collateral.json"), at=utc("2026-03-01T00:00:00Z"))
    assert v.accepted, v.reasons
    tcb = v.result.tcb
    assert v.result.quote.body.tee_tcb_svn[0] == 0x0B and v.result.quote.body.tee_tcb_svn2[0] == 0x0D
    assert (tcb.status, tcb.launch_status, tcb.current_status) == ("UpToDate", "UpToDate", "UpToDate")


def test_v4_quote_has_no_current_status(testdata):
    d = testdata / "dcap-qvl-v4"
    v = appraise((d / "quote.bin").read_bytes(), load_bundle(d / "collateral.json"), at=utc("2025-06-20T00:00:00Z"))
    tcb = v.to_dict()["tcb"]
    assert (tcb["launch_status"], tcb["current_status"]) == ("UpToDate", None)
