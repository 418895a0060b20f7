"""What the emulated platform claims about its TCB: TCB levels, TDX module and QE identity.

These are the inputs of the collateral ("Intel SGX and Intel TDX PCS API v4": TDX TCB
info v3 ``tcbLevels`` and ``tdxModuleIdentities``, TDX QE identity v2) and of the quote
(the PCK certificate's TCB, the TD report's TEE_TCB_SVN, the QE report). A test that
wants a platform out of date, a level with advisories or a QE that does not match its
identity builds these values differently; nothing else changes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime

from tdxvm.attest.tcbinfo import TCB_STATUSES

# Statuses a TDX module identity's levels may carry (dcap-qvl rejects the others).
MODULE_TCB_STATUSES = ("UpToDate", "OutOfDate", "Revoked")


def _status(value: str) -> None:
    if value not in TCB_STATUSES:
        raise ValueError(f"unknown TCB status {value!r} (expected one of {', '.join(TCB_STATUSES)})")


def _svns(name: str, values: tuple[int, ...] | list[int], count: int = 16) -> tuple[int, ...]:
    out = tuple(values)
    if len(out) != count or any(not 0 <= v <= 255 for v in out):
        raise ValueError(f"{name} needs {count} SVNs, each 0..255 (got {list(out)})")
    return out


def _size(name: str, value: bytes, size: int) -> None:
    if len(value) != size:
        raise ValueError(f"{name} must be {size} bytes, got {len(value)}")


@dataclass(frozen=True, slots=True, kw_only=True)
class TcbLevel:
    """One entry of the TCB info's ``tcbLevels``.

    ``sgx_components`` and ``pce_svn`` are compared with the PCK certificate's TCB,
    ``tdx_components`` with the TD report's TEE_TCB_SVN (byte 0 the TDX module SVN,
    byte 1 its major version). ``tcb_date`` ``None`` lets the collateral pick a date
    before its issue date.
    """

    sgx_components: tuple[int, ...]
    pce_svn: int
    tdx_components: tuple[int, ...]
    status: str = "UpToDate"
    tcb_date: datetime | None = None
    advisory_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "sgx_components", _svns("sgx_components", self.sgx_components))
        object.__setattr__(self, "tdx_components", _svns("tdx_components", self.tdx_components))
        object.__setattr__(self, "advisory_ids", tuple(self.advisory_ids))
        _status(self.status)

    @property
    def tee_tcb_svn(self) -> bytes:
        """The lowest TEE_TCB_SVN that matches this level."""
        return bytes(self.tdx_components)


@dataclass(frozen=True, slots=True, kw_only=True)
class IsvTcbLevel:
    """A TCB level keyed by one ISV SVN (QE identity and TDX module identity levels)."""

    isvsvn: int
    status: str = "UpToDate"
    tcb_date: datetime | None = None
    advisory_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "advisory_ids", tuple(self.advisory_ids))
        _status(self.status)


@dataclass(frozen=True, slots=True, kw_only=True)
class TdxModuleIdentity:
    """An entry of ``tdxModuleIdentities`` (id ``TDX_<major version, 2 hex digits>``)."""

    version: int
    tcb_levels: tuple[IsvTcbLevel, ...]
    mrsigner: bytes = bytes(48)
    attributes: bytes = bytes(8)
    attributes_mask: bytes = b"\xff" * 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "tcb_levels", tuple(self.tcb_levels))
        for level in self.tcb_levels:
            if level.status not in MODULE_TCB_STATUSES:
                raise ValueError(
                    f"TDX module TCB level status {level.status!r} is not one of {', '.join(MODULE_TCB_STATUSES)}"
                )
        _size("TDX module mrsigner", self.mrsigner, 48)
        _size("TDX module attributes", self.attributes, 8)
        _size("TDX module attributes mask", self.attributes_mask, 8)

    @property
    def id(self) -> str:
        return f"TDX_{self.version:02X}"


def _module_level(svn: int, level: TcbLevel) -> IsvTcbLevel:
    """The module level matching a platform level: module levels know only UpToDate,
    OutOfDate and Revoked (PCS API v4, ``tdxModuleIdentities``), and carry advisories
    only when not UpToDate."""
    if level.status == "Revoked":
        status = "Revoked"
    elif level.status.startswith("OutOfDate"):
        status = "OutOfDate"
    else:
        status = "UpToDate"
    advisories = level.advisory_ids if status != "UpToDate" else ()
    return IsvTcbLevel(isvsvn=svn, status=status, tcb_date=level.tcb_date, advisory_ids=advisories)


def module_identities_for(levels: tuple[TcbLevel, ...]) -> tuple[TdxModuleIdentity, ...]:
    """Module identities consistent with ``levels``: per major version (TEE_TCB_SVN byte
    1, when non-zero) one identity whose levels are the module SVNs (byte 0) of the
    platform levels, highest first (the first platform level per SVN decides)."""
    by_version: dict[int, dict[int, TcbLevel]] = {}
    for level in levels:
        svn, version = level.tdx_components[0], level.tdx_components[1]
        if version:
            by_version.setdefault(version, {}).setdefault(svn, level)
    return tuple(
        TdxModuleIdentity(
            version=version,
            tcb_levels=tuple(_module_level(svn, lv) for svn, lv in sorted(svns.items(), reverse=True)),
        )
        for version, svns in sorted(by_version.items(), reverse=True)
    )


def _h(label: str, size: int) -> bytes:
    return hashlib.sha512(b"tdxvm emulated " + label.encode()).digest()[:size]


DEFAULT_FMSPC = bytes.fromhex("90C06F000000")
DEFAULT_PCE_ID = bytes(2)
DEFAULT_ADVISORIES = ("INTEL-SA-01036", "INTEL-SA-01099")
DEFAULT_TCB_LEVELS: tuple[TcbLevel, ...] = (
    TcbLevel(
        sgx_components=(3, 3, 2, 2, 4, 1, 0, 5) + (0,) * 8,
        pce_svn=13,
        tdx_components=(5, 1, 2) + (0,) * 13,
        status="UpToDate",
    ),
    TcbLevel(
        sgx_components=(2, 2, 2, 2, 3, 1, 0, 5) + (0,) * 8,
        pce_svn=11,
        tdx_components=(3, 1, 2) + (0,) * 13,
        status="OutOfDate",
        advisory_ids=DEFAULT_ADVISORIES,
    ),
)
# The TDX module: Intel signs it with an all-zero MRSIGNER; MRSEAM is a measurement.
DEFAULT_MR_SEAM = _h("TDX module", 48)


@dataclass(frozen=True, slots=True, kw_only=True)
class QeProfile:
    """The TD Quoting Enclave: the values its report carries and the identity policy
    the collateral states for it (TDX QE identity v2).

    The identity lists ``misc_select & misc_select_mask`` and ``attributes &
    attributes_mask``; the report carries the unmasked values (Intel's TD QE reports
    attributes 0x15…0xE7, its identity expects 0x11 under mask 0xFB…).
    """

    mrsigner: bytes = _h("TD QE signer", 32)
    mrenclave: bytes = _h("TD QE", 32)
    isv_prod_id: int = 2
    isv_svn: int = 4
    cpu_svn: bytes | None = None
    misc_select: int = 0
    misc_select_mask: int = 0xFFFFFFFF
    attributes: bytes = bytes.fromhex("1500000000000000E700000000000000")
    attributes_mask: bytes = bytes.fromhex("FBFFFFFFFFFFFFFF0000000000000000")
    tcb_levels: tuple[IsvTcbLevel, ...] = field(default=(IsvTcbLevel(isvsvn=4),))

    def __post_init__(self) -> None:
        object.__setattr__(self, "tcb_levels", tuple(self.tcb_levels))
        _size("QE mrsigner", self.mrsigner, 32)
        _size("QE mrenclave", self.mrenclave, 32)
        _size("QE attributes", self.attributes, 16)
        _size("QE attributes mask", self.attributes_mask, 16)
        if self.cpu_svn is not None:
            _size("QE cpu_svn", self.cpu_svn, 16)

    @property
    def expected_attributes(self) -> bytes:
        return bytes(a & m for a, m in zip(self.attributes, self.attributes_mask, strict=True))


DEFAULT_QE = QeProfile()
