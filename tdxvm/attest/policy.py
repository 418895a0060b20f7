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
register included; every verdict and ``tdxvm status`` show those lines. Both live in
:mod:`tdxvm.attest.policyrules`, which needs no pydantic (nor does the strict default
policy there, :class:`~tdxvm.attest.policyrules.StrictPolicy`).
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, PlainSerializer, ValidationInfo, field_validator

from tdxvm.attest.duration import format_duration
from tdxvm.attest.errors import PolicyFileError
from tdxvm.attest.freshness import collateral_age, evaluation_data_number
from tdxvm.attest.policyrules import ALL_ONES8, ZERO48, evaluate
from tdxvm.attest.policyrules import loosened as _loosened
from tdxvm.attest.policyrules import unpinned as _unpinned
from tdxvm.attest.tcb import EVALUATED_TCB_STATUSES

__all__ = ["ALL_ONES8", "ZERO48", "Policy", "evaluate", "load_policy", "parse_policy"]


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
EvaluationDataNumber = Annotated[int, BeforeValidator(evaluation_data_number)]
CollateralAge = Annotated[timedelta, BeforeValidator(collateral_age), PlainSerializer(format_duration, return_type=str)]


def _statuses(value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"expected a non-empty list of TCB statuses ({', '.join(EVALUATED_TCB_STATUSES)})")
    for v in value:
        if v == "Revoked":
            raise ValueError("'Revoked' cannot be accepted: a revoked TCB is always refused (tcb-revoked)")
        if v not in EVALUATED_TCB_STATUSES:
            raise ValueError(
                f"{v!r} is not a TCB status ({', '.join(s for s in EVALUATED_TCB_STATUSES if s != 'Revoked')})"
            )
    return tuple(value)


_ADVISORY = re.compile(r"INTEL-SA-\d{5}")


def _advisory_ids(value: Any) -> tuple[str, ...]:
    """Intel advisory IDs (``INTEL-SA-00615``), written in any case; a typo would never match."""
    if not isinstance(value, (list, tuple)):
        raise ValueError("expected a list of Intel advisory IDs like INTEL-SA-00615")
    out = []
    for v in value:
        text = v.strip().upper() if isinstance(v, str) else ""
        if not _ADVISORY.fullmatch(text):
            raise ValueError(f"{v!r} is not an Intel advisory ID (INTEL-SA- and five digits, e.g. INTEL-SA-00615)")
        out.append(text)
    return tuple(out)


AdvisoryIds = Annotated[tuple[str, ...], BeforeValidator(_advisory_ids)]

_ZERO_RTMR = {
    "rtmr1": "an all-zero RTMR1 means the firmware measured no kernel, so any kernel would pass",
    "rtmr2": "an all-zero RTMR2 means the kernel's EFI stub measured no command line and no initrd (Linux < 6.9), "
    "so the host may swap them",
}


class Policy(BaseModel):
    """An attestation policy. Construct with keywords or load from YAML."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    accepted_tcb_statuses: Annotated[tuple[str, ...], BeforeValidator(_statuses)] = ("UpToDate",)
    rejected_advisory_ids: AdvisoryIds = ()
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
    max_collateral_age: CollateralAge | None = (
        None  # "7d", "36h": TCB info and QE identity issued at most this long ago
    )

    @field_validator("rtmr1", "rtmr2")
    @classmethod
    def _not_zero(cls, value: tuple[str, ...] | None, info: ValidationInfo) -> tuple[str, ...] | None:
        if value is not None and ZERO48 in value and not info.data.get("allow_zero_rtmrs"):
            raise ValueError(
                f"{_ZERO_RTMR[info.field_name or '']}; pin the measured value, or set allow_zero_rtmrs: "
                "true to accept that"
            )
        return value

    def loosened(self) -> list[str]:
        """Human lines for every rule looser than the strict default and every measurement
        register left unpinned: the verdict's ``policy_exceptions``, shown by status."""
        return _loosened(self)

    def unpinned(self) -> list[str]:
        """One line per measurement register (MRTD, RTMR0..3) the policy expects no value for."""
        return _unpinned(self)


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
