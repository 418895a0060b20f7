"""TDVF metadata and MRTD: the real Debian TDVF against a second implementation, and
malformed images rejected with the byte offset."""

from __future__ import annotations

import hashlib
import struct

import pytest

from tdxvm.image import MeasureError
from tdxvm.image.tdvf import ATTR_MR_EXTEND, ATTR_PAGE_AUG, mrtd, parse_tdvf

from .conftest import build_tdvf

# MRTD of ovmf-inteltdx 2026.08+ds-2 (OVMF.inteltdx.ms.fd, SHA-256 below), computed by
# tdxvm and by the independent implementation in this file; pinned so that a change of
# either shows. No peer publishes a value for this build (dstack-mr and tdx-measure pin
# their own firmware, which Debian does not ship).
PINNED_FIRMWARE_SHA256 = "a265075b4147a096109e501e76196df1ec8a18659c26f7401492c597ec88f312"
PINNED = {
    "single-pass": "a7a1f751abc454f9cbab198ca8d2edb2821935df525c74182b5e776cb0929e8c59aefecce725b0d08a5e9d3d3183bd08",
    "two-pass": "b90b236113eb4c0d4df4ef590568c14e6028a3a31d7e8ac63dee9845df5008d3ebf82d4f5974e933798f65d7a279b9a9",
}


def independent_mrtd(fw: bytes, two_pass: bool = False) -> bytes:
    """A second MRTD implementation: finds the descriptor by scanning for a valid
    "TDVF" header (not through the GUIDed table), writes the whole TDH.MEM.PAGE.ADD /
    TDH.MR.EXTEND record stream into one buffer, and hashes it once."""
    candidates = []
    pos = fw.find(b"TDVF")
    while pos >= 0:
        length, version, count = struct.unpack_from("<III", fw, pos + 4)
        if version == 1 and 0 < count < 64 and length == 16 + 32 * count:
            candidates.append(pos)
        pos = fw.find(b"TDVF", pos + 1)
    assert len(candidates) == 1, candidates
    count = struct.unpack_from("<I", fw, candidates[0] + 12)[0]
    stream = bytearray()
    for i in range(count):
        data_off, _raw, addr, size, _type, attrs = struct.unpack_from("<IIQQII", fw, candidates[0] + 16 + 32 * i)
        if attrs & 2:
            continue
        adds = [struct.pack("<16sQ104x", b"MEM.PAGE.ADD", addr + p) for p in range(0, size, 4096)]
        extends = []
        for p in range(0, size, 4096):
            page = b""
            if attrs & 1:
                for c in range(0, 4096, 256):
                    page += struct.pack("<16sQ104x", b"MR.EXTEND", addr + p + c)
                    page += fw[data_off + p + c : data_off + p + c + 256]
            extends.append(page)
        if two_pass:
            stream += b"".join(adds) + b"".join(extends)
        else:
            stream += b"".join(a + e for a, e in zip(adds, extends, strict=True))
    return hashlib.sha384(bytes(stream)).digest()


def test_real_tdvf_metadata(tdvf_image):
    meta = parse_tdvf(tdvf_image)
    kinds = [(s.type_name, s.extended, s.added) for s in meta.sections]
    assert kinds[0] == ("BFV", True, True)  # the boot firmware volume is extended
    assert ("CFV", False, True) in kinds  # the variable store is added, not extended
    assert {"TD_HOB", "TempMem"} <= {k for k, _, _ in kinds}
    hob = [s for s in meta.sections if s.type_name == "TD_HOB"]
    assert len(hob) == 1 and hob[0].raw_data_size == 0
    bfv = meta.sections[0]
    assert bfv.data_offset + bfv.raw_data_size <= len(tdvf_image)
    assert bfv.memory_address + bfv.memory_data_size == 1 << 32  # BFV ends at 4 GiB (reset vector)


@pytest.mark.parametrize("order", ["single-pass", "two-pass"])
def test_real_tdvf_mrtd_matches_independent_implementation(tdvf_image, order):
    assert mrtd(tdvf_image, order=order) == independent_mrtd(tdvf_image, two_pass=order == "two-pass")


def test_real_tdvf_mrtd_pinned(tdvf_image, tdvf_path):
    digest = hashlib.sha256(tdvf_image).hexdigest()
    if digest != PINNED_FIRMWARE_SHA256:
        pytest.skip(
            f"Debian's ovmf-inteltdx changed ({tdvf_path} has SHA-256 {digest}); "
            "the independent-implementation test still covers it"
        )
    for order, value in PINNED.items():
        assert mrtd(tdvf_image, order=order).hex() == value


def test_orders_on_a_small_image():
    # One extended page of data and one plain page: the record order is visible.
    data = bytes(range(256)) * 16
    fw = build_tdvf(
        [(0, 0x1000, 0x100000, 0x2000, 0, ATTR_MR_EXTEND), (0, 0, 0x200000, 0x1000, 3, 0)], fill=data + data
    )
    add = [struct.pack("<16sQ104x", b"MEM.PAGE.ADD", a) for a in (0x100000, 0x101000, 0x200000)]

    def ext(page: int) -> bytes:
        return b"".join(
            struct.pack("<16sQ104x", b"MR.EXTEND", 0x100000 + page * 4096 + c) + data[c : c + 256]
            for c in range(0, 4096, 256)
        )

    single = add[0] + ext(0) + add[1] + ext(1) + add[2]
    two = add[0] + add[1] + ext(0) + ext(1) + add[2]
    assert mrtd(fw) == hashlib.sha384(single).digest()
    assert mrtd(fw, order="two-pass") == hashlib.sha384(two).digest()


def test_page_aug_sections_are_not_in_mrtd():
    base = [(0, 0x1000, 0x100000, 0x1000, 0, ATTR_MR_EXTEND)]
    with_aug = base + [(0, 0, 0x300000, 0x4000, 4, ATTR_PAGE_AUG)]
    assert mrtd(build_tdvf(base)) == mrtd(build_tdvf(with_aug))


def _mutate(fw: bytes, at: int, value: bytes) -> bytes:
    return fw[:at] + value + fw[at + len(value) :]


SIZE = 0x40000
META = SIZE - 0x1000
FOOTER = SIZE - 0x30
GOOD = [(0, 0x1000, 0x100000, 0x1000, 0, ATTR_MR_EXTEND), (0, 0, 0x809000, 0x2000, 2, 0)]


@pytest.mark.parametrize(
    ("image", "offset", "words"),
    [
        (bytes(40), 0, "too small"),
        (bytes(SIZE), FOOTER, "footer GUID"),
        (_mutate(build_tdvf(GOOD), FOOTER - 2, struct.pack("<H", 10)), FOOTER - 2, "table length"),
        (
            _mutate(build_tdvf(GOOD, size=0x2000), 0x2000 - 0x32, struct.pack("<H", 0xFFFF)),
            0x2000 - 0x32,
            "table length",
        ),
        (_mutate(build_tdvf(GOOD), FOOTER - 20, struct.pack("<H", 5)), FOOTER - 20, "entry length"),
        (_mutate(build_tdvf(GOOD), FOOTER - 18, bytes(16)), FOOTER, "no TDX metadata offset entry"),
        (_mutate(build_tdvf(GOOD), FOOTER - 24, struct.pack("<I", SIZE + 1)), FOOTER - 24, "outside the image"),
        (_mutate(build_tdvf(GOOD), META, b"TDVX"), META, "signature"),
        (_mutate(build_tdvf(GOOD), META + 8, struct.pack("<I", 2)), META + 8, "version 2"),
        (_mutate(build_tdvf(GOOD), META + 4, struct.pack("<I", 99)), META + 4, "does not match 2 sections"),
        (_mutate(build_tdvf(GOOD), META + 12, struct.pack("<I", 200)), META + 4, "does not match"),
        (build_tdvf([(0, 0x1000, 0x100800, 0x1000, 0, 1)]), META + 16 + 8, "4 KiB aligned"),
        (build_tdvf([(0, 0x3000, 0x100000, 0x1000, 0, 1)]), META + 16 + 4, "exceeds MemoryDataSize"),
        (build_tdvf([(0, 0, 0x100000, 0x1000, 1, 0)]), META + 16 + 4, "no image data"),
        (build_tdvf([(0, 0x10, 0x809000, 0x1000, 2, 0)]), META + 16 + 4, "has no image data"),
        (build_tdvf([(0, 0, 0x809000, 0x1000, 2, ATTR_MR_EXTEND)]), META + 16 + 28, "cannot be predicted"),
        (build_tdvf([(SIZE - 0x800, 0x800, 0x100000, 0x1000, 0, 1)]), META + 16, "runs past the end"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_malformed_tdvf_names_the_offset(image, offset, words):
    with pytest.raises(MeasureError) as info:
        mrtd(image)
    assert info.value.code == "tdvf"
    assert info.value.offset == offset
    assert f"byte offset {offset}:" in str(info.value)
    assert words in str(info.value)


def test_truncated_real_tdvf(tdvf_image):
    with pytest.raises(MeasureError, match=rf"byte offset {len(tdvf_image) - 1 - 0x30}: no OVMF table footer"):
        parse_tdvf(tdvf_image[:-1])
    with pytest.raises(MeasureError, match="byte offset"):
        parse_tdvf(tdvf_image[-0x1000:])  # the table survives, the metadata it points to does not


def test_unknown_order():
    with pytest.raises(MeasureError, match="unknown page order"):
        mrtd(build_tdvf(GOOD), order="three-pass")
