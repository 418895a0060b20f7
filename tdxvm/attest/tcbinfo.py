"""Typed views of Intel's TCB info (TDX, v3) and QE identity (v2) JSON.

Formats: "Intel SGX and Intel TDX PCS API v4", sections "Get TDX TCB Info" (tcbInfo
v3) and "Get TDX QE Identity" (enclaveIdentity v2). The JSON text is parsed only after
its signature was checked over the exact bytes; these classes never re-serialise it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
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


def parse_intel_time(text: Any, where: str) -> datetime:
    """Parse Intel's ``2025-06-19T10:16:03Z`` timestamps (RFC 3339, UTC)."""
    if not isinstance(text, str):
        raise CollateralError(f"{where}: expected an RFC 3339 date string")
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise CollateralError(f"{where}: {text!r} is not an RFC 3339 date") from None
    if value.tzinfo is None:
        raise CollateralError(f"{where}: {text!r} has no time zone")
    return value


class _Obj:
    """Typed access to a JSON object with errors that name the path."""

    def __init__(self, value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise CollateralError(f"{path}: expected a JSON object")
        self.value = value
        self.path = path

    def get(self, key: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
        if key not in self.value:
            if optional:
                return None
            raise CollateralError(f"{self.path}.{key}: missing")
        v = self.value[key]
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise CollateralError(f"{self.path}.{key}: has the wrong type")
        return v

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
        return parse_intel_time(self.get(key, str), f"{self.path}.{key}")

    def status(self) -> str:
        s = self.get("tcbStatus", str)
        if s not in TCB_STATUSES:
            raise CollateralError(f"{self.path}.tcbStatus: unknown status {s!r}")
        return s

    def advisories(self) -> tuple[str, ...]:
        ids = self.get("advisoryIDs", list, optional=True) or []
        if not all(isinstance(i, str) for i in ids):
            raise CollateralError(f"{self.path}.advisoryIDs: expected strings")
        return tuple(ids)

    def objs(self, key: str, *, optional: bool = False) -> list[_Obj]:
        items = self.get(key, list, optional=optional) or []
        return [_Obj(v, f"{self.path}.{key}[{i}]") for i, v in enumerate(items)]


def _svns(obj: _Obj, key: str) -> tuple[int, ...]:
    comps = obj.get(key, list)
    try:
        out = tuple(c["svn"] for c in comps)
    except (TypeError, KeyError):
        raise CollateralError(f"{obj.path}.{key}: expected objects with an 'svn'") from None
    if len(out) != 16:
        raise CollateralError(f"{obj.path}.{key}: expected 16 components, got {len(out)}")
    if not all(type(v) is int and 0 <= v <= 255 for v in out):
        raise CollateralError(f"{obj.path}.{key}: SVN is not an integer in 0..255")
    return out


def _load(text: str, what: str) -> _Obj:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CollateralError(f"{what}: not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
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


def _module(obj: _Obj, *, with_levels: bool) -> TdxModuleIdentity:
    levels: tuple[ModuleTcbLevel, ...] = ()
    if with_levels:
        levels = tuple(
            ModuleTcbLevel(
                isv_svn=_Obj(lv.get("tcb", dict), lv.path + ".tcb").get("isvsvn", int),
                tcb_date=lv.time("tcbDate"),
                status=lv.status(),
                advisory_ids=lv.advisories(),
            )
            for lv in obj.objs("tcbLevels")
        )
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
    levels = []
    for lv in o.objs("tcbLevels"):
        tcb = _Obj(lv.get("tcb", dict), lv.path + ".tcb")
        levels.append(
            TcbLevel(
                sgx_components=_svns(tcb, "sgxtcbcomponents"),
                pce_svn=tcb.get("pcesvn", int),
                tdx_components=_svns(tcb, "tdxtcbcomponents"),
                tcb_date=lv.time("tcbDate"),
                status=lv.status(),
                advisory_ids=lv.advisories(),
            )
        )
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
        tdx_module_identities=tuple(
            _module(m, with_levels=True) for m in o.objs("tdxModuleIdentities", optional=True)
        ),
        tcb_levels=tuple(levels),
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
                isv_svn=_Obj(lv.get("tcb", dict), lv.path + ".tcb").get("isvsvn", int),
                tcb_date=lv.time("tcbDate"),
                status=lv.status(),
                advisory_ids=lv.advisories(),
            )
            for lv in o.objs("tcbLevels")
        ),
    )
