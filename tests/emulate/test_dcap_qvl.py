"""dcap-qvl, an independent verifier, accepts the emulated platform's material and
rejects each deliberately broken variant (the knobs verifier tests will turn)."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import dcap_qvl
import pytest

from tdxvm.attest.quote import TD_ATTR_DEBUG, TD_ATTR_SEPT_VE_DISABLE
from tdxvm.emulate import (
    DEFAULT_ADVISORIES,
    DEFAULT_TCB_LEVELS,
    EmulatedPlatform,
    IsvTcbLevel,
    Validity,
)

from .conftest import AT

DAY = timedelta(days=1)
OLD_TDX = bytes([3, 1, 2]) + bytes(13)  # the OutOfDate level's TEE_TCB_SVN


def verify(
    p: EmulatedPlatform,
    quote: bytes | None = None,
    *,
    root: bytes | None = None,
    at: int | None = None,
):
    collateral = dcap_qvl.QuoteCollateralV3.from_json(p.collateral().to_json())
    return dcap_qvl.verify_with_root_ca(
        quote if quote is not None else p.sign_quote(),
        collateral,
        root if root is not None else p.root_ca_der,
        at if at is not None else p.unix_time,
    )


def rejected(p: EmulatedPlatform, quote: bytes | None = None, **kw) -> str:
    with pytest.raises(ValueError) as info:
        verify(p, quote, **kw)
    return str(info.value)


@pytest.mark.parametrize(("version", "body_type"), [(4, None), (5, 2), (5, 3), (5, 4)])
def test_up_to_date(platform: EmulatedPlatform, version: int, body_type: int | None) -> None:
    quote = platform.sign_quote(version=version, body_type=body_type, report_data=bytes(range(64)))
    report = verify(platform, quote)
    assert report.status == "UpToDate"
    assert report.advisory_ids == []


def test_processor_ca_chain_is_up_to_date(platform: EmulatedPlatform) -> None:
    assert verify(platform.variant(pck_ca_kind="processor")).status == "UpToDate"


def test_lower_tee_tcb_svn_is_out_of_date(platform: EmulatedPlatform) -> None:
    report = verify(platform, platform.sign_quote(tee_tcb_svn=OLD_TDX))
    assert report.status == "OutOfDate"
    assert report.advisory_ids == list(DEFAULT_ADVISORIES)


@pytest.mark.parametrize(
    "change",
    [
        {"pck_tcb_components": DEFAULT_TCB_LEVELS[1].sgx_components},
        {"pck_pce_svn": DEFAULT_TCB_LEVELS[0].pce_svn - 1},
    ],
)
def test_lower_pck_tcb_is_out_of_date(platform: EmulatedPlatform, change: dict) -> None:
    report = verify(platform.variant(**change))
    assert report.status == "OutOfDate"
    assert report.advisory_ids == list(DEFAULT_ADVISORIES)


def test_advisories_on_the_matched_level(platform: EmulatedPlatform) -> None:
    top = replace(DEFAULT_TCB_LEVELS[0], status="SWHardeningNeeded", advisory_ids=("INTEL-SA-00615",))
    report = verify(platform.variant(tcb_levels=(top, *DEFAULT_TCB_LEVELS[1:])))
    assert report.status == "SWHardeningNeeded"
    assert report.advisory_ids == ["INTEL-SA-00615"]


def test_below_every_level_is_rejected(platform: EmulatedPlatform) -> None:
    assert "below minimum" in rejected(platform, platform.sign_quote(tee_tcb_svn=bytes([2, 1, 2]) + bytes(13)))
    low = platform.variant(pck_tcb_components=(1,) * 16)
    assert "No matching TCB level" in rejected(low)


def test_revoked_level_is_rejected(platform: EmulatedPlatform) -> None:
    revoked = replace(DEFAULT_TCB_LEVELS[0], status="Revoked")
    assert "Revoked" in rejected(platform.variant(tcb_levels=(revoked,)))


def test_qe_out_of_date(platform: EmulatedPlatform) -> None:
    levels = (
        IsvTcbLevel(isvsvn=4),
        IsvTcbLevel(isvsvn=2, status="OutOfDate", advisory_ids=("INTEL-SA-00999",)),
    )
    old_qe = replace(platform.qe, isv_svn=3)
    p = platform.variant(qe=old_qe, qe_identity=replace(old_qe, tcb_levels=levels))
    report = verify(p)
    assert (report.status, report.advisory_ids) == ("OutOfDate", ["INTEL-SA-00999"])


def test_revoked_pck(platform: EmulatedPlatform) -> None:
    assert "CertRevoked" in rejected(platform.variant(revoke_pck=True))
    serial = platform.pck_cert.serial_number
    assert "CertRevoked" in rejected(platform.variant(revoked_pck_serials=[serial]))


def test_revoked_intermediate(platform: EmulatedPlatform) -> None:
    assert "CertRevoked" in rejected(platform.variant(revoke_pck_ca=True))


def test_revoked_tcb_signing_cert(platform: EmulatedPlatform) -> None:
    assert "CertRevoked" in rejected(platform.variant(revoked_ca_serials=[platform.tcb_signing_cert.serial_number]))


def test_wrong_root(platform: EmulatedPlatform) -> None:
    other = EmulatedPlatform(at=AT, seed="someone else")
    assert "Verification failed" in rejected(platform, root=other.root_ca_der)
    # The whole other platform verifies against its own root only.
    assert verify(other).status == "UpToDate"
    rejected(other, root=platform.root_ca_der)


@pytest.mark.parametrize(
    ("option", "window", "message"),
    [
        (
            "tcb_info_validity",
            Validity.around(AT, before=40 * DAY, after=-10 * DAY),
            "TCBInfo expired",
        ),
        (
            "tcb_info_validity",
            Validity.around(AT, before=-DAY, after=30 * DAY),
            "issue date is in the future",
        ),
        (
            "qe_identity_validity",
            Validity.around(AT, before=40 * DAY, after=-10 * DAY),
            "QE Identity expired",
        ),
        ("qe_identity_validity", Validity.around(AT, before=-DAY, after=30 * DAY), "in the future"),
        ("crl_validity", Validity.around(AT, before=40 * DAY, after=-10 * DAY), "CrlExpired"),
        ("pck_validity", Validity.around(AT, before=400 * DAY, after=-DAY), "CertExpired"),
        ("pck_ca_validity", Validity.around(AT, before=-DAY, after=400 * DAY), "CertNotValidYet"),
        ("tcb_signing_validity", Validity.around(AT, before=400 * DAY, after=-DAY), "CertExpired"),
    ],
)
def test_time_windows(platform: EmulatedPlatform, option: str, window: Validity, message: str) -> None:
    assert message in rejected(platform.variant(**{option: window}))


def test_verifying_after_next_update_fails(platform: EmulatedPlatform) -> None:
    assert verify(platform, at=platform.unix_time + 28 * 86400).status == "UpToDate"
    rejected(platform, at=platform.unix_time + 31 * 86400)
    rejected(platform, at=platform.unix_time - 2 * 86400)


def test_fmspc_mismatch(platform: EmulatedPlatform) -> None:
    assert "Fmspc mismatch" in rejected(platform.variant(tcb_info_fmspc=bytes.fromhex("00906ED50000")))


def test_debug_td(platform: EmulatedPlatform) -> None:
    quote = platform.sign_quote(td_attributes=TD_ATTR_SEPT_VE_DISABLE | TD_ATTR_DEBUG)
    assert "Debug mode" in rejected(platform, quote)
    assert "SEPT_VE_DISABLE" in rejected(platform, platform.sign_quote(td_attributes=0))


def test_service_td_in_td_report_15(platform: EmulatedPlatform) -> None:
    assert "service TD" in rejected(platform, platform.sign_quote(version=5, mr_service_td=bytes([1]) * 48))


def test_wrong_qe_identity(platform: EmulatedPlatform) -> None:
    assert "MRSIGNER mismatch" in rejected(platform.variant(qe_identity=replace(platform.qe, mrsigner=bytes(32))))
    assert "ISVPRODID mismatch" in rejected(platform.variant(qe_identity=replace(platform.qe, isv_prod_id=1)))
    assert "ISVSVN 3 is below" in rejected(platform.variant(qe=replace(platform.qe, isv_svn=3)))


def test_revoked_root_ca(platform: EmulatedPlatform) -> None:
    """The root CA CRL may list the trust anchor itself; dcap-qvl checks the root too."""
    revoked = platform.variant(revoke_root_ca=True)
    assert revoked.revoked_ca_serials == (platform.root_ca_cert.serial_number,)
    assert "CertRevoked" in rejected(revoked)
    assert "CertRevoked" in rejected(platform.variant(revoked_ca_serials=[platform.root_ca_cert.serial_number]))


def test_td15_quote_carries_both_tcb_svns(platform: EmulatedPlatform) -> None:
    old, new = platform.tee_tcb_svn_for("OutOfDate"), platform.tee_tcb_svn_for("UpToDate")
    assert (old, new) == (OLD_TDX, platform.tee_tcb_svn)
    for body_type in (3, 4):
        quote = platform.sign_quote(version=5, body_type=body_type, tee_tcb_svn=old, tee_tcb_svn2=new)
        report = dcap_qvl.parse_quote(quote).report
        assert (report.tee_tcb_svn, report.tee_tcb_svn2) == (old, new)
    # TEE_TCB_SVN2 defaults to TEE_TCB_SVN.
    assert dcap_qvl.parse_quote(platform.sign_quote(version=5, tee_tcb_svn=old)).report.tee_tcb_svn2 == old
    with pytest.raises(ValueError, match="no TCB level has status 'Revoked'"):
        platform.tee_tcb_svn_for("Revoked")


@pytest.mark.parametrize(
    ("launch", "current", "status"),
    [
        ("OutOfDate", "UpToDate", "TDRelaunchAdvised"),
        ("OutOfDate", "OutOfDate", "OutOfDate"),
        ("UpToDate", "UpToDate", "UpToDate"),
    ],
)
def test_td_relaunch(platform: EmulatedPlatform, launch: str, current: str, status: str) -> None:
    """A TD launched on the out-of-date module while the up-to-date one runs now."""
    quote = platform.sign_quote(
        version=5, tee_tcb_svn=platform.tee_tcb_svn_for(launch), tee_tcb_svn2=platform.tee_tcb_svn_for(current)
    )
    assert verify(platform, quote).status == status


def test_relaunch_configuration_needed(platform: EmulatedPlatform) -> None:
    top = replace(DEFAULT_TCB_LEVELS[0], status="ConfigurationNeeded")
    p = platform.variant(tcb_levels=(top, *DEFAULT_TCB_LEVELS[1:]))
    quote = p.sign_quote(version=5, tee_tcb_svn=OLD_TDX, tee_tcb_svn2=p.tee_tcb_svn_for("ConfigurationNeeded"))
    assert verify(p, quote).status == "TDRelaunchAdvisedConfigurationNeeded"


def test_unknown_current_tcb_is_rejected(platform: EmulatedPlatform) -> None:
    quote = platform.sign_quote(version=5, tee_tcb_svn=OLD_TDX, tee_tcb_svn2=bytes([2, 1, 2]) + bytes(13))
    assert "TEE_TCB_SVN2" in rejected(platform, quote)
