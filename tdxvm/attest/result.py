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
    """The TCB statuses found while matching the quote against TCB info and QE identity.

    ``platform_status``, ``tdx_module_status``, ``tcb_date`` and ``advisory_ids`` are
    those of the launch-time TCB (TEE_TCB_SVN). ``launch_status`` is its converged
    status; ``current_status`` that of TEE_TCB_SVN2, the TDX module running now (TD
    report 1.5 bodies only, else None). ``status`` combines the two
    (:func:`tdxvm.attest.tcb.check_for_relaunch`).
    """

    status: str
    advisory_ids: tuple[str, ...]
    platform_status: str
    tdx_module_status: str | None
    qe_status: str
    tcb_date: datetime
    tcb_evaluation_data_number: int
    launch_status: str | None = None
    current_status: str | None = None


@dataclass(frozen=True, slots=True)
class IssuedItem:
    """When a verified TCB info or QE identity was issued, its next update, and its TCB
    evaluation data number (Intel raises it at every TCB recovery)."""

    issue_date: datetime
    next_update: datetime
    tcb_evaluation_data_number: int


@dataclass(frozen=True, slots=True)
class CrlDates:
    """When a verified CRL was issued (``thisUpdate``) and its next update."""

    this_update: datetime
    next_update: datetime | None


@dataclass(frozen=True, slots=True)
class CollateralFacts:
    """The dated items of the collateral a quote was verified with (``None``: the item's
    signature did not verify, so nothing in it is reported). ``pck_crl``: the PCK CRL's
    dates, once it verified against the quote's PCK CA."""

    tcb_info: IssuedItem | None
    qe_identity: IssuedItem | None
    pck_crl: CrlDates | None = None

    def _items(self) -> list[IssuedItem]:
        return [i for i in (self.tcb_info, self.qe_identity) if i is not None]

    @property
    def issue_date(self) -> datetime | None:
        """The older issue date of the two: how fresh the collateral is."""
        return min((i.issue_date for i in self._items()), default=None)

    @property
    def next_update(self) -> datetime | None:
        return min((i.next_update for i in self._items()), default=None)

    @property
    def tcb_evaluation_data_number(self) -> int | None:
        """The lower number of the two: the TCB recovery the collateral knows of, at least."""
        return min((i.tcb_evaluation_data_number for i in self._items()), default=None)


@dataclass(frozen=True, slots=True)
class VerificationResult:
    """Outcome of checking a quote against collateral at a given time.

    ``reasons`` lists every verification failure; an empty list means the quote is
    genuine and its TCB was evaluated (``tcb`` is set). ``collateral`` holds the dates and
    TCB evaluation data numbers of the verified TCB info and QE identity. Whether the TCB
    status, the measurements and the collateral's age are acceptable is the policy's
    decision (:mod:`tdxvm.attest.policy`).
    """

    quote: Quote
    at: datetime
    fmspc: str | None
    tcb: TcbEvaluation | None
    reasons: tuple[Reason, ...] = field(default=())
    collateral: CollateralFacts | None = None

    @property
    def genuine(self) -> bool:
        return not self.reasons and self.tcb is not None

    @property
    def measurements(self) -> Measurements:
        return Measurements.from_quote(self.quote)
