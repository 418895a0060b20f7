"""Hand-written DER and the SGX extension, checked against X.690 and a real Intel PCK."""

from __future__ import annotations

import pytest
from cryptography import x509
from hypothesis import given
from hypothesis import strategies as st

from tdxvm.attest.pck import parse_pem_chain
from tdxvm.attest.quote import parse_quote
from tdxvm.emulate import SgxExtension, der
from tdxvm.emulate.sgxext import SGX_EXTENSION_OID


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, "020100"),
        (1, "020101"),
        (127, "02017f"),
        (128, "02020080"),
        (256, "02020100"),
        (-1, "0201ff"),
        (-128, "020180"),
        (-129, "0202ff7f"),
    ],
)
def test_integer_is_minimal_twos_complement(value: int, encoded: str) -> None:
    assert der.integer(value).hex() == encoded


@given(st.integers(min_value=-(2**70), max_value=2**70))
def test_integer_round_trips(value: int) -> None:
    enc = der.integer(value)
    assert enc[0] == 0x02 and enc[1] == len(enc) - 2
    assert int.from_bytes(enc[2:], "big", signed=True) == value


def test_long_lengths_and_other_types() -> None:
    assert der.octet_string(bytes(200))[:3].hex() == "0481c8"
    assert der.octet_string(bytes(300))[:4].hex() == "0482012c"
    assert der.boolean(True).hex() == "0101ff"
    assert der.boolean(False).hex() == "010100"
    assert der.enumerated(1).hex() == "0a0101"
    assert der.oid("1.2.840.113741.1.13.1.2.17").hex() == "060b2a864886f84d010d010211"
    with pytest.raises(ValueError):
        der.oid("3.1")


def test_sgx_extension_matches_a_real_intel_pck_byte_for_byte(testdata) -> None:
    quote = parse_quote((testdata / "dcap-qvl-v4" / "quote.bin").read_bytes())
    leaf = parse_pem_chain(quote.signature.pck_chain_pem)[0]
    ext = leaf.extensions.get_extension_for_oid(x509.ObjectIdentifier(SGX_EXTENSION_OID))
    # Values read from Intel's certificate (PCK Platform CA, FMSPC B0C06F000000).
    ours = SgxExtension(
        ppid=bytes.fromhex("811dca2a26b952e85bb6448b097ba4fd"),
        tcb_components=(3, 3, 2, 2, 4, 1, 0, 5) + (0,) * 8,
        pce_svn=11,
        cpu_svn=bytes.fromhex("03030202040100050000000000000000"),
        pce_id=bytes(2),
        fmspc=bytes.fromhex("B0C06F000000"),
        sgx_type=1,
        platform_instance_id=bytes.fromhex("07828474603e7019dc930775ffe8cdd2"),
    )
    assert ext.critical is False
    assert ours.encode() == ext.value.value


def test_sgx_extension_rejects_bad_sizes() -> None:
    good = dict(ppid=bytes(16), tcb_components=(0,) * 16, pce_svn=0, pce_id=bytes(2), fmspc=bytes(6))
    SgxExtension(**good)
    for change in (
        {"ppid": bytes(15)},
        {"tcb_components": (0,) * 15},
        {"fmspc": bytes(5)},
        {"pce_svn": 70000},
    ):
        with pytest.raises(ValueError):
            SgxExtension(**{**good, **change})
