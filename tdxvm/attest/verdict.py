"""Verification plus policy: the accept/reject decision and its JSON form.

The JSON object is a stable contract (``tdxvm verify-quote -o json``): ``verdict``,
``tcb_status``, ``advisory_ids``, ``reasons`` (``code``/``message``), ``quote_version``
and ``measurements`` always appear. ``policy_exceptions`` lists, one line each, every
rule of the policy looser than the strict default and every measurement register it
leaves unpinned (:meth:`tdxvm.attest.policy.Policy.loosened`, which status shows too).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tdxvm.attest.chain import TrustAnchor
from tdxvm.attest.collateral import Collateral
from tdxvm.attest.policy import Policy, evaluate
from tdxvm.attest.quote import Quote
from tdxvm.attest.result import Reason, VerificationResult
from tdxvm.attest.verify import QuoteVerifier


@dataclass(frozen=True, slots=True)
class Verdict:
    result: VerificationResult
    policy: Policy
    reasons: tuple[Reason, ...]

    @property
    def accepted(self) -> bool:
        return self.result.genuine and not self.reasons

    def to_dict(self) -> dict[str, Any]:
        r = self.result
        tcb = r.tcb
        return {
            "verdict": "accept" if self.accepted else "reject",
            "tcb_status": tcb.status if tcb else None,
            "advisory_ids": list(tcb.advisory_ids) if tcb else [],
            "reasons": [x.to_dict() for x in self.reasons],
            "quote_version": r.quote.version,
            "body_type": r.quote.body.body_type,
            "fmspc": r.fmspc,
            "verified_at": r.at.isoformat().replace("+00:00", "Z"),
            "tcb": None
            if tcb is None
            else {
                "platform_status": tcb.platform_status,
                "tdx_module_status": tcb.tdx_module_status,
                "qe_status": tcb.qe_status,
                "tcb_date": tcb.tcb_date.isoformat().replace("+00:00", "Z"),
                "tcb_evaluation_data_number": tcb.tcb_evaluation_data_number,
            },
            "policy_exceptions": self.policy.loosened(),
            "measurements": r.measurements.to_dict(),
        }


def appraise(
    quote: bytes | Quote,
    collateral: Collateral,
    *,
    at: datetime,
    policy: Policy | None = None,
    verifier: QuoteVerifier | None = None,
    trust_anchor: TrustAnchor | None = None,
) -> Verdict:
    """Verify ``quote`` and apply ``policy`` (strict default). Reasons: verification first."""
    if verifier is None:
        verifier = QuoteVerifier(trust_anchor=trust_anchor)
    policy = policy or Policy()
    result = verifier.verify(quote, collateral, at=at)
    return Verdict(result=result, policy=policy, reasons=result.reasons + tuple(evaluate(policy, result)))
