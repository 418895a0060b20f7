"""Attestation policy: which genuine TDs the controller trusts.

Strict by default: TCB status UpToDate only, no DEBUG and no MIGRATABLE TD,
SEPT_VE_DISABLE set, MRSERVICETD zero where the quote has the field (a v4 quote's TD
report 1.0 has none: TDX 1.0 has no service TDs). Measurement keys are optional here;
the launch path fills them from the image manifest and refuses a policy without them.
Every value is lowercase or uppercase hex; a measurement key may also be a list of
allowed values. Unknown keys are errors that name the YAML line, and so is an all-zero
RTMR1 or RTMR2 (nothing measured there) unless ``allow_zero_rtmrs: true``.

TD attribute values (``td_attributes``, ``td_attributes_mask``) are the quote's 8 bytes
as they appear in it (the little-endian u64 of TDINFO_STRUCT.ATTRIBUTES); a mask
compares only its set bits. Bit names: :data:`tdxvm.attest.quote.TD_ATTR_NAMES`.

:func:`evaluate` checks every rule and returns every mismatch, not only the first.
:meth:`Policy.loosened` lists what the policy leaves open, every unpinned measurement
register included; every verdict and ``tdxvm status`` show those lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationInfo, field_validator

from tdxvm.attest.errors import PolicyFileError
from tdxvm.attest.freshness import CollateralAge, EvaluationDataNumber, freshness_reasons
from tdxvm.attest.quote import Quote, td_attribute_names
from tdxvm.attest.result import Reason, VerificationResult
from tdxvm.attest.tcb import EVALUATED_TCB_STATUSES


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
Hex8 = Annotated[str, BeforeValidator(_hex_of(8))]
Hex16 = Annotated[str, BeforeValidator(_hex_of(16))]
Hex64 = Annotated[str, BeforeValidator(_hex_of(64))]


def _statuses(value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"expected a non-empty list of TCB statuses ({', '.join(EVALUATED_TCB_STATUSES)})")
    for v in value:
        if v not in EVALUATED_TCB_STATUSES:
            raise ValueError(f"{v!r} is not a TCB status ({', '.join(EVALUATED_TCB_STATUSES)})")
    return tuple(value)


ZERO48 = "00" * 48
ALL_ONES8 = "ff" * 8
_ALL_BITS = (1 << 64) - 1
_ZERO_RTMR = {
    "rtmr1": "an all-zero RTMR1 means the firmware measured no kernel, so any kernel would pass",
    "rtmr2": "an all-zero RTMR2 means the kernel's EFI stub measured no command line and no initrd (Linux < 6.9), "
             "so the host may swap them",
}  # fmt: skip
# What a measurement register left unpinned lets the host (or anyone) change unseen.
_UNPINNED = (
    ("mrtd", "any firmware (TDVF) is accepted, and the firmware measures everything after it"),
    ("rtmr0", "the host chooses the TD's ACPI tables, TD HOB and firmware variables (AML runs in the guest kernel)"),
    ("rtmr1", "any kernel is accepted"),
    ("rtmr2", "any kernel command line and initrd are accepted, so the host may swap the initramfs and the command line"),
    ("rtmr3", "run-time measurements (the served model) are not checked"),
)


class Policy(BaseModel):
    """An attestation policy. Construct with keywords or load from YAML."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    accepted_tcb_statuses: Annotated[tuple[str, ...], BeforeValidator(_statuses)] = ("UpToDate",)
    rejected_advisory_ids: tuple[str, ...] = ()
    allow_debug: bool = False
    allow_migratable: bool = False
    require_sept_ve_disable: bool = True
    allow_zero_rtmrs: bool = False
    mrtd: Hex48s | None = None
    rtmr0: Hex48s | None = None
    rtmr1: Hex48s | None = None
    rtmr2: Hex48s | None = None
    rtmr3: Hex48s | None = None
    mr_config_id: Hex48s | None = None
    mr_owner: Hex48s | None = None
    mr_owner_config: Hex48s | None = None
    mr_service_td: Hex48s | None = None  # None: zero where the quote has the field; given: the quote must have it
    allowed_mr_seam: Hex48s | None = None
    xfam: Hex8s | None = None
    td_attributes: Hex8s | None = None
    td_attributes_mask: Hex8 | None = None  # applies to td_attributes (a launch pins those); None: all ones
    min_tee_tcb_svn: Hex16 | None = None
    report_data: Hex64 | None = None
    min_tcb_evaluation_data_number: EvaluationDataNumber | None = None  # see tdxvm.attest.freshness
    max_collateral_age: CollateralAge | None = None  # "7d", "36h": TCB info and QE identity issued at most this long ago

    @field_validator("rtmr1", "rtmr2")
    @classmethod
    def _not_zero(cls, value: tuple[str, ...] | None, info: ValidationInfo) -> tuple[str, ...] | None:
        if value is not None and ZERO48 in value and not info.data.get("allow_zero_rtmrs"):
            raise ValueError(f"{_ZERO_RTMR[info.field_name or '']}; pin the measured value, or set allow_zero_rtmrs: "
                             "true to accept that")  # fmt: skip
        return value

    def loosened(self) -> list[str]:
        """Human lines for every rule looser than the strict default and every measurement
        register left unpinned: the verdict's ``policy_exceptions``, shown by status."""
        out = []
        if set(self.accepted_tcb_statuses) != {"UpToDate"}:
            out.append(f"accepted_tcb_statuses: {list(self.accepted_tcb_statuses)}")
        if self.allow_debug:
            out.append("allow_debug: true (the host can read this TD's memory)")
        if self.allow_migratable:
            out.append("allow_migratable: true (a migration TD may move this TD's state to another platform)")
        if not self.require_sept_ve_disable:
            out.append("require_sept_ve_disable: false")
        if self.allow_zero_rtmrs:
            out.append("allow_zero_rtmrs: true (an all-zero RTMR1/RTMR2 leaves the kernel, command line or initrd unmeasured)")
        if self.mr_service_td is not None and set(self.mr_service_td) != {ZERO48}:
            out.append("mr_service_td: non-zero service TD allowed")
        if self.td_attributes is not None and self.td_attributes_mask not in (None, ALL_ONES8):
            ignored = ~_attributes(self.td_attributes_mask) & _ALL_BITS
            names = "all of them" if ignored == _ALL_BITS else ", ".join(td_attribute_names(ignored))
            out.append(f"td_attributes_mask: TD attributes not compared: {names}")
        return out + self.unpinned()

    def unpinned(self) -> list[str]:
        """One line per measurement register (MRTD, RTMR0..3) the policy expects no value for."""
        return [f"{key} not pinned: {what}" for key, what in _UNPINNED if getattr(self, key) is None]


def load_policy(path: str | Path) -> Policy:
    from tdxvm.yamlfile import SpecError, load_yaml  # PyYAML only for commands that read a policy file

    try:
        return load_yaml(path, Policy)
    except SpecError as exc:
        raise PolicyFileError(f"attestation policy is not valid:\n{exc}") from None


def parse_policy(text: str, *, source: str = "<policy>") -> Policy:
    from tdxvm.yamlfile import SpecError, parse_yaml

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
)


def _expected(allowed: tuple[str, ...]) -> str:
    return allowed[0] if len(allowed) == 1 else "one of " + ", ".join(allowed)


def _attributes(text: str | None) -> int:
    return int.from_bytes(bytes.fromhex(text), "little") if text is not None else _ALL_BITS


def _attribute_diff(quoted: int, expected: int, mask: int) -> str:
    differ = (quoted ^ expected) & mask
    set_ = td_attribute_names(differ & quoted)
    clear = td_attribute_names(differ & ~quoted)
    return "; ".join(([f"set but not expected: {', '.join(set_)}"] if set_ else [])
                     + ([f"expected but not set: {', '.join(clear)}"] if clear else []))  # fmt: skip


def _td_attributes(policy: Policy, q: Quote) -> Reason | None:
    if policy.td_attributes is None:
        return None
    quoted, mask = q.body.td_attributes_u64, _attributes(policy.td_attributes_mask)
    if any(quoted & mask == _attributes(v) & mask for v in policy.td_attributes):
        return None
    names = ", ".join(td_attribute_names(quoted)) or "none set"
    under = "" if policy.td_attributes_mask in (None, ALL_ONES8) else f" under mask {policy.td_attributes_mask}"
    diffs = [_attribute_diff(quoted, _attributes(v), mask) for v in policy.td_attributes]
    how = diffs[0] if len(diffs) == 1 else "; ".join(f"against {v}: {d}" for v, d in zip(policy.td_attributes, diffs, strict=True))
    return Reason("td-attributes", f"quote field TD_ATTRIBUTES is {q.body.td_attributes.hex()} ({names}), expected "
                                   f"{_expected(policy.td_attributes)}{under}: {how}")  # fmt: skip


def _service_td(policy: Policy, q: Quote) -> Reason | None:
    quoted = q.body.mr_service_td
    if policy.mr_service_td is None:
        if quoted is not None and any(quoted):
            return Reason("measurement-mismatch", f"quote field MR_SERVICETD is {quoted.hex()}, expected {ZERO48} (no service TD)")
        return None
    if quoted is None:
        return Reason("measurement-mismatch", f"the v{q.version} quote has no MR_SERVICETD field (its TD report 1.0 body "
                                              "predates service TDs), and the policy pins mr_service_td")  # fmt: skip
    if quoted.hex() not in policy.mr_service_td:
        return Reason("measurement-mismatch", f"quote field MR_SERVICETD is {quoted.hex()}, expected {_expected(policy.mr_service_td)}")
    return None


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
    out += freshness_reasons(policy.min_tcb_evaluation_data_number, policy.max_collateral_age, result)
    if q.body.debug and not policy.allow_debug:
        out.append(Reason("debug-td", "the TD has the DEBUG attribute: its memory and state are readable by the host"))
    if q.body.migratable and not policy.allow_migratable:
        out.append(Reason("migratable-td", "the TD has the MIGRATABLE attribute: a migration TD may move its state to "
                                           "another platform, which this quote does not attest"))  # fmt: skip
    if policy.require_sept_ve_disable and not q.body.sept_ve_disable:
        out.append(Reason("sept-ve-disable", "the TD does not have SEPT_VE_DISABLE set"))
    service_td = _service_td(policy, q)
    if service_td is not None:
        out.append(service_td)
    for key, label, get in _MEASUREMENTS:
        allowed = getattr(policy, key)
        if allowed is not None and get(q).hex() not in allowed:
            out.append(Reason("measurement-mismatch", f"quote field {label} is {get(q).hex()}, expected {_expected(allowed)}"))
    attributes = _td_attributes(policy, q)
    if attributes is not None:
        out.append(attributes)
    if policy.min_tee_tcb_svn is not None:
        minimum = bytes.fromhex(policy.min_tee_tcb_svn)
        low = [i for i in range(16) if q.body.tee_tcb_svn[i] < minimum[i]]
        if low:
            out.append(Reason("tee-tcb-svn", f"quote field TEE_TCB_SVN is {q.body.tee_tcb_svn.hex()}, below the minimum {minimum.hex()} at byte(s) {low}"))
    if policy.report_data is not None and q.body.report_data.hex() != policy.report_data:
        out.append(Reason("report-data", f"quote field REPORT_DATA is {q.body.report_data.hex()}, expected {policy.report_data}"))
    return out
