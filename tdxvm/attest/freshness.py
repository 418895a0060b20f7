"""How fresh the collateral must be: the policy keys ``min_tcb_evaluation_data_number``
and ``max_collateral_age``.

A network attacker who blocks the PCS or PCCS can hold a verifier on cached collateral
until its ``nextUpdate``, about 30 days, across an Intel TCB recovery: a platform that
the recovery marks OutOfDate still passes as UpToDate. Two rules close that window:

- ``min_tcb_evaluation_data_number``: the TCB info's and the QE identity's
  ``tcbEvaluationDataNumber`` (Intel raises it at every TCB recovery) must be at least
  this;
- ``max_collateral_age`` (``7d``, ``36h``, …; :mod:`tdxvm.attest.duration`): each of the
  two must have been issued (``issueDate``) at most this long before the verification
  time, and so must the PCK CRL (``thisUpdate``): Intel issues all three daily, and an
  old PCK CRL from a fresh-looking set would hide a revocation since. The root CA's CRL,
  issued yearly, is not held to it.

Both read the verified items (:class:`~tdxvm.attest.result.CollateralFacts`); a rule
that has nothing verified to read refuses.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from tdxvm.attest.duration import format_duration, parse_duration
from tdxvm.attest.result import IssuedItem, Reason, VerificationResult


def evaluation_data_number(value: Any) -> int:
    """The policy value of ``min_tcb_evaluation_data_number`` (``ValueError`` if unusable)."""
    text = value if isinstance(value, str) else None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif text is not None and text.strip().isdigit():
        number = int(text.strip())
    else:
        raise ValueError("expected a whole number: Intel's tcbEvaluationDataNumber, e.g. 17")
    if number < 0:
        raise ValueError("a TCB evaluation data number is not negative")
    return number


def collateral_age(value: Any) -> timedelta:
    """The policy value of ``max_collateral_age`` (``ValueError`` if unusable)."""
    if isinstance(value, timedelta):
        if value <= timedelta(0):
            raise ValueError("a duration must be longer than zero")
        return value
    if not isinstance(value, str):
        raise ValueError("expected a duration such as 7d, 36h or 1d12h")
    return parse_duration(value)


def _iso(when: datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


def freshness_reasons(minimum: int | None, max_age: timedelta | None, result: VerificationResult) -> list[Reason]:
    """Every way the verified collateral is older than the policy allows (empty: fresh)."""
    if minimum is None and max_age is None:
        return []
    facts = result.collateral
    items: list[tuple[str, IssuedItem | None]] = [
        ("TCB info", facts.tcb_info if facts else None),
        ("QE identity", facts.qe_identity if facts else None),
    ]
    out = []
    for what, item in items:
        if item is None:
            out.append(
                Reason(
                    "collateral-freshness-unknown",
                    f"the policy limits how old the collateral may be, but the {what} "
                    "was not verified, so its date and number are unknown",
                )
            )
            continue
        if minimum is not None and item.tcb_evaluation_data_number < minimum:
            out.append(
                Reason(
                    "tcb-evaluation-data-number",
                    f"the {what} has TCB evaluation data number "
                    f"{item.tcb_evaluation_data_number}, below the policy's minimum "
                    f"{minimum}: it predates Intel's TCB recovery {minimum}",
                )
            )
        if max_age is not None and result.at - item.issue_date > max_age:
            age = format_duration(result.at - item.issue_date)
            out.append(
                Reason(
                    "collateral-too-old",
                    f"the {what} was issued at {_iso(item.issue_date)}, {age} before the "
                    f"verification time; the policy accepts collateral at most "
                    f"{format_duration(max_age)} old (max_collateral_age)",
                )
            )
    if max_age is not None:
        crl = facts.pck_crl if facts else None
        if crl is None:
            out.append(
                Reason(
                    "collateral-freshness-unknown",
                    "the policy limits how old the collateral may be, but the PCK CRL was not verified, "
                    "so its date is unknown",
                )
            )
        elif (age := result.at - crl.this_update) > max_age:
            out.append(
                Reason(
                    "collateral-too-old",
                    f"the PCK CRL was issued at {_iso(crl.this_update)}, {format_duration(age)} "
                    f"before the verification time; the policy accepts collateral at most "
                    f"{format_duration(max_age)} old (max_collateral_age): a revocation since would not show",
                )
            )
    return out
