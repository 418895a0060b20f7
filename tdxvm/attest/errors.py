"""Error types of the attestation package.

Every failure the verifier can report is an :class:`AttestError`. Input that cannot be
used at all (a truncated quote, malformed collateral, a bad policy file) raises one of
the *input* errors; a well-formed quote that does not pass verification is not an
exception but a :class:`~tdxvm.attest.result.Reason` in the verification result.
"""

from __future__ import annotations

from tdxvm.errors import TdxvmError, Unreachable


class AttestError(TdxvmError):
    """Base of every error raised by :mod:`tdxvm.attest`.

    ``code`` is a stable, machine-readable identifier (used in ``-o json`` output and
    for exit codes); ``str(err)`` is the human message.
    """

    code = "attest-error"

    @property
    def message(self) -> str:
        return str(self.args[0])


class QuoteFormatError(AttestError):
    """The quote bytes are not a well-formed TDX quote.

    ``field`` names the structure field and ``offset`` its byte offset in the quote.
    """

    code = "quote-format"

    def __init__(self, message: str, *, field: str, offset: int) -> None:
        super().__init__(f"{field} at byte offset {offset}: {message}")
        self.field = field
        self.offset = offset


class CollateralError(AttestError):
    """Collateral (TCB info, QE identity, CRLs, issuer chains) is missing or malformed."""

    code = "collateral"


class CollateralFetchError(CollateralError, Unreachable):
    """Collateral could not be fetched from the PCS/PCCS and no usable cached copy exists
    (exit 3: the PCS did not answer, or not with collateral)."""

    code = "collateral-fetch"


class CertificateError(AttestError):
    """A certificate or CRL could not be parsed."""

    code = "certificate"


class PckChainError(CertificateError):
    """The quote's own PCK certificate chain cannot be read, so the platform's FMSPC and
    CA (whose collateral would be looked up) are unknown: a reason to refuse the quote
    (``pck-chain``), not an unusable input of the verifier's."""

    code = "pck-chain"


class PolicyFileError(AttestError):
    """An attestation policy file is malformed; the message names file, line and key."""

    code = "policy-file"


class EventLogError(AttestError):
    """A CCEL table or TCG event log is malformed; the message names the byte offset."""

    code = "event-log"
