"""Typed views of Intel's TCB info (TDX, v3) and QE identity (v2) JSON.

Formats: "Intel SGX and Intel TDX PCS API v4", sections "Get TDX TCB Info" (tcbInfo
v3) and "Get TDX QE Identity" (enclaveIdentity v2). The JSON text is parsed only after
its signature was checked over the exact bytes; these classes never re-serialise it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from operator import itemgetter
from typing import Any

from tdxvm.attest.errors import CollateralError

TCB_STATUSES = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
)


_EARLIEST, _LATEST = datetime(1970, 1, 1, tzinfo=timezone.utc), datetime(9000, 1, 1, tzinfo=timezone.utc)


def parse_intel_time(text: Any, where: str) -> datetime:
    """Parse Intel's ``2025-06-19T10:16:03Z`` timestamps (RFC 3339), in UTC; a date before
    1970 or after 8999 is refused (no collateral has one, and arithmetic on it overflows)."""
    if not isinstance(text, str):
        raise CollateralError(f"{where}: expected an RFC 3339 date string")
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise CollateralError(f"{where}: {text!r} is not an RFC 3339 date") from None
    if value.tzinfo is None:
        raise CollateralError(f"{where}: {text!r} has no time zone (expected UTC, 'Z')")
    try:
        value = value.astimezone(timezone.utc)
    except OverflowError:  # year 1 or 9999 moved across midnight by its offset
        value = None
    if value is None or not _EARLIEST <= value < _LATEST:
        raise CollateralError(f"{where}: {text!r} is out of range (1970 to 8999)")
    return value


_MISSING = object()
_STATUSES = frozenset(TCB_STATUSES)


class _Obj:
    """Typed access to a JSON object with errors that name the path.

    The dates of one document are parsed once each (``dates``, shared by its objects):
    TCB levels repeat the same few ``tcbDate`` values.
    """

    __slots__ = ("value", "path", "dates")

    def __init__(self, value: Any, path: str, dates: dict[str, datetime] | None = None) -> None:
        if type(value) is not dict and not isinstance(value, dict):
            raise CollateralError(f"{path}: expected a JSON object")
        self.value = value
        self.path = path
        self.dates = {} if dates is None else dates

    def get(self, key: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
        v = self.value.get(key, _MISSING)
        if type(v) is kind:  # the common case: bool is not int, so it falls through to be refused below
            return v
        if v is _MISSING:
            if optional:
                return None
            raise CollateralError(f"{self.path}.{key}: missing")
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise CollateralError(f"{self.path}.{key}: has the wrong type")
        return v

    def obj(self, key: str) -> _Obj:
        return _Obj(self.get(key, dict), f"{self.path}.{key}", self.dates)

    def hex(self, key: str, size: int) -> bytes:
        text = self.get(key, str)
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raise CollateralError(f"{self.path}.{key}: not hex") from None
        if len(raw) != size:
            raise CollateralError(f"{self.path}.{key}: expected {size} bytes, got {len(raw)}")
        return raw

    def time(self, key: str) -> datetime:
        text = self.get(key, str)
        when = self.dates.get(text)
        if when is None:
            when = self.dates[text] = parse_intel_time(text, f"{self.path}.{key}")
        return when

    def status(self) -> str:
        s = self.get("tcbStatus", str)
        if s not in _STATUSES:
            raise CollateralError(f"{self.path}.tcbStatus: unknown status {s!r}")
        return s

    def advisories(self) -> tuple[str, ...]:
        ids = self.get("advisoryIDs", list, optional=True) or []
        if not all(type(i) is str or isinstance(i, str) for i in ids):
            raise CollateralError(f"{self.path}.advisoryIDs: expected strings")
        return tuple(ids)

    def objs(self, key: str, *, optional: bool = False) -> list[_Obj]:
        items = self.get(key, list, optional=optional) or []
        path, dates = self.path, self.dates
        return [_Obj(v, f"{path}.{key}[{i}]", dates) for i, v in enumerate(items)]


def _svns(obj: _Obj, key: str) -> tuple[int, ...]:
    comps = obj.get(key, list)
    try:
        out = tuple([c["svn"] for c in comps])
    except (TypeError, KeyError):
        raise CollateralError(f"{obj.path}.{key}: expected objects with an 'svn'") from None
    if len(out) != 16:
        raise CollateralError(f"{obj.path}.{key}: expected 16 components, got {len(out)}")
    if set(map(type, out)) != {int} or min(out) < 0 or max(out) > 255:
        raise CollateralError(f"{obj.path}.{key}: SVN is not an integer in 0..255")
    return out


def _load(text: str, what: str) -> _Obj:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CollateralError(f"{what}: not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:  # an integer too long, absurd nesting
        raise CollateralError(f"{what}: not usable JSON ({exc})") from None
    return _Obj(doc, what)


@dataclass(frozen=True, slots=True)
class TcbLevel:
    sgx_components: tuple[int, ...]
    pce_svn: int
    tdx_components: tuple[int, ...]
    tcb_date: datetime
    status: str
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ModuleTcbLevel:
    isv_svn: int
    tcb_date: datetime
    status: str
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TdxModuleIdentity:
    id: str
    mrsigner: bytes
    attributes: bytes
    attributes_mask: bytes
    tcb_levels: tuple[ModuleTcbLevel, ...]


@dataclass(frozen=True, slots=True)
class TcbInfo:
    id: str
    version: int
    issue_date: datetime
    next_update: datetime
    fmspc: bytes
    pce_id: bytes
    tcb_type: int
    tcb_evaluation_data_number: int
    tdx_module: TdxModuleIdentity
    tdx_module_identities: tuple[TdxModuleIdentity, ...]
    tcb_levels: tuple[TcbLevel, ...]


def _isv_level(lv: _Obj) -> ModuleTcbLevel:
    return ModuleTcbLevel(
        isv_svn=lv.obj("tcb").get("isvsvn", int),
        tcb_date=lv.time("tcbDate"),
        status=lv.status(),
        advisory_ids=lv.advisories(),
    )


def _tcb_level(lv: _Obj) -> TcbLevel:
    tcb = lv.obj("tcb")
    return TcbLevel(
        sgx_components=_svns(tcb, "sgxtcbcomponents"),
        pce_svn=tcb.get("pcesvn", int),
        tdx_components=_svns(tcb, "tdxtcbcomponents"),
        tcb_date=lv.time("tcbDate"),
        status=lv.status(),
        advisory_ids=lv.advisories(),
    )


def _module(obj: _Obj, *, with_levels: bool) -> TdxModuleIdentity:
    levels = tuple(_isv_level(lv) for lv in obj.objs("tcbLevels")) if with_levels else ()
    return TdxModuleIdentity(
        id=obj.get("id", str) if with_levels else "",
        mrsigner=obj.hex("mrsigner", 48),
        attributes=obj.hex("attributes", 8),
        attributes_mask=obj.hex("attributesMask", 8),
        tcb_levels=levels,
    )


def parse_tcb_info(text: str) -> TcbInfo:
    """Parse the ``tcbInfo`` JSON object (the exact signed text)."""
    o = _load(text, "tcb_info")
    return _regular_tcb_info(o.value, o.dates) or _checked_tcb_info(o)


def _checked_tcb_info(o: _Obj) -> TcbInfo:
    """Every field checked in turn: the first one that is missing or wrong is named."""
    levels = tuple([_tcb_level(lv) for lv in o.objs("tcbLevels")])
    module = o.get("tdxModule", dict, optional=True)
    if module is None:
        raise CollateralError("tcb_info.tdxModule: missing (not a TDX TCB info)")
    return TcbInfo(
        id=o.get("id", str),
        version=o.get("version", int),
        issue_date=o.time("issueDate"),
        next_update=o.time("nextUpdate"),
        fmspc=o.hex("fmspc", 6),
        pce_id=o.hex("pceId", 2),
        tcb_type=o.get("tcbType", int),
        tcb_evaluation_data_number=o.get("tcbEvaluationDataNumber", int),
        tdx_module=_module(_Obj(module, "tcb_info.tdxModule"), with_levels=False),
        tdx_module_identities=tuple(_module(m, with_levels=True) for m in o.objs("tdxModuleIdentities", optional=True)),
        tcb_levels=levels,
    )


@dataclass(frozen=True, slots=True)
class QeTcbLevel:
    isv_svn: int
    tcb_date: datetime
    status: str
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class QeIdentity:
    id: str
    version: int
    issue_date: datetime
    next_update: datetime
    tcb_evaluation_data_number: int
    miscselect: int
    miscselect_mask: int
    attributes: bytes
    attributes_mask: bytes
    mrsigner: bytes
    isv_prod_id: int
    tcb_levels: tuple[QeTcbLevel, ...]


def parse_qe_identity(text: str) -> QeIdentity:
    """Parse the ``enclaveIdentity`` JSON object (the exact signed text)."""
    o = _load(text, "qe_identity")
    return _regular_qe_identity(o.value, o.dates) or _checked_qe_identity(o)


def _checked_qe_identity(o: _Obj) -> QeIdentity:
    """Every field checked in turn: the first one that is missing or wrong is named."""
    return QeIdentity(
        id=o.get("id", str),
        version=o.get("version", int),
        issue_date=o.time("issueDate"),
        next_update=o.time("nextUpdate"),
        tcb_evaluation_data_number=o.get("tcbEvaluationDataNumber", int),
        # MISCSELECT is a little-endian u32 in the report; the JSON hex is its bytes.
        miscselect=int.from_bytes(o.hex("miscselect", 4), "little"),
        miscselect_mask=int.from_bytes(o.hex("miscselectMask", 4), "little"),
        attributes=o.hex("attributes", 16),
        attributes_mask=o.hex("attributesMask", 16),
        mrsigner=o.hex("mrsigner", 32),
        isv_prod_id=o.get("isvprodid", int),
        tcb_levels=tuple(
            QeTcbLevel(
                isv_svn=lv.obj("tcb").get("isvsvn", int),
                tcb_date=lv.time("tcbDate"),
                status=lv.status(),
                advisory_ids=lv.advisories(),
            )
            for lv in o.objs("tcbLevels")
        ),
    )


# -- the regular case in one pass ------------------------------------------------------
# Intel's documents are regular: every field present with its type. The functions below
# read such a document with few steps and return None at the first thing they do not
# expect; the checked functions above then read it again and name what is wrong. They
# accept nothing the checked functions refuse and build the same values
# (tests/attest/test_tcbinfo.py compares the two on mutated documents).


def _hex(value: Any, size: int) -> bytes | None:
    if type(value) is not str:
        return None
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        return None
    return raw if len(raw) == size else None


def _date(value: Any, dates: dict[str, datetime]) -> datetime | None:
    if type(value) is not str:
        return None
    when = dates.get(value)
    if when is None:
        try:
            when = dates[value] = parse_intel_time(value, "")
        except CollateralError:
            return None
    return when


_SVN = itemgetter("svn")


def _svn_list(comps: Any) -> tuple[int, ...] | None:
    if type(comps) is not list or len(comps) != 16:
        return None
    try:
        out = tuple(map(_SVN, comps))
        return out if set(map(type, out)) == {int} and bytes(out) else None  # bytes(): each in 0..255
    except (TypeError, KeyError, ValueError):
        return None


def _tail(lv: dict[str, Any], dates: dict[str, datetime]) -> tuple[datetime, str, tuple[str, ...]] | None:
    """(tcbDate, tcbStatus, advisoryIDs) of a level."""
    status, ids = lv.get("tcbStatus"), lv.get("advisoryIDs", _MISSING)
    if type(status) is not str or status not in _STATUSES:
        return None
    if ids is _MISSING or ids == []:
        ids = ()
    elif type(ids) is not list or set(map(type, ids)) != {str}:
        return None
    date = _date(lv.get("tcbDate"), dates)
    return None if date is None else (date, status, tuple(ids))


def _isv_levels(levels: Any, dates: dict[str, datetime], kind: type) -> tuple | None:
    if type(levels) is not list:
        return None
    out = []
    for lv in levels:
        tcb = lv.get("tcb") if type(lv) is dict else None
        svn = tcb.get("isvsvn") if type(tcb) is dict else None
        tail = _tail(lv, dates) if type(svn) is int else None
        if tail is None:
            return None
        out.append(kind(svn, *tail))
    return tuple(out)


def _regular_module(m: Any, dates: dict[str, datetime], *, with_levels: bool) -> TdxModuleIdentity | None:
    if type(m) is not dict:
        return None
    levels: tuple | None = ()
    ident = ""
    if with_levels:
        levels, ident = _isv_levels(m.get("tcbLevels"), dates, ModuleTcbLevel), m.get("id")
    mrsigner, attributes, mask = (
        _hex(m.get("mrsigner"), 48),
        _hex(m.get("attributes"), 8),
        _hex(m.get("attributesMask"), 8),
    )
    if levels is None or type(ident) is not str or mrsigner is None or attributes is None or mask is None:
        return None
    return TdxModuleIdentity(ident, mrsigner, attributes, mask, levels)


def _regular_tcb_info(doc: dict[str, Any], dates: dict[str, datetime]) -> TcbInfo | None:
    levels, modules = doc.get("tcbLevels"), doc.get("tdxModuleIdentities", [])
    if type(levels) is not list or type(modules) is not list:
        return None
    out = []
    for lv in levels:
        tcb = lv.get("tcb") if type(lv) is dict else None
        if type(tcb) is not dict:
            return None
        sgx, pce, tdx = (
            _svn_list(tcb.get("sgxtcbcomponents")),
            tcb.get("pcesvn"),
            _svn_list(tcb.get("tdxtcbcomponents")),
        )
        tail = _tail(lv, dates) if sgx is not None and tdx is not None and type(pce) is int else None
        if tail is None:
            return None
        out.append(TcbLevel(sgx, pce, tdx, *tail))
    module = _regular_module(doc.get("tdxModule"), dates, with_levels=False)
    identities = [_regular_module(m, dates, with_levels=True) for m in modules]
    ident, version, kind, number = (
        doc.get("id"),
        doc.get("version"),
        doc.get("tcbType"),
        doc.get("tcbEvaluationDataNumber"),
    )
    issue, nxt = _date(doc.get("issueDate"), dates), _date(doc.get("nextUpdate"), dates)
    fmspc, pce_id = _hex(doc.get("fmspc"), 6), _hex(doc.get("pceId"), 2)
    if (
        module is None
        or None in identities
        or type(ident) is not str
        or type(version) is not int
        or type(kind) is not int
        or type(number) is not int
        or issue is None
        or nxt is None
        or fmspc is None
        or pce_id is None
    ):
        return None
    return TcbInfo(ident, version, issue, nxt, fmspc, pce_id, kind, number, module, tuple(identities), tuple(out))  # type: ignore[arg-type]


def _regular_qe_identity(doc: dict[str, Any], dates: dict[str, datetime]) -> QeIdentity | None:
    levels = _isv_levels(doc.get("tcbLevels"), dates, QeTcbLevel)
    ident, version, number, prod = (
        doc.get("id"),
        doc.get("version"),
        doc.get("tcbEvaluationDataNumber"),
        doc.get("isvprodid"),
    )
    issue, nxt = _date(doc.get("issueDate"), dates), _date(doc.get("nextUpdate"), dates)
    misc, misc_mask = _hex(doc.get("miscselect"), 4), _hex(doc.get("miscselectMask"), 4)
    attributes, mask, mrsigner = (
        _hex(doc.get("attributes"), 16),
        _hex(doc.get("attributesMask"), 16),
        _hex(doc.get("mrsigner"), 32),
    )
    if (
        levels is None
        or type(ident) is not str
        or type(version) is not int
        or type(number) is not int
        or type(prod) is not int
        or issue is None
        or nxt is None
        or misc is None
        or misc_mask is None
        or attributes is None
        or mask is None
        or mrsigner is None
    ):
        return None
    return QeIdentity(
        ident,
        version,
        issue,
        nxt,
        number,
        int.from_bytes(misc, "little"),
        int.from_bytes(misc_mask, "little"),
        attributes,
        mask,
        mrsigner,
        prod,
        levels,
    )
