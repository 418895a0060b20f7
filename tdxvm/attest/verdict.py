"""Verification plus policy: the accept/reject decision and its JSON form.

The JSON object is a stable contract (``tdxvm verify-quote -o json``): ``verdict``,
``tcb_status``, ``advisory_ids``, ``reasons`` (``code``/``message``), ``quote_version``
and ``measurements`` always appear. ``policy_exceptions`` lists, one line each, every
rule of the policy looser than the strict default and every measurement register it
leaves unpinned (:func:`tdxvm.attest.policyrules.loosened`, which status shows too),
and, first, collateral that came from the cache because the service could not be
reached (:meth:`tdxvm.attest.collateral.CollateralOrigin.exception`). ``collateral``
says where the collateral came from (``source``), its TCB evaluation data number and
issue date (the lower number and the older date of TCB info and QE identity; null
when neither verified), its next update, and each of the two items.

A quote that cannot be read at all (:class:`~tdxvm.attest.errors.QuoteFormatError`) is
refused, not an error: :class:`QuoteRefusal` gives the same keys, ``verdict``
``reject`` and one reason ``quote-format`` that also carries ``field`` and ``offset``;
what needs the quote (``quote_version``, ``body_type``, ``measurements``…) is null.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from tdxvm.attest.chain import TrustAnchor
from tdxvm.attest.collateral import Collateral, CollateralOrigin, resolve_collateral
from tdxvm.attest.errors import PckChainError, QuoteFormatError
from tdxvm.attest.policyrules import StrictPolicy, evaluate
from tdxvm.attest.quote import Quote, parse_quote
from tdxvm.attest.result import CollateralFacts, CrlDates, IssuedItem, Reason, VerificationResult
from tdxvm.attest.verify import QuoteVerifier, utc_time

if TYPE_CHECKING:
    from tdxvm.attest.policy import Policy  # a policy file's; StrictPolicy: the default, without pydantic


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _item(item: IssuedItem | None) -> dict[str, Any] | None:
    if item is None:
        return None
    return {
        "issue_date": _iso(item.issue_date),
        "next_update": _iso(item.next_update),
        "tcb_evaluation_data_number": item.tcb_evaluation_data_number,
    }


def collateral_dict(facts: CollateralFacts | None, origin: CollateralOrigin | None) -> dict[str, Any]:
    """The verdict's ``collateral`` object (every key always present)."""
    return {
        "source": origin.describe() if origin else None,
        "tcb_evaluation_data_number": facts.tcb_evaluation_data_number if facts else None,
        "issue_date": _iso(facts.issue_date) if facts else None,
        "next_update": _iso(facts.next_update) if facts else None,
        "tcb_info": _item(facts.tcb_info) if facts else None,
        "qe_identity": _item(facts.qe_identity) if facts else None,
        "pck_crl": _crl(facts.pck_crl) if facts else None,
    }


def _crl(dates: CrlDates | None) -> dict[str, Any] | None:
    if dates is None:
        return None
    return {
        "this_update": _iso(dates.this_update),
        "next_update": _iso(dates.next_update) if dates.next_update else None,
    }


@dataclass(frozen=True, slots=True)
class Verdict:
    result: VerificationResult
    policy: Policy | StrictPolicy
    reasons: tuple[Reason, ...]
    origin: CollateralOrigin | None = None

    def exceptions(self) -> list[str]:
        """``policy_exceptions``: stale-collateral risk first, then the policy's own."""
        stale = self.origin.exception() if self.origin else None
        return ([stale] if stale else []) + self.policy.loosened()

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
                "launch_status": tcb.launch_status,
                "current_status": tcb.current_status,
            },
            "collateral": collateral_dict(r.collateral, self.origin),
            "policy_exceptions": self.exceptions(),
            "measurements": r.measurements.to_dict(),
        }


@dataclass(frozen=True, slots=True)
class QuoteRefusal:
    """The answer for bytes that are not a TDX quote tdxvm reads: refused, never verified."""

    error: QuoteFormatError
    policy: Policy | StrictPolicy
    at: datetime

    accepted = False

    @property
    def reasons(self) -> tuple[Reason, ...]:
        return (Reason(self.error.code, self.error.message),)

    def to_dict(self) -> dict[str, Any]:
        e = self.error
        return {
            "verdict": "reject",
            "tcb_status": None,
            "advisory_ids": [],
            "reasons": [{"code": e.code, "message": e.message, "field": e.field, "offset": e.offset}],
            "quote_version": None,
            "body_type": None,
            "fmspc": None,
            "verified_at": self.at.astimezone(timezone.utc).isoformat().replace("+00:00", "Z"),
            "tcb": None,
            "collateral": collateral_dict(None, None),
            "policy_exceptions": self.policy.loosened(),
            "measurements": None,
        }


CollateralFor = Callable[[Quote], Collateral | tuple[Collateral, CollateralOrigin]]


def appraise(
    quote: bytes | Quote,
    collateral: Collateral | CollateralFor,
    *,
    at: datetime,
    policy: Policy | StrictPolicy | None = None,
    verifier: QuoteVerifier | None = None,
    trust_anchor: TrustAnchor | None = None,
    origin: CollateralOrigin | None = None,
) -> Verdict:
    """Verify ``quote`` and apply ``policy`` (strict default). Reasons: verification first.

    ``collateral`` is the collateral, or a function of the parsed quote that finds it
    (returning it, or it and its origin, as :func:`tdxvm.attest.pcs.get_collateral`).
    A quote whose own PCK chain cannot be read has no collateral to find (its FMSPC is
    in that chain): it is refused with ``pck-chain``, as the verifier refuses it with
    collateral in hand. ``origin`` (where ``collateral`` came from; the function's
    own, when it gives one) is reported in the verdict; collateral from the cache is
    listed among its policy exceptions.
    """
    if verifier is None:
        verifier = QuoteVerifier(trust_anchor=trust_anchor)
    if policy is None:
        from tdxvm.attest.policy import Policy  # pydantic: only for callers that give no policy at all

        policy = Policy()
    if callable(collateral):
        quote = quote if isinstance(quote, Quote) else parse_quote(quote)
        try:
            collateral, found_at = resolve_collateral(collateral, quote)
        except PckChainError as exc:
            reason = Reason(exc.code, str(exc))
            result = VerificationResult(quote=quote, at=utc_time(at), fmspc=None, tcb=None, reasons=(reason,))
            return Verdict(result=result, policy=policy, reasons=result.reasons + tuple(evaluate(policy, result)))
        origin = found_at or origin
    result = verifier.verify(quote, collateral, at=at)
    return Verdict(
        result=result, policy=policy, reasons=result.reasons + tuple(evaluate(policy, result)), origin=origin
    )
