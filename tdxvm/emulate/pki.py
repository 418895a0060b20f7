"""The emulated Intel SGX PKI: root CA, PCK CA, PCK leaf, TCB signing certificate, CRLs.

Certificates copy the profile of "Intel SGX PCK Certificate and Certificate Revocation
List Profile Specification" (ECDSA P-256 with SHA-256, X.509 v3): the same extensions,
criticality and key usages as Intel's production certificates, so that a verifier
written for Intel's chain (and dcap-qvl, which uses webpki) accepts them. The names are
Intel's with "tdxvm Emulated" in front and an organisation that says so, keeping the
words "Platform"/"Processor" that verifiers read to pick the PCK CRL.

Every time is an argument; nothing here reads the clock. Signatures are deterministic
(RFC 6979) and serial numbers are derived from the subject key, so the same keys and
windows give byte-identical certificates and CRLs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tdxvm.emulate.sgxext import SgxExtension

ROOT_CA_CN = "tdxvm Emulated SGX Root CA"
PCK_PLATFORM_CA_CN = "tdxvm Emulated SGX PCK Platform CA"
PCK_PROCESSOR_CA_CN = "tdxvm Emulated SGX PCK Processor CA"
PCK_CERT_CN = "tdxvm Emulated SGX PCK Certificate"
TCB_SIGNING_CN = "tdxvm Emulated SGX TCB Signing"
ORGANIZATION = "tdxvm emulated TDX platform (not Intel)"
# Where Intel's certificates name their CRLs; ".invalid" (RFC 2606) never resolves.
CRL_BASE_URL = "https://emulated-pcs.tdxvm.invalid/sgx/certification/v4"

_SHA256 = hashes.SHA256()
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def ensure_utc(at: datetime, what: str = "time") -> datetime:
    """``at`` in UTC, whole seconds (X.509 and Intel's JSON carry no fractions)."""
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware (got naive {at.isoformat()})")
    return at.astimezone(timezone.utc).replace(microsecond=0)


@dataclass(frozen=True, slots=True)
class Validity:
    """A time window: certificate notBefore/notAfter, CRL thisUpdate/nextUpdate, or
    collateral issueDate/nextUpdate."""

    not_before: datetime
    not_after: datetime

    def __post_init__(self) -> None:
        object.__setattr__(self, "not_before", ensure_utc(self.not_before, "not_before"))
        object.__setattr__(self, "not_after", ensure_utc(self.not_after, "not_after"))

    @classmethod
    def around(cls, at: datetime, *, before: timedelta, after: timedelta) -> Validity:
        """``[at - before, at + after]``; a negative ``after`` gives a window already over
        at ``at``, a negative ``before`` one that has not begun."""
        at = ensure_utc(at)
        return cls(at - before, at + after)

    def contains(self, at: datetime) -> bool:
        return self.not_before <= ensure_utc(at) <= self.not_after


def derive_key(seed: bytes, role: str) -> ec.EllipticCurvePrivateKey:
    """A P-256 key derived from ``seed`` and a role name (reproducible test keys)."""
    digest = hashlib.sha512(b"tdxvm-emulate-key\x00" + role.encode() + b"\x00" + seed).digest()
    scalar = int.from_bytes(digest, "big") % (_P256_ORDER - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP256R1())


def generate_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _spki(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def derive_serial(role: str, key: ec.EllipticCurvePublicKey, extra: bytes = b"") -> int:
    """A positive serial number below 2**152, fixed by role, subject key and ``extra``."""
    digest = hashlib.sha256(b"tdxvm-emulate-serial\x00" + role.encode() + b"\x00" + _spki(key) + extra)
    return (int.from_bytes(digest.digest()[:19], "big") >> 1) or 1


def emulated_name(common_name: str) -> x509.Name:
    """Intel's subject layout (CN, O, L, ST, C) with an organisation marking emulation."""
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.LOCALITY_NAME, "Emulated"),
            x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "NA"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "XX"),
        ]
    )


def _key_usage(*, sign: bool = False, ca: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=sign,
        content_commitment=sign,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _crl_point(url: str) -> x509.CRLDistributionPoints:
    uri = x509.UniformResourceIdentifier(url)
    return x509.CRLDistributionPoints([x509.DistributionPoint([uri], None, None, None)])


def _issue(
    *,
    subject: x509.Name,
    subject_key: ec.EllipticCurvePublicKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    serial: int,
    validity: Validity,
    ca_path_length: int | None,
    is_ca: bool,
    crl_url: str,
    extra: Sequence[x509.ExtensionType] = (),
) -> x509.Certificate:
    issuer_public = issuer_key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer is not None else subject)
        .public_key(subject_key)
        .serial_number(serial)
        .not_valid_before(validity.not_before)
        .not_valid_after(validity.not_after)
        # Intel's order: AKI, CRL distribution point, SKI, key usage, basic constraints.
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public), False)
        .add_extension(_crl_point(crl_url), False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_key), False)
        .add_extension(_key_usage(sign=not is_ca, ca=is_ca), True)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=ca_path_length), True)
    )
    for ext in extra:
        builder = builder.add_extension(ext, False)  # the SGX extension is non-critical
    return builder.sign(issuer_key, _SHA256, ecdsa_deterministic=True)


def issue_root_ca(*, key: ec.EllipticCurvePrivateKey, validity: Validity) -> x509.Certificate:
    """Self-signed root ("Intel SGX Root CA" profile: path length 1, keyCertSign+cRLSign)."""
    return _issue(
        subject=emulated_name(ROOT_CA_CN),
        subject_key=key.public_key(),
        issuer=None,
        issuer_key=key,
        serial=derive_serial("root-ca", key.public_key()),
        validity=validity,
        ca_path_length=1,
        is_ca=True,
        crl_url=f"{CRL_BASE_URL}/rootcacrl",
    )


def issue_pck_ca(
    *,
    key: ec.EllipticCurvePublicKey,
    root: x509.Certificate,
    root_key: ec.EllipticCurvePrivateKey,
    validity: Validity,
    kind: str = "platform",
) -> x509.Certificate:
    """The intermediate ("Intel SGX PCK Platform CA" or "... Processor CA", path length 0)."""
    if kind not in ("platform", "processor"):
        raise ValueError(f"PCK CA kind must be 'platform' or 'processor', not {kind!r}")
    cn = PCK_PLATFORM_CA_CN if kind == "platform" else PCK_PROCESSOR_CA_CN
    return _issue(
        subject=emulated_name(cn),
        subject_key=key,
        issuer=root,
        issuer_key=root_key,
        serial=derive_serial(f"pck-ca-{kind}", key),
        validity=validity,
        ca_path_length=0,
        is_ca=True,
        crl_url=f"{CRL_BASE_URL}/rootcacrl",
    )


def pck_ca_kind(ca: x509.Certificate) -> str:
    """``"platform"`` or ``"processor"`` from the CA's common name."""
    cn = str(ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
    return "platform" if "Platform" in cn else "processor"


def issue_pck_cert(
    *,
    key: ec.EllipticCurvePublicKey,
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    validity: Validity,
    extension: SgxExtension,
) -> x509.Certificate:
    """A PCK leaf ("Intel SGX PCK Certificate") carrying the SGX extension."""
    encoded = extension.encode()
    return _issue(
        subject=emulated_name(PCK_CERT_CN),
        subject_key=key,
        issuer=ca,
        issuer_key=ca_key,
        serial=derive_serial("pck", key, encoded),
        validity=validity,
        ca_path_length=None,
        is_ca=False,
        crl_url=f"{CRL_BASE_URL}/pckcrl?ca={pck_ca_kind(ca)}&encoding=der",
        extra=[extension.to_x509()],
    )


def issue_tcb_signing_cert(
    *,
    key: ec.EllipticCurvePublicKey,
    root: x509.Certificate,
    root_key: ec.EllipticCurvePrivateKey,
    validity: Validity,
) -> x509.Certificate:
    """The certificate whose key signs TCB info and QE identity ("Intel SGX TCB Signing")."""
    return _issue(
        subject=emulated_name(TCB_SIGNING_CN),
        subject_key=key,
        issuer=root,
        issuer_key=root_key,
        serial=derive_serial("tcb-signing", key),
        validity=validity,
        ca_path_length=None,
        is_ca=False,
        crl_url=f"{CRL_BASE_URL}/rootcacrl",
    )


def issue_crl(
    *,
    issuer: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    validity: Validity,
    revoked_serials: Iterable[int] = (),
    crl_number: int = 1,
) -> bytes:
    """A DER CRL in Intel's profile: v2, CRL number and AKI, reason keyCompromise on each
    entry, revocation date = thisUpdate. ``validity`` is (thisUpdate, nextUpdate)."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(validity.not_before)
        .next_update(validity.not_after)
        .add_extension(x509.CRLNumber(crl_number), False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False)
    )
    for serial in dict.fromkeys(revoked_serials):
        entry = (
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(validity.not_before)
            .add_extension(x509.CRLReason(x509.ReasonFlags.key_compromise), False)
            .build()
        )
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(issuer_key, _SHA256, ecdsa_deterministic=True)
    return crl.public_bytes(serialization.Encoding.DER)


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def pem_chain(*certs: x509.Certificate) -> str:
    """Concatenated PEM, in the order given (leaf first, as Intel sends chains)."""
    return "".join(pem(c) for c in certs)
