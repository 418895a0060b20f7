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
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from tdxvm.attest.errors import CertificateError
from tdxvm.attest.pck import load_pem_block, parse_pem_chain, pem_blocks
from tdxvm.attest.result import Reason

INTEL_SGX_ROOT_CA_SHA256 = bytes.fromhex(
    "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
)


@dataclass(frozen=True, slots=True)
class TrustAnchor:
    """The root CA that every chain must end in, pinned by the SHA-256 of its DER."""

    sha256: bytes
    name: str

    @classmethod
    def intel(cls) -> TrustAnchor:
        return cls(sha256=INTEL_SGX_ROOT_CA_SHA256, name="Intel SGX Root CA")

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
        return cls(sha256=der_sha256(cert), name=cert.subject.rfc4514_string())


def der_sha256(cert: x509.Certificate) -> bytes:
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).digest()


def _cn(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string()


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


@dataclass(frozen=True, slots=True)
class CheckedChain:
    """A chain whose names, signatures and anchor were checked (time-independent)."""

    what: str
    certs: tuple[x509.Certificate, ...]
    hashes: tuple[bytes, ...]
    reasons: tuple[Reason, ...]

    @property
    def leaf(self) -> x509.Certificate:
        return self.certs[0]

    @property
    def root(self) -> x509.Certificate:
        return self.certs[-1]

    def time_reasons(self, at: datetime) -> list[Reason]:
        out = []
        for cert in self.certs:
            if at < cert.not_valid_before_utc:
                out.append(Reason("cert-not-yet-valid", f"{self.what}: {_cn(cert)} is not valid before {cert.not_valid_before_utc.isoformat()}"))
            elif at > cert.not_valid_after_utc:
                out.append(Reason("cert-expired", f"{self.what}: {_cn(cert)} expired at {cert.not_valid_after_utc.isoformat()}"))
        return out

    def revocation_reasons(self, crls: list[CheckedCrl]) -> list[Reason]:
        """Every certificate below the root must be covered by a CRL of its issuer."""
        out = []
        for cert, issuer, issuer_hash in zip(self.certs, self.certs[1:], self.hashes[1:]):
            crl = next((c for c in crls if c.issuer_sha256 == issuer_hash), None)
            if crl is None:
                out.append(Reason("crl-missing", f"{self.what}: no CRL from {_cn(issuer)} to check {_cn(cert)}"))
            elif crl.crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
                out.append(Reason("cert-revoked", f"{self.what}: {_cn(cert)} (serial {cert.serial_number:x}) is revoked"))
        return out


class CertStore:
    """Parsed certificates and checked signatures, remembered across chains and quotes.

    The same root, PCK CA and TCB signing certificates appear in several chains of the
    collateral and in every quote: each is parsed, hashed and signature-checked once.
    """

    def __init__(self) -> None:
        self._certs: dict[bytes, x509.Certificate] = {}
        # id(cert) -> (cert, SHA-256 of its whole DER). Holding the cert pins its id.
        # Every cache is keyed by that hash: two certificates that share a signature
        # value but differ anywhere else are different certificates.
        self._hashes: dict[int, tuple[x509.Certificate, bytes]] = {}
        self._issued: dict[tuple[bytes, bytes], str | None] = {}

    def load_chain(self, pem: bytes | str, what: str) -> list[x509.Certificate]:
        out = []
        for i, block in enumerate(pem_blocks(pem, what)):
            cert = self._certs.get(block)
            if cert is None:
                cert = self._certs[block] = load_pem_block(block, what, i)
            out.append(cert)
        return out

    def sha256(self, cert: x509.Certificate) -> bytes:
        entry = self._hashes.get(id(cert))
        if entry is None or entry[0] is not cert:
            entry = self._hashes[id(cert)] = (cert, der_sha256(cert))
        return entry[1]

    def issuance_problem(self, cert: x509.Certificate, issuer: x509.Certificate) -> str | None:
        key = (self.sha256(cert), self.sha256(issuer))
        if key not in self._issued:
            self._issued[key] = _issuance_problem(cert, issuer)
        return self._issued[key]

    def check_chain(self, certs: list[x509.Certificate], *, anchor: TrustAnchor, what: str) -> CheckedChain:
        """Check issuer names, CA flags and ECDSA signatures up to the anchor.

        The anchor is pinned by its hash, so its self-signature proves nothing and is not
        checked; a chain that does not end in the anchor is refused regardless.
        """
        reasons: list[Reason] = []
        hashes = tuple(self.sha256(c) for c in certs)
        if hashes[-1] != anchor.sha256:
            root = certs[-1]
            reasons.append(Reason("untrusted-root", f"{what}: ends in {_cn(root)} (SHA-256 {hashes[-1].hex()}), not the trust anchor {anchor.name}"))
        for cert, issuer in zip(certs, certs[1:]):
            problem = self.issuance_problem(cert, issuer)
            if problem is not None:
                code = "cert-not-ca" if "is not a CA" in problem else "cert-signature"
                reasons.append(Reason(code, f"{what}: {problem}"))
        return CheckedChain(what=what, certs=tuple(certs), hashes=hashes, reasons=tuple(reasons))

    def check_crl(self, crl: x509.CertificateRevocationList, issuer: x509.Certificate, what: str) -> CheckedCrl:
        """Check that ``issuer`` issued and signed ``crl`` (its time window is separate)."""
        reasons = []
        if crl.issuer != issuer.subject:
            reasons.append(Reason("crl-issuer", f"{what} is issued by {crl.issuer.rfc4514_string()}, expected {_cn(issuer)}"))
        else:
            key = issuer.public_key()
            if not isinstance(key, ec.EllipticCurvePublicKey) or not crl.is_signature_valid(key):
                reasons.append(Reason("crl-signature", f"{what}: signature does not verify with {_cn(issuer)}"))
        return CheckedCrl(what=what, crl=crl, issuer_sha256=self.sha256(issuer), reasons=tuple(reasons))


def _issuance_problem(cert: x509.Certificate, issuer: x509.Certificate) -> str | None:
    if not _is_ca(issuer):
        return f"{_cn(issuer)} issued {_cn(cert)} but is not a CA"
    try:
        if not isinstance(issuer.public_key(), ec.EllipticCurvePublicKey):
            return f"{_cn(issuer)} does not have an EC key"
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature) as exc:
        return f"{_cn(cert)} is not validly issued by {_cn(issuer)} ({exc or 'bad signature'})"
    return None


@dataclass(frozen=True, slots=True)
class CheckedCrl:
    """A CRL whose signature was checked against the certificate that issued it."""

    what: str
    crl: x509.CertificateRevocationList
    issuer_sha256: bytes
    reasons: tuple[Reason, ...]

    def time_reasons(self, at: datetime) -> list[Reason]:
        last, nxt = self.crl.last_update_utc, self.crl.next_update_utc
        if at < last:
            return [Reason("crl-not-yet-valid", f"{self.what} is not valid before {last.isoformat()}")]
        if nxt is None or at > nxt:
            when = nxt.isoformat() if nxt else "(no nextUpdate)"
            return [Reason("crl-expired", f"{self.what} expired at {when}")]
        return []


def load_crl(der: bytes, what: str) -> x509.CertificateRevocationList:
    """Load a DER (or PEM) CRL and every field the verifier reads from it."""
    pem = der.lstrip().startswith(b"-----BEGIN")
    try:
        crl = x509.load_pem_x509_crl(der) if pem else x509.load_der_x509_crl(der)
        crl.issuer, crl.last_update_utc, crl.next_update_utc
        for entry in crl:
            entry.serial_number
    except (ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion) as exc:
        raise CertificateError(f"{what}: not a usable {'PEM' if pem else 'DER'} CRL: {exc}") from None
    return crl
