"""A policy's rules applied to a verified quote, without pydantic: :func:`evaluate`,
:func:`loosened` and :func:`unpinned` read any object with the fields of
:class:`~tdxvm.attest.policy.Policy`, and :class:`StrictPolicy` is the strict default
policy as a plain object.

``tdxvm verify-quote`` without ``--policy`` applies :class:`StrictPolicy`, so that it
does not import pydantic (and build the policy model) for a policy it does not read;
:class:`~tdxvm.attest.policy.Policy` loads policy files and delegates to the functions
here, so both give the same reasons and the same lines
(``tests/attest/test_policy.py`` checks that their fields and defaults agree).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from tdxvm.attest.freshness import freshness_reasons
from tdxvm.attest.quote import TD_ATTR_DEBUG, TD_ATTR_TUD_MASK, Quote, td_attribute_names
from tdxvm.attest.result import Reason, VerificationResult

ZERO48 = "00" * 48
ALL_ONES8 = "ff" * 8
_ALL_BITS = (1 << 64) - 1
# What a measurement register left unpinned lets the host (or anyone) change unseen.
_UNPINNED = (
    ("mrtd", "any firmware (TDVF) is accepted, and the firmware measures everything after it"),
    ("rtmr0", "the host chooses the TD's ACPI tables, TD HOB and firmware variables (AML runs in the guest kernel)"),
    ("rtmr1", "any kernel is accepted"),
    (
        "rtmr2",
        "any kernel command line and initrd are accepted, so the host may swap the initramfs and the command line",
    ),
    ("rtmr3", "run-time measurements (the served model) are not checked"),
)


@dataclass(frozen=True, slots=True)
class StrictPolicy:
    """The strict default policy (the values of ``Policy()``), without pydantic."""

    accepted_tcb_statuses: tuple[str, ...] = ("UpToDate",)
    rejected_advisory_ids: tuple[str, ...] = ()
    allow_debug: bool = False
    allow_migratable: bool = False
    require_sept_ve_disable: bool = True
    allow_zero_rtmrs: bool = False
    mrtd: tuple[str, ...] | None = None
    rtmr0: tuple[str, ...] | None = None
    rtmr1: tuple[str, ...] | None = None
    rtmr2: tuple[str, ...] | None = None
    rtmr3: tuple[str, ...] | None = None
    mr_config_id: tuple[str, ...] | None = None
    mr_owner: tuple[str, ...] | None = None
    mr_owner_config: tuple[str, ...] | None = None
    mr_service_td: tuple[str, ...] | None = None
    allowed_mr_seam: tuple[str, ...] | None = None
    xfam: tuple[str, ...] | None = None
    td_attributes: tuple[str, ...] | None = None
    td_attributes_mask: str | None = None
    min_tee_tcb_svn: str | None = None
    report_data: str | None = None
    min_tcb_evaluation_data_number: int | None = None
    max_collateral_age: timedelta | None = None

    def loosened(self) -> list[str]:
        return loosened(self)

    def unpinned(self) -> list[str]:
        return unpinned(self)


def loosened(policy: Any) -> list[str]:
    """Human lines for every rule looser than the strict default and every measurement
    register left unpinned: the verdict's ``policy_exceptions``, shown by status."""
    out = []
    if set(policy.accepted_tcb_statuses) != {"UpToDate"}:
        out.append(f"accepted_tcb_statuses: {list(policy.accepted_tcb_statuses)}")
    if policy.allow_debug:
        out.append("allow_debug: true (the host can read this TD's memory)")
    if policy.allow_migratable:
        out.append("allow_migratable: true (a migration TD may move this TD's state to another platform)")
    if not policy.require_sept_ve_disable:
        out.append("require_sept_ve_disable: false")
    if policy.allow_zero_rtmrs:
        out.append(
            "allow_zero_rtmrs: true (an all-zero RTMR1/RTMR2 leaves the kernel, command line or initrd unmeasured)"
        )
    if policy.mr_service_td is not None and set(policy.mr_service_td) != {ZERO48}:
        out.append("mr_service_td: non-zero service TD allowed")
    if policy.td_attributes is not None and policy.td_attributes_mask not in (None, ALL_ONES8):
        ignored = ~_attributes(policy.td_attributes_mask) & _ALL_BITS
        names = "all of them" if ignored == _ALL_BITS else ", ".join(td_attribute_names(ignored))
        out.append(f"td_attributes_mask: TD attributes not compared: {names}")
    return out + unpinned(policy)


def unpinned(policy: Any) -> list[str]:
    """One line per measurement register (MRTD, RTMR0..3) the policy expects no value for."""
    return [f"{key} not pinned: {what}" for key, what in _UNPINNED if getattr(policy, key) is None]


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
)


def _expected(allowed: tuple[str, ...]) -> str:
    return allowed[0] if len(allowed) == 1 else "one of " + ", ".join(allowed)


def _attributes(text: str | None) -> int:
    return int.from_bytes(bytes.fromhex(text), "little") if text is not None else _ALL_BITS


def _attribute_diff(quoted: int, expected: int, mask: int) -> str:
    differ = (quoted ^ expected) & mask
    set_ = td_attribute_names(differ & quoted)
    clear = td_attribute_names(differ & ~quoted)
    return "; ".join(
        ([f"set but not expected: {', '.join(set_)}"] if set_ else [])
        + ([f"expected but not set: {', '.join(clear)}"] if clear else [])
    )


def _td_attributes(policy: Any, q: Quote) -> Reason | None:
    if policy.td_attributes is None:
        return None
    quoted, mask = q.body.td_attributes_u64, _attributes(policy.td_attributes_mask)
    if any(quoted & mask == _attributes(v) & mask for v in policy.td_attributes):
        return None
    names = ", ".join(td_attribute_names(quoted)) or "none set"
    under = "" if policy.td_attributes_mask in (None, ALL_ONES8) else f" under mask {policy.td_attributes_mask}"
    diffs = [_attribute_diff(quoted, _attributes(v), mask) for v in policy.td_attributes]
    how = (
        diffs[0]
        if len(diffs) == 1
        else "; ".join(f"against {v}: {d}" for v, d in zip(policy.td_attributes, diffs, strict=True))
    )
    return Reason(
        "td-attributes",
        f"quote field TD_ATTRIBUTES is {q.body.td_attributes.hex()} ({names}), expected "
        f"{_expected(policy.td_attributes)}{under}: {how}",
    )


def _service_td(policy: Any, q: Quote) -> Reason | None:
    quoted = q.body.mr_service_td
    if policy.mr_service_td is None:
        if quoted is not None and any(quoted):
            return Reason(
                "measurement-mismatch", f"quote field MR_SERVICETD is {quoted.hex()}, expected {ZERO48} (no service TD)"
            )
        return None
    if quoted is None:
        return Reason(
            "measurement-mismatch",
            f"the v{q.version} quote has no MR_SERVICETD field (its TD report 1.0 body "
            "predates service TDs), and the policy pins mr_service_td",
        )
    if quoted.hex() not in policy.mr_service_td:
        return Reason(
            "measurement-mismatch",
            f"quote field MR_SERVICETD is {quoted.hex()}, expected {_expected(policy.mr_service_td)}",
        )
    return None


def _under_debug(attributes: int) -> list[Reason]:
    """The TD attributes of the TUD group (bits 7:0) that are set: each makes a TD untrusted."""
    if attributes & TD_ATTR_DEBUG:
        return [Reason("debug-td", "the TD has the DEBUG attribute: its memory and state are readable by the host")]
    others = attributes & TD_ATTR_TUD_MASK
    if not others:
        return []
    return [
        Reason(
            "debug-td",
            f"the TD has {', '.join(td_attribute_names(others))} of the TD-under-debug attributes (bits 7:0: "
            "profiling and debug features that expose the TD to the host): TDX treats such a TD as untrusted",
        )
    ]


def evaluate(policy: Any, result: VerificationResult) -> list[Reason]:
    """Every way in which a verified quote breaks ``policy`` (empty: accepted)."""
    out: list[Reason] = []
    q: Quote = result.quote
    tcb = result.tcb
    if tcb is not None:
        if tcb.status not in policy.accepted_tcb_statuses:
            out.append(
                Reason(
                    "tcb-status",
                    f"TCB status is {tcb.status}; the policy accepts {', '.join(policy.accepted_tcb_statuses)}",
                )
            )
        bad = [a for a in tcb.advisory_ids if a.upper() in policy.rejected_advisory_ids]
        if bad:
            out.append(Reason("advisory", f"advisories rejected by the policy apply: {', '.join(bad)}"))
    out += freshness_reasons(policy.min_tcb_evaluation_data_number, policy.max_collateral_age, result)
    if not policy.allow_debug:
        out += _under_debug(q.body.td_attributes_u64)
    if q.body.migratable and not policy.allow_migratable:
        out.append(
            Reason(
                "migratable-td",
                "the TD has the MIGRATABLE attribute: a migration TD may move its state to "
                "another platform, which this quote does not attest",
            )
        )
    if policy.require_sept_ve_disable and not q.body.sept_ve_disable:
        out.append(Reason("sept-ve-disable", "the TD does not have SEPT_VE_DISABLE set"))
    service_td = _service_td(policy, q)
    if service_td is not None:
        out.append(service_td)
    for key, label, get in _MEASUREMENTS:
        allowed = getattr(policy, key)
        if allowed is not None and get(q).hex() not in allowed:
            out.append(
                Reason("measurement-mismatch", f"quote field {label} is {get(q).hex()}, expected {_expected(allowed)}")
            )
    attributes = _td_attributes(policy, q)
    if attributes is not None:
        out.append(attributes)
    if policy.min_tee_tcb_svn is not None:
        minimum = bytes.fromhex(policy.min_tee_tcb_svn)
        low = [i for i in range(16) if q.body.tee_tcb_svn[i] < minimum[i]]
        if low:
            out.append(
                Reason(
                    "tee-tcb-svn",
                    f"quote field TEE_TCB_SVN is {q.body.tee_tcb_svn.hex()}, below the minimum {minimum.hex()} "
                    f"at byte(s) {low}",
                )
            )
    if policy.report_data is not None and q.body.report_data.hex() != policy.report_data:
        out.append(
            Reason(
                "report-data", f"quote field REPORT_DATA is {q.body.report_data.hex()}, expected {policy.report_data}"
            )
        )
    return out
