"""tdxvm's verdicts against dcap-qvl's, on real Intel vectors and on emulated quotes,
genuine and forged.

dcap-qvl's ``verify`` succeeds for any TCB status but Revoked and refuses DEBUG TDs,
TDs without SEPT_VE_DISABLE and bound service TDs; tdxvm splits the same decisions
between verification and policy. The comparison therefore uses a policy that accepts
every TCB status but Revoked, and compares the TCB status and advisories too.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta, timezone

import dcap_qvl
import pytest

from tdxvm.attest.chain import TrustAnchor
from tdxvm.attest.collateral import Collateral
from tdxvm.attest.policy import Policy
from tdxvm.attest.quote import TD_ATTR_DEBUG, TD_ATTR_SEPT_VE_DISABLE
from tdxvm.attest.tcb import EVALUATED_TCB_STATUSES
from tdxvm.attest.verdict import appraise
from tdxvm.emulate import EmulatedPlatform, PlatformOptions, Validity

from ..conftest import TESTDATA, utc

AT = datetime(2025, 7, 1, 12, 0, 0, tzinfo=timezone.utc)
DAY = timedelta(days=1)
LIKE_DCAP_QVL = Policy(accepted_tcb_statuses=tuple(s for s in EVALUATED_TCB_STATUSES if s != "Revoked"))


def both(quote: bytes, collateral_json: str, at: datetime, root_der: bytes | None = None):
    """(dcap-qvl outcome, tdxvm outcome): each None when refused, else (status, advisories)."""
    theirs_coll = dcap_qvl.QuoteCollateralV3.from_json(collateral_json)
    try:
        if root_der is None:
            r = dcap_qvl.verify(quote, theirs_coll, int(at.timestamp()))
        else:
            r = dcap_qvl.verify_with_root_ca(quote, theirs_coll, root_der, int(at.timestamp()))
        theirs = (r.status, frozenset(r.advisory_ids))
    except ValueError:
        theirs = None
    anchor = TrustAnchor.from_der(root_der) if root_der is not None else None
    v = appraise(quote, Collateral.from_json(collateral_json), at=at, policy=LIKE_DCAP_QVL, trust_anchor=anchor)
    ours = (v.result.tcb.status, frozenset(v.result.tcb.advisory_ids)) if v.accepted else None
    return theirs, ours, v


REAL = [
    ("dcap-qvl-v4", "dcap-qvl-v4", "2025-06-20T00:00:00Z"),
    ("dcap-qvl-v4", "dcap-qvl-v4", "2025-07-20T11:00:00Z"),
    ("dcap-qvl-v4", "dcap-qvl-v4", "2025-06-18T00:00:00Z"),
    ("go-tdx-guest-v5", "go-tdx-guest-v5", "2026-03-01T00:00:00Z"),
    ("go-tdx-guest-v5", "go-tdx-guest-v5", "2026-03-21T11:00:00Z"),
    ("dcap-qvl-v5-no-tcb-level", "dcap-qvl-v5-no-tcb-level", "2026-03-01T00:00:00Z"),
    ("trustee-debug-td", "dcap-qvl-v4", "2025-06-20T00:00:00Z"),
    ("cc-api-preprod-root", "dcap-qvl-v4", "2025-06-20T00:00:00Z"),
    ("go-tdx-guest-ccel", "dcap-qvl-v4", "2025-06-20T00:00:00Z"),
]


@pytest.mark.parametrize(("quote", "collateral", "at"), REAL)
def test_real_vectors_agree(quote, collateral, at):
    raw = (TESTDATA / quote / "quote.bin").read_bytes()
    text = (TESTDATA / collateral / "collateral.json").read_text()
    theirs, ours, v = both(raw, text, utc(at))
    assert theirs == ours, v.reasons


@pytest.fixture(scope="module")
def platform() -> EmulatedPlatform:
    return EmulatedPlatform(at=AT, seed="tests/attest/crosscheck")


def _coll(p: EmulatedPlatform) -> str:
    return p.collateral().to_json()


@pytest.mark.parametrize(("version", "body_type"), [(4, None), (5, 2), (5, 3), (5, 4)])
def test_emulated_genuine_quotes_agree(platform, version, body_type):
    quote = platform.sign_quote(version=version, body_type=body_type, mr_td=b"\x11" * 48, report_data=b"\x22" * 64)
    theirs, ours, v = both(quote, _coll(platform), AT, platform.root_ca_der)
    assert ours == theirs == ("UpToDate", frozenset()), v.reasons


def _flip(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x01
    return bytes(out)


def _sig_offset(quote: bytes) -> int:
    return 48 + 584 + 4  # v4: signature data starts after header, body and its length


def _tamper_json(collateral_json: str, key: str, old: str, new: str) -> str:
    import json

    doc = json.loads(collateral_json)
    assert old in doc[key]
    doc[key] = doc[key].replace(old, new, 1)
    return json.dumps(doc)


FORGERIES = {
    "quote signature": lambda p: (_flip(p.sign_quote(), _sig_offset(b"") + 5), _coll(p), p.root_ca_der),
    "attestation key": lambda p: (_flip(p.sign_quote(), _sig_offset(b"") + 64 + 3), _coll(p), p.root_ca_der),
    "QE report signature": lambda p: (
        _flip(p.sign_quote(), _sig_offset(b"") + 128 + 6 + 384 + 9),
        _coll(p),
        p.root_ca_der,
    ),
    "QE report body": lambda p: (_flip(p.sign_quote(), _sig_offset(b"") + 128 + 6 + 64), _coll(p), p.root_ca_der),
    "QE auth data": lambda p: (
        _flip(p.sign_quote(), _sig_offset(b"") + 128 + 6 + 384 + 64 + 2 + 1),
        _coll(p),
        p.root_ca_der,
    ),
    "TD body (MRTD)": lambda p: (_flip(p.sign_quote(), 48 + 136 + 7), _coll(p), p.root_ca_der),
    "header user data": lambda p: (_flip(p.sign_quote(), 30), _coll(p), p.root_ca_der),
    "wrong root": lambda p: (p.sign_quote(), _coll(p), EmulatedPlatform(at=AT, seed="another root").root_ca_der),
    "Intel root for emulated chain": lambda p: (p.sign_quote(), _coll(p), None),
    "revoked PCK": lambda p: (
        p.variant(revoke_pck=True).sign_quote(),
        _coll(p.variant(revoke_pck=True)),
        p.root_ca_der,
    ),
    "revoked PCK CA": lambda p: (
        p.variant(revoke_pck_ca=True).sign_quote(),
        _coll(p.variant(revoke_pck_ca=True)),
        p.root_ca_der,
    ),
    "expired TCB info": lambda p: (
        p.sign_quote(),
        _coll(p.variant(tcb_info_validity=Validity.around(AT, before=40 * DAY, after=-10 * DAY))),
        p.root_ca_der,
    ),
    "TCB info not yet valid": lambda p: (
        p.sign_quote(),
        _coll(p.variant(tcb_info_validity=Validity.around(AT, before=-2 * DAY, after=30 * DAY))),
        p.root_ca_der,
    ),
    "expired QE identity": lambda p: (
        p.sign_quote(),
        _coll(p.variant(qe_identity_validity=Validity.around(AT, before=40 * DAY, after=-1 * DAY))),
        p.root_ca_der,
    ),
    "expired CRLs": lambda p: (
        p.sign_quote(),
        _coll(p.variant(crl_validity=Validity.around(AT, before=40 * DAY, after=-1 * DAY))),
        p.root_ca_der,
    ),
    "FMSPC mismatch": lambda p: (
        p.sign_quote(),
        _coll(p.variant(tcb_info_fmspc=bytes.fromhex("00906ED50000"))),
        p.root_ca_der,
    ),
    "DEBUG TD": lambda p: (
        p.sign_quote(td_attributes=TD_ATTR_SEPT_VE_DISABLE | TD_ATTR_DEBUG),
        _coll(p),
        p.root_ca_der,
    ),
    "no SEPT_VE_DISABLE": lambda p: (p.sign_quote(td_attributes=0), _coll(p), p.root_ca_der),
    "service TD bound": lambda p: (
        p.sign_quote(version=5, body_type=3, mr_service_td=b"\x01" * 48),
        _coll(p),
        p.root_ca_der,
    ),
    "tampered TCB info JSON": lambda p: (
        p.sign_quote(),
        _tamper_json(_coll(p), "tcb_info", '"OutOfDate"', '"UpToDate"'),
        p.root_ca_der,
    ),
    "tampered QE identity JSON": lambda p: (
        p.sign_quote(),
        _tamper_json(_coll(p), "qe_identity", '"isvprodid":', '"isvprodid": '),
        p.root_ca_der,
    ),
    "QE identity MRSIGNER": lambda p: (
        p.sign_quote(),
        _coll(p.variant(qe_identity=dataclasses.replace(p.qe, mrsigner=bytes(32)))),
        p.root_ca_der,
    ),
    "platform below every TCB level": lambda p: (
        p.variant(pck_tcb_components=(1,) * 16).sign_quote(),
        _coll(p),
        p.root_ca_der,
    ),
    "trust anchor revoked by its own CRL": lambda p: (
        p.sign_quote(),
        _coll(p.variant(revoke_root_ca=True)),
        p.root_ca_der,
    ),
    "TEE_TCB_SVN2 below every TCB level": lambda p: (
        p.sign_quote(version=5, tee_tcb_svn2=bytes([2, 1, 2]) + bytes(13)),
        _coll(p),
        p.root_ca_der,
    ),
}


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_forgeries_refused_by_both(platform, name):
    quote, collateral_json, root = FORGERIES[name](platform)
    theirs, ours, v = both(quote, collateral_json, AT, root)
    assert theirs is None, f"dcap-qvl accepted {name}"
    assert ours is None, f"tdxvm accepted {name}"
    assert v.reasons


def test_out_of_date_platform_agrees(platform):
    """A PCK below the UpToDate level: both report OutOfDate with the same advisories."""
    p = platform.variant(pck_tcb_components=(2, 2, 2, 2, 3, 1, 0, 5) + (0,) * 8, pck_pce_svn=11)
    theirs, ours, v = both(p.sign_quote(), _coll(p), AT, p.root_ca_der)
    assert theirs is not None and theirs[0] == "OutOfDate"
    assert ours == theirs, v.reasons
    strict = appraise(
        p.sign_quote(), Collateral.from_json(_coll(p)), at=AT, trust_anchor=TrustAnchor.from_der(p.root_ca_der)
    )
    assert [r.code for r in strict.reasons] == ["tcb-status"]


def test_out_of_date_tdx_module_agrees(platform):
    """An old TDX module SVN (TEE_TCB_SVN byte 0) is OutOfDate for both verifiers."""
    quote = platform.sign_quote(tee_tcb_svn=bytes([3, 1, 2]) + bytes(13))
    theirs, ours, v = both(quote, _coll(platform), AT, platform.root_ca_der)
    assert theirs is not None and theirs[0] == "OutOfDate"
    assert ours == theirs, v.reasons
    assert v.result.tcb.platform_status == "UpToDate" and v.result.tcb.tdx_module_status == "OutOfDate"


def test_intel_rule_for_tee_tcb_svn_bytes_0_and_1():
    """With TEE_TCB_SVN[1] >= 1, Intel's QVL does not compare bytes 0-1 with the platform
    TCB level: the TDX module identity judges the module SVN instead (dcap-qvl 0.7 does
    the same; its older releases compared all 16 bytes).

    Here the UpToDate level lists TDX module SVN 7 while the module identity TDX_01 says
    SVN 5 is UpToDate, and the quote has SVN 5: Intel's rule gives UpToDate.
    """
    from tdxvm.emulate import IsvTcbLevel, TcbLevel, TdxModuleIdentity

    levels = (
        TcbLevel(sgx_components=(3, 3, 2, 2, 4, 1, 0, 5) + (0,) * 8, pce_svn=13, tdx_components=(7, 1, 2) + (0,) * 13),
        TcbLevel(
            sgx_components=(2, 2, 2, 2, 3, 1, 0, 5) + (0,) * 8,
            pce_svn=11,
            tdx_components=(3, 1, 2) + (0,) * 13,
            status="OutOfDate",
            advisory_ids=("INTEL-SA-00001",),
        ),
    )
    module = TdxModuleIdentity(version=1, tcb_levels=(IsvTcbLevel(isvsvn=5), IsvTcbLevel(isvsvn=3, status="OutOfDate")))
    p = EmulatedPlatform(
        PlatformOptions(tcb_levels=levels, tdx_module_identities=(module,)), at=AT, seed="tests/attest/intel-rule"
    )
    quote = p.sign_quote(tee_tcb_svn=bytes([5, 1, 2]) + bytes(13))
    theirs, ours, v = both(quote, _coll(p), AT, p.root_ca_der)
    assert ours == ("UpToDate", frozenset()), v.reasons
    assert theirs == ours
    # Comparing all 16 bytes would have matched the OutOfDate level instead.
    assert v.result.tcb.platform_status == "UpToDate"


def test_status_convergence_with_qe_agrees():
    """A ConfigurationNeeded platform with an OutOfDate QE converges to
    OutOfDateConfigurationNeeded, advisories of both merged (Intel QVL's rule)."""
    from tdxvm.emulate import IsvTcbLevel, TcbLevel

    levels = (
        TcbLevel(
            sgx_components=(3, 3, 2, 2, 4, 1, 0, 5) + (0,) * 8,
            pce_svn=13,
            tdx_components=(5, 1, 2) + (0,) * 13,
            status="ConfigurationNeeded",
            advisory_ids=("INTEL-SA-00002",),
        ),
    )
    p = EmulatedPlatform(PlatformOptions(tcb_levels=levels), at=AT, seed="tests/attest/converge")
    qe = dataclasses.replace(
        p.qe,
        tcb_levels=(
            IsvTcbLevel(isvsvn=p.qe.isv_svn + 1),
            IsvTcbLevel(isvsvn=0, status="OutOfDate", advisory_ids=("INTEL-SA-00003",)),
        ),
    )
    p = p.variant(qe_identity=qe)
    theirs, ours, v = both(p.sign_quote(), _coll(p), AT, p.root_ca_der)
    assert ours == theirs == ("OutOfDateConfigurationNeeded", frozenset({"INTEL-SA-00002", "INTEL-SA-00003"})), (
        v.reasons
    )
