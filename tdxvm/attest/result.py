"""What verification found: reasons for refusal, TCB status, the quote's measurements."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from tdxvm.attest.quote import Quote


@dataclass(frozen=True, slots=True)
class Reason:
    """One reason a quote is refused. ``code`` is stable; ``message`` is for people."""

    code: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


@dataclass(frozen=True, slots=True)
class Measurements:
    """The TD's measurement registers and identity fields, as lowercase hex."""

    mrtd: str
    rtmr0: str
    rtmr1: str
    rtmr2: str
    rtmr3: str
    mr_config_id: str
    mr_owner: str
    mr_owner_config: str
    mr_seam: str
    mr_signer_seam: str
    mr_service_td: str | None
    td_attributes: str
    xfam: str
    tee_tcb_svn: str
    report_data: str

    @classmethod
    def from_quote(cls, quote: Quote) -> Measurements:
        b = quote.body
        return cls(
            mrtd=b.mr_td.hex(),
            rtmr0=b.rtmrs[0].hex(),
            rtmr1=b.rtmrs[1].hex(),
            rtmr2=b.rtmrs[2].hex(),
            rtmr3=b.rtmrs[3].hex(),
            mr_config_id=b.mr_config_id.hex(),
            mr_owner=b.mr_owner.hex(),
            mr_owner_config=b.mr_owner_config.hex(),
            mr_seam=b.mr_seam.hex(),
            mr_signer_seam=b.mr_signer_seam.hex(),
            mr_service_td=b.mr_service_td.hex() if b.mr_service_td is not None else None,
            td_attributes=b.td_attributes.hex(),
            xfam=b.xfam.hex(),
            tee_tcb_svn=b.tee_tcb_svn.hex(),
            report_data=b.report_data.hex(),
        )

    def to_dict(self) -> dict[str, str | None]:
        return {k: getattr(self, k) for k in self.__slots__}  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class TcbEvaluation:
    """The TCB statuses found while matching the quote against TCB info and QE identity."""

    status: str
    advisory_ids: tuple[str, ...]
    platform_status: str
    tdx_module_status: str | None
    qe_status: str
    tcb_date: datetime
    tcb_evaluation_data_number: int


@dataclass(frozen=True, slots=True)
class VerificationResult:
    """Outcome of checking a quote against collateral at a given time.

    ``reasons`` lists every verification failure; an empty list means the quote is
    genuine and its TCB was evaluated (``tcb`` is set). Whether the TCB status and the
    measurements are acceptable is the policy's decision (:mod:`tdxvm.attest.policy`).
    """

    quote: Quote
    at: datetime
    fmspc: str | None
    tcb: TcbEvaluation | None
    reasons: tuple[Reason, ...] = field(default=())

    @property
    def genuine(self) -> bool:
        return not self.reasons and self.tcb is not None

    @property
    def measurements(self) -> Measurements:
        return Measurements.from_quote(self.quote)
