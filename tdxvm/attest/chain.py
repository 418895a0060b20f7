"""Certificate chains and CRLs of Intel's attestation PKI, checked at an explicit time.

The chains are short and fixed ("Intel SGX PCK Certificate and CRL Profile"): PCK leaf →
PCK Platform/Processor CA → Intel SGX Root CA, and TCB Signing → Root CA. Each
certificate must be issued (name and ECDSA signature) by the next, be inside its
validity window, and not be revoked by its issuer's CRL; the last must be the trust
anchor. Signature checks are time-independent and done once per chain
(:class:`CheckedChain`); the time checks run at every verification.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtensionOID

from tdxvm.attest.der import certificate_parts, crl_parts
from tdxvm.attest.errors import CertificateError
from tdxvm.attest.pck import load_dated_certificate, parse_pem_chain, pem_block_der, pem_blocks
from tdxvm.attest.result import Reason

INTEL_SGX_ROOT_CA_SHA256 = bytes.fromhex("44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3")


@dataclass(frozen=True, slots=True)
class TrustAnchor:
    """The root CA that every chain must end in, pinned by the SHA-256 of its DER.

    ``ca``: what the anchor's basic constraints say (see :func:`_is_ca`), when known
    beforehand; the hash pins the certificate's bytes, so this is a fact about it, and
    a chain's check then does not decode the anchor's extensions to ask again.
    """

    sha256: bytes
    name: str
    ca: bool | None = field(default=None, compare=False)

    @classmethod
    def intel(cls) -> TrustAnchor:
        return cls(sha256=INTEL_SGX_ROOT_CA_SHA256, name="Intel SGX Root CA", ca=True)

    @classmethod
    def from_pem(cls, pem: bytes | str) -> TrustAnchor:
        cert = parse_pem_chain(pem, "root CA")[0]
        return cls.from_certificate(cert)

    @classmethod
    def from_der(cls, der: bytes) -> TrustAnchor:
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError as exc:
            raise CertificateError(f"root CA: not a DER certificate: {exc}") from None
        return cls.from_certificate(cert)

    @classmethod
    def from_certificate(cls, cert: x509.Certificate) -> TrustAnchor:
        return cls(sha256=der_sha256(cert), name=cert_name(cert), ca=_is_ca(cert))


def der_sha256(cert: x509.Certificate) -> bytes:
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).digest()


def cert_name(cert: x509.Certificate) -> str:
    """The subject for messages; never raises, even on a malformed name."""
    try:
        return cert.subject.rfc4514_string()
    except ValueError:
        return "<certificate with a malformed subject>"


def _is_ca(cert: x509.Certificate) -> bool:
    """Whether the certificate's basic constraints say CA (malformed extensions: no)."""
    try:
        return bool(cert.extensions.get_extension_for_oid(ExtensionOID.BASIC_CONSTRAINTS).value.ca)
    except (x509.ExtensionNotFound, x509.DuplicateExtension, x509.UnsupportedGeneralNameType, ValueError):
        return False


@dataclass(frozen=True, slots=True)
class CheckedChain:
    """A chain whose names, signatures and anchor were checked (time-independent)."""

    what: str
    certs: tuple[x509.Certificate, ...]
    hashes: tuple[bytes, ...]
    reasons: tuple[Reason, ...]
    windows: tuple[tuple[datetime, datetime], ...] = ()  # each certificate's validity, read once
    # revocation_reasons by the CRL objects asked about; the value pins them, so their ids stay theirs
    _revocation: dict[tuple[int, ...], tuple[tuple[CheckedCrl, ...], tuple[Reason, ...]]] = field(
        default_factory=dict, compare=False, repr=False
    )

    @property
    def leaf(self) -> x509.Certificate:
        return self.certs[0]

    @property
    def root(self) -> x509.Certificate:
        return self.certs[-1]

    def time_reasons(self, at: datetime) -> list[Reason]:
        out = []
        windows = self.windows or tuple((c.not_valid_before_utc, c.not_valid_after_utc) for c in self.certs)
        for cert, (not_before, not_after) in zip(self.certs, windows, strict=True):
            if at < not_before:
                out.append(
                    Reason(
                        "cert-not-yet-valid",
                        f"{self.what}: {cert_name(cert)} is not valid before {not_before.isoformat()}",
                    )
                )
            elif at > not_after:
                out.append(Reason("cert-expired", f"{self.what}: {cert_name(cert)} expired at {not_after.isoformat()}"))
        return out

    def revocation_reasons(self, crls: list[CheckedCrl]) -> list[Reason]:
        """Every certificate below the root must be covered by a CRL of its issuer."""
        key = tuple(map(id, crls))
        known = self._revocation.get(key)
        if known is None:
            known = self._revocation[key] = (tuple(crls), tuple(self._revocation_reasons(crls)))
        return list(known[1])

    def _revocation_reasons(self, crls: list[CheckedCrl]) -> list[Reason]:
        out = []
        by_issuer: dict[bytes, CheckedCrl] = {}
        for c in reversed(crls):  # the first CRL of an issuer wins
            by_issuer[c.issuer_sha256] = c
        for cert, issuer, issuer_hash in zip(self.certs[:-1], self.certs[1:], self.hashes[1:], strict=True):
            crl = by_issuer.get(issuer_hash)
            if crl is None:
                out.append(
                    Reason("crl-missing", f"{self.what}: no CRL from {cert_name(issuer)} to check {cert_name(cert)}")
                )
            elif crl.revokes(cert):
                out.append(
                    Reason("cert-revoked", f"{self.what}: {cert_name(cert)} (serial {cert.serial_number:x}) is revoked")
                )
        return out


class _CertInfo:
    """What the verifier reads from one certificate, each part decoded on first use.

    A certificate whose signatures a verified-collateral entry vouches for is never
    decoded further than its hash. A malformed signed body raises
    :class:`CertificateError` where it is first read; a public key that is malformed or
    not EC reads as ``None``, which no signature check accepts.
    """

    __slots__ = ("cert", "sha256", "_der", "_what", "_parts", "_key", "_key_read", "_window", "_ca")

    def __init__(
        self, cert: x509.Certificate, der: bytes, what: str, window: tuple[datetime, datetime] | None = None
    ) -> None:
        self.cert = cert
        self.sha256 = hashlib.sha256(der).digest()
        self._der, self._what = der, what
        self._parts: tuple[bytes, bytes, bytes] | None = None
        self._key: ec.EllipticCurvePublicKey | None = None
        self._key_read = False
        self._window = window
        self._ca: bool | None = None

    @property
    def window(self) -> tuple[datetime, datetime]:
        """(notBefore, notAfter), read once (each read of the property makes new datetimes)."""
        if self._window is None:
            self._window = (self.cert.not_valid_before_utc, self.cert.not_valid_after_utc)
        return self._window

    def _signed_body(self) -> tuple[bytes, bytes, bytes]:
        if self._parts is None:
            self._parts = certificate_parts(self._der, self._what)
        return self._parts

    @property
    def tbs(self) -> bytes:
        return self._signed_body()[0]

    @property
    def issuer_name(self) -> bytes:
        return self._signed_body()[1]

    @property
    def subject_name(self) -> bytes:
        return self._signed_body()[2]

    @property
    def ca(self) -> bool:
        if self._ca is None:
            self._ca = _is_ca(self.cert)
        return self._ca

    def known_ca(self, ca: bool) -> None:
        """Take the CA flag from the trust anchor this certificate is (by its hash)."""
        self._ca = ca

    @property
    def key(self) -> ec.EllipticCurvePublicKey | None:
        if not self._key_read:
            try:
                key = self.cert.public_key()
            except (ValueError, UnsupportedAlgorithm):
                key = None
            self._key = key if isinstance(key, ec.EllipticCurvePublicKey) else None
            self._key_read = True
        return self._key


_UNCHECKED = object()


class CertStore:
    """Parsed certificates and checked signatures, remembered across chains and quotes.

    The same root, PCK CA and TCB signing certificates appear in several chains of the
    collateral and in every quote: each is parsed, hashed and signature-checked once.
    Every cache is keyed by the SHA-256 of a certificate's whole DER: two certificates
    that share a signature value but differ anywhere else are different certificates.
    """

    def __init__(self) -> None:
        self._chains: dict[bytes | str, tuple[x509.Certificate, ...]] = {}  # by the exact PEM text
        self._blocks: dict[bytes, x509.Certificate] = {}
        self._info: dict[int, _CertInfo] = {}  # id(cert); the entry holds the cert, pinning its id
        self._issued: dict[tuple[bytes, bytes], str | None] = {}
        self._crl_checked: dict[tuple[bytes, bytes], str | None] = {}

    def load_chain(self, pem: bytes | str, what: str) -> list[x509.Certificate]:
        """The certificates of a PEM chain, leaf first; the same text (the TCB info's and
        the QE identity's issuer chains, usually) is read once."""
        known = self._chains.get(pem)
        if known is not None:
            return list(known)
        out = []
        for i, block in enumerate(pem_blocks(pem, what)):
            cert = self._blocks.get(block)
            if cert is None:
                der = pem_block_der(block, what, i)
                cert, window = load_dated_certificate(der, what, i)
                self._info[id(cert)] = _CertInfo(cert, der, f"{what}: certificate {i}", window)
                self._blocks[block] = cert
            out.append(cert)
        self._chains[pem] = tuple(out)
        return out

    def _remember(self, cert: x509.Certificate, der: bytes, what: str) -> _CertInfo:
        info = _CertInfo(cert, der, what)
        self._info[id(cert)] = info
        return info

    def info(self, cert: x509.Certificate) -> _CertInfo:
        info = self._info.get(id(cert))
        if info is None or info.cert is not cert:  # not loaded by load_chain (a caller's certificate)
            info = self._remember(cert, cert.public_bytes(Encoding.DER), cert_name(cert))
        return info

    def sha256(self, cert: x509.Certificate) -> bytes:
        return self.info(cert).sha256

    def public_key(self, cert: x509.Certificate) -> ec.EllipticCurvePublicKey | None:
        """The certificate's EC public key (None for any other kind of key)."""
        return self.info(cert).key

    def issuance_problem(self, cert: x509.Certificate, issuer: x509.Certificate) -> str | None:
        return self._issuance(self.info(cert), self.info(issuer))

    def _issuance(self, c: _CertInfo, i: _CertInfo) -> str | None:
        key = (c.sha256, i.sha256)
        problem = self._issued.get(key, _UNCHECKED)
        if problem is _UNCHECKED:
            problem = self._issued[key] = self._issuance_problem(c, i)
        return problem  # type: ignore[return-value]

    @staticmethod
    def _issuance_problem(c: _CertInfo, i: _CertInfo) -> str | None:
        if not i.ca:
            return f"{cert_name(i.cert)} issued {cert_name(c.cert)} but is not a CA"
        if i.key is None:
            return f"{cert_name(i.cert)} does not have an EC key"
        if c.issuer_name != i.subject_name:
            return f"{cert_name(c.cert)} names another issuer than {cert_name(i.cert)}"
        if not _ecdsa_signed(i.key, c.cert.signature, c.tbs, c.cert.signature_algorithm_oid):
            return f"{cert_name(c.cert)} is not validly issued by {cert_name(i.cert)} (bad signature)"
        return None

    def vouch_chain(self, certs: list[x509.Certificate] | tuple[x509.Certificate, ...]) -> None:
        """Record that every certificate of ``certs`` is validly issued by the next one,
        without checking: for a chain whose check a verified-collateral cache entry
        (:mod:`tdxvm.attest.verifiedcache`) remembers. Keys are whole-DER hashes."""
        for cert, issuer in zip(certs[:-1], certs[1:], strict=True):
            self._issued[(self.sha256(cert), self.sha256(issuer))] = None

    def vouch_crl(self, crl: Crl, issuer: x509.Certificate) -> None:
        """Record, without checking, that ``issuer`` issued and signed ``crl`` (see :meth:`vouch_chain`)."""
        self._crl_checked[(crl.sha256, self.sha256(issuer))] = None

    def check_chain(self, certs: list[x509.Certificate], *, anchor: TrustAnchor, what: str) -> CheckedChain:
        """Check issuer names, CA flags and ECDSA signatures up to the anchor.

        The anchor is pinned by its hash, so its self-signature proves nothing and is not
        checked; a chain that does not end in the anchor is refused regardless.
        """
        reasons: list[Reason] = []
        infos = [self.info(c) for c in certs]
        hashes = tuple([i.sha256 for i in infos])
        if hashes[-1] == anchor.sha256:
            if anchor.ca is not None:
                infos[-1].known_ca(anchor.ca)
        else:
            root = certs[-1]
            reasons.append(
                Reason(
                    "untrusted-root",
                    f"{what}: ends in {cert_name(root)} (SHA-256 {hashes[-1].hex()}), "
                    f"not the trust anchor {anchor.name}",
                )
            )
        for cert, issuer in zip(infos[:-1], infos[1:], strict=True):
            problem = self._issuance(cert, issuer)
            if problem is not None:
                code = "cert-not-ca" if "is not a CA" in problem else "cert-signature"
                reasons.append(Reason(code, f"{what}: {problem}"))
        windows = tuple([i.window for i in infos])
        return CheckedChain(what, tuple(certs), hashes, tuple(reasons), windows)

    def crl_problem(self, crl: Crl, issuer: x509.Certificate) -> str | None:
        """``"crl-issuer"``, ``"crl-signature"`` or ``None``: whether ``issuer`` issued ``crl``."""
        i = self.info(issuer)
        key = (crl.sha256, i.sha256)
        problem = self._crl_checked.get(key, _UNCHECKED)
        if problem is _UNCHECKED:
            problem = None
            if crl.issuer_name != i.subject_name:
                problem = "crl-issuer"
            elif i.key is None or not _ecdsa_signed(i.key, crl.crl.signature, crl.tbs, crl.crl.signature_algorithm_oid):
                problem = "crl-signature"
            self._crl_checked[key] = problem
        return problem  # type: ignore[return-value]

    def check_crl(self, crl: Crl, issuer: x509.Certificate, what: str) -> CheckedCrl:
        """Check that ``issuer`` issued and signed ``crl`` (its time window is separate)."""
        problem = self.crl_problem(crl, issuer)
        reasons = []
        if problem == "crl-issuer":
            reasons.append(Reason("crl-issuer", f"{what} is not issued by {cert_name(issuer)}"))
        elif problem == "crl-signature":
            reasons.append(Reason("crl-signature", f"{what}: signature does not verify with {cert_name(issuer)}"))
        return CheckedCrl(
            what=what, crl=crl.crl, issuer_sha256=self.sha256(issuer), reasons=tuple(reasons), window=crl.window
        )


_ECDSA: dict[x509.ObjectIdentifier, ec.ECDSA] = {
    x509.SignatureAlgorithmOID.ECDSA_WITH_SHA256: ec.ECDSA(hashes.SHA256()),
    x509.SignatureAlgorithmOID.ECDSA_WITH_SHA384: ec.ECDSA(hashes.SHA384()),
    x509.SignatureAlgorithmOID.ECDSA_WITH_SHA512: ec.ECDSA(hashes.SHA512()),
}


def _ecdsa_signed(key: ec.EllipticCurvePublicKey, signature: bytes, data: bytes, oid: x509.ObjectIdentifier) -> bool:
    """Whether ``signature`` (DER ECDSA, algorithm ``oid``) over ``data`` verifies with ``key``."""
    algorithm = _ECDSA.get(oid)
    if algorithm is None:
        return False
    try:
        key.verify(signature, data, algorithm)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True, slots=True)
class CheckedCrl:
    """A CRL whose signature was checked against the certificate that issued it."""

    what: str
    crl: x509.CertificateRevocationList
    issuer_sha256: bytes
    reasons: tuple[Reason, ...]
    window: tuple[datetime, datetime | None] | None = None  # (thisUpdate, nextUpdate), read once
    _revoked: dict[int, bool] = field(default_factory=dict, compare=False, repr=False)  # serial -> listed

    def revokes(self, cert: x509.Certificate) -> bool:
        """Whether the CRL lists ``cert``; a CRL whose entries cannot be read revokes all."""
        serial = cert.serial_number
        listed = self._revoked.get(serial)
        if listed is None:
            try:
                listed = self.crl.get_revoked_certificate_by_serial_number(serial) is not None
            except ValueError:
                listed = True
            self._revoked[serial] = listed
        return listed

    def time_reasons(self, at: datetime) -> list[Reason]:
        last, nxt = self.window or (self.crl.last_update_utc, self.crl.next_update_utc)
        if at < last:
            return [Reason("crl-not-yet-valid", f"{self.what} is not valid before {last.isoformat()}")]
        if nxt is None or at > nxt:
            when = nxt.isoformat() if nxt else "(no nextUpdate)"
            return [Reason("crl-expired", f"{self.what} expired at {when}")]
        return []


@dataclass(frozen=True, slots=True)
class Crl:
    """A parsed CRL with its signed body and issuer name as DER, and the SHA-256 of its DER."""

    crl: x509.CertificateRevocationList
    tbs: bytes
    issuer_name: bytes
    sha256: bytes
    window: tuple[datetime, datetime | None] | None = None  # (thisUpdate, nextUpdate)


def load_crl(der: bytes, what: str) -> Crl:
    """Load a DER (or PEM) CRL and every field the verifier reads from it."""
    pem = der.lstrip().startswith(b"-----BEGIN")
    try:
        crl = x509.load_pem_x509_crl(der) if pem else x509.load_der_x509_crl(der)
        window = (crl.last_update_utc, crl.next_update_utc)
        _ = (crl.signature, crl.signature_algorithm_oid)
        raw = crl.public_bytes(Encoding.DER) if pem else der
    except (ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion) as exc:
        raise CertificateError(f"{what}: not a usable {'PEM' if pem else 'DER'} CRL: {exc}") from None
    tbs, issuer = crl_parts(raw, what)
    return Crl(crl=crl, tbs=tbs, issuer_name=issuer, sha256=hashlib.sha256(raw).digest(), window=window)
