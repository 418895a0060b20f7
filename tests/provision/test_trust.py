"""The two trusts behind :class:`tdxvm.provision.trust.Trust`: Intel's (TDX) and the
emulated platform's, as :func:`for_backend` makes them."""

from __future__ import annotations

import hashlib

import pytest

from tdxvm.emulate.qgs import QuoteServiceError
from tdxvm.provision.trust import EmulatedTrust, TdxTrust, for_backend

NO_SUCH_UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"


@pytest.fixture(autouse=True)
def _own_folders(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_tdx_trusts_intels_root_and_runs_nothing_for_quotes():
    trust = for_backend("tdx")
    assert isinstance(trust, TdxTrust) and trust.backend == "tdx" and trust.trust_anchor is None
    assert callable(trust.collateral)  # fetched per quote (PCS or PCCS), not held
    with trust.quote_service("<domain/>", lambda _path: b"") as address:
        assert address is None  # the guest asks its host's QGS
    assert trust.ensure_quote_daemon("qemu:///system", NO_SUCH_UUID, boot_id=1) is None


def test_the_emulated_platform_is_made_once_and_kept(tmp_path):
    first = for_backend("emulated")
    folder = tmp_path / "data" / "tdxvm" / "emulated"
    assert isinstance(first, EmulatedTrust) and first.backend == "emulated" and first.emulated_dir == folder
    assert (folder / "root-ca.pem").is_file()
    assert first.trust_anchor.sha256 == hashlib.sha256(first.platform.root_ca_der).digest()
    again = for_backend("emulated")
    assert again.trust_anchor.sha256 == first.trust_anchor.sha256  # loaded, not made anew
    elsewhere = for_backend("emulated", emulated_dir=tmp_path / "other")
    assert elsewhere.emulated_dir == tmp_path / "other" and elsewhere.trust_anchor.sha256 != first.trust_anchor.sha256


def test_the_emulated_quote_daemon_is_the_platforms(tmp_path):
    """The daemon loads the platform from the trust's own folder (here it cannot start: no such domain)."""
    trust = for_backend("emulated", emulated_dir=tmp_path / "em")
    with pytest.raises(QuoteServiceError, match="did not start"):
        trust.ensure_quote_daemon("test:///default", NO_SUCH_UUID)
    assert (tmp_path / "em" / "qgsd" / f"{NO_SUCH_UUID}.log").is_file()
