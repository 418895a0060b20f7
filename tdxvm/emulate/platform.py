"""The emulated TDX platform: keys, certificates, collateral and a quote signer in one.

:class:`EmulatedPlatform` plays Intel's part for tests, CI and emulated guests: its root
CA is the trust anchor a verifier is given instead of Intel's, its collateral is in the
formats of "Intel SGX and Intel TDX PCS API v4", and its quotes are laid out like a real
TD Quoting Enclave's. Every field of :class:`PlatformOptions` is one knob a verifier
test may turn to get deliberately broken material (``tests/emulate/test_dcap_qvl.py``
shows each one and the verdict dcap-qvl gives).

The platform is immutable; :meth:`EmulatedPlatform.variant` gives a copy with other
options and the same keys, so a test can compare a good and a broken case that differ
in that one thing.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tdxvm.attest.collateral import Collateral
from tdxvm.emulate import collateral as coll
from tdxvm.emulate import pki
from tdxvm.emulate.keys import ROOT_CA_CERT_FILE, PlatformKeys, write_private_file
from tdxvm.emulate.quote import DEFAULT_QE_AUTH_DATA, QuoteSigner, TdReportFields
from tdxvm.emulate.sgxext import SgxExtension
from tdxvm.emulate.tcb import (
    DEFAULT_FMSPC,
    DEFAULT_PCE_ID,
    DEFAULT_QE,
    DEFAULT_TCB_LEVELS,
    QeProfile,
    TcbLevel,
    TdxModuleIdentity,
    module_identities_for,
)
from tdxvm.fileio import lock_exclusive, partial_folder

_DAY = timedelta(days=1)
# Default windows relative to ``at``: (days before, days after).
_WINDOWS = {
    "root_ca_validity": (365, 20 * 365),
    "pck_ca_validity": (365, 10 * 365),
    "tcb_signing_validity": (365, 7 * 365),
    "pck_validity": (30, 7 * 365),
    "crl_validity": (1, 29),
    "tcb_info_validity": (1, 29),
    "qe_identity_validity": (1, 29),
}


def _digest16(label: str, key: ec.EllipticCurvePrivateKey) -> bytes:
    """16 stable bytes (PPID, platform instance ID) derived from a platform key."""
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(label.encode() + spki).digest()[:16]


@dataclass(frozen=True, kw_only=True)
class PlatformOptions:
    """What an :class:`EmulatedPlatform` issues, beyond its keys and its time: the TCB,
    the QE, the certificate and collateral windows and the revocations. The defaults give
    a platform whose quotes verify UpToDate; every field is a knob for broken material.

    TCB: the PCK certificate's TCB (``pck_tcb_components``, ``pck_pce_svn``, default: the
    first UpToDate level of ``tcb_levels``; ``pck_cpu_svn``, ``ppid``), the levels TCB
    info lists (``tcb_levels``, with advisories or other statuses), the FMSPC it is issued
    for (``tcb_info_fmspc``, default: ``fmspc``), and the TDX module identities (default:
    derived from ``tcb_levels``, one ``TDX_<major>`` identity whose levels are the module
    SVNs), which decide the module's own status in TD 1.5 quotes.

    QE: ``qe`` is what the QE report carries, ``qe_identity`` (default: ``qe``) what the
    collateral says it should be; ``qe_auth_data`` goes into every quote.

    Windows (:class:`~tdxvm.emulate.pki.Validity`, default: spans around the platform's
    ``at``): certificates from a year before it (the PCK 30 days) to 7-20 years after;
    CRLs, TCB info and QE identity issued a day before with the next update 29 days
    after, Intel's 30-day cycle. Set one that is over or not begun to break it.

    Revocations: ``revoke_pck``/``revoke_pck_ca``/``revoke_root_ca`` (the root CA CRL then
    lists the trust anchor itself), or ``revoked_pck_serials``/``revoked_ca_serials`` for
    any serial.
    """

    # the platform and its TCB
    fmspc: bytes = DEFAULT_FMSPC
    pce_id: bytes = DEFAULT_PCE_ID
    pck_ca_kind: str = "platform"  # or "processor"
    tcb_levels: Sequence[TcbLevel] = DEFAULT_TCB_LEVELS
    tdx_module_identities: Sequence[TdxModuleIdentity] | None = None
    pck_tcb_components: Sequence[int] | None = None
    pck_pce_svn: int | None = None
    pck_cpu_svn: bytes | None = None
    ppid: bytes | None = None
    # the quoting enclave
    qe: QeProfile = DEFAULT_QE
    qe_identity: QeProfile | None = None
    qe_auth_data: bytes = DEFAULT_QE_AUTH_DATA
    # collateral contents
    tcb_info_fmspc: bytes | None = None
    tcb_evaluation_data_number: int = 17
    # validity windows (None: the defaults around ``at``)
    root_ca_validity: pki.Validity | None = None
    pck_ca_validity: pki.Validity | None = None
    pck_validity: pki.Validity | None = None
    tcb_signing_validity: pki.Validity | None = None
    crl_validity: pki.Validity | None = None
    tcb_info_validity: pki.Validity | None = None
    qe_identity_validity: pki.Validity | None = None
    # revocations
    revoked_pck_serials: Sequence[int] = ()
    revoked_ca_serials: Sequence[int] = ()
    revoke_pck: bool = False
    revoke_pck_ca: bool = False
    revoke_root_ca: bool = False

    def __post_init__(self) -> None:
        # Sequences are kept as tuples, so that no caller's list changes a platform later.
        for name in (
            "tcb_levels",
            "tdx_module_identities",
            "pck_tcb_components",
            "revoked_pck_serials",
            "revoked_ca_serials",
        ):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))


class EmulatedPlatform:
    """An emulated Intel TDX platform (root CA, PCK chain, collateral, quote signer).

    ``options`` (:class:`PlatformOptions`) says what it issues; the defaults verify
    UpToDate. ``at`` is the time everything is issued for (default: now, read once).
    Keys come from ``keys``, else from ``seed`` (reproducible; another seed gives a
    different root), else are random; ``root_ca_cert`` reuses a root certificate of the
    same root key (:meth:`load`). The quote's TEE_TCB_SVN defaults to the PCK's level,
    and ``td_attributes`` with DEBUG may be given to :meth:`sign_quote`.

    TD 1.5 (TDX module updates while the TD runs): a v5 quote with body type 3 or 4
    carries ``tee_tcb_svn`` (the module the TD launched on) and ``tee_tcb_svn2`` (the
    module running now; default: the same); :meth:`tee_tcb_svn_for` gives the value that
    reaches a level of a given status.
    """

    def __init__(
        self,
        options: PlatformOptions | None = None,
        *,
        at: datetime | None = None,
        seed: bytes | str | None = None,
        keys: PlatformKeys | None = None,
        root_ca_cert: x509.Certificate | None = None,
    ) -> None:
        if keys is not None and seed is not None:
            raise ValueError("give either keys or seed, not both")
        o = self.options = options if options is not None else PlatformOptions()
        at = pki.ensure_utc(at if at is not None else datetime.now(timezone.utc), "at")
        self.at = at
        self.keys = keys or (PlatformKeys.from_seed(seed) if seed is not None else PlatformKeys.generate())
        self.tcb_levels = tuple(o.tcb_levels)
        if not self.tcb_levels:
            raise ValueError("tcb_levels must not be empty")
        self.reference_level = next((lv for lv in self.tcb_levels if lv.status == "UpToDate"), self.tcb_levels[0])
        self.module_identities = (
            tuple(o.tdx_module_identities)
            if o.tdx_module_identities is not None
            else module_identities_for(self.tcb_levels)
        )
        self.fmspc, self.pce_id, self.qe = bytes(o.fmspc), bytes(o.pce_id), o.qe
        self.qe_identity = o.qe_identity if o.qe_identity is not None else o.qe
        self.tcb_info_fmspc = bytes(o.tcb_info_fmspc) if o.tcb_info_fmspc is not None else self.fmspc
        self.tcb_evaluation_data_number = o.tcb_evaluation_data_number
        self.windows = {
            name: getattr(o, name) or pki.Validity.around(at, before=b * _DAY, after=a * _DAY)
            for name, (b, a) in _WINDOWS.items()
        }
        k = self.keys
        if root_ca_cert is not None:
            if root_ca_cert.public_key() != k.root_ca.public_key():
                raise ValueError("root_ca_cert does not belong to the root CA key")
            self.root_ca_cert = root_ca_cert
        else:
            self.root_ca_cert = pki.issue_root_ca(key=k.root_ca, validity=self.windows["root_ca_validity"])
        self.pck_ca_cert = pki.issue_pck_ca(
            key=k.pck_ca.public_key(),
            root=self.root_ca_cert,
            root_key=k.root_ca,
            validity=self.windows["pck_ca_validity"],
            kind=o.pck_ca_kind,
        )
        platform_ca = o.pck_ca_kind == "platform"
        self.pck_extension = SgxExtension(
            ppid=o.ppid if o.ppid is not None else _digest16("ppid", k.attestation),
            tcb_components=tuple(
                o.pck_tcb_components if o.pck_tcb_components is not None else self.reference_level.sgx_components
            ),
            pce_svn=o.pck_pce_svn if o.pck_pce_svn is not None else self.reference_level.pce_svn,
            cpu_svn=o.pck_cpu_svn,
            pce_id=self.pce_id,
            fmspc=self.fmspc,
            platform_instance_id=_digest16("instance", k.pck) if platform_ca else None,
        )
        self.pck_cert = pki.issue_pck_cert(
            key=k.pck.public_key(),
            ca=self.pck_ca_cert,
            ca_key=k.pck_ca,
            validity=self.windows["pck_validity"],
            extension=self.pck_extension,
        )
        self.tcb_signing_cert = pki.issue_tcb_signing_cert(
            key=k.tcb_signing.public_key(),
            root=self.root_ca_cert,
            root_key=k.root_ca,
            validity=self.windows["tcb_signing_validity"],
        )
        self.revoked_pck_serials = tuple(o.revoked_pck_serials) + (
            (self.pck_cert.serial_number,) if o.revoke_pck else ()
        )
        self.revoked_ca_serials = (
            tuple(o.revoked_ca_serials)
            + ((self.pck_ca_cert.serial_number,) if o.revoke_pck_ca else ())
            + ((self.root_ca_cert.serial_number,) if o.revoke_root_ca else ())
        )
        self.signer = QuoteSigner(
            attestation_key=k.attestation,
            pck_key=k.pck,
            pck_chain_pem=self.pck_chain_pem,
            qe=o.qe,
            cpu_svn=self.pck_extension.effective_cpu_svn,
            pce_svn=self.pck_extension.pce_svn,
            qe_auth_data=o.qe_auth_data,
        )

    # -- certificates -------------------------------------------------------------

    @property
    def root_ca_der(self) -> bytes:
        """The trust anchor to give a verifier (DER)."""
        return self.root_ca_cert.public_bytes(serialization.Encoding.DER)

    @property
    def root_ca_pem(self) -> str:
        return pki.pem(self.root_ca_cert)

    @property
    def pck_chain_pem(self) -> bytes:
        """The PCK chain a quote carries: leaf, PCK CA, root."""
        return pki.pem_chain(self.pck_cert, self.pck_ca_cert, self.root_ca_cert).encode("ascii")

    @property
    def unix_time(self) -> int:
        """``at`` as whole seconds since the epoch (what dcap-qvl takes)."""
        return int(self.at.timestamp())

    @property
    def tee_tcb_svn(self) -> bytes:
        """The TEE_TCB_SVN quotes carry by default (the reference level's TDX components)."""
        return self.reference_level.tee_tcb_svn

    def tee_tcb_svn_for(self, status: str) -> bytes:
        """The TDX components of the first TCB level with ``status`` (e.g. "OutOfDate"): a
        TEE_TCB_SVN or TEE_TCB_SVN2 that reaches that level (the PCK's TCB permitting)."""
        level = next((lv for lv in self.tcb_levels if lv.status == status), None)
        if level is None:
            raise ValueError(f"no TCB level has status {status!r} ({', '.join(lv.status for lv in self.tcb_levels)})")
        return level.tee_tcb_svn

    # -- collateral ---------------------------------------------------------------

    @cached_property
    def _collateral(self) -> Collateral:
        w, k = self.windows, self.keys
        return coll.build_collateral(
            root=self.root_ca_cert,
            root_key=k.root_ca,
            pck_ca=self.pck_ca_cert,
            pck_ca_key=k.pck_ca,
            tcb_signing=self.tcb_signing_cert,
            tcb_signing_key=k.tcb_signing,
            crl_validity=w["crl_validity"],
            revoked_ca_serials=self.revoked_ca_serials,
            revoked_pck_serials=self.revoked_pck_serials,
            tcb_info=coll.tcb_info_json(
                fmspc=self.tcb_info_fmspc,
                pce_id=self.pce_id,
                validity=w["tcb_info_validity"],
                levels=self.tcb_levels,
                module_identities=self.module_identities,
                tcb_evaluation_data_number=self.tcb_evaluation_data_number,
            ),
            qe_identity=coll.qe_identity_json(
                qe=self.qe_identity,
                validity=w["qe_identity_validity"],
                tcb_evaluation_data_number=self.tcb_evaluation_data_number,
            ),
        )

    def collateral(self) -> Collateral:
        """The quote collateral, in dcap-qvl's ``QuoteCollateralV3`` layout."""
        return self._collateral

    # -- quotes -------------------------------------------------------------------

    def sign_quote(
        self,
        *,
        version: int = 4,
        body_type: int | None = None,
        report: TdReportFields | None = None,
        **fields: Any,
    ) -> bytes:
        """A signed TDX quote. ``fields`` are :class:`~tdxvm.emulate.quote.TdReportFields`
        (``mr_td``, ``rtmrs``, ``report_data``, ``td_attributes``, …) with TEE_TCB_SVN
        defaulting to :attr:`tee_tcb_svn` (and ``tee_tcb_svn2``, in TD report 1.5
        bodies, to TEE_TCB_SVN); or ``report`` is used as given, with ``fields``
        replacing some of its values. v4 carries TD report 1.0; v5 takes ``body_type``
        2, 3 (default) or 4."""
        if report is None:
            report = TdReportFields(tee_tcb_svn=fields.pop("tee_tcb_svn", self.tee_tcb_svn), **fields)
        elif fields:
            report = dataclasses.replace(report, **fields)
        return self.signer.sign(report, version=version, body_type=body_type)

    def sign_body(self, body: bytes, *, version: int = 4, body_type: int | None = None) -> bytes:
        """A signed quote around a TD report body the caller laid out (e.g. a guest's)."""
        return self.signer.sign_body(body, version=version, body_type=body_type)

    # -- variants and persistence -------------------------------------------------

    def variant(
        self,
        *,
        at: datetime | None = None,
        seed: bytes | str | None = None,
        keys: PlatformKeys | None = None,
        root_ca_cert: x509.Certificate | None = None,
        **changes: Any,
    ) -> EmulatedPlatform:
        """A platform with these :class:`PlatformOptions` fields changed and everything
        else kept: its time (unless ``at`` is given), its keys and its root CA certificate.
        A new ``seed`` or ``keys`` gives a new root, and so does a new ``root_ca_validity``
        (unless ``root_ca_cert`` is given)."""
        options = dataclasses.replace(self.options, **changes)
        if seed is None and keys is None:
            keys = self.keys
            if root_ca_cert is None and "root_ca_validity" not in changes:
                root_ca_cert = self.root_ca_cert
        elif seed is not None:
            keys = None
        return EmulatedPlatform(
            options, at=at if at is not None else self.at, seed=seed, keys=keys, root_ca_cert=root_ca_cert
        )

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Save the keys and the root CA certificate (all files 0600) so that a restarted
        quote service keeps the same trust anchor; see :meth:`load`.

        A missing or empty ``folder`` gets the whole platform at once: it is written in a
        partial folder beside it (0700) and renamed into place, so a reader sees no
        platform there or all of one; :class:`FileExistsError` if another one got there
        meanwhile (a rename never replaces a folder that is not empty). Into a folder that
        holds other files (or is a symlink, or an empty mount point), each file is replaced
        on its own, the root CA certificate last. Where several processes may make one
        platform folder at once, use :meth:`create`."""
        path = Path(folder)
        if not path.is_symlink() and _missing_or_empty(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            with partial_folder(path.parent, f".{path.name}.partial-") as staging:
                self._write(staging)
                try:
                    os.rename(staging, path)  # replaces an empty folder, never a full one
                    return path
                except OSError as exc:
                    if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                        raise FileExistsError(
                            errno.EEXIST, "another emulated platform was saved there meanwhile", str(path)
                        ) from None
                    if exc.errno not in (errno.EBUSY, errno.EXDEV):  # an empty mount point stays
                        raise
        self._write(path)
        return path

    def create(self, folder: str | os.PathLike[str], *, timeout: float = 60) -> Path:
        """:meth:`save` into ``folder`` only if it is missing or empty, else
        :class:`FileExistsError`: of several processes creating one folder at once, one
        wins and the others find it taken. They take turns on the lock file
        ``.<name>.lock`` beside ``folder`` (waiting up to ``timeout`` seconds, then
        :class:`TimeoutError`) and look at the folder again holding it: the lock
        :meth:`tdxvm.provision.trust.EmulatedTrust.load` takes to make its platform."""
        path = Path(folder)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = lock_exclusive(path.parent / f".{path.name}.lock", timeout=timeout)
        try:
            if not _missing_or_empty(path):
                raise FileExistsError(errno.EEXIST, "exists and is not empty", str(path))
            return self.save(path)
        finally:
            os.close(lock)

    def _write(self, folder: Path) -> None:
        self.keys.save(folder)
        write_private_file(folder / ROOT_CA_CERT_FILE, self.root_ca_pem.encode("ascii"))

    @classmethod
    def load(
        cls,
        folder: str | os.PathLike[str],
        options: PlatformOptions | None = None,
        *,
        at: datetime | None = None,
    ) -> EmulatedPlatform:
        """A platform from :meth:`save`'s folder: same keys and root CA certificate; the
        other certificates and the collateral are issued again for ``options`` and ``at``."""
        path = Path(folder)
        keys = PlatformKeys.load(path)
        root = x509.load_pem_x509_certificate((path / ROOT_CA_CERT_FILE).read_bytes())
        return cls(options, at=at, keys=keys, root_ca_cert=root)


def _missing_or_empty(path: Path) -> bool:
    """Whether ``path`` names nothing, or a folder with nothing in it."""
    try:
        return not os.listdir(path)
    except FileNotFoundError:
        return not os.path.lexists(path)  # a dangling symlink is not missing
