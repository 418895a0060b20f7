"""tdxvm against dcap-qvl 0.7 on the rules of issue 13: TDX 1.5 TCB evaluation with
TEE_TCB_SVN2 (TD relaunch advised, a current TCB that matches no level refused) and a
trust anchor revoked by its own CRL. Same verdict, status and advisories, every case.

The emulated platform's default TCB info has an UpToDate level with TDX module SVN 5
and an OutOfDate one with SVN 3 (module identity TDX_01: 5 UpToDate, 3 OutOfDate), so
TEE_TCB_SVN ``03 01 02…`` is a TD launched on an out-of-date module and TEE_TCB_SVN2
``05 01 02…`` an up-to-date module running now.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone

import dcap_qvl
import pytest

from tdxvm.attest.chain import TrustAnchor
from tdxvm.attest.policy import Policy
from tdxvm.attest.tcb import EVALUATED_TCB_STATUSES
from tdxvm.attest.verdict import appraise
from tdxvm.emulate import DEFAULT_TCB_LEVELS, EmulatedPlatform, IsvTcbLevel, TdxModuleIdentity

AT = datetime(2025, 7, 1, 12, 0, 0, tzinfo=timezone.utc)
# dcap-qvl returns every status but Revoked; accept the same to compare the statuses.
LIKE_DCAP_QVL = Policy(accepted_tcb_statuses=tuple(s for s in EVALUATED_TCB_STATUSES if s != "Revoked"))
L0, L1 = DEFAULT_TCB_LEVELS


def svn(*head: int) -> bytes:
    return bytes(head) + bytes(16 - len(head))


OLD, NEW = svn(3, 1, 2), svn(5, 1, 2)


def both(p: EmulatedPlatform, quote: bytes):
    """(dcap-qvl, tdxvm) outcomes, each None when refused, else (status, advisories); and tdxvm's verdict."""
    collateral = dcap_qvl.QuoteCollateralV3.from_json(p.collateral().to_json())
    try:
        r = dcap_qvl.verify_with_root_ca(quote, collateral, p.root_ca_der, p.unix_time)
        theirs = (r.status, frozenset(r.advisory_ids))
    except ValueError:
        theirs = None
    v = appraise(quote, p.collateral(), at=AT, policy=LIKE_DCAP_QVL, trust_anchor=TrustAnchor.from_der(p.root_ca_der))
    ours = (v.result.tcb.status, frozenset(v.result.tcb.advisory_ids)) if v.accepted else None
    return theirs, ours, v


@pytest.fixture(scope="module")
def platform() -> EmulatedPlatform:
    return EmulatedPlatform(at=AT, seed="tests/attest/tdx15")


def _levels(st0: str, st1: str, **kw) -> dict:
    return {"tcb_levels": (replace(L0, status=st0, advisory_ids=("INTEL-SA-00010",)), replace(L1, status=st1)), **kw}


def _qe_out_of_date(p: EmulatedPlatform) -> dict:
    levels = (
        IsvTcbLevel(isvsvn=p.qe.isv_svn + 1),
        IsvTcbLevel(isvsvn=0, status="OutOfDate", advisory_ids=("INTEL-SA-00020",)),
    )
    return {"qe_identity": replace(p.qe, tcb_levels=levels)}


def _microcode_update(p: EmulatedPlatform) -> dict:
    """The launch TCB is out of date (needing configuration) only in TDX component 2."""
    levels = (
        replace(L0, tdx_components=(5, 1, 3) + (0,) * 13),
        replace(
            L0,
            tdx_components=(5, 1, 2) + (0,) * 13,
            status="OutOfDateConfigurationNeeded",
            advisory_ids=("INTEL-SA-00030",),
        ),
    )
    return {
        "tcb_levels": levels,
        "tdx_module_identities": (TdxModuleIdentity(version=1, tcb_levels=(IsvTcbLevel(isvsvn=5),)),),
    }


def _current_sw_hardening(p: EmulatedPlatform) -> dict:
    """The module running now reaches a SWHardeningNeeded level with its own advisory."""
    levels = (
        replace(L0, tdx_components=(7, 1, 3) + (0,) * 13, status="SWHardeningNeeded", advisory_ids=("INTEL-SA-00040",)),
        replace(L0, tdx_components=(5, 1, 2) + (0,) * 13, status="OutOfDate", advisory_ids=("INTEL-SA-00041",)),
    )
    module = TdxModuleIdentity(
        version=1,
        tcb_levels=(IsvTcbLevel(isvsvn=7), IsvTcbLevel(isvsvn=5, status="OutOfDate", advisory_ids=("INTEL-SA-00042",))),
    )
    return {"tcb_levels": levels, "tdx_module_identities": (module,)}


def _current_module_revoked(p: EmulatedPlatform) -> dict:
    module = TdxModuleIdentity(version=1, tcb_levels=(IsvTcbLevel(isvsvn=7), IsvTcbLevel(isvsvn=5, status="Revoked")))
    return {"tcb_levels": (replace(L0, tdx_components=(5, 1, 2) + (0,) * 13),), "tdx_module_identities": (module,)}


Change = Callable[[EmulatedPlatform], dict]
# name: (platform change, TEE_TCB_SVN, TEE_TCB_SVN2, v5 body type, expected status or None when refused)
CASES: dict[str, tuple[Change | None, bytes, bytes, int, str | None]] = {
    "module updated while the TD runs": (None, OLD, NEW, 3, "TDRelaunchAdvised"),
    "module updated, TD report 1.5 with TDX Connect fields": (None, OLD, NEW, 4, "TDRelaunchAdvised"),
    "module updated past the newest level": (None, OLD, svn(6, 1, 2), 3, "TDRelaunchAdvised"),
    "updated to a module still out of date": (None, OLD, svn(4, 1, 2), 3, "OutOfDate"),
    "not updated": (None, OLD, OLD, 3, "OutOfDate"),
    "TD report 1.0 in a v5 quote has no TEE_TCB_SVN2": (None, OLD, NEW, 2, "OutOfDate"),
    "launched up to date": (None, NEW, NEW, 3, "UpToDate"),
    "TEE_TCB_SVN2 below TEE_TCB_SVN (the launch status stands)": (None, NEW, OLD, 3, "UpToDate"),
    "platform needs configuration": (
        lambda p: _levels("ConfigurationNeeded", "OutOfDate"),
        OLD,
        NEW,
        3,
        "TDRelaunchAdvisedConfigurationNeeded",
    ),
    "current level SWHardeningNeeded": (
        lambda p: _levels("SWHardeningNeeded", "OutOfDate"),
        OLD,
        NEW,
        3,
        "TDRelaunchAdvised",
    ),
    "launch OutOfDateConfigurationNeeded, microcode updated": (
        _microcode_update,
        svn(5, 1, 2),
        svn(5, 1, 3),
        3,
        "TDRelaunchAdvisedConfigurationNeeded",
    ),
    "current module has its own advisory": (_current_sw_hardening, svn(5, 1, 2), svn(7, 1, 3), 3, "TDRelaunchAdvised"),
    "QE out of date: no relaunch advice": (_qe_out_of_date, OLD, NEW, 3, "OutOfDate"),
    "SGX TCB out of date: no relaunch advice": (
        lambda p: {"pck_tcb_components": L1.sgx_components, "pck_pce_svn": L1.pce_svn},
        OLD,
        NEW,
        3,
        "OutOfDate",
    ),
    "TEE_TCB_SVN2 below every module level": (None, OLD, svn(2, 1, 2), 3, None),
    "TEE_TCB_SVN2 names an unknown module (TDX_02)": (None, OLD, svn(5, 2, 2), 3, None),
    "TEE_TCB_SVN2 below every level's microcode": (None, OLD, svn(5, 1, 1), 3, None),
    "TEE_TCB_SVN2 of a major version 0 module": (None, OLD, svn(5, 0, 2), 3, None),
    "TEE_TCB_SVN2 on a revoked module": (_current_module_revoked, svn(7, 1, 2), svn(5, 1, 2), 3, None),
    "platform level revoked": (lambda p: _levels("Revoked", "OutOfDate"), NEW, NEW, 3, None),
    # a module of major version 1 whose TCB info says nothing of its levels: not evaluated, refused
    "TCB info without TDX module identities": (lambda p: {"tdx_module_identities": ()}, NEW, NEW, 3, None),
    "TDX module identity without TCB levels": (
        lambda p: {"tdx_module_identities": (TdxModuleIdentity(version=1, tcb_levels=()),)},
        NEW,
        NEW,
        3,
        None,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_tdx15_tcb_agrees_with_dcap_qvl(platform, name):
    change, launch, current, body_type, expected = CASES[name]
    p = platform.variant(**change(platform)) if change else platform
    quote = p.sign_quote(version=5, body_type=body_type, tee_tcb_svn=launch, tee_tcb_svn2=current)
    theirs, ours, v = both(p, quote)
    assert ours == theirs, v.reasons
    assert (ours[0] if ours else None) == expected, v.reasons


def test_relaunch_reports_both_tcbs(platform):
    _, ours, v = both(platform, platform.sign_quote(version=5, tee_tcb_svn=OLD, tee_tcb_svn2=NEW))
    tcb = v.to_dict()["tcb"]
    assert (tcb["launch_status"], tcb["current_status"], tcb["tdx_module_status"]) == (
        "OutOfDate",
        "UpToDate",
        "OutOfDate",
    )
    strict = appraise(
        platform.sign_quote(version=5, tee_tcb_svn=OLD, tee_tcb_svn2=NEW),
        platform.collateral(),
        at=AT,
        trust_anchor=TrustAnchor.from_der(platform.root_ca_der),
    )
    assert [r.code for r in strict.reasons] == ["tcb-status"]  # the strict default accepts UpToDate only
    assert "TDRelaunchAdvised" in strict.reasons[0].message


@pytest.mark.parametrize("name", [n for n, case in CASES.items() if case[-1] is None and case[0] is None])
def test_unmatched_tee_tcb_svn2_names_the_field(platform, name):
    _, launch, current, body_type, _ = CASES[name]
    _, _, v = both(
        platform, platform.sign_quote(version=5, body_type=body_type, tee_tcb_svn=launch, tee_tcb_svn2=current)
    )
    assert [r.code for r in v.reasons] == ["current-tcb-not-supported"]
    assert f"TEE_TCB_SVN2 {current.hex()}" in v.reasons[0].message


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("platform level revoked", "tcb-revoked"),
        ("TCB info without TDX module identities", "tdx-module-unknown"),
        ("TDX module identity without TCB levels", "tdx-module-tcb-level-not-found"),
    ],
)
def test_a_tcb_that_cannot_be_accepted_says_why(platform, name, code):
    change, launch, current, body_type, _ = CASES[name]
    p = platform.variant(**change(platform))
    _, _, v = both(p, p.sign_quote(version=5, body_type=body_type, tee_tcb_svn=launch, tee_tcb_svn2=current))
    assert [r.code for r in v.reasons] == [code]


def test_revoked_trust_anchor_refused_by_both(platform):
    p = platform.variant(revoke_root_ca=True)
    theirs, ours, v = both(p, p.sign_quote(version=5))
    assert theirs is None and ours is None
    assert [r.code for r in v.reasons] == ["trust-anchor-revoked"]
    assert "root CA CRL lists the trust anchor" in v.reasons[0].message
    # Listing another serial (the TCB signing certificate) revokes that certificate, not the anchor.
    p = platform.variant(revoked_ca_serials=[platform.tcb_signing_cert.serial_number])
    theirs, ours, v = both(p, p.sign_quote(version=5))
    assert theirs is None and ours is None
    assert "trust-anchor-revoked" not in {r.code for r in v.reasons} and "cert-revoked" in {r.code for r in v.reasons}
