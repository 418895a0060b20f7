"""TDX attestation: parse quotes, verify them against Intel's collateral, apply a policy.

Typical use::

    from tdxvm.attest import QuoteVerifier, Policy, appraise, load_bundle

    verdict = appraise(quote_bytes, load_bundle("bundle.json"), at=now, policy=Policy())
    if not verdict.accepted:
        for reason in verdict.reasons:
            print(reason.code, reason.message)

The layout reads parse → verify → policy: :mod:`~tdxvm.attest.quote` (bytes to
structures, no I/O), :mod:`~tdxvm.attest.verify` (signatures, chains, collateral, TCB),
:mod:`~tdxvm.attest.policy` (what a verified TD must look like),
:mod:`~tdxvm.attest.verdict` (both together, and the JSON contract).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Names resolve on first use, so that importing one module of this package (the guest
# image ships tdxvm.attest.binding alone) does not import the verifier, pydantic and all.
_EXPORTS = {
    "TrustAnchor": "chain",
    "Collateral": "collateral",
    "load_bundle": "collateral",
    "save_bundle": "collateral",
    "AttestError": "errors",
    "CertificateError": "errors",
    "CollateralError": "errors",
    "CollateralFetchError": "errors",
    "EventLogError": "errors",
    "PolicyFileError": "errors",
    "QuoteFormatError": "errors",
    "Policy": "policy",
    "evaluate": "policy",
    "load_policy": "policy",
    "parse_policy": "policy",
    "Quote": "quote",
    "TdReport": "quote",
    "parse_quote": "quote",
    "Measurements": "result",
    "Reason": "result",
    "TcbEvaluation": "result",
    "VerificationResult": "result",
    "Verdict": "verdict",
    "appraise": "verdict",
    "QuoteVerifier": "verify",
    "verify_quote": "verify",
}

if TYPE_CHECKING:
    from tdxvm.attest.chain import TrustAnchor
    from tdxvm.attest.collateral import Collateral, load_bundle, save_bundle
    from tdxvm.attest.errors import (
        AttestError,
        CertificateError,
        CollateralError,
        CollateralFetchError,
        EventLogError,
        PolicyFileError,
        QuoteFormatError,
    )
    from tdxvm.attest.policy import Policy, evaluate, load_policy, parse_policy
    from tdxvm.attest.quote import Quote, TdReport, parse_quote
    from tdxvm.attest.result import Measurements, Reason, TcbEvaluation, VerificationResult
    from tdxvm.attest.verdict import Verdict, appraise
    from tdxvm.attest.verify import QuoteVerifier, verify_quote


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tdxvm.attest' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"tdxvm.attest.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "AttestError",
    "CertificateError",
    "Collateral",
    "CollateralError",
    "CollateralFetchError",
    "EventLogError",
    "Measurements",
    "Policy",
    "PolicyFileError",
    "Quote",
    "QuoteFormatError",
    "QuoteVerifier",
    "Reason",
    "TcbEvaluation",
    "TdReport",
    "TrustAnchor",
    "Verdict",
    "VerificationResult",
    "appraise",
    "evaluate",
    "load_bundle",
    "load_policy",
    "parse_policy",
    "parse_quote",
    "save_bundle",
    "verify_quote",
]
