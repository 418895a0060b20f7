"""Signature checks remembered on disk, so that a new process verifying a quote from a
known platform against known collateral checks only the quote's own signature.

Collateral does not change per quote, nor does a platform's PCK certificate chain or
its QE report, and their signatures are all of a cold verification's ECDSA work but
one. Each is checked once per content digest and trust anchor; an entry then says
"these exact bytes verified up to this anchor":

- ``tcb_info``: the TCB info's signature over its exact JSON text by the leaf of its
  issuer chain, and every link of that chain up to the anchor;
- ``qe_identity``: the same for the QE identity;
- ``pck_crl``: the PCK CRL's signature by the leaf of its issuer chain, and that chain;
- ``root_ca_crl``: the root CA CRL's signature by the anchor;
- ``pck_chain``: the PCK certificate chain a quote carries (PCK leaf, PCK CA, root; by
  the SHA-256 of each certificate's exact DER): every link (issuer name, CA flag,
  signature) up to the anchor;
- ``qe_report``: the QE report's signature by the PCK leaf (by the leaf's DER SHA-256,
  the exact report bytes and the signature).

An entry's name is SHA-256(tag ‖ item ‖ anchor SHA-256 ‖ the item's exact bytes, each
length-prefixed): other bytes, another PCK leaf or another anchor find no entry. One
more entry (:data:`WHOLE`) stands for a whole collateral set whose four items all
verified, so that the common case reads one file for the collateral; a set with a new
item (a new CRL, say) still finds the entries of the items it shares with the last one.
Only successes are recorded, with the item's validity window (its own dates intersected
with those of the certificates of its chain; for a QE report, the PCK leaf's), and an
entry is used only while the verification time is inside that window. The verifier's
time and revocation checks (certificate windows, CRLs, the PCK certificate against the
PCK CRL) run on every verification, whether or not an entry stood in for a signature
check, and the quote's own signature is always checked.

Fail closed: an entry is used only when the folder (:func:`default_verified_dir`,
0700) and the file (0600) belong to the current user and are not group- or
world-writable, it parses, it names the item, key and anchor asked for, and its MAC
(keyed BLAKE2b-256) under the cache's own key (``mac.key``: 32 random bytes, 0600)
verifies. Anything else is ignored and the item verified again. The MAC catches
corruption and entries copied from another cache; against a process that runs as the
same user it is no defence, but such a process could as well change tdxvm itself.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509

from tdxvm.attest.collateral import Collateral
from tdxvm.fileio import write_atomic
from tdxvm.xdg import cache_home

ITEMS = ("tcb_info", "qe_identity", "pck_crl", "root_ca_crl")
WHOLE = "collateral"  # one more entry for a whole collateral set: all four items, one file to read
PCK_CHAIN = "pck_chain"  # a quote's PCK certificate chain (per platform)
QE_REPORT = "qe_report"  # a QE report signed by a PCK leaf (per platform and attestation key)
FORMAT = "tdxvm-verified-collateral/1"
KEY_FILE = "mac.key"
_TAG = b"tdxvm verified collateral v1\0"
_MAX_ENTRY = 4096
MAX_ENTRIES = 1024  # five per collateral set (Intel updates CRLs daily, TCB info monthly), two per platform
_ENTRY_NAME = re.compile(r"[0-9a-f]{64}\.json")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_log = logging.getLogger(__name__)


def default_verified_dir() -> Path:
    """``$TDXVM_VERIFIED_CACHE`` if set (an absolute path), else
    ``$XDG_CACHE_HOME/tdxvm/verified``, else ``~/.cache/tdxvm/verified`` (beside the
    collateral cache of :mod:`tdxvm.attest.pcs`)."""
    own = os.environ.get("TDXVM_VERIFIED_CACHE", "")
    if os.path.isabs(own):
        return Path(own)
    return cache_home() / "verified"


def item_key(item: str, anchor_sha256: bytes, *parts: bytes) -> str:
    """The entry name of ``item`` for these exact bytes under this anchor (hex SHA-256)."""
    h = hashlib.sha256(_TAG + item.encode() + b"\0" + anchor_sha256)
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def whole_key(c: Collateral, anchor_sha256: bytes) -> str:
    """The entry name of the whole collateral set ``c`` under the anchor."""
    return item_key(
        WHOLE,
        anchor_sha256,
        c.tcb_info.encode(),
        c.tcb_info_signature,
        c.tcb_info_issuer_chain.encode(),
        c.qe_identity.encode(),
        c.qe_identity_signature,
        c.qe_identity_issuer_chain.encode(),
        c.pck_crl,
        c.pck_crl_issuer_chain.encode(),
        c.root_ca_crl,
    )


def collateral_keys(c: Collateral, anchor_sha256: bytes) -> dict[str, str]:
    """The entry name of each item of ``c`` (see :data:`ITEMS`) under the anchor."""
    return {
        "tcb_info": item_key(
            "tcb_info", anchor_sha256, c.tcb_info.encode(), c.tcb_info_signature, c.tcb_info_issuer_chain.encode()
        ),
        "qe_identity": item_key(
            "qe_identity",
            anchor_sha256,
            c.qe_identity.encode(),
            c.qe_identity_signature,
            c.qe_identity_issuer_chain.encode(),
        ),
        "pck_crl": item_key("pck_crl", anchor_sha256, c.pck_crl, c.pck_crl_issuer_chain.encode()),
        "root_ca_crl": item_key("root_ca_crl", anchor_sha256, c.root_ca_crl),
    }


def pck_chain_key(cert_sha256s: Iterable[bytes], anchor_sha256: bytes) -> str:
    """The entry name of a PCK certificate chain (leaf first; each certificate by the
    SHA-256 of its DER) under the anchor."""
    return item_key(PCK_CHAIN, anchor_sha256, *cert_sha256s)


def qe_report_key(leaf_sha256: bytes, report: bytes, signature: bytes, anchor_sha256: bytes) -> str:
    """The entry name of a QE report and its signature by the PCK leaf (DER SHA-256)."""
    return item_key(QE_REPORT, anchor_sha256, leaf_sha256, report, signature)


@dataclass(frozen=True, slots=True)
class Window:
    """When an item is valid: its own dates within its chain certificates' (inclusive)."""

    not_before: datetime
    not_after: datetime

    @classmethod
    def of(cls, start: datetime, end: datetime, certs: Iterable[x509.Certificate]) -> Window:
        certs = list(certs)
        return cls(
            not_before=max([start, *(c.not_valid_before_utc for c in certs)]),
            not_after=min([end, *(c.not_valid_after_utc for c in certs)]),
        )

    @classmethod
    def of_crl(cls, crl: x509.CertificateRevocationList, certs: Iterable[x509.Certificate]) -> Window | None:
        """thisUpdate..nextUpdate within the certificates' windows; None without a nextUpdate."""
        end = crl.next_update_utc
        return None if end is None else cls.of(crl.last_update_utc, end, certs)

    @classmethod
    def overlap(cls, spans: Iterable[tuple[datetime, datetime]]) -> Window | None:
        """The time inside every (start, end) span; None when there is none."""
        spans = list(spans)
        window = cls(max(start for start, _ in spans), min(end for _, end in spans))
        return window if window.not_before <= window.not_after else None

    def contains(self, at: datetime) -> bool:
        return self.not_before <= at <= self.not_after


def _iso(when: datetime) -> str:
    return when.astimezone(timezone.utc).isoformat()


def _utc(text: str) -> datetime:
    when = datetime.fromisoformat(text)
    if when.utcoffset() != _ZERO:
        raise ValueError(f"{text!r} is not UTC")
    return when


_ZERO = timedelta(0)


def _private(st: os.stat_result, kind: int) -> bool:
    """Ours, of the expected kind, and writable by nobody else."""
    return stat.S_IFMT(st.st_mode) == kind and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _read_private(path: str, limit: int) -> bytes | None:
    """Up to ``limit`` bytes of ``path`` if it is a private regular file (no symlink), else None."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except OSError:
        return None
    try:
        return os.read(fd, limit) if _private(os.fstat(fd), stat.S_IFREG) else None
    except OSError:
        return None
    finally:
        os.close(fd)


class VerifiedCache:
    """Verified-collateral entries in ``directory``; see the module docstring."""

    def __init__(self, *, directory: Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_verified_dir()
        self._mac_key: bytes | None = None
        self._pruned = False

    # -- the folder and its key ------------------------------------------------------

    def _key(self, *, create: bool) -> bytes | None:
        """The MAC key, or ``None`` when the folder or key is missing or not private."""
        if self._mac_key is not None:
            return self._mac_key
        folder = os.fspath(self.directory)
        path = os.path.join(folder, KEY_FILE)
        try:
            if create:
                os.makedirs(folder, mode=0o700, exist_ok=True)
            if not _private(os.lstat(folder), stat.S_IFDIR):
                return None
            key = _read_private(path, 33)
            if key is None and create and not os.path.lexists(path):
                key = secrets.token_bytes(32)
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
                except FileExistsError:  # another process made it first: use theirs
                    key = _read_private(path, 33)
                else:
                    with os.fdopen(fd, "wb") as f:
                        os.fchmod(f.fileno(), 0o600)
                        f.write(key)
        except OSError as exc:
            _log.debug("verified-collateral cache %s unusable: %s", folder, exc)
            return None
        if key is None or len(key) != 32:
            return None
        self._mac_key = key
        return key

    # -- entries ---------------------------------------------------------------------
    # An entry is text, one field a line, the last the MAC (keyed BLAKE2b-256) of the
    # lines before it:
    #   tdxvm-verified-collateral/1 | item <name> | key <hex> | anchor <hex> |
    #   not_before <ISO 8601 UTC> | not_after <ISO 8601 UTC> | mac <hex>
    # A lookup rebuilds the first four lines it expects and compares them whole, and the
    # MAC covers the dates, so a changed, missing or extra byte anywhere makes the entry
    # unusable.

    @staticmethod
    def _head(item: str, key: str, anchor: str) -> bytes:
        return f"{FORMAT}\nitem {item}\nkey {key}\nanchor {anchor}\n".encode()

    @staticmethod
    def _mac(mac_key: bytes, signed: bytes) -> bytes:
        return hashlib.blake2b(signed, key=mac_key, digest_size=32).hexdigest().encode()

    def _path(self, key: str) -> str:
        return os.path.join(os.fspath(self.directory), f"{key}.json")

    def lookup(self, item: str, key: str, *, anchor_sha256: bytes, at: datetime) -> bool:
        """Whether a trustworthy entry says ``item`` (bytes named by ``key``) verified up
        to the anchor, and ``at`` lies inside the window it recorded."""
        mac_key = self._key(create=False)
        data = _read_private(self._path(key), _MAX_ENTRY + 1) if mac_key is not None else None
        if mac_key is None or data is None or len(data) > _MAX_ENTRY:
            return False
        head = self._head(item, key, anchor_sha256.hex())
        if not data.startswith(head):
            return False
        rest = data[len(head) :].split(b"\n")
        if (
            len(rest) != 4
            or rest[3]
            or not (
                rest[0].startswith(b"not_before ") and rest[1].startswith(b"not_after ") and rest[2].startswith(b"mac ")
            )
        ):
            return False
        if not hmac.compare_digest(rest[2][4:], self._mac(mac_key, data[: len(data) - len(rest[2]) - 1])):
            return False
        try:
            return _utc(rest[0][11:].decode("ascii")) <= at <= _utc(rest[1][10:].decode("ascii"))
        except ValueError:  # not a date: not trusted
            return False

    def vouched(self, c: Collateral, *, anchor_sha256: bytes, at: datetime) -> tuple[dict[str, str], set[str]]:
        """Entry names for ``c`` (its items and :data:`WHOLE`), and the items that entries
        vouch for at ``at``. A whole-set entry answers for all four items at once (one
        file read, the common case); without one, each item is looked up."""
        whole = whole_key(c, anchor_sha256)
        if self.lookup(WHOLE, whole, anchor_sha256=anchor_sha256, at=at):
            return {WHOLE: whole}, set(ITEMS)
        keys = collateral_keys(c, anchor_sha256)
        vouched = {item for item, key in keys.items() if self.lookup(item, key, anchor_sha256=anchor_sha256, at=at)}
        return {**keys, WHOLE: whole}, vouched

    def record_verified(
        self, keys: dict[str, str], vouched: set[str], windows: dict[str, Window | None], *, anchor_sha256: bytes
    ) -> None:
        """Record each item that verified (``windows[item]`` set) and no entry vouched
        for yet, and the whole set when all four did."""
        for item, window in windows.items():
            if window is not None and item not in vouched:
                self.record(item, keys[item], anchor_sha256=anchor_sha256, window=window)
        spans = [w for w in windows.values() if w is not None]
        if WHOLE in keys and len(spans) == len(ITEMS):
            whole = Window(max(w.not_before for w in spans), min(w.not_after for w in spans))
            if whole.not_before <= whole.not_after:
                self.record(WHOLE, keys[WHOLE], anchor_sha256=anchor_sha256, window=whole)

    def record(self, item: str, key: str, *, anchor_sha256: bytes, window: Window) -> None:
        """Remember that ``item`` verified; a cache that cannot be written is skipped."""
        mac_key = self._key(create=True)
        if mac_key is None:
            return
        signed = self._head(item, key, anchor_sha256.hex()) + (
            f"not_before {_iso(window.not_before)}\nnot_after {_iso(window.not_after)}\n".encode()
        )
        try:
            write_atomic(Path(self._path(key)), signed + b"mac " + self._mac(mac_key, signed) + b"\n", mode=0o600)
        except OSError as exc:
            _log.debug("cannot record verified collateral in %s: %s", self.directory, exc)
            return
        self._prune()

    def _prune(self) -> None:
        """Keep at most :data:`MAX_ENTRIES` entries, dropping the least recently written
        (checked once per instance, on a write). Entries are not dropped when their window
        ends: a verification at an earlier time (``--at``) may still use them."""
        if self._pruned:
            return
        self._pruned = True
        try:
            entries = [(p.stat().st_mtime, p) for p in self.directory.iterdir() if _ENTRY_NAME.fullmatch(p.name)]
        except OSError:
            return
        if len(entries) > MAX_ENTRIES:
            for _, path in sorted(entries)[: len(entries) - MAX_ENTRIES * 3 // 4]:
                path.unlink(missing_ok=True)
