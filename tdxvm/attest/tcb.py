"""TCB evaluation as Intel's Quote Verification Library does it.

Sources: Intel's SGX-TDX-DCAP-QuoteVerificationLibrary (``TcbLevelCheck.cpp``,
``TdxModuleCheck.cpp``, ``QuoteVerifier.cpp``) and the PCS API v4 documentation of
TCB info v3:

* TCB levels are tried from the highest down (sorted by SGX components, then PCESVN,
  then TDX components); the first level whose SGX components and PCESVN are all ≤ the
  PCK certificate's and whose TDX components are all ≤ the quote's TEE_TCB_SVN wins.
* TEE_TCB_SVN bytes 0 and 1 are the TDX module's minor SVN and major version. When
  byte 1 is ≥ 1, those two bytes are not compared with the TCB level; the module is
  matched instead against ``tdxModuleIdentities`` entry ``TDX_<byte1 as %02X>``
  (MRSIGNER, masked attributes, and its own TCB levels by ISVSVN = byte 0).
* Statuses converge: an OutOfDate TDX module or QE makes an UpToDate or
  SWHardeningNeeded platform OutOfDate, and a ConfigurationNeeded or
  ConfigurationAndSWHardeningNeeded one OutOfDateConfigurationNeeded; a Revoked module
  makes it Revoked. Advisory IDs of every matched level are merged.
* A TD report 1.5 body carries TEE_TCB_SVN2 (the TDX module running now, after
  TD-preserving updates) besides TEE_TCB_SVN (the module the TD launched on). Both are
  evaluated the same way (:mod:`tdxvm.attest.tcbeval`), and :func:`check_for_relaunch`
  combines the two statuses (Intel QVL ``TDRelaunchCheck.cpp``, dcap-qvl 0.7
  ``TcbStatus::check_for_relaunch``): a launch TCB that is OutOfDate(ConfigurationNeeded)
  with a current one that is not out of date gives TDRelaunchAdvised, or
  TDRelaunchAdvisedConfigurationNeeded when either needs configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import ge

from tdxvm.attest.pck import PckExtension
from tdxvm.attest.quote import EnclaveReport, TdReport
from tdxvm.attest.result import Reason
from tdxvm.attest.tcbinfo import TCB_STATUSES, ModuleTcbLevel, QeIdentity, TcbInfo, TcbLevel
from tdxvm.errors import Refused

# What a TD 1.5 evaluation adds to the statuses of the TCB info (Intel QVL's
# STATUS_TCB_TD_RELAUNCH_ADVISED and STATUS_TCB_TD_RELAUNCH_ADVISED_CONFIGURATION_NEEDED).
TD_RELAUNCH_STATUSES = ("TDRelaunchAdvised", "TDRelaunchAdvisedConfigurationNeeded")
# Every status a TCB evaluation can give: what a policy may list in accepted_tcb_statuses.
EVALUATED_TCB_STATUSES = TCB_STATUSES + TD_RELAUNCH_STATUSES
_OUT_OF_DATE = ("OutOfDate", "OutOfDateConfigurationNeeded")
_NOT_OUT_OF_DATE = ("UpToDate", "SWHardeningNeeded", "ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded")
_CONFIGURATION_NEEDED = (
    "ConfigurationNeeded",
    "OutOfDateConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "TDRelaunchAdvisedConfigurationNeeded",
)


@dataclass(frozen=True, slots=True)
class Matched:
    status: str
    advisory_ids: tuple[str, ...]


class TcbMismatch(Refused):
    """Internal: carries the reason why no level matched (the verdict turns it into a reason)."""

    def __init__(self, reason: Reason) -> None:
        super().__init__(reason.message)
        self.reason = reason


def _masked(value: bytes, mask: bytes) -> int:
    """``value`` AND ``mask``, byte by byte (as one number; both are the same length)."""
    if len(value) != len(mask):
        raise ValueError(f"{len(value)} bytes masked by {len(mask)}")
    return int.from_bytes(value, "big") & int.from_bytes(mask, "big")


def _sort_key(level: TcbLevel) -> tuple:
    return (level.sgx_components, level.pce_svn, level.tdx_components)


def match_platform_level(
    tcb_info: TcbInfo, pck: PckExtension, tee_tcb_svn: bytes, field: str = "TEE_TCB_SVN"
) -> TcbLevel:
    """The first level (highest first) the PCK's TCB and ``tee_tcb_svn`` (quote field ``field``) reach."""
    skip = 2 if tee_tcb_svn[1] > 0 else 0
    tdx = tee_tcb_svn[skip:16]
    for level in sorted(tcb_info.tcb_levels, key=_sort_key, reverse=True):
        if pck.pce_svn < level.pce_svn:
            continue
        if not all(map(ge, pck.tcb_components, level.sgx_components)):  # both 16 components (parsers check)
            continue
        if not all(map(ge, tdx, level.tdx_components[skip:16])):
            continue
        return level
    raise TcbMismatch(
        Reason(
            "tcb-level-not-found",
            "no TCB level of the TCB info matches this platform (PCK TCB components "
            f"{list(pck.tcb_components)}, PCESVN {pck.pce_svn}, {field} {tee_tcb_svn.hex()})",
        )
    )


def match_tdx_module(
    tcb_info: TcbInfo, body: TdReport, tee_tcb_svn: bytes | None = None, field: str = "TEE_TCB_SVN"
) -> Matched | None:
    """Check the TDX module's identity; return its TCB level's status, if it has one.

    ``tee_tcb_svn`` (default: the body's TEE_TCB_SVN) picks the module identity (byte 1)
    and its level (byte 0); ``field`` names it in messages.
    """
    svn = body.tee_tcb_svn if tee_tcb_svn is None else tee_tcb_svn
    minor, major = svn[0], svn[1]
    identity = tcb_info.tdx_module
    levels: tuple[ModuleTcbLevel, ...] = ()
    if major > 0:  # a module of major version 1 or later: its TCB levels decide (Intel's QVL)
        if not tcb_info.tdx_module_identities:
            raise TcbMismatch(
                Reason(
                    "tdx-module-unknown",
                    f"TCB info lists no TDX module identities, so the TDX module of {field} byte 1 = {major} "
                    "cannot be matched to a TCB level",
                )
            )
        wanted = f"TDX_{major:02X}"
        found = [m for m in tcb_info.tdx_module_identities if m.id.upper() == wanted]
        if not found:
            raise TcbMismatch(
                Reason(
                    "tdx-module-unknown", f"TCB info has no TDX module identity {wanted} ({field} byte 1 is {major})"
                )
            )
        identity = found[0]
        levels = identity.tcb_levels
        if not levels:
            raise TcbMismatch(
                Reason(
                    "tdx-module-tcb-level-not-found",
                    f"TDX module {identity.id} has no TCB levels in the TCB info, so its SVN {minor} "
                    f"({field} byte 0) matches none",
                )
            )
    if body.mr_signer_seam != identity.mrsigner:
        raise TcbMismatch(
            Reason(
                "tdx-module-mrsigner",
                f"quote field MR_SIGNER_SEAM is {body.mr_signer_seam.hex()}, expected {identity.mrsigner.hex()}",
            )
        )
    mask = identity.attributes_mask
    if _masked(body.seam_attributes, mask) != _masked(identity.attributes, mask):
        raise TcbMismatch(
            Reason(
                "tdx-module-attributes",
                f"quote field SEAM_ATTRIBUTES is {body.seam_attributes.hex()}, expected {identity.attributes.hex()} "
                f"under mask {mask.hex()}",
            )
        )
    if not levels:
        return None
    for level in levels:
        if minor >= level.isv_svn:
            return Matched(level.status, level.advisory_ids)
    raise TcbMismatch(
        Reason(
            "tdx-module-tcb-level-not-found",
            f"TDX module {identity.id} SVN {minor} ({field} byte 0) is below every TCB level",
        )
    )


def match_qe(qe_identity: QeIdentity, report: EnclaveReport) -> Matched:
    checks = []
    if report.mr_signer != qe_identity.mrsigner:
        checks.append(
            ("qe-mrsigner", f"QE report MRSIGNER is {report.mr_signer.hex()}, expected {qe_identity.mrsigner.hex()}")
        )
    if report.isv_prod_id != qe_identity.isv_prod_id:
        checks.append(
            ("qe-isvprodid", f"QE report ISVPRODID is {report.isv_prod_id}, expected {qe_identity.isv_prod_id}")
        )
    if report.misc_select & qe_identity.miscselect_mask != qe_identity.miscselect & qe_identity.miscselect_mask:
        checks.append(
            (
                "qe-miscselect",
                f"QE report MISCSELECT is {report.misc_select:08x}, expected {qe_identity.miscselect:08x} "
                f"under mask {qe_identity.miscselect_mask:08x}",
            )
        )
    mask = qe_identity.attributes_mask
    if _masked(report.attributes, mask) != _masked(qe_identity.attributes, mask):
        checks.append(
            (
                "qe-attributes",
                f"QE report ATTRIBUTES is {report.attributes.hex()}, expected {qe_identity.attributes.hex()} "
                f"under mask {mask.hex()}",
            )
        )
    if checks:
        code, message = checks[0]
        raise TcbMismatch(Reason(code, "; ".join(m for _, m in checks)))
    for level in qe_identity.tcb_levels:
        if report.isv_svn >= level.isv_svn:
            if level.status == "Revoked":
                raise TcbMismatch(Reason("qe-revoked", f"QE ISVSVN {report.isv_svn} is revoked"))
            return Matched(level.status, level.advisory_ids)
    raise TcbMismatch(
        Reason("qe-tcb-level-not-found", f"QE ISVSVN {report.isv_svn} is below every QE identity TCB level")
    )


def converge(platform: str, other: str | None) -> str:
    """Intel QVL's convergence of the platform status with a module or QE status."""
    if other == "Revoked":
        return "Revoked"
    if other == "OutOfDate":
        if platform in ("UpToDate", "SWHardeningNeeded"):
            return "OutOfDate"
        if platform in ("ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded"):
            return "OutOfDateConfigurationNeeded"
    return platform


def check_for_relaunch(launch: str, current: str) -> str:
    """The status of a TD 1.5 from its launch-time and current TCB statuses.

    As dcap-qvl 0.7's ``check_for_relaunch`` (its reading of Intel QVL's
    ``checkForRelaunch``): a launch status OutOfDate or OutOfDateConfigurationNeeded
    with a current status that is not out of date gives TDRelaunchAdvised, or
    TDRelaunchAdvisedConfigurationNeeded when either status needs configuration;
    anything else keeps the launch status. A Revoked current TCB is Revoked (dcap-qvl
    refuses it; the TD runs on a revoked TDX module now).
    """
    if current == "Revoked":
        return "Revoked"
    if launch in _OUT_OF_DATE and current in _NOT_OUT_OF_DATE:
        if launch in _CONFIGURATION_NEEDED or current in _CONFIGURATION_NEEDED:
            return "TDRelaunchAdvisedConfigurationNeeded"
        return "TDRelaunchAdvised"
    return launch


def merge_advisories(*groups: tuple[str, ...]) -> tuple[str, ...]:
    out: list[str] = []
    for group in groups:
        for a in group:
            if a not in out:
                out.append(a)
    return tuple(out)
