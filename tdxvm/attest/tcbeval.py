"""A quote's TCB status: its launch-time TCB and, for a TD 1.5, its current one.

The steps follow Intel's QVL (``TcbLevelCheck.cpp`` ``checkTcbLevel``, 2024 on) as
dcap-qvl 0.7 implements them, so that the two verifiers agree
(``tests/attest/test_crosscheck_tdx15.py``):

1. FMSPC and PCE-ID of the PCK certificate must be those of the TCB info; the QE must
   match the QE identity (:func:`~tdxvm.attest.tcb.match_qe`).
2. Launch-time TCB: the platform level reached by the PCK's TCB and TEE_TCB_SVN, the TDX
   module's level by TEE_TCB_SVN, each converged with the QE's status.
3. A TD report 1.5 body (v5 body type 3 or 4) also carries TEE_TCB_SVN2, the TDX module
   running now after TD-preserving updates. It is evaluated the same way; when it
   reaches no TCB level (or no module identity or module level), the TCB is not
   supported and the quote is refused (``current-tcb-not-supported``), as dcap-qvl does
   ("Failed to evaluate the current TDX TCB (TEE_TCB_SVN2)").
4. The status is :func:`~tdxvm.attest.tcb.check_for_relaunch` of the two: launched
   OutOfDate on a platform whose current TCB is not out of date gives
   ``TDRelaunchAdvised`` (``…ConfigurationNeeded`` when configuration is needed).
   Advisory IDs, platform, module and QE statuses and the TCB date are the launch's.
5. A Revoked status is a refusal (``tcb-revoked``), as in Intel's QVL (a terminal
   result) and dcap-qvl: no policy can accept it.

Where Intel's reference differs from dcap-qvl 0.7 (it compares TEE_TCB_SVN2 with the
latest level only, advises a relaunch only when the launch-time *module* is OutOfDate,
and keeps the launch status when TEE_TCB_SVN2 reaches no level), tdxvm follows dcap-qvl:
it refuses what it cannot evaluate, and no refusal of dcap-qvl is an acceptance here.
"""

from __future__ import annotations

from dataclasses import dataclass

from tdxvm.attest.pck import PckExtension
from tdxvm.attest.quote import Quote
from tdxvm.attest.result import Reason, TcbEvaluation
from tdxvm.attest.tcb import (
    Matched,
    TcbMismatch,
    check_for_relaunch,
    converge,
    match_platform_level,
    match_qe,
    match_tdx_module,
    merge_advisories,
)
from tdxvm.attest.tcbinfo import QeIdentity, TcbInfo, TcbLevel


@dataclass(frozen=True, slots=True)
class _TdxTcb:
    """One TEE_TCB_SVN evaluated: the platform level, the module's, the converged status."""

    level: TcbLevel
    module: Matched | None
    status: str


def _tdx_tcb(tcb_info: TcbInfo, pck: PckExtension, q: Quote, svn: bytes, field: str, qe: Matched) -> _TdxTcb:
    level = match_platform_level(tcb_info, pck, svn, field)
    module = match_tdx_module(tcb_info, q.body, svn, field)
    status = converge(converge(level.status, module.status if module else None), qe.status)
    return _TdxTcb(level=level, module=module, status=status)


def evaluate_tcb(
    tcb_info: TcbInfo, qe_identity: QeIdentity, pck: PckExtension, q: Quote
) -> tuple[list[Reason], TcbEvaluation | None]:
    """The quote's TCB evaluation, or the reasons it cannot be evaluated (then ``None``)."""
    reasons = []
    if tcb_info.fmspc != pck.fmspc:
        reasons.append(
            Reason(
                "fmspc-mismatch",
                f"TCB info is for FMSPC {tcb_info.fmspc.hex().upper()}, "
                f"the PCK certificate has {pck.fmspc.hex().upper()}",
            )
        )
    if tcb_info.pce_id != pck.pce_id:
        reasons.append(
            Reason(
                "pce-id-mismatch",
                f"TCB info is for PCE-ID {tcb_info.pce_id.hex()}, the PCK certificate has {pck.pce_id.hex()}",
            )
        )
    if reasons:
        return reasons, None
    try:
        qe = match_qe(qe_identity, q.signature.qe_report)
        launch = _tdx_tcb(tcb_info, pck, q, q.body.tee_tcb_svn, "TEE_TCB_SVN", qe)
    except TcbMismatch as exc:
        return [exc.reason], None
    current = None
    svn2 = q.body.tee_tcb_svn2
    if svn2 is not None:
        try:
            current = _tdx_tcb(tcb_info, pck, q, svn2, "TEE_TCB_SVN2", qe)
        except TcbMismatch as exc:
            return [
                Reason(
                    "current-tcb-not-supported",
                    f"the TDX module running now (TEE_TCB_SVN2 {svn2.hex()}) has no TCB level "
                    f"in the TCB info, so the TD's current TCB cannot be evaluated: {exc.reason.message}",
                )
            ], None
    module = launch.module
    status = launch.status if current is None else check_for_relaunch(launch.status, current.status)
    if status == "Revoked":
        parts = [f"platform {launch.level.status}", f"TDX module {module.status if module else 'unrated'}"]
        parts += [f"QE {qe.status}"] + ([f"TDX module running now {current.status}"] if current else [])
        return [
            Reason(
                "tcb-revoked",
                f"the TCB is Revoked ({', '.join(parts)}): a revoked TCB ends Intel's quote verification "
                "(a terminal status), so no policy accepts it",
            )
        ], None
    return [], TcbEvaluation(
        status=status,
        advisory_ids=merge_advisories(
            launch.level.advisory_ids, module.advisory_ids if module else (), qe.advisory_ids
        ),
        platform_status=launch.level.status,
        tdx_module_status=module.status if module else None,
        qe_status=qe.status,
        tcb_date=launch.level.tcb_date,
        tcb_evaluation_data_number=tcb_info.tcb_evaluation_data_number,
        launch_status=launch.status,
        current_status=current.status if current else None,
    )
