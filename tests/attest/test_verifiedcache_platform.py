"""The verified cache's per-platform entries: a quote's PCK certificate chain and its QE
report signature. A warm cache leaves only the quote's own signature to check; an entry
serves only its exact bytes (another PCK leaf finds none), only inside its window, and
a tampered, foreign or damaged entry is ignored and the signature checked again."""

from __future__ import annotations

import base64
import os
from datetime import timedelta

import pytest

from tdxvm.attest import chain as chain_mod
from tdxvm.attest import verify as verify_mod
from tdxvm.attest.chain import TrustAnchor
from tdxvm.attest.collateral import load_bundle
from tdxvm.attest.pck import parse_pem_chain, pem_block_der, pem_blocks
from tdxvm.attest.quote import parse_quote
from tdxvm.attest.verifiedcache import PCK_CHAIN, QE_REPORT, VerifiedCache, Window, pck_chain_key, qe_report_key
from tdxvm.attest.verify import QuoteVerifier
from tdxvm.emulate.platform import EmulatedPlatform

from ..conftest import utc

V4_FROM, V4_TO = utc("2025-06-19T10:32:27Z"), utc("2025-07-19T10:00:35Z")
PCK_FROM, PCK_TO = utc("2025-02-06T23:25:51Z"), utc("2032-02-06T23:25:51Z")  # the PCK leaf's validity
INTEL = TrustAnchor.intel().sha256


@pytest.fixture
def v4(testdata):
    return (testdata / "dcap-qvl-v4" / "quote.bin").read_bytes(), load_bundle(
        testdata / "dcap-qvl-v4" / "collateral.json"
    )


@pytest.fixture
def checked(monkeypatch):
    """The signature value of every ECDSA verification the verifier makes."""
    seen: list[bytes] = []
    signed, ok = chain_mod._ecdsa_signed, verify_mod._ecdsa_ok

    def record_signed(key, signature, data, oid):
        seen.append(signature)
        return signed(key, signature, data, oid)

    def record_ok(key, signature, data):
        seen.append(signature)
        return ok(key, signature, data)

    monkeypatch.setattr(chain_mod, "_ecdsa_signed", record_signed)
    monkeypatch.setattr(verify_mod, "_ecdsa_ok", record_ok)
    return seen


def cached(folder, **kw):
    return QuoteVerifier(verified_cache=VerifiedCache(directory=folder), **kw)


def _signatures(quote: bytes):
    """(quote signature, QE report signature, PCK leaf's signature) of a quote."""
    q = parse_quote(quote)
    return (
        q.signature.signature,
        q.signature.qe_report_signature,
        parse_pem_chain(q.signature.pck_chain_pem)[0].signature,
    )


def _keys(quote: bytes, anchor: bytes = INTEL):
    """The entry names of the quote's PCK chain and QE report."""
    q = parse_quote(quote)
    hashes = [chain_mod.der_sha256(c) for c in parse_pem_chain(q.signature.pck_chain_pem)]
    return {
        PCK_CHAIN: pck_chain_key(hashes, anchor),
        QE_REPORT: qe_report_key(hashes[0], q.signature.qe_report.raw, q.signature.qe_report_signature, anchor),
    }


def _bad_leaf_signature(quote: bytes) -> bytes:
    """The quote with the last byte of its PCK leaf's signature changed (the same length,
    so the quote still parses; its leaf is then not validly issued by the PCK CA)."""
    block = pem_blocks(parse_quote(quote).signature.pck_chain_pem)[0]
    der = bytearray(pem_block_der(block, "test", 0))
    der[-1] ^= 1
    lines = block.split(b"\n")
    text = base64.b64encode(bytes(der))
    body, pos = [], 0
    for line in lines[1:-1]:
        body.append(text[pos : pos + len(line)])
        pos += len(line)
    bad = b"\n".join([lines[0], *body, lines[-1]])
    assert len(bad) == len(block) and bad != block
    return quote.replace(block, bad)


def _bad_qe_report_signature(quote: bytes) -> bytes:
    sig = parse_quote(quote).signature.qe_report_signature
    return quote.replace(sig, bytes([sig[0] ^ 1]) + sig[1:])


# -- a warm cache checks only the quote's signature ----------------------------------------


def test_entries_stand_in_for_the_pck_chain_and_qe_report(v4, tmp_path, checked):
    quote, coll = v4
    quote_sig, qe_sig, leaf_sig = _signatures(quote)
    assert cached(tmp_path).verify(quote, coll, at=V4_FROM).genuine
    assert {quote_sig, qe_sig, leaf_sig} <= set(checked)
    assert all((tmp_path / f"{key}.json").is_file() for key in _keys(quote).values())
    checked.clear()
    result = cached(tmp_path).verify(quote, coll, at=V4_TO)
    assert checked == [quote_sig]
    assert result == QuoteVerifier().verify(quote, coll, at=V4_TO)


def test_revocation_still_checked_with_a_warm_cache(tmp_path, checked):
    """The PCK chain entry vouches for signatures, never for revocation: a PCK CRL that
    lists the leaf refuses the quote although the chain's entry serves."""
    platform = EmulatedPlatform(at=V4_FROM, seed="verified-cache-platform")
    anchor = TrustAnchor.from_der(platform.root_ca_der)
    quote = platform.sign_quote()
    assert cached(tmp_path, trust_anchor=anchor).verify(quote, platform.collateral(), at=V4_FROM).genuine
    revoked = platform.variant(revoke_pck=True).collateral()
    checked.clear()
    result = cached(tmp_path, trust_anchor=anchor).verify(quote, revoked, at=V4_FROM)
    assert "cert-revoked" in {r.code for r in result.reasons}
    assert _signatures(quote)[2] not in checked  # the PCK leaf's signature came from the entry
    assert result == QuoteVerifier(trust_anchor=anchor).verify(quote, revoked, at=V4_FROM)


# -- an entry serves only its own bytes, inside its window ---------------------------------


def test_pck_chain_entry_unused_outside_its_window(v4, tmp_path, checked):
    quote, coll = v4
    _, qe_sig, leaf_sig = _signatures(quote)
    cached(tmp_path).verify(quote, coll, at=V4_FROM)
    for at in (PCK_FROM - timedelta(seconds=1), PCK_TO + timedelta(seconds=1)):
        checked.clear()
        result = cached(tmp_path).verify(quote, coll, at=at)
        assert leaf_sig in checked and qe_sig in checked  # both entries lie outside: checked again
        assert result == QuoteVerifier().verify(quote, coll, at=at)
    cache, keys = VerifiedCache(directory=tmp_path), _keys(quote)
    for item in (PCK_CHAIN, QE_REPORT):
        assert cache.lookup(item, keys[item], anchor_sha256=INTEL, at=PCK_FROM)
        assert cache.lookup(item, keys[item], anchor_sha256=INTEL, at=PCK_TO)
        assert not cache.lookup(item, keys[item], anchor_sha256=INTEL, at=PCK_TO + timedelta(seconds=1))
        assert not cache.lookup(item, keys[item], anchor_sha256=bytes(32), at=V4_FROM)  # another anchor


def test_other_pck_leaf_finds_no_entry(tmp_path, checked):
    """Two platforms under one PCK CA: the second's leaf and QE report are checked anew."""
    first = EmulatedPlatform(at=V4_FROM, seed="verified-cache-platform")
    second = first.variant(ppid=bytes(range(16)))
    anchor = TrustAnchor.from_der(first.root_ca_der)
    assert first.pck_ca_cert == second.pck_ca_cert and first.pck_cert != second.pck_cert
    coll = first.collateral()
    cached(tmp_path, trust_anchor=anchor).verify(first.sign_quote(), coll, at=V4_FROM)
    quote = second.sign_quote()
    assert not set(_keys(quote, anchor.sha256).values()) & set(_keys(first.sign_quote(), anchor.sha256).values())
    checked.clear()
    result = cached(tmp_path, trust_anchor=anchor).verify(quote, coll, at=V4_FROM)
    _, qe_sig, leaf_sig = _signatures(quote)
    assert leaf_sig in checked and qe_sig in checked
    assert result.genuine and result == QuoteVerifier(trust_anchor=anchor).verify(quote, coll, at=V4_FROM)


def test_qe_report_entry_belongs_to_its_pck_leaf(v4, tmp_path):
    quote, _ = v4
    q = parse_quote(quote).signature
    leaf = chain_mod.der_sha256(parse_pem_chain(q.pck_chain_pem)[0])
    cache = VerifiedCache(directory=tmp_path)
    key = qe_report_key(leaf, q.qe_report.raw, q.qe_report_signature, INTEL)
    cache.record(QE_REPORT, key, anchor_sha256=INTEL, window=Window(PCK_FROM, PCK_TO))
    assert cache.lookup(QE_REPORT, key, anchor_sha256=INTEL, at=V4_FROM)
    for other in (
        qe_report_key(bytes(32), q.qe_report.raw, q.qe_report_signature, INTEL),  # another leaf
        qe_report_key(leaf, q.qe_report.raw[:-1] + b"\x01", q.qe_report_signature, INTEL),  # another report
        qe_report_key(leaf, q.qe_report.raw, q.qe_report_signature[:-1] + b"\x01", INTEL),
    ):
        assert other != key and not cache.lookup(QE_REPORT, other, anchor_sha256=INTEL, at=V4_FROM)


# -- fail closed ----------------------------------------------------------------------------


def _forge(folder, good: str, bad: str, how: str):
    """Make an entry under the name ``bad`` from the good entry ``good``."""
    good_path, target = folder / f"{good}.json", folder / f"{bad}.json"
    text = good_path.read_text()
    if how == "copied":  # the good entry under the bad entry's name
        target.write_text(text)
    elif how == "edited":  # renamed inside too: the MAC no longer matches
        target.write_text(text.replace(good, bad))
    elif how == "truncated":
        target.write_text(text.replace(good, bad)[:-20])
    else:  # a well-made entry that is not private
        item = text.splitlines()[1].removeprefix("item ")
        VerifiedCache(directory=folder).record(item, bad, anchor_sha256=INTEL, window=Window(PCK_FROM, PCK_TO))
        if how == "world-writable":
            target.chmod(0o602)
        elif how == "foreign-owned":
            os.chown(target, 4321, 4321)
        elif how == "symlink":
            real = folder / "elsewhere.entry"
            target.rename(real)
            target.symlink_to(real)
    assert target.exists() or target.is_symlink()


@pytest.mark.parametrize("how", ["copied", "edited", "truncated", "world-writable", "foreign-owned", "symlink"])
@pytest.mark.parametrize(
    ("item", "tamper", "code"),
    [(PCK_CHAIN, _bad_leaf_signature, "cert-signature"), (QE_REPORT, _bad_qe_report_signature, "qe-report-signature")],
)
def test_forged_entry_does_not_make_a_bad_signature_pass(v4, tmp_path, how, item, tamper, code):
    if how == "foreign-owned" and os.geteuid() != 0:
        pytest.skip("needs root to give a file another owner")
    quote, coll = v4
    folder = tmp_path / "verified"
    assert cached(folder).verify(quote, coll, at=V4_FROM).genuine
    bad = tamper(quote)
    _forge(folder, _keys(quote)[item], _keys(bad)[item], how)
    result = cached(folder).verify(bad, coll, at=V4_FROM)
    assert code in {r.code for r in result.reasons}
    assert result == QuoteVerifier().verify(bad, coll, at=V4_FROM)


@pytest.mark.parametrize("damage", ["garbage", "mac", "dates", "other-anchor"])
@pytest.mark.parametrize("item", [PCK_CHAIN, QE_REPORT])
def test_damaged_entry_is_checked_again(v4, tmp_path, checked, item, damage):
    quote, coll = v4
    cached(tmp_path).verify(quote, coll, at=V4_FROM)
    path = tmp_path / f"{_keys(quote)[item]}.json"
    text = path.read_text()
    path.write_text(
        {
            "garbage": "\x00\xff not an entry",
            "mac": text[:-5] + "0000\n",
            "dates": text.replace("2032-", "2039-"),
            "other-anchor": text.replace(INTEL.hex(), "00" * 32),
        }[damage]
    )
    checked.clear()
    result = cached(tmp_path).verify(quote, coll, at=V4_FROM)
    _, qe_sig, leaf_sig = _signatures(quote)
    assert (leaf_sig if item == PCK_CHAIN else qe_sig) in checked
    assert result.genuine and result == QuoteVerifier().verify(quote, coll, at=V4_FROM)
