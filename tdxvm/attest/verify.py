"""Quote verification: signatures, PCK chain, CRLs, collateral and TCB, at a given time.

The steps follow Intel's QVL (``QuoteVerifier.cpp``) and the "TDX DCAP Quoting Library
API" appendix on quote verification:

1. the collateral: TCB info and QE identity signed (over their exact JSON bytes) by the
   TCB signing certificate, whose chain ends in the trust anchor; root CA CRL and PCK CRL
   signed by their issuers; everything inside its validity window at ``at``;
2. the PCK chain in the quote ends in the trust anchor, each certificate valid at ``at``
   and not revoked;
3. the QE report is signed by the PCK leaf, and its REPORTDATA is
   SHA-256(attestation key ‖ QE auth data) ‖ 32 zero bytes;
4. the quote (header ‖ body) is signed by the attestation key;
5. the QE matches the QE identity, and the platform, TDX module and QE are matched to
   TCB levels, giving the merged TCB status and advisories.

Failures are collected as :class:`~tdxvm.attest.result.Reason` values rather than
raised. Only unusable input raises (:class:`~tdxvm.attest.errors.AttestError`).

:class:`QuoteVerifier` remembers the time-independent work (certificate and collateral
signatures, parsed JSON) so that verifying many quotes against the same collateral is
cheap; the time checks always run again.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from tdxvm.attest.chain import (
    CertStore,
    CheckedChain,
    CheckedCrl,
    Crl,
    TrustAnchor,
    cert_name,
    load_crl,
)
from tdxvm.attest.collateral import Collateral
from tdxvm.attest.errors import AttestError, CertificateError
from tdxvm.attest.pck import PckExtension, parse_pck_extension
from tdxvm.attest.quote import INTEL_QE_VENDOR_ID, Quote, parse_quote
from tdxvm.attest.result import CollateralFacts, CrlDates, IssuedItem, Reason, VerificationResult
from tdxvm.attest.tcbeval import evaluate_tcb
from tdxvm.attest.tcbinfo import QeIdentity, TcbInfo, parse_qe_identity, parse_tcb_info
from tdxvm.attest.verifiedcache import PCK_CHAIN, QE_REPORT, VerifiedCache, Window, pck_chain_key, qe_report_key

_SHA256 = ec.ECDSA(hashes.SHA256())


def _raw_sig_to_der(raw: bytes) -> bytes:
    return encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))


def utc_time(at: datetime) -> datetime:
    """A verification time in UTC; it must be timezone-aware."""
    if at.tzinfo is None:
        raise AttestError("verification time must be timezone-aware", code="usage")
    return at.astimezone(timezone.utc)


def _ecdsa_ok(key: ec.EllipticCurvePublicKey, raw_sig: bytes, data: bytes) -> bool:
    if len(raw_sig) != 64:
        return False
    try:
        key.verify(_raw_sig_to_der(raw_sig), data, _SHA256)
        return True
    except InvalidSignature:
        return False


def _p256_key(raw: bytes) -> ec.EllipticCurvePublicKey | None:
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + raw)
    except ValueError:
        return None


def _window(what: str, issue: datetime, next_update: datetime, at: datetime) -> list[Reason]:
    if at < issue:
        return [
            Reason(
                "collateral-not-yet-valid",
                f"{what} is not valid before {issue.isoformat()} (verification time {at.isoformat()})",
            )
        ]
    if at > next_update:
        return [
            Reason(
                "collateral-expired",
                f"{what} expired at {next_update.isoformat()} (verification time {at.isoformat()})",
            )
        ]
    return []


def _anchor_revoked(root_crl: CheckedCrl, anchor: x509.Certificate) -> list[Reason]:
    """The trust anchor listed in its own CRL (dcap-qvl checks the root against the CRLs too)."""
    if not root_crl.revokes(anchor):
        return []
    return [
        Reason(
            "trust-anchor-revoked",
            f"the root CA CRL lists the trust anchor {cert_name(anchor)} (serial {anchor.serial_number:x}) as "
            "revoked: nothing it issued (PCK chain, TCB signing certificate) can be trusted",
        )
    ]


@dataclass(frozen=True, slots=True)
class _CheckedCollateral:
    tcb_chain: CheckedChain
    qe_chain: CheckedChain
    pck_crl_chain: CheckedChain
    root_crl: CheckedCrl | None
    pck_crl: Crl
    tcb_info: TcbInfo | None
    qe_identity: QeIdentity | None
    reasons: tuple[Reason, ...]
    facts: CollateralFacts  # dates and TCB evaluation data numbers of the items whose signature verified

    def time_reasons(self, at: datetime) -> list[Reason]:
        out: list[Reason] = []
        for chain in (self.tcb_chain, self.qe_chain, self.pck_crl_chain):
            out += chain.time_reasons(at)
        if self.root_crl is not None:
            out += self.root_crl.time_reasons(at)
            out += _anchor_revoked(self.root_crl, self.tcb_chain.root)
            for chain in (self.tcb_chain, self.qe_chain, self.pck_crl_chain):
                out += chain.revocation_reasons([self.root_crl])
        if self.tcb_info is not None:
            out += _window("TCB info", self.tcb_info.issue_date, self.tcb_info.next_update, at)
        if self.qe_identity is not None:
            out += _window("QE identity", self.qe_identity.issue_date, self.qe_identity.next_update, at)
        return out


@dataclass(frozen=True, slots=True)
class _CheckedPck:
    chain: CheckedChain
    extension: PckExtension | None
    pck_crl: CheckedCrl
    reasons: tuple[Reason, ...]


def _facts(t: TcbInfo | None, q: QeIdentity | None) -> CollateralFacts:
    return CollateralFacts(
        tcb_info=None if t is None else IssuedItem(t.issue_date, t.next_update, t.tcb_evaluation_data_number),
        qe_identity=None if q is None else IssuedItem(q.issue_date, q.next_update, q.tcb_evaluation_data_number),
    )


def _with_pck_crl(facts: CollateralFacts, crl: CheckedCrl) -> CollateralFacts:
    """``facts`` with the PCK CRL's dates, when it verified."""
    if crl.reasons or crl.window is None:
        return facts
    return dataclasses.replace(facts, pck_crl=CrlDates(crl.window[0], crl.window[1]))


def _check_signed_json(
    text: str, signature: bytes, key: ec.EllipticCurvePublicKey | None, chain: CheckedChain, what: str
) -> list[Reason]:
    if key is None or not _ecdsa_ok(key, signature, text.encode()):
        return [
            Reason(
                f"{what.replace(' ', '-').lower()}-signature",
                f"{what} signature does not verify with {cert_name(chain.leaf)}",
            )
        ]
    return []


class QuoteVerifier:
    """Verifies TDX quotes against collateral; reuse one instance to verify many quotes.

    The caches hold checks of collateral, PCK chains and QE reports (one entry per
    platform, roughly); they are dropped whole once one holds ``cache_limit`` entries,
    so a long-running verifier's memory stays bounded.

    With ``verified_cache`` (:class:`~tdxvm.attest.verifiedcache.VerifiedCache`), the
    signature checks of the collateral, of the quote's PCK chain and of its QE report
    are also remembered on disk, so that a new verifier (a new process) verifying a
    quote from a known platform checks only the quote's own signature; the time and
    revocation checks run on every verification either way.
    """

    def __init__(
        self,
        *,
        trust_anchor: TrustAnchor | None = None,
        cache_limit: int = 1024,
        verified_cache: VerifiedCache | None = None,
    ) -> None:
        self.trust_anchor = trust_anchor or TrustAnchor.intel()
        self.cache_limit = cache_limit
        self.verified_cache = verified_cache
        self._reset()

    def _reset(self) -> None:
        """Forget every cached check (done when the caches reach ``cache_limit``)."""
        self._collateral: dict[Collateral, _CheckedCollateral] = {}
        self._pck: dict[tuple[bytes, bytes], _CheckedPck] = {}
        self._qe_reports: dict[tuple[bytes, bytes, bytes], bool] = {}
        self._certs = CertStore()

    # -- time-independent checks, cached -------------------------------------------

    def _vouched(
        self, c: Collateral, at: datetime, chains: tuple[list[x509.Certificate], ...], crls: tuple[Crl, Crl | None]
    ) -> tuple[dict[str, str], set[str]]:
        """The on-disk entry names of ``c``'s items, and the items an entry vouches for at
        ``at``; their signatures are then marked as checked in the certificate store."""
        if self.verified_cache is None:
            return {}, set()
        certs = self._certs
        keys, vouched = self.verified_cache.vouched(c, anchor_sha256=self.trust_anchor.sha256, at=at)
        tcb_certs, qe_certs, pck_crl_certs = chains
        pck_crl, root_ca_crl = crls
        if "tcb_info" in vouched:
            certs.vouch_chain(tcb_certs)
        if "qe_identity" in vouched:
            certs.vouch_chain(qe_certs)
        if "pck_crl" in vouched:
            certs.vouch_chain(pck_crl_certs)
            certs.vouch_crl(pck_crl, pck_crl_certs[0])
        if "root_ca_crl" in vouched and root_ca_crl is not None:  # read only when tcb_certs[-1] is the anchor
            certs.vouch_crl(root_ca_crl, tcb_certs[-1])
        return keys, vouched

    def _record_verified(self, checked: _CheckedCollateral, keys: dict[str, str], vouched: set[str]) -> None:
        """Remember on disk each item of the collateral whose signatures all verified."""
        if self.verified_cache is None or len(keys) <= 1:  # no cache, or one entry vouched for the whole set
            return
        ch = checked
        windows = {
            "tcb_info": None
            if ch.tcb_chain.reasons or ch.tcb_info is None
            else Window.of(ch.tcb_info.issue_date, ch.tcb_info.next_update, ch.tcb_chain.certs),
            "qe_identity": None
            if ch.qe_chain.reasons or ch.qe_identity is None
            else Window.of(ch.qe_identity.issue_date, ch.qe_identity.next_update, ch.qe_chain.certs),
            "pck_crl": None
            if ch.pck_crl_chain.reasons or self._certs.crl_problem(ch.pck_crl, ch.pck_crl_chain.leaf)
            else Window.of_crl(ch.pck_crl.crl, ch.pck_crl_chain.certs),
            "root_ca_crl": None
            if ch.root_crl is None or ch.root_crl.reasons
            else Window.of_crl(ch.root_crl.crl, ch.tcb_chain.certs[-1:]),
        }
        self.verified_cache.record_verified(keys, vouched, windows, anchor_sha256=self.trust_anchor.sha256)

    def _check_collateral(self, c: Collateral, at: datetime) -> _CheckedCollateral:
        cached = self._collateral.get(c)
        if cached is not None:
            return cached
        anchor = self.trust_anchor
        tcb_certs = self._certs.load_chain(c.tcb_info_issuer_chain, "TCB info issuer chain")
        qe_certs = self._certs.load_chain(c.qe_identity_issuer_chain, "QE identity issuer chain")
        pck_crl_certs = self._certs.load_chain(c.pck_crl_issuer_chain, "PCK CRL issuer chain")
        pck_crl = load_crl(c.pck_crl, "PCK CRL")
        # The root CA CRL is read only when the chain ends in the anchor that signs it.
        rooted = self._certs.sha256(tcb_certs[-1]) == anchor.sha256
        root_ca_crl = load_crl(c.root_ca_crl, "root CA CRL") if rooted else None
        keys, vouched = self._vouched(c, at, (tcb_certs, qe_certs, pck_crl_certs), (pck_crl, root_ca_crl))
        tcb_chain = self._certs.check_chain(tcb_certs, anchor=anchor, what="TCB info issuer chain")
        qe_chain = self._certs.check_chain(qe_certs, anchor=anchor, what="QE identity issuer chain")
        pck_crl_chain = self._certs.check_chain(pck_crl_certs, anchor=anchor, what="PCK CRL issuer chain")
        reasons = list(tcb_chain.reasons + qe_chain.reasons + pck_crl_chain.reasons)
        root_crl = None
        if root_ca_crl is not None:
            root_crl = self._certs.check_crl(root_ca_crl, tcb_chain.root, "root CA CRL")
            reasons += root_crl.reasons
        tcb_reasons = (
            []
            if "tcb_info" in vouched
            else _check_signed_json(
                c.tcb_info, c.tcb_info_signature, self._certs.public_key(tcb_chain.leaf), tcb_chain, "TCB info"
            )
        )
        qe_reasons = (
            []
            if "qe_identity" in vouched
            else _check_signed_json(
                c.qe_identity, c.qe_identity_signature, self._certs.public_key(qe_chain.leaf), qe_chain, "QE identity"
            )
        )
        reasons += tcb_reasons + qe_reasons
        tcb_info = None if tcb_reasons else parse_tcb_info(c.tcb_info)
        qe_identity = None if qe_reasons else parse_qe_identity(c.qe_identity)
        if tcb_info is not None and (tcb_info.id != "TDX" or tcb_info.version != 3):
            reasons.append(
                Reason("tcb-info-type", f"TCB info is {tcb_info.id} version {tcb_info.version}, expected TDX version 3")
            )
        if qe_identity is not None and (qe_identity.id != "TD_QE" or qe_identity.version not in (2, 3)):
            reasons.append(
                Reason(
                    "qe-identity-type",
                    f"QE identity is {qe_identity.id} version {qe_identity.version}, expected TD_QE version 2",
                )
            )
        checked = _CheckedCollateral(
            tcb_chain=tcb_chain,
            qe_chain=qe_chain,
            pck_crl_chain=pck_crl_chain,
            root_crl=root_crl,
            pck_crl=pck_crl,
            tcb_info=tcb_info,
            qe_identity=qe_identity,
            reasons=tuple(reasons),
            facts=_facts(tcb_info, qe_identity),
        )
        self._record_verified(checked, keys, vouched)
        self._collateral[c] = checked
        return checked

    def _check_pck(self, pem: bytes, coll: _CheckedCollateral, c: Collateral, at: datetime) -> _CheckedPck:
        key = (pem, c.pck_crl)
        cached = self._pck.get(key)
        if cached is not None:
            return cached
        certs = self._certs.load_chain(pem, "PCK certificate chain in the quote")
        reasons: list[Reason] = []
        if len(certs) < 2:
            raise CertificateError("PCK certificate chain in the quote: needs the PCK leaf, its CA and the root")
        entry = self._vouched_pck_chain(certs, at)
        chain = self._certs.check_chain(certs, anchor=self.trust_anchor, what="PCK certificate chain")
        if entry and not chain.reasons:
            self._record(PCK_CHAIN, entry, chain.windows)
        reasons += chain.reasons
        pck_crl = self._certs.check_crl(coll.pck_crl, certs[1], "PCK CRL")
        reasons += pck_crl.reasons
        try:
            extension: PckExtension | None = parse_pck_extension(certs[0])
        except CertificateError as exc:
            extension = None
            reasons.append(Reason("pck-extension", str(exc)))
        checked = _CheckedPck(chain=chain, extension=extension, pck_crl=pck_crl, reasons=tuple(reasons))
        self._pck[key] = checked
        return checked

    # -- per-platform entries of the verified cache (PCK chain, QE report) --------------

    def _vouched_pck_chain(self, certs: list[x509.Certificate], at: datetime) -> str | None:
        """The on-disk entry name of the quote's PCK chain, or None when an entry vouches
        for it at ``at`` (its links are then marked as checked) or there is no cache."""
        if self.verified_cache is None:
            return None
        entry = pck_chain_key([self._certs.sha256(cert) for cert in certs], self.trust_anchor.sha256)
        if not self._entry_vouches(PCK_CHAIN, entry, at):
            return entry
        self._certs.vouch_chain(certs)
        return None

    def _entry_vouches(self, item: str, entry: str | None, at: datetime) -> bool:
        cache = self.verified_cache
        return (
            cache is not None
            and entry is not None
            and cache.lookup(item, entry, anchor_sha256=self.trust_anchor.sha256, at=at)
        )

    def _record(self, item: str, entry: str, spans: tuple[tuple[datetime, datetime], ...]) -> None:
        """Remember on disk that ``item`` verified, for the time inside every span."""
        window = Window.overlap(spans)
        if self.verified_cache is not None and window is not None:
            self.verified_cache.record(item, entry, anchor_sha256=self.trust_anchor.sha256, window=window)

    def _qe_report_signed(self, leaf: x509.Certificate, quote: Quote, at: datetime) -> bool:
        sig = quote.signature
        leaf_sha256 = self._certs.sha256(leaf)
        key = (leaf_sha256, sig.qe_report.raw, sig.qe_report_signature)
        ok = self._qe_reports.get(key)
        if ok is None:
            entry = None if self.verified_cache is None else qe_report_key(*key, self.trust_anchor.sha256)
            ok = self._entry_vouches(QE_REPORT, entry, at)
            if not ok:
                pub = self._certs.public_key(leaf)
                ok = pub is not None and _ecdsa_ok(pub, sig.qe_report_signature, sig.qe_report.raw)
                if ok and entry is not None:
                    self._record(QE_REPORT, entry, (self._certs.info(leaf).window,))  # the leaf's validity
            self._qe_reports[key] = ok
        return ok

    # -- verification ----------------------------------------------------------------

    def verify(self, quote: bytes | Quote, collateral: Collateral, *, at: datetime) -> VerificationResult:
        """Verify ``quote`` against ``collateral`` as of ``at`` (timezone-aware)."""
        at = utc_time(at)
        if max(len(self._collateral), len(self._pck), len(self._qe_reports)) >= self.cache_limit:
            self._reset()
        q = quote if isinstance(quote, Quote) else parse_quote(quote)
        reasons: list[Reason] = []
        if q.header.qe_vendor_id != INTEL_QE_VENDOR_ID:
            reasons.append(Reason("qe-vendor", f"QE vendor ID {q.header.qe_vendor_id.hex()} is not Intel's"))

        coll = self._check_collateral(collateral, at)
        reasons += coll.reasons
        reasons += coll.time_reasons(at)

        try:
            pck = self._check_pck(q.signature.pck_chain_pem, coll, collateral, at)
        except CertificateError as exc:
            reasons.append(Reason("pck-chain", str(exc)))
            return VerificationResult(
                quote=q, at=at, fmspc=None, tcb=None, reasons=tuple(reasons), collateral=coll.facts
            )
        reasons += pck.reasons
        reasons += pck.chain.time_reasons(at)
        reasons += pck.pck_crl.time_reasons(at)
        crls = [pck.pck_crl] + ([coll.root_crl] if coll.root_crl is not None else [])
        reasons += pck.chain.revocation_reasons(crls)

        sig = q.signature
        if not self._qe_report_signed(pck.chain.leaf, q, at):
            reasons.append(
                Reason("qe-report-signature", "QE report signature does not verify with the PCK certificate")
            )
        expected = hashlib.sha256(sig.attestation_key + sig.qe_auth_data).digest() + bytes(32)
        if sig.qe_report.report_data != expected:
            reasons.append(
                Reason("qe-report-data", "QE report data is not SHA-256(attestation key ‖ QE auth data) ‖ zeros")
            )
        att_key = _p256_key(sig.attestation_key)
        if att_key is None:
            reasons.append(Reason("attestation-key", "attestation key is not a P-256 point"))
        elif not _ecdsa_ok(att_key, sig.signature, q.signed_data):
            reasons.append(Reason("quote-signature", "quote signature does not verify with the attestation key"))

        fmspc = pck.extension.fmspc.hex().upper() if pck.extension else None
        tcb = None
        if coll.tcb_info is not None and coll.qe_identity is not None and pck.extension is not None:
            tcb_reasons, tcb = evaluate_tcb(coll.tcb_info, coll.qe_identity, pck.extension, q)
            reasons += tcb_reasons
        return VerificationResult(
            quote=q,
            at=at,
            fmspc=fmspc,
            tcb=tcb if not reasons else None,
            reasons=tuple(reasons),
            collateral=_with_pck_crl(coll.facts, pck.pck_crl),
        )


def verify_quote(
    quote: bytes | Quote,
    collateral: Collateral,
    *,
    at: datetime,
    trust_anchor: TrustAnchor | None = None,
) -> VerificationResult:
    """One-shot verification; see :class:`QuoteVerifier`."""
    return QuoteVerifier(trust_anchor=trust_anchor).verify(quote, collateral, at=at)
