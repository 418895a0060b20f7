"""The errors of measurement prediction, below every module that raises them.

:mod:`tdxvm.image.measure` and the parsers it calls (:mod:`~tdxvm.image.authenticode`,
:mod:`~tdxvm.image.tdvf`, :mod:`~tdxvm.image.uefivars`, :mod:`~tdxvm.image.smbios`, …)
all raise :class:`MeasureError`; it lives here so that none of them imports another
only for its error class.
"""

from __future__ import annotations

from tdxvm.errors import TdxvmError


class MeasureError(TdxvmError):
    """Input that cannot be measured: not a PE, no TDVF metadata, truncated tables.

    ``code`` is a stable identifier for scripts; ``offset`` the byte offset in the input
    where the problem is (None when the problem is not at one place).
    """

    code = "measure"

    def __init__(self, message: str, *, code: str | None = None, offset: int | None = None) -> None:
        super().__init__(message, code=code)
        self.offset = offset


class UnmeasuredKernelError(MeasureError):
    """A kernel whose EFI stub does not measure the command line and initrd in a TD (or
    of which that cannot be told): RTMR2 would not cover them, so the host could replace
    them unnoticed."""

    code = "kernel-unmeasured"
