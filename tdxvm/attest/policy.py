"""Attestation policy: which genuine TDs the controller trusts.

Strict by default: TCB status UpToDate only, no DEBUG TD, SEPT_VE_DISABLE set,
MRSERVICETD zero. Measurement keys are optional here; the launch path fills them from
the image manifest and refuses a policy without them. Every value is lowercase or
uppercase hex; a measurement key may also be a list of allowed values. Unknown keys
are errors that name the YAML line.

:func:`evaluate` checks every rule and returns every mismatch, not only the first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from tdxvm.attest.errors import PolicyFileError
from tdxvm.attest.quote import Quote
from tdxvm.attest.result import Reason, VerificationResult
from tdxvm.attest.tcbinfo import TCB_STATUSES
from tdxvm.yamlfile import SpecError, load_yaml, parse_yaml


def _hex_of(size: int):
    def check(value: Any) -> str:
        if isinstance(value, bytes):
            value = value.hex()
        if not isinstance(value, str):
            raise ValueError(f"expected a hex string of {size} bytes")
        text = value.strip().lower()
        if text.startswith("0x"):
            text = text[2:]
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raise ValueError(f"{value!r} is not hex") from None
        if len(raw) != size:
            raise ValueError(f"expected {size} bytes ({2 * size} hex digits), got {len(raw)}")
        return text

    return check


def _one_or_many(size: int):
    one = _hex_of(size)

    def check(value: Any) -> tuple[str, ...]:
        if isinstance(value, (list, tuple)):
            if not value:
                raise ValueError("an empty list allows nothing; remove the key to allow any value")
            return tuple(one(v) for v in value)
        return (one(value),)

    return check


Hex48s = Annotated[tuple[str, ...], BeforeValidator(_one_or_many(48))]
Hex8s = Annotated[tuple[str, ...], BeforeValidator(_one_or_many(8))]
Hex16 = Annotated[str, BeforeValidator(_hex_of(16))]
Hex64 = Annotated[str, BeforeValidator(_hex_of(64))]


def _statuses(value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"expected a non-empty list of TCB statuses ({', '.join(TCB_STATUSES)})")
    for v in value:
        if v not in TCB_STATUSES:
            raise ValueError(f"{v!r} is not a TCB status ({', '.join(TCB_STATUSES)})")
    return tuple(value)


class Policy(BaseModel):
    """An attestation policy. Construct with keywords or load from YAML."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    accepted_tcb_statuses: Annotated[tuple[str, ...], BeforeValidator(_statuses)] = ("UpToDate",)
    rejected_advisory_ids: tuple[str, ...] = ()
    allow_debug: bool = False
    require_sept_ve_disable: bool = True
    mrtd: Hex48s | None = None
    rtmr0: Hex48s | None = None
    rtmr1: Hex48s | None = None
    rtmr2: Hex48s | None = None
    rtmr3: Hex48s | None = None
    mr_config_id: Hex48s | None = None
    mr_owner: Hex48s | None = None
    mr_owner_config: Hex48s | None = None
    mr_service_td: Hex48s = Field(default=("00" * 48,))
    allowed_mr_seam: Hex48s | None = None
    xfam: Hex8s | None = None
    td_attributes: Hex8s | None = None
    min_tee_tcb_svn: Hex16 | None = None
    report_data: Hex64 | None = None

    def loosened(self) -> list[str]:
        """Human lines for every rule looser than the strict default (shown by status)."""
        out = []
        if set(self.accepted_tcb_statuses) != {"UpToDate"}:
            out.append(f"accepted_tcb_statuses: {list(self.accepted_tcb_statuses)}")
        if self.allow_debug:
            out.append("allow_debug: true (the host can read this TD's memory)")
        if not self.require_sept_ve_disable:
            out.append("require_sept_ve_disable: false")
        if self.mr_service_td != ("00" * 48,):
            out.append("mr_service_td: non-zero service TD allowed")
        return out


def load_policy(path: str | Path) -> Policy:
    try:
        return load_yaml(path, Policy)
    except SpecError as exc:
        raise PolicyFileError(f"attestation policy is not valid:\n{exc}") from None


def parse_policy(text: str, *, source: str = "<policy>") -> Policy:
    try:
        return parse_yaml(text, Policy, source=source)
    except SpecError as exc:
        raise PolicyFileError(f"attestation policy is not valid:\n{exc}") from None


_MEASUREMENTS = (
    ("mrtd", "MR_TD", lambda q: q.body.mr_td),
    ("rtmr0", "RTMR0", lambda q: q.body.rtmrs[0]),
    ("rtmr1", "RTMR1", lambda q: q.body.rtmrs[1]),
    ("rtmr2", "RTMR2", lambda q: q.body.rtmrs[2]),
    ("rtmr3", "RTMR3", lambda q: q.body.rtmrs[3]),
    ("mr_config_id", "MR_CONFIG_ID", lambda q: q.body.mr_config_id),
    ("mr_owner", "MR_OWNER", lambda q: q.body.mr_owner),
    ("mr_owner_config", "MR_OWNER_CONFIG", lambda q: q.body.mr_owner_config),
    ("allowed_mr_seam", "MR_SEAM", lambda q: q.body.mr_seam),
    ("xfam", "XFAM", lambda q: q.body.xfam),
    ("td_attributes", "TD_ATTRIBUTES", lambda q: q.body.td_attributes),
)


def _expected(allowed: tuple[str, ...]) -> str:
    return allowed[0] if len(allowed) == 1 else "one of " + ", ".join(allowed)


def evaluate(policy: Policy, result: VerificationResult) -> list[Reason]:
    """Every way in which a verified quote breaks ``policy`` (empty: accepted)."""
    out: list[Reason] = []
    q: Quote = result.quote
    tcb = result.tcb
    if tcb is not None:
        if tcb.status not in policy.accepted_tcb_statuses:
            out.append(Reason("tcb-status", f"TCB status is {tcb.status}; the policy accepts {', '.join(policy.accepted_tcb_statuses)}"))
        bad = [a for a in tcb.advisory_ids if a in policy.rejected_advisory_ids]
        if bad:
            out.append(Reason("advisory", f"advisories rejected by the policy apply: {', '.join(bad)}"))
    if q.body.debug and not policy.allow_debug:
        out.append(Reason("debug-td", "the TD has the DEBUG attribute: its memory and state are readable by the host"))
    if policy.require_sept_ve_disable and not q.body.sept_ve_disable:
        out.append(Reason("sept-ve-disable", "the TD does not have SEPT_VE_DISABLE set"))
    service_td = q.body.mr_service_td or bytes(48)
    if service_td.hex() not in policy.mr_service_td:
        out.append(Reason("measurement-mismatch", f"quote field MR_SERVICETD is {service_td.hex()}, expected {_expected(policy.mr_service_td)}"))
    for key, label, get in _MEASUREMENTS:
        allowed = getattr(policy, key)
        if allowed is not None and get(q).hex() not in allowed:
            out.append(Reason("measurement-mismatch", f"quote field {label} is {get(q).hex()}, expected {_expected(allowed)}"))
    if policy.min_tee_tcb_svn is not None:
        minimum = bytes.fromhex(policy.min_tee_tcb_svn)
        low = [i for i in range(16) if q.body.tee_tcb_svn[i] < minimum[i]]
        if low:
            out.append(Reason("tee-tcb-svn", f"quote field TEE_TCB_SVN is {q.body.tee_tcb_svn.hex()}, below the minimum {minimum.hex()} at byte(s) {low}"))
    if policy.report_data is not None and q.body.report_data.hex() != policy.report_data:
        out.append(Reason("report-data", f"quote field REPORT_DATA is {q.body.report_data.hex()}, expected {policy.report_data}"))
    return out
