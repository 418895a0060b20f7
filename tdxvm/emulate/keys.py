"""The emulated platform's private keys, and their files.

Five P-256 keys stand in for Intel's: the root CA, the PCK CA (intermediate), the PCK
(the platform's leaf, which signs the QE report), the TCB signing key (collateral) and
the QE's attestation key (quotes). A folder holds them as unencrypted PKCS#8 PEM, mode
0600 in a 0700 folder; loading refuses key files that others may read, like OpenSSH.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, fields
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tdxvm.emulate.pki import derive_key, generate_key
from tdxvm.fileio import write_atomic

ROOT_CA_CERT_FILE = "root-ca.pem"
_FILES = {
    "root_ca": "root-ca.key",
    "pck_ca": "pck-ca.key",
    "pck": "pck.key",
    "tcb_signing": "tcb-signing.key",
    "attestation": "attestation.key",
}


def write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600 (also when the file existed), atomically."""
    write_atomic(path, data, mode=0o600)


def read_private_file(path: Path) -> bytes:
    """Read a key file, refusing one that group or others may access."""
    mode = path.stat().st_mode
    if mode & 0o077:
        raise PermissionError(f"{path}: key file mode is {stat.filemode(mode)}; it must be private (chmod 600)")
    return path.read_bytes()


@dataclass(frozen=True, slots=True, kw_only=True)
class PlatformKeys:
    """The private keys of one emulated platform."""

    root_ca: ec.EllipticCurvePrivateKey
    pck_ca: ec.EllipticCurvePrivateKey
    pck: ec.EllipticCurvePrivateKey
    tcb_signing: ec.EllipticCurvePrivateKey
    attestation: ec.EllipticCurvePrivateKey

    def __post_init__(self) -> None:
        for f in fields(self):
            key = getattr(self, f.name)
            if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
                raise TypeError(f"{f.name} key must be an ECDSA P-256 private key")

    @classmethod
    def generate(cls) -> PlatformKeys:
        """Fresh random keys."""
        return cls(**{name: generate_key() for name in _FILES})

    @classmethod
    def from_seed(cls, seed: bytes | str) -> PlatformKeys:
        """Keys derived from ``seed``: the same seed gives the same platform (tests, CI)."""
        raw = seed.encode() if isinstance(seed, str) else bytes(seed)
        return cls(**{name: derive_key(raw, name) for name in _FILES})

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write the keys into ``folder`` (created 0700 if missing), each file 0600."""
        path = Path(folder)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name, filename in _FILES.items():
            key: ec.EllipticCurvePrivateKey = getattr(self, name)
            data = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            write_private_file(path / filename, data)
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> PlatformKeys:
        """Read keys written by :meth:`save`."""
        path = Path(folder)
        keys = {}
        for name, filename in _FILES.items():
            data = read_private_file(path / filename)
            key = serialization.load_pem_private_key(data, password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise TypeError(f"{path / filename}: not an EC private key")
            keys[name] = key
        return cls(**keys)
