"""The service's TLS identity: made inside the guest, private, reused for the same model,
re-issued for new names, replaced for another model."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tdxvm.guest.tls import CERT_FILE, KEY_FILE, SERVES_FILE, TlsError, ensure_identity, load_identity, spki_der


def test_new_identity_is_private_p256_with_the_names(tmp_path):
    folder = tmp_path / "tls"
    ident = ensure_identity(folder, ["inference.example", "10.0.2.15", "::1"])
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / KEY_FILE).stat().st_mode) == 0o600
    key = serialization.load_pem_private_key((folder / KEY_FILE).read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    cert = x509.load_pem_x509_certificate((folder / CERT_FILE).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["inference.example"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.2.15"), ipaddress.ip_address("::1")]
    cert.verify_directly_issued_by(cert)  # self-signed by the key beside it
    assert ident.spki == spki_der(cert) == spki_der(cert.public_bytes(serialization.Encoding.DER))
    assert ident.spki == key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert len(ident.spki_sha256) == 64


def test_identity_is_reused_and_reissued_for_new_names(tmp_path):
    first = ensure_identity(tmp_path, ["a.example"])
    pem = (tmp_path / CERT_FILE).read_bytes()
    again = ensure_identity(tmp_path, ["a.example"])
    assert again.spki == first.spki and (tmp_path / CERT_FILE).read_bytes() == pem
    renamed = ensure_identity(tmp_path, ["b.example"])
    assert renamed.spki == first.spki and (tmp_path / CERT_FILE).read_bytes() != pem  # same key, new certificate
    assert load_identity(tmp_path).spki == first.spki
    assert load_identity(tmp_path / "none") is None


def test_a_key_serves_one_model_only(tmp_path):
    """A pinned session must never outlive a model change: another model event, another key."""
    a = ensure_identity(tmp_path, serves=b'{"model":"a"}')
    assert a.made and stat.S_IMODE((tmp_path / SERVES_FILE).stat().st_mode) == 0o644
    again = ensure_identity(tmp_path, serves=b'{"model":"a"}')  # a restart serving the same model
    assert not again.made and again.spki == a.spki
    b = ensure_identity(tmp_path, serves=b'{"model":"b"}')
    assert b.made and b.spki != a.spki and load_identity(tmp_path).spki == b.spki
    back = ensure_identity(tmp_path, serves=b'{"model":"a"}')  # the first model again: not its old key either
    assert back.made and back.spki not in (a.spki, b.spki)
    assert not ensure_identity(tmp_path).made  # without a model to serve, the key there is kept


def test_a_key_without_its_record_is_not_reused_for_a_model(tmp_path):
    """A key made before it was bound to a model, or whose record was lost in a crash, is replaced."""
    old = ensure_identity(tmp_path)
    fresh = ensure_identity(tmp_path, serves=b"m")
    assert fresh.made and fresh.spki != old.spki
    (tmp_path / SERVES_FILE).unlink()
    assert ensure_identity(tmp_path, serves=b"m").spki != fresh.spki


def test_refusals(tmp_path):
    ensure_identity(tmp_path)
    (tmp_path / KEY_FILE).chmod(0o644)
    with pytest.raises(TlsError, match="must be private"):
        ensure_identity(tmp_path)
    with pytest.raises(TlsError, match="must be private"):
        load_identity(tmp_path)
    with pytest.raises(TlsError, match="neither an IP address nor a DNS name"):
        ensure_identity(tmp_path / "x", ["bad name!"])
    p384_dir = tmp_path / "p384"
    p384_dir.mkdir()
    k = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (p384_dir / KEY_FILE).write_bytes(k)
    (p384_dir / KEY_FILE).chmod(0o600)
    with pytest.raises(TlsError, match="P-256") as err:
        ensure_identity(p384_dir)
    assert err.value.code == "tls"
    with pytest.raises(TlsError, match="not DER"):
        spki_der(b"not a certificate")
