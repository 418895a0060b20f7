"""The on-disk verified-collateral cache: same results with and without it on the real
vectors, only the quote's own signatures checked when it is warm, and it fails closed
(tampered, corrupt, foreign or loosely permitted entries are ignored; an expired item is
refused even though an entry for it exists)."""

from __future__ import annotations

import dataclasses
import os
import stat
from datetime import timedelta

import pytest

from tdxvm.attest import chain as chain_mod
from tdxvm.attest import verify as verify_mod
from tdxvm.attest.chain import TrustAnchor
from tdxvm.attest.collateral import load_bundle
from tdxvm.attest.verifiedcache import (
    ITEMS,
    KEY_FILE,
    VerifiedCache,
    Window,
    collateral_keys,
    default_verified_dir,
    whole_key,
)
from tdxvm.attest.verify import QuoteVerifier

from ..conftest import utc

V4_FROM, V4_TO = utc("2025-06-19T10:32:27Z"), utc("2025-07-19T10:00:35Z")
V5_FROM, V5_TO = utc("2026-02-18T10:58:51Z"), utc("2026-03-20T10:41:15Z")
INTEL = TrustAnchor.intel().sha256

# (quote folder, collateral folder, time): every real vector with collateral, accepted or not
CASES = [
    ("dcap-qvl-v4", "dcap-qvl-v4", V4_FROM),
    ("dcap-qvl-v4", "dcap-qvl-v4", V4_TO),
    ("dcap-qvl-v4", "dcap-qvl-v4", V4_TO + timedelta(days=1)),  # TCB info expired
    ("dcap-qvl-v4", "dcap-qvl-v4", V4_FROM - timedelta(days=1)),  # not yet valid
    ("go-tdx-guest-v5", "go-tdx-guest-v5", V5_FROM),
    ("go-tdx-guest-v5", "go-tdx-guest-v5", V5_TO),
    ("dcap-qvl-v5-no-tcb-level", "dcap-qvl-v5-no-tcb-level", V5_FROM + timedelta(days=3)),
    ("trustee-debug-td", "dcap-qvl-v4", V4_FROM),
    ("cc-api-preprod-root", "dcap-qvl-v4", V4_FROM),
    ("go-tdx-guest-ccel", "dcap-qvl-v4", V4_FROM),  # FMSPC mismatch
]


def _load(testdata, quote_dir, coll_dir):
    return (testdata / quote_dir / "quote.bin").read_bytes(), load_bundle(testdata / coll_dir / "collateral.json")


@pytest.fixture
def v4(testdata):
    return _load(testdata, "dcap-qvl-v4", "dcap-qvl-v4")


@pytest.fixture
def ecdsa_calls(monkeypatch):
    """Counts every ECDSA verification the verifier makes."""
    calls = []
    signed, ok = chain_mod._ecdsa_signed, verify_mod._ecdsa_ok

    def count_signed(*args):
        calls.append("chain")
        return signed(*args)

    def count_ok(*args):
        calls.append("raw")
        return ok(*args)

    monkeypatch.setattr(chain_mod, "_ecdsa_signed", count_signed)
    monkeypatch.setattr(verify_mod, "_ecdsa_ok", count_ok)
    return calls


def cached(folder, **kw):
    return QuoteVerifier(verified_cache=VerifiedCache(directory=folder), **kw)


def entries(folder):
    return sorted(p for p in folder.iterdir() if p.name != KEY_FILE)


# -- same results with and without the cache ------------------------------------------------


@pytest.mark.parametrize(("quote_dir", "coll_dir", "at"), CASES)
def test_same_results_with_and_without_cache(testdata, tmp_path, quote_dir, coll_dir, at):
    quote, coll = _load(testdata, quote_dir, coll_dir)
    plain = QuoteVerifier().verify(quote, coll, at=at)
    first = cached(tmp_path).verify(quote, coll, at=at)  # checks everything, records what verified
    again = cached(tmp_path).verify(quote, coll, at=at)  # a new verifier: entries stand in for checks
    assert first == plain and again == plain
    # entries made at one time serve every other time of the window, and change no verdict
    for other in (V4_FROM, V4_TO, V5_FROM, V5_TO, V4_TO + timedelta(days=1)):
        assert cached(tmp_path).verify(quote, coll, at=other) == QuoteVerifier().verify(quote, coll, at=other)


def test_warm_cache_checks_only_the_quotes_signatures(v4, tmp_path, ecdsa_calls):
    quote, coll = v4
    QuoteVerifier().verify(quote, coll, at=V4_FROM)
    cold = len(ecdsa_calls)
    assert (
        cold == 9
    )  # TCB signing and PCK CA certificates, root CRL, PCK CRL, TCB info, QE identity; PCK leaf, QE report, quote
    ecdsa_calls.clear()
    assert cached(tmp_path).verify(quote, coll, at=V4_FROM).genuine
    assert len(ecdsa_calls) == cold  # recording adds no check: the PCK CRL's issuer is the quote's PCK CA
    # one entry per item, one for the whole set, one for the PCK chain and one for the QE report
    assert [p.suffix for p in entries(tmp_path)] == [".json"] * (len(ITEMS) + 3)
    ecdsa_calls.clear()
    assert cached(tmp_path).verify(quote, coll, at=V4_TO).genuine
    assert ecdsa_calls == ["raw"]  # the quote's own signature
    ecdsa_calls.clear()
    assert (
        cached(tmp_path, trust_anchor=TrustAnchor(sha256=INTEL, name="same root, named again"))
        .verify(quote, coll, at=V4_FROM)
        .genuine
    )
    assert len(ecdsa_calls) == 1  # the entries belong to the anchor's hash, not its name
    ecdsa_calls.clear()
    QuoteVerifier(verified_cache=None).verify(quote, coll, at=V4_FROM)  # --no-cache
    assert len(ecdsa_calls) == cold


def test_files_are_private(v4, tmp_path):
    folder = tmp_path / "verified"
    cached(folder).verify(*v4, at=V4_FROM)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_default_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("TDXVM_VERIFIED_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_verified_dir() == tmp_path / "tdxvm" / "verified"  # beside tdxvm/collateral
    monkeypatch.setenv("TDXVM_VERIFIED_CACHE", str(tmp_path / "elsewhere"))
    assert default_verified_dir() == tmp_path / "elsewhere"


# -- time: an entry never outlives its item ---------------------------------------------------


def test_expired_item_refused_even_when_cached(v4, tmp_path, ecdsa_calls):
    quote, coll = v4
    assert cached(tmp_path).verify(quote, coll, at=V4_FROM).genuine
    ecdsa_calls.clear()
    late = cached(tmp_path).verify(quote, coll, at=V4_TO + timedelta(days=1))
    assert not late.genuine
    assert {"collateral-expired", "crl-expired"} <= {r.code for r in late.reasons}
    # Outside their windows the entries stand in for nothing: all checked again, except
    # the root CA CRL's signature, whose own window (2025-03-20..2026-04-03) still holds,
    # and the PCK leaf's and QE report's signatures (the PCK chain's window is 2025-02-06..2032-02-06).
    assert len(ecdsa_calls) == 6
    early = cached(tmp_path).verify(quote, coll, at=V4_FROM - timedelta(days=1))
    assert "collateral-not-yet-valid" in {r.code for r in early.reasons}


def test_lookup_respects_the_recorded_window(tmp_path):
    cache = VerifiedCache(directory=tmp_path)
    window = Window(V4_FROM, V4_TO)
    cache.record("tcb_info", "ab" * 32, anchor_sha256=INTEL, window=window)
    assert cache.lookup("tcb_info", "ab" * 32, anchor_sha256=INTEL, at=V4_FROM)
    assert cache.lookup("tcb_info", "ab" * 32, anchor_sha256=INTEL, at=V4_TO)
    assert not cache.lookup("tcb_info", "ab" * 32, anchor_sha256=INTEL, at=V4_TO + timedelta(seconds=1))
    assert not cache.lookup("tcb_info", "ab" * 32, anchor_sha256=INTEL, at=V4_FROM - timedelta(seconds=1))
    assert not cache.lookup("qe_identity", "ab" * 32, anchor_sha256=INTEL, at=V4_FROM)  # another item
    assert not cache.lookup("tcb_info", "ab" * 32, anchor_sha256=bytes(32), at=V4_FROM)  # another anchor


def test_other_anchor_other_entries(v4, tmp_path):
    quote, coll = v4
    cached(tmp_path).verify(quote, coll, at=V4_FROM)
    mine = {*collateral_keys(coll, INTEL).values(), whole_key(coll, INTEL)}
    assert (
        mine <= {p.stem for p in entries(tmp_path)} and len(entries(tmp_path)) == len(mine) + 2
    )  # + PCK chain, QE report
    assert not {*collateral_keys(coll, bytes(32)).values(), whole_key(coll, bytes(32))} & mine


def test_item_entries_serve_when_the_whole_set_entry_does_not(v4, tmp_path, ecdsa_calls):
    """A new PCK CRL (a new collateral set) still finds the entries of the three items
    that did not change; a broken whole-set entry falls back on the item entries."""
    quote, coll = v4
    cached(tmp_path).verify(quote, coll, at=V4_FROM)
    (tmp_path / f"{whole_key(coll, INTEL)}.json").write_text("broken")
    ecdsa_calls.clear()
    assert cached(tmp_path).verify(quote, coll, at=V4_FROM).genuine
    assert len(ecdsa_calls) == 1
    ecdsa_calls.clear()
    (tmp_path / f"{collateral_keys(coll, INTEL)['pck_crl']}.json").unlink()  # as if the PCK CRL were new
    (tmp_path / f"{whole_key(coll, INTEL)}.json").unlink()
    assert cached(tmp_path).verify(quote, coll, at=V4_FROM).genuine
    assert len(ecdsa_calls) == 3  # + the PCK CRL's signature and its chain (PCK CA by the root)
    assert (tmp_path / f"{whole_key(coll, INTEL)}.json").exists()  # recorded again


# -- fail closed ---------------------------------------------------------------------------


def _bad_tcb_info(coll):
    """The collateral with a TCB info whose signature no longer verifies (one status changed)."""
    bad = dataclasses.replace(
        coll, tcb_info=coll.tcb_info.replace('"tcbStatus":"OutOfDate"', '"tcbStatus":"UpToDate"', 1)
    )
    assert bad.tcb_info != coll.tcb_info
    return bad


def _forge(folder, bad, good_path, *, how):
    """Write an entry that claims the bad TCB info verified; ``how`` says how it was made."""
    key = collateral_keys(bad, INTEL)["tcb_info"]
    good_key = good_path.stem
    text = good_path.read_text()
    target = folder / f"{key}.json"
    if how == "copied":  # the good entry under the bad entry's name
        target.write_text(text)
    elif how == "edited":  # the good entry rewritten to name the bad bytes' key; the MAC no longer matches
        target.write_text(text.replace(good_key, key))
    elif how == "truncated":
        target.write_text(text.replace(good_key, key)[:-20])
    else:  # a correctly made entry (the same user could make one) that is not private
        cache = VerifiedCache(directory=folder)
        cache.record("tcb_info", key, anchor_sha256=INTEL, window=Window(V4_FROM - timedelta(days=9), V4_TO))
        if how == "group-writable":
            target.chmod(0o620)
        elif how == "world-writable":
            target.chmod(0o602)
        elif how == "foreign-owned":
            os.chown(target, 4321, 4321)
        elif how == "symlink":
            real = folder / "elsewhere.entry"
            target.rename(real)
            target.symlink_to(real)
        elif how == "folder-group-writable":
            folder.chmod(0o770)
        elif how == "foreign-key":
            os.chown(folder / KEY_FILE, 4321, 4321)
    return target


@pytest.mark.parametrize(
    "how",
    [
        "copied",
        "edited",
        "truncated",
        "group-writable",
        "world-writable",
        "foreign-owned",
        "symlink",
        "folder-group-writable",
        "foreign-key",
    ],
)
def test_tampered_entry_does_not_make_bad_collateral_pass(v4, tmp_path, how):
    if how.startswith("foreign") and os.geteuid() != 0:
        pytest.skip("needs root to give a file another owner")
    quote, coll = v4
    folder = tmp_path / "verified"
    assert cached(folder).verify(quote, coll, at=V4_FROM).genuine
    good_path = folder / f"{collateral_keys(coll, INTEL)['tcb_info']}.json"
    bad = _bad_tcb_info(coll)
    target = _forge(folder, bad, good_path, how=how)
    assert target.exists()
    result = cached(folder).verify(quote, bad, at=V4_FROM)
    assert not result.genuine
    assert "tcb-info-signature" in {r.code for r in result.reasons}
    assert result == QuoteVerifier().verify(quote, bad, at=V4_FROM)


def test_correct_private_entry_is_trusted(v4, tmp_path):
    """The counterpart of the test above: the same forged entry, private and well made,
    is trusted. The cache defends against corruption and other users, not against a
    process of the same user (which could change tdxvm itself)."""
    quote, coll = v4
    folder = tmp_path / "verified"
    cached(folder).verify(quote, coll, at=V4_FROM)
    good_path = folder / f"{collateral_keys(coll, INTEL)['tcb_info']}.json"
    bad = _bad_tcb_info(coll)
    _forge(folder, bad, good_path, how="private")
    assert "tcb-info-signature" not in {r.code for r in cached(folder).verify(quote, bad, at=V4_FROM).reasons}


@pytest.mark.parametrize("damage", ["garbage", "empty", "mac", "dates", "key-file"])
def test_damaged_entries_are_checked_again(v4, tmp_path, ecdsa_calls, damage):
    quote, coll = v4
    folder = tmp_path / "verified"
    cached(folder).verify(quote, coll, at=V4_FROM)
    for path in entries(folder):
        text = path.read_text()
        path.write_text(
            {
                "garbage": "\x00\xff not an entry",
                "empty": "",
                "mac": text[:-3] + ("000" if not text.endswith("000\n") else "111") + "\n",
                "dates": text.replace("2025-0", "2024-0"),
                "key-file": text,
            }[damage]
        )
    if damage == "key-file":
        (folder / KEY_FILE).write_bytes(os.urandom(32))  # entries made under another key
    ecdsa_calls.clear()
    result = cached(folder).verify(quote, coll, at=V4_FROM)
    assert len(ecdsa_calls) == 9  # every entry ignored: everything checked again
    assert result.genuine and result == QuoteVerifier().verify(quote, coll, at=V4_FROM)


def test_unwritable_cache_is_skipped(v4, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cached(blocker / "verified").verify(*v4, at=V4_FROM).genuine


def test_many_entries_are_pruned(tmp_path, monkeypatch):
    from tdxvm.attest import verifiedcache

    monkeypatch.setattr(verifiedcache, "MAX_ENTRIES", 64)  # the rule, not the size, is under test: fewer files to write
    cache = VerifiedCache(directory=tmp_path)
    for i in range(verifiedcache.MAX_ENTRIES + 10):
        cache._pruned = False
        cache.record("tcb_info", f"{i:064x}", anchor_sha256=INTEL, window=Window(V4_FROM, V4_TO))
    left = entries(tmp_path)
    assert len(left) <= verifiedcache.MAX_ENTRIES
    assert f"{verifiedcache.MAX_ENTRIES + 9:064x}.json" in {p.name for p in left}  # the newest stay
