"""Collateral from Intel's PCS or a PCCS, a disk cache, and fetch-else-cache.

Requests follow "Intel SGX and Intel TDX PCS API v4" (a PCCS serves the same paths):

- "Get TDX TCB Information": ``GET /tdx/certification/v4/tcb?fmspc=HEX``; body
  ``{"tcbInfo": {…}, "signature": "hex"}``, issuer chain in ``TCB-Info-Issuer-Chain``
  (``SGX-TCB-Info-Issuer-Chain`` from older services).
- "Get TDX Quoting Enclave Identity": ``GET /tdx/certification/v4/qe/identity``; body
  ``{"enclaveIdentity": {…}, "signature": "hex"}``, chain in ``SGX-Enclave-Identity-Issuer-Chain``.
- "Get PCK Cert CRL": ``GET /sgx/certification/v4/pckcrl?ca=platform|processor&encoding=der``;
  chain in ``SGX-PCK-CRL-Issuer-Chain``; body DER (some PCCS versions send hex or PEM).
- The Intel SGX Root CA CRL: from Intel's PCS, at the CRL distribution point of the root
  certificate; from a PCCS, ``GET /sgx/certification/v4/rootcacrl`` (hex text or DER).

Issuer chains arrive as URL-encoded PEM. ``tcbInfo`` and ``enclaveIdentity`` are kept
as the exact text of the response, since Intel's signatures cover those bytes.
"""

from __future__ import annotations

import binascii
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple, Protocol
from urllib.parse import unquote, urlsplit

import requests
from cryptography import x509
from requests.structures import CaseInsensitiveDict

from tdxvm.attest.collateral import (
    INTEL_PCS_URL,
    SIGNATURE_SIZE,
    Collateral,
    CollateralOrigin,
    CollateralSummary,
    crl_der,
    load_bundle,
    raw_members,
    summarize,
    validity,
)
from tdxvm.attest.errors import CertificateError, CollateralError, CollateralFetchError, PckChainError
from tdxvm.attest.pck import parse_pck_extension, parse_pem_chain, pck_ca_type
from tdxvm.attest.quote import Quote
from tdxvm.fileio import write_atomic
from tdxvm.textsafe import safe_text
from tdxvm.xdg import cache_home

CA_TYPES = ("platform", "processor")
MAX_BODY = 8 << 20  # PCS bodies are a few KiB; a PCK CRL is at most a few hundred.
_log = logging.getLogger(__name__)


class _Reply(NamedTuple):
    what: str
    url: str
    status: int
    headers: CaseInsensitiveDict[str]
    body: bytes

    def fail(self, detail: str) -> CollateralFetchError:
        return CollateralFetchError(f"{self.what}: malformed response from {self.url} (HTTP {self.status}): {detail}")

    def chain(self, *names: str) -> str:
        """The issuer chain from the first header present, URL-decoded and checked as PEM."""
        raw = next((self.headers[n] for n in names if n in self.headers), None)
        if raw is None:
            raise self.fail(f"no {' or '.join(names)} header")
        pem = unquote(raw)
        try:
            parse_pem_chain(pem, f"{names[0]} header")
        except CertificateError as exc:
            raise self.fail(str(exc)) from None
        return pem


def _check_key(fmspc: bytes, ca: str) -> None:
    if len(fmspc) != 6 or ca not in CA_TYPES:
        raise ValueError(f"need a 6-byte FMSPC and CA type 'platform' or 'processor', got {fmspc.hex()!r}, {ca!r}")


def quote_fmspc_ca(quote: Quote) -> tuple[bytes, str]:
    """FMSPC and PCK CA type (``"platform"``/``"processor"``) from the quote's PCK chain;
    :class:`PckChainError` when that chain cannot be read."""
    try:
        chain = parse_pem_chain(quote.signature.pck_chain_pem, "PCK certificate chain in the quote")
        if len(chain) < 2:
            raise CertificateError("PCK certificate chain in the quote: needs the PCK certificate and its issuer")
        return parse_pck_extension(chain[0]).fmspc, pck_ca_type(chain[1])
    except CertificateError as exc:
        raise PckChainError(str(exc)) from None


def service_url(base_url: str) -> str:
    """The service's base URL as :class:`PcsClient` uses it (and the cache is keyed by):
    no trailing slash, no ``/sgx|tdx/certification/v4`` suffix."""
    base = base_url.rstrip("/")
    for suffix in ("/sgx/certification/v4", "/tdx/certification/v4"):
        base = base.removesuffix(suffix)
    return base


class PcsClient:
    """Fetches collateral from Intel's PCS (the default) or a PCCS at ``base_url``."""

    def __init__(
        self, *, base_url: str = INTEL_PCS_URL, session: requests.Session | None = None, timeout: float = 30.0
    ) -> None:
        self.base_url = service_url(base_url)
        self.timeout = timeout
        self._session = session if session is not None else requests.Session()

    @property
    def is_intel_pcs(self) -> bool:
        """Intel's PCS (or its sandbox) serves no root CA CRL; a PCCS does."""
        host = urlsplit(self.base_url).hostname or ""
        return host == "trustedservices.intel.com" or host.endswith(".trustedservices.intel.com")

    def fetch_for_quote(self, quote: Quote) -> Collateral:
        """The collateral for ``quote``'s platform (FMSPC and CA from its PCK chain)."""
        fmspc, ca = quote_fmspc_ca(quote)
        return self.fetch(fmspc=fmspc, ca=ca)

    def fetch(self, *, fmspc: bytes, ca: str) -> Collateral:
        """Fetch TCB info, QE identity, PCK CRL and root CA CRL for one platform type."""
        _check_key(fmspc, ca)
        tdx, sgx = f"{self.base_url}/tdx/certification/v4", f"{self.base_url}/sgx/certification/v4"
        r = self._get("TCB info", f"{tdx}/tcb?fmspc={fmspc.hex().upper()}")
        tcb_chain = r.chain("TCB-Info-Issuer-Chain", "SGX-TCB-Info-Issuer-Chain")
        tcb_info, tcb_sig = _signed_json(r, "tcbInfo")
        served = json.loads(tcb_info).get("fmspc")
        if not isinstance(served, str) or served.upper() != fmspc.hex().upper():
            raise r.fail(f"TCB info is for FMSPC {served!r}, asked for {fmspc.hex().upper()}")
        r = self._get("QE identity", f"{tdx}/qe/identity")
        qe_chain = r.chain("SGX-Enclave-Identity-Issuer-Chain")
        qe_identity, qe_sig = _signed_json(r, "enclaveIdentity")
        r = self._get("PCK CRL", f"{sgx}/pckcrl?ca={ca}&encoding=der")
        pck_crl_chain = r.chain("SGX-PCK-CRL-Issuer-Chain")
        pck_crl = _crl(r)
        root_url = _distribution_point(pck_crl_chain) if self.is_intel_pcs else f"{sgx}/rootcacrl"
        root_ca_crl = _crl(self._get("root CA CRL", root_url))
        return Collateral(
            pck_crl_issuer_chain=pck_crl_chain,
            root_ca_crl=root_ca_crl,
            pck_crl=pck_crl,
            tcb_info_issuer_chain=tcb_chain,
            tcb_info=tcb_info,
            tcb_info_signature=tcb_sig,
            qe_identity_issuer_chain=qe_chain,
            qe_identity=qe_identity,
            qe_identity_signature=qe_sig,
        )

    def _get(self, what: str, url: str) -> _Reply:
        try:
            resp = self._session.get(url, timeout=self.timeout, stream=True)
        except requests.Timeout as exc:
            raise CollateralFetchError(f"{what}: GET {url}: no response within {self.timeout:g} s") from exc
        except requests.RequestException as exc:
            raise CollateralFetchError(f"{what}: GET {url} failed, no HTTP response: {_why(exc)}") from exc
        with resp:
            if resp.status_code != 200:
                detail = "".join(
                    f", {h}: {unquote(resp.headers[h])}" for h in ("Error-Code", "Error-Message") if h in resp.headers
                )  # the server's words, shown with their control characters escaped wherever they are printed
                raise CollateralFetchError(
                    safe_text(
                        f"{what}: GET {url} returned HTTP {resp.status_code} {resp.reason or ''}".rstrip() + detail
                    )
                )
            body = bytearray()
            try:
                for chunk in resp.iter_content(64 << 10):
                    body += chunk
                    if len(body) > MAX_BODY:
                        raise CollateralFetchError(f"{what}: response from {url} (HTTP 200) exceeds {MAX_BODY} bytes")
            except requests.RequestException as exc:
                raise CollateralFetchError(f"{what}: GET {url} returned HTTP 200, then failed: {_why(exc)}") from exc
        return _Reply(what, url, resp.status_code, resp.headers, bytes(body))


def _why(exc: BaseException) -> str:
    """The root cause of a requests error ("Connection refused"), not urllib3's wrappers."""
    why, seen = str(exc), set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.strerror:
            why = cur.strerror
        nxt = getattr(cur, "reason", None)
        cur = nxt if isinstance(nxt, BaseException) else cur.__cause__ or cur.__context__
    return why


def _signed_json(r: _Reply, key: str) -> tuple[str, bytes]:
    """The raw text of ``key``'s object and the decoded ``signature`` of a PCS JSON body."""
    try:
        members = raw_members(r.body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise r.fail(f"body is not a JSON object: {exc}") from None
    raw, sig = members.get(key), members.get("signature")
    if raw is None or not raw.startswith("{"):
        raise r.fail(f"body has no {key!r} object")
    signature = json.loads(sig) if sig is not None else None
    if not isinstance(signature, str):
        raise r.fail("body has no 'signature' string")
    try:
        decoded = binascii.unhexlify(signature)
    except (binascii.Error, ValueError):
        raise r.fail("'signature' is not hex") from None
    if len(decoded) != SIGNATURE_SIZE:
        raise r.fail(f"'signature' is {len(decoded)} bytes, expected {SIGNATURE_SIZE}")
    return raw, decoded


def _crl(r: _Reply) -> bytes:
    try:
        return crl_der(r.body)
    except ValueError as exc:
        raise r.fail(f"body is not a CRL: {exc}") from None


def _distribution_point(pem_chain: str) -> str:
    """The CRL distribution point URL of the chain's root certificate."""
    root = parse_pem_chain(pem_chain, "PCK CRL issuer chain")[-1]
    try:
        points = list(root.extensions.get_extension_for_class(x509.CRLDistributionPoints).value)
    except x509.ExtensionNotFound:
        points = []
    for name in (name for point in points for name in point.full_name or []):
        if isinstance(name, x509.UniformResourceIdentifier):
            return name.value
    raise CollateralFetchError("root CA CRL: the root certificate names no CRL distribution point")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/tdxvm/collateral``, else ``~/.cache/tdxvm/collateral`` (:mod:`tdxvm.xdg`)."""
    return cache_home() / "collateral"


_CACHED_NAME = re.compile(r"(?P<fmspc>[0-9A-F]{12})-(?P<ca>platform|processor)-(?P<service>[0-9a-f]{16})\.json")


@dataclass(frozen=True, slots=True)
class CachedCollateral:
    """One bundle in the cache: its key and what it says of itself (not verified), or
    why it cannot be read."""

    path: Path
    fmspc: str
    ca: str
    service_id: str
    summary: CollateralSummary | None
    error: str | None


class CollateralCache:
    """Collateral bundles on disk, one per (service URL, FMSPC, CA type); folder 0700, files 0600."""

    def __init__(self, *, directory: Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_cache_dir()

    @staticmethod
    def service_id(base_url: str) -> str:
        """The part of a file name that stands for the service (its URL's SHA-256, 16 hex)."""
        return hashlib.sha256(base_url.encode()).hexdigest()[:16]

    def path_for(self, *, base_url: str, fmspc: bytes, ca: str) -> Path:
        _check_key(fmspc, ca)
        return self.directory / f"{fmspc.hex().upper()}-{ca}-{self.service_id(base_url)}.json"

    def entries(self) -> list[CachedCollateral]:
        """Every cached bundle, by FMSPC, CA type and service; an unreadable one says why."""
        try:
            paths = sorted(self.directory.iterdir())
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise CollateralError(
                f"{self.directory}: cannot list the collateral cache: {exc.strerror or exc}"
            ) from None
        out = []
        for path in paths:
            match = _CACHED_NAME.fullmatch(path.name)
            if match is None:
                continue
            try:
                summary, error = summarize(load_bundle(path)), None
            except CollateralError as exc:
                summary, error = None, str(exc)
            out.append(CachedCollateral(path, match["fmspc"], match["ca"], match["service"], summary, error))
        return out

    def load(self, *, base_url: str, fmspc: bytes, ca: str) -> Collateral | None:
        """The cached bundle, ``None`` if there is none; :class:`CollateralError` if corrupt."""
        path = self.path_for(base_url=base_url, fmspc=fmspc, ca=ca)
        return load_bundle(path) if path.is_file() else None

    def store(self, collateral: Collateral, *, base_url: str, fmspc: bytes, ca: str) -> Path:
        path = self.path_for(base_url=base_url, fmspc=fmspc, ca=ca)
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.directory, 0o700)
            write_atomic(path, collateral.to_json().encode("utf-8"), mode=0o600)
        except OSError as exc:
            raise CollateralError(f"{path}: cannot cache collateral: {exc.strerror or exc}") from None
        return path


class CollateralSource(Protocol):
    """Where collateral comes from (:class:`PcsClient`, or a stand-in in tests)."""

    base_url: str

    def fetch(self, *, fmspc: bytes, ca: str) -> Collateral: ...


def get_collateral(
    quote: Quote, *, client: CollateralSource, cache: CollateralCache | None, at: datetime
) -> tuple[Collateral, CollateralOrigin]:
    """Fetch the collateral for ``quote``; if that fails, use the cached copy valid at ``at``.

    Returns the collateral and its origin: ``how`` is ``"fetched"`` or ``"cache"`` (then
    ``why`` holds the fetch error; the verdict lists it as a policy exception, since
    an attacker who blocks the service can hold the verifier on the cached copy until
    its ``nextUpdate``). A fetched copy replaces the cached one. Without a usable cached
    copy the fetch error is raised again, saying why the cached copy could not stand in
    (none, unreadable, expired at …, not yet valid).
    """
    fmspc, ca = quote_fmspc_ca(quote)
    try:
        collateral = client.fetch(fmspc=fmspc, ca=ca)
    except CollateralFetchError as err:
        if cache is None:
            raise
        return _cached(err, cache, client.base_url, fmspc, ca, at), CollateralOrigin(
            "cache", client.base_url, safe_text(err)
        )
    if cache is not None:
        try:
            cache.store(collateral, base_url=client.base_url, fmspc=fmspc, ca=ca)
        except CollateralError as exc:
            _log.warning("%s", exc)
    return collateral, CollateralOrigin("fetched", client.base_url)


def _cached(
    err: CollateralFetchError, cache: CollateralCache, base_url: str, fmspc: bytes, ca: str, at: datetime
) -> Collateral:
    try:
        cached = cache.load(base_url=base_url, fmspc=fmspc, ca=ca)
        window = validity(cached) if cached is not None else None
    except CollateralError as exc:
        raise CollateralFetchError(f"{err}; the cached copy is unusable: {exc}") from err
    if cached is None or window is None:
        raise CollateralFetchError(f"{err}; no cached copy in {cache.directory}") from err
    if window.contains(at):
        return cached
    if at.replace(tzinfo=at.tzinfo or timezone.utc) >= window.not_after:
        why = f"the cached copy expired at {window.not_after:%Y-%m-%dT%H:%M:%SZ} ({window.expires_first} nextUpdate)"
    else:
        why = f"the cached copy is not valid before {window.not_before:%Y-%m-%dT%H:%M:%SZ}"
    raise CollateralFetchError(f"{err}; {why}") from err
