"""Quote collateral and its offline bundle.

The collateral of a TDX quote is what Intel's Provisioning Certification Service serves
beside the PCK certificate ("Intel SGX and Intel TDX PCS API v4"): the TDX TCB info
("Get TDX TCB Info"), the TDX QE identity ("Get TDX Quoting Enclave Identity"), the PCK
CRL ("Get PCK Cert CRL"), each with its issuer chain, and the CRL of the Intel SGX Root
CA. :mod:`tdxvm.attest.pcs` fetches it; this module holds it, reads and writes the
offline bundle, and computes the time window in which it is usable.

The bundle is the JSON layout of dcap-qvl's ``QuoteCollateralV3``: issuer chains as PEM
text, ``tcb_info`` and ``qe_identity`` as the raw JSON text Intel signed (never
re-serialised: the signatures cover those exact bytes), CRLs (DER) and signatures (raw
64-byte r‖s) as hex.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from tdxvm.attest.chain import load_crl
from tdxvm.attest.errors import CertificateError, CollateralError
from tdxvm.attest.tcbinfo import parse_intel_time
from tdxvm.fileio import write_atomic

SIGNATURE_SIZE = 64
INTEL_PCS_URL = "https://api.trustedservices.intel.com"  # here, not in pcs: no HTTP stack to name it

# Keys of the bundle, in dcap-qvl's order, with how each is encoded.
_TEXT = "text"
_HEX = "hex"
_LAYOUT: tuple[tuple[str, str], ...] = (
    ("pck_crl_issuer_chain", _TEXT),
    ("root_ca_crl", _HEX),
    ("pck_crl", _HEX),
    ("tcb_info_issuer_chain", _TEXT),
    ("tcb_info", _TEXT),
    ("tcb_info_signature", _HEX),
    ("qe_identity_issuer_chain", _TEXT),
    ("qe_identity", _TEXT),
    ("qe_identity_signature", _HEX),
)
# dcap-qvl may add the quote's PCK chain; it is not collateral (the quote carries it).
_IGNORED = frozenset({"pck_certificate_chain"})


@dataclass(frozen=True, slots=True)
class Collateral:
    """Everything besides the quote that verification needs (dcap-qvl ``QuoteCollateralV3``)."""

    pck_crl_issuer_chain: str
    root_ca_crl: bytes
    pck_crl: bytes
    tcb_info_issuer_chain: str
    tcb_info: str
    tcb_info_signature: bytes
    qe_identity_issuer_chain: str
    qe_identity: str
    qe_identity_signature: bytes

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "<bundle>") -> Collateral:
        """Read a bundle; a :class:`CollateralError` names ``source`` and the faulty key."""
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CollateralError(f"{source}: not UTF-8 text (byte {exc.start})") from None
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CollateralError(
                f"{source}: not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
            ) from None
        except (ValueError, RecursionError) as exc:  # an integer too long, absurd nesting
            raise CollateralError(f"{source}: not usable JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise CollateralError(f"{source}: expected a JSON object, got {_kind(doc)}")
        known = {name for name, _ in _LAYOUT}
        unknown = sorted(k for k in doc if k not in known and k not in _IGNORED)
        if unknown:
            raise CollateralError(f"{source}: unknown key {unknown[0]!r}")
        values: dict[str, str | bytes] = {}
        for name, encoding in _LAYOUT:
            if name not in doc:
                raise CollateralError(f"{source}: key {name!r} is missing")
            value = doc[name]
            if not isinstance(value, str):
                raise CollateralError(f"{source}: key {name!r} must be a string, got {_kind(value)}")
            values[name] = _unhex(value, source, name) if encoding == _HEX else value
        for name in ("tcb_info_signature", "qe_identity_signature"):
            size = len(values[name])
            if size != SIGNATURE_SIZE:
                raise CollateralError(
                    f"{source}: key {name!r} must be a {SIGNATURE_SIZE}-byte ECDSA signature (r‖s), got {size} bytes"
                )
        return cls(**values)  # type: ignore[arg-type]

    def to_json(self) -> str:
        """The bundle as JSON text, in the layout :meth:`from_json` and dcap-qvl read."""
        doc = {
            name: getattr(self, name).hex() if encoding == _HEX else getattr(self, name) for name, encoding in _LAYOUT
        }
        return json.dumps(doc, indent=2, ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class CollateralOrigin:
    """Where the collateral of a verification came from, as every verdict reports it.

    ``how`` is ``"fetched"`` (from the PCS/PCCS at ``where``, now), ``"cache"`` (the
    cached copy for ``where``, because fetching failed: ``why``), ``"bundle"`` (an
    offline bundle at ``where``) or ``"given"`` (handed over in-process, e.g. by the
    emulated platform).
    """

    how: str
    where: str
    why: str | None = None

    def describe(self) -> str:
        return f"{self.how} {self.where}" if self.how in ("bundle", "given") else f"{self.how} from {self.where}"

    def exception(self) -> str | None:
        """The verdict's policy exception for collateral that may be stale, else None."""
        if self.how != "cache":
            return None
        return f"collateral from the cache: {self.where} could not be reached ({self.why or 'no reason given'})"


def resolve_collateral(source: object, quote: object) -> tuple[Collateral, CollateralOrigin | None]:
    """The collateral for ``quote`` from ``source``: a :class:`Collateral`, or a function of
    the quote returning one or a ``(collateral, origin)`` pair (as ``pcs.get_collateral``)."""
    got = source(quote) if callable(source) else source
    if isinstance(got, tuple):
        collateral, origin = got
        return collateral, origin
    if not isinstance(got, Collateral):
        raise TypeError(f"collateral source gave {type(got).__name__}, not Collateral")
    return got, None


def _kind(value: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _unhex(value: str, source: str, name: str) -> bytes:
    try:
        return binascii.unhexlify(value)
    except (binascii.Error, ValueError) as exc:
        raise CollateralError(f"{source}: key {name!r} is not hex ({exc})") from None


_WS = " \t\n\r"


def raw_members(text: str) -> dict[str, str]:
    """The members of a JSON object as the exact source text of each value.

    Raises :class:`ValueError` (with an offset) for anything but one JSON object, and
    for a member name given twice (JSON parsers disagree on which one wins).
    """
    decoder = json.JSONDecoder()

    def skip(pos: int) -> int:
        while pos < len(text) and text[pos] in _WS:
            pos += 1
        return pos

    def expect(pos: int, chars: str, what: str) -> int:
        if pos >= len(text) or text[pos] not in chars:
            raise ValueError(f"expected {what} at offset {pos}")
        return pos

    def value(pos: int) -> tuple[object, int]:
        try:
            return decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{exc.msg} at offset {exc.pos}") from None
        except (ValueError, RecursionError) as exc:  # an integer too long, absurd nesting
            raise ValueError(f"the value at offset {pos}: {exc}") from None

    out: dict[str, str] = {}
    pos = skip(expect(skip(0), "{", "'{'") + 1)
    if text[pos : pos + 1] != "}":
        while True:
            key, pos = value(expect(pos, '"', "a member name"))
            pos = skip(expect(skip(pos), ":", "':'") + 1)
            _, end = value(pos)
            assert isinstance(key, str)
            if key in out:
                raise ValueError(f"member {key!r} appears twice")
            out[key] = text[pos:end]
            pos = expect(skip(end), ",}", "',' or '}'")
            if text[pos] == "}":
                break
            pos = skip(pos + 1)
    end = skip(pos + 1)
    if end != len(text):
        raise ValueError(f"extra data after the object at offset {end}")
    return out


def crl_der(data: bytes) -> bytes:
    """A CRL as DER, given as DER, PEM or hex text (PCCS versions differ); checked to parse."""
    der: bytes | None = data
    if data[:1] != b"\x30":  # not a DER SEQUENCE: PEM or hex text
        text = data.strip()
        pem = text.startswith(b"-----BEGIN X509 CRL-----") and text.endswith(b"-----END X509 CRL-----")
        try:
            der = (
                base64.b64decode(b"".join(text.splitlines()[1:-1]), validate=True) if pem else binascii.unhexlify(text)
            )
        except (binascii.Error, ValueError):
            der = None
    if der is None:
        raise ValueError("neither DER, PEM nor hex")
    try:
        load_crl(der, "CRL")
    except CertificateError as exc:
        raise ValueError(str(exc)) from None
    return der


def load_bundle(path: str | os.PathLike[str]) -> Collateral:
    """Read an offline collateral bundle (dcap-qvl ``QuoteCollateralV3`` JSON) from a file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CollateralError(f"{path}: cannot read collateral bundle: {exc.strerror or exc}") from None
    return Collateral.from_json(data, source=str(path))


def save_bundle(collateral: Collateral, path: str | os.PathLike[str]) -> None:
    """Write ``collateral`` as a bundle, atomically (temporary file, then rename), mode 0644."""
    try:
        write_atomic(Path(path), (collateral.to_json() + "\n").encode("utf-8"), mode=0o644)
    except OSError as exc:
        raise CollateralError(f"{path}: cannot write collateral bundle: {exc.strerror or exc}") from None


@dataclass(frozen=True, slots=True)
class CollateralWindow:
    """When a collateral set is usable: from the latest issue date to the earliest next update.

    ``not_before`` is the latest of the TCB info's and QE identity's ``issueDate`` and
    both CRLs' ``thisUpdate``; ``not_after`` the earliest ``nextUpdate`` of the four,
    and ``expires_first`` names the item it comes from.
    """

    not_before: datetime
    not_after: datetime
    expires_first: str

    def contains(self, at: datetime) -> bool:
        """Whether every item is valid at ``at``: not_before ≤ at < not_after (naive = UTC)."""
        at = at if at.tzinfo else at.replace(tzinfo=timezone.utc)
        return self.not_before <= at < self.not_after


def validity(collateral: Collateral) -> CollateralWindow:
    """The window in which every dated item of ``collateral`` is current."""
    spans = [
        ("TCB info", *_json_dates(collateral.tcb_info, "tcb_info")),
        ("QE identity", *_json_dates(collateral.qe_identity, "qe_identity")),
        ("PCK CRL", *_crl_dates(collateral.pck_crl, "pck_crl")),
        ("root CA CRL", *_crl_dates(collateral.root_ca_crl, "root_ca_crl")),
    ]
    first = min(spans, key=lambda s: s[2])
    return CollateralWindow(not_before=max(s[1] for s in spans), not_after=first[2], expires_first=first[0])


@dataclass(frozen=True, slots=True)
class CollateralSummary:
    """What a collateral set says of itself, read but not verified (for status displays):
    the lower ``tcbEvaluationDataNumber`` and the older ``issueDate`` of TCB info and QE
    identity, and the window in which every item is current."""

    tcb_evaluation_data_number: int
    issue_date: datetime
    window: CollateralWindow


def summarize(collateral: Collateral) -> CollateralSummary:
    """:class:`CollateralSummary` of ``collateral``; :class:`CollateralError` if malformed."""
    numbers, issued = [], []
    for key in ("tcb_info", "qe_identity"):
        text = getattr(collateral, key)
        issued.append(_json_dates(text, key)[0])
        number = json.loads(text).get("tcbEvaluationDataNumber")
        if not isinstance(number, int) or isinstance(number, bool):
            raise CollateralError(f"collateral {key}.tcbEvaluationDataNumber: missing or not a number")
        numbers.append(number)
    return CollateralSummary(
        tcb_evaluation_data_number=min(numbers), issue_date=min(issued), window=validity(collateral)
    )


def _json_dates(text: str, key: str) -> tuple[datetime, datetime]:
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:  # not JSON, an integer too long, absurd nesting
        raise CollateralError(f"collateral {key}: not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise CollateralError(f"collateral {key}: expected a JSON object, got {_kind(doc)}")
    return _date(doc, key, "issueDate"), _date(doc, key, "nextUpdate")


def _date(doc: dict[str, object], key: str, name: str) -> datetime:
    value = doc.get(name)
    if not isinstance(value, str):
        raise CollateralError(f"collateral {key}.{name}: missing or not a string")
    return parse_intel_time(value, f"collateral {key}.{name}")


def _crl_dates(der: bytes, key: str) -> tuple[datetime, datetime]:
    try:
        crl = load_crl(der, f"collateral {key}").crl
    except CertificateError as exc:
        raise CollateralError(str(exc)) from None
    if crl.next_update_utc is None:
        raise CollateralError(f"collateral {key}: CRL has no nextUpdate")
    return crl.last_update_utc, crl.next_update_utc
