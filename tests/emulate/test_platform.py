"""Platform options, variants, and the saved key folder a quote service restarts from."""

from __future__ import annotations

import os
import stat
import time
from datetime import timedelta

import dcap_qvl
import pytest

from tdxvm.emulate import EmulatedPlatform, PlatformKeys, PlatformOptions, TcbLevel

from .conftest import AT


def _verifies(p: EmulatedPlatform, root: bytes) -> str:
    coll = dcap_qvl.QuoteCollateralV3.from_json(p.collateral().to_json())
    return dcap_qvl.verify_with_root_ca(p.sign_quote(), coll, root, p.unix_time).status


def test_save_and_load_keep_keys_and_root(platform: EmulatedPlatform, tmp_path) -> None:
    folder = tmp_path / "emulated"
    platform.save(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(
        [
            "root-ca.key",
            "pck-ca.key",
            "pck.key",
            "tcb-signing.key",
            "attestation.key",
            "root-ca.pem",
        ]
    )
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
    later = EmulatedPlatform.load(folder, at=AT + timedelta(days=400))
    assert later.root_ca_der == platform.root_ca_der  # the trust anchor survives restarts
    assert later.signer.attestation_public_key == platform.signer.attestation_public_key
    assert _verifies(later, platform.root_ca_der) == "UpToDate"


def test_load_refuses_readable_keys(platform: EmulatedPlatform, tmp_path) -> None:
    platform.save(tmp_path)
    os.chmod(tmp_path / "pck.key", 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        PlatformKeys.load(tmp_path)


def test_save_tightens_an_existing_file(platform: EmulatedPlatform, tmp_path) -> None:
    (tmp_path / "pck.key").write_text("old")
    os.chmod(tmp_path / "pck.key", 0o644)
    platform.keys.save(tmp_path)
    assert stat.S_IMODE((tmp_path / "pck.key").stat().st_mode) == 0o600


def test_variant_keeps_keys_and_root(platform: EmulatedPlatform) -> None:
    v = platform.variant(revoke_pck=True, at=AT + timedelta(days=5))
    assert v.keys is platform.keys
    assert v.root_ca_der == platform.root_ca_der
    assert v.at == AT + timedelta(days=5)
    assert platform.variant(seed="new").root_ca_der != platform.root_ca_der
    assert platform.revoked_pck_serials == ()


def test_load_issues_again_for_the_options_given(platform: EmulatedPlatform, tmp_path) -> None:
    platform.save(tmp_path)
    revoked = EmulatedPlatform.load(tmp_path, PlatformOptions(revoke_pck=True), at=AT)
    assert revoked.root_ca_der == platform.root_ca_der
    assert revoked.revoked_pck_serials == (revoked.pck_cert.serial_number,)
    with pytest.raises(ValueError, match="Revoked"):
        _verifies(revoked, platform.root_ca_der)


def test_options_are_kept_and_copied(platform: EmulatedPlatform) -> None:
    serials = [5]
    options = PlatformOptions(revoked_pck_serials=serials)
    serials.append(6)  # a caller's list changes no platform later
    assert options.revoked_pck_serials == (5,)
    assert EmulatedPlatform(options, at=AT, seed="x").revoked_pck_serials == (5,)
    v = platform.variant(revoke_pck_ca=True)
    assert v.options == PlatformOptions(revoke_pck_ca=True) and platform.options == PlatformOptions()
    with pytest.raises(TypeError, match="revoke_everything"):
        platform.variant(revoke_everything=True)


def test_random_keys_and_argument_checks() -> None:
    a, b = EmulatedPlatform(at=AT), EmulatedPlatform(at=AT)
    assert a.root_ca_der != b.root_ca_der
    with pytest.raises(ValueError, match="either keys or seed"):
        EmulatedPlatform(at=AT, seed="x", keys=a.keys)
    with pytest.raises(ValueError, match="root CA key"):
        EmulatedPlatform(at=AT, seed="x", root_ca_cert=a.root_ca_cert)
    with pytest.raises(ValueError, match="pck_ca_kind|platform"):
        EmulatedPlatform(PlatformOptions(pck_ca_kind="other"), at=AT, seed="x")
    with pytest.raises(ValueError, match="TCB status"):
        TcbLevel(sgx_components=(0,) * 16, pce_svn=0, tdx_components=(0,) * 16, status="Fine")


def test_default_time_is_now_when_not_given() -> None:
    # The one documented clock read: ``at`` defaults to the current time.
    p = EmulatedPlatform(seed="x")
    assert p.at.tzinfo is not None and abs(p.at.timestamp() - time.time()) < 60
