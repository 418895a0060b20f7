"""The inference service's TLS identity, made inside the guest: an ECDSA P-256 key and a
self-signed certificate.

The key never leaves the TD: it is generated in a folder in TD memory
(``/run/tdxvm/tls``, a tmpfs), as ``key.pem`` (PKCS#8, mode 0600, folder 0700). A
service start reuses it only to serve what it was made for: the model event the service
measured into RTMR3 (model digest, name and output-changing settings), whose SHA-256 is
kept beside it in ``serves``. Serving another model makes a new key, so that a client
that attested one model and pinned its key can never reach another through that pin;
it must attest again, and the attestation then names the new model. Clients do not trust the
certificate through a CA: the service's attestation binds the certificate's
SubjectPublicKeyInfo (:func:`spki_der`) into the quote's REPORTDATA under the key name
``tls``, and clients pin that key (:mod:`tdxvm.provision.endpoint`). The certificate
names the service's DNS names and IP addresses (subjectAltName) for clients that also
check host names; it is issued again, with the same key, when the names change.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tdxvm.errors import TdxvmError
from tdxvm.fileio import write_atomic

DEFAULT_DIR = Path(
    "/run/tdxvm/tls"
)  # TD memory; where the image's service unit keeps it; the agent reads the cert there
KEY_FILE = "key.pem"
CERT_FILE = "cert.pem"
SERVES_FILE = "serves"  # SHA-256 (hex) of what the key serves, see the module doc
_VALIDITY = timedelta(days=10 * 365)


class TlsError(TdxvmError):
    """The TLS key or certificate folder is unusable; the message names the file."""

    code = "tls"


@dataclass(frozen=True, slots=True)
class TlsIdentity:
    """The service's key and certificate files and the parsed certificate."""

    key_path: Path
    cert_path: Path
    certificate: x509.Certificate
    made: bool = False  # the key was made by this call (none there, or it served something else)

    @property
    def spki(self) -> bytes:
        """The DER SubjectPublicKeyInfo the attestation binds (key name ``tls``)."""
        return spki_der(self.certificate)

    @property
    def spki_sha256(self) -> str:
        return hashlib.sha256(self.spki).hexdigest()


def spki_der(cert: x509.Certificate | bytes) -> bytes:
    """The DER SubjectPublicKeyInfo of a certificate (an ``x509.Certificate`` or its DER)."""
    if isinstance(cert, bytes | bytearray | memoryview):
        try:
            cert = x509.load_der_x509_certificate(bytes(cert))
        except ValueError as exc:
            raise TlsError(f"certificate: not DER X.509: {exc}") from None
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def subject_alt_names(names: Sequence[str]) -> list[x509.GeneralName]:
    """``names`` as subjectAltName entries: IP addresses as such, anything else as a DNS name."""
    out: list[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name.strip("[]"))))
            continue
        except ValueError:
            pass
        label = name.rstrip(".")
        if (
            not label
            or len(label) > 253
            or not all(
                part and len(part) <= 63 and part.replace("-", "").replace("*", "").isalnum() and part.isascii()
                for part in label.split(".")
            )
        ):
            raise TlsError(f"TLS name {name!r} is neither an IP address nor a DNS name")
        out.append(x509.DNSName(label.lower()))
    return out


def ensure_identity(
    folder: str | os.PathLike[str],
    names: Sequence[str] = ("localhost",),
    *,
    serves: bytes | None = None,
    at: datetime | None = None,
) -> TlsIdentity:
    """The TLS identity in ``folder``: the key found there, else a new P-256 key; its
    certificate found there if it is for that key and these ``names``, else a new one.

    With ``serves`` (what the service serves: its measured model event's payload) the key
    found there is used only if it was made to serve exactly that; otherwise a new key
    replaces it (see the module doc)."""
    path = Path(folder)
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise TlsError(f"{path}: cannot create the TLS folder: {exc.strerror or exc}") from None
    key_path, cert_path, serves_path = path / KEY_FILE, path / CERT_FILE, path / SERVES_FILE
    served = None if serves is None else hashlib.sha256(serves).hexdigest().encode() + b"\n"
    key = _load_key(key_path) if key_path.exists() else None
    if key is not None and served is not None and _read(serves_path) != served:
        key = None  # made to serve another model: never reused for this one
    made = key is None
    if key is None:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        _write(key_path, pem, 0o600)
    if served is not None and made:
        _write(serves_path, served, 0o644)  # after the key: a crash in between makes a new key again
    sans = subject_alt_names(names)
    cert = _load_cert(cert_path) if cert_path.exists() else None
    if cert is None or not _fits(cert, key, sans):
        cert = _issue(key, sans, at or datetime.now(timezone.utc))
        _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return TlsIdentity(key_path=key_path, cert_path=cert_path, certificate=cert, made=made)


def load_identity(folder: str | os.PathLike[str]) -> TlsIdentity | None:
    """The identity in ``folder`` without creating anything (the agent's view); None if absent.

    Only the certificate is read; the key must exist beside it and be private."""
    path = Path(folder)
    key_path, cert_path = path / KEY_FILE, path / CERT_FILE
    if not cert_path.exists() or not key_path.exists():
        return None
    _check_private(key_path)
    return TlsIdentity(key_path=key_path, cert_path=cert_path, certificate=_load_cert(cert_path))


def _check_private(path: Path) -> None:
    mode = path.stat().st_mode
    if mode & 0o077:
        raise TlsError(f"{path}: TLS key file mode is {stat.filemode(mode)}; it must be private (chmod 600)")


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    _check_private(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise TlsError(f"{path}: not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise TlsError(f"{path}: the TLS key must be ECDSA P-256")
    return key


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as exc:
        raise TlsError(f"{path}: not a PEM certificate: {exc}") from None


def _fits(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, sans: list[x509.GeneralName]) -> bool:
    if spki_der(cert) != key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        return False
    try:
        have = list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        have = []
    return sorted(map(repr, have)) == sorted(map(repr, sans))


def _issue(key: ec.EllipticCurvePrivateKey, sans: list[x509.GeneralName], at: datetime) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tdxvm inference service (attested key)")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(at - timedelta(days=1))
        .not_valid_after(at + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256())


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise TlsError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _write(path: Path, data: bytes, mode: int) -> None:
    try:
        write_atomic(path, data, mode=mode)
    except OSError as exc:
        raise TlsError(f"{path}: cannot write: {exc.strerror or exc}") from None
