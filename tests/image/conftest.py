"""Fixtures for the measurement tests: real firmware and signed PE files from Debian,
the real event logs beside the repository, and builders for small synthetic inputs.

Debian packages are fetched as data, never installed (``tests/debian_data.py``): a
private sources list for unstable, ``apt-get download``, ``dpkg-deb -x`` into
``~/.cache/tdxvm-test/debian/<package>`` (or ``$TDXVM_TEST_CACHE``), reused afterwards.
A test that needs one is skipped, with the reason, only when the download fails.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from ..debian_data import MIRROR, cache_dir, unstable_package

FOOTER_GUID = uuid.UUID("96b582de-1fb2-45f7-baea-a366c55a082d")
METADATA_GUID = uuid.UUID("e47a6535-984a-4798-865e-4685a7bf8ec2")


def _package_file(package: str, *patterns: str) -> Path:
    try:
        root = unstable_package(package)
    except (OSError, subprocess.CalledProcessError, RuntimeError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        pytest.skip(f"cannot fetch {package} from Debian unstable ({exc}; {detail[-300:]!r})")
    found = sorted(p for pattern in patterns for p in root.glob(pattern))
    if not found:
        pytest.fail(f"{package} from Debian unstable has no {' or '.join(patterns)} (package layout changed?)")
    return found[0]


@pytest.fixture(scope="session")
def tdvf_path() -> Path:
    """Debian unstable's ovmf-inteltdx TDVF (``OVMF.inteltdx.ms.fd``)."""
    return _package_file("ovmf-inteltdx", "usr/share/ovmf/OVMF.inteltdx*.fd")


@pytest.fixture(scope="session")
def tdvf_image(tdvf_path: Path) -> bytes:
    return tdvf_path.read_bytes()


@pytest.fixture(scope="session")
def shim_signed() -> bytes:
    """shimx64.efi.signed: a real PE/COFF image carrying two Authenticode signatures."""
    return _package_file("shim-signed", "usr/lib/shim/shimx64.efi.signed").read_bytes()


@pytest.fixture(scope="session")
def grub_signed() -> bytes:
    """grubx64.efi.signed, signed by Debian's Secure Boot signer."""
    return _package_file("grub-efi-amd64-signed", "usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed").read_bytes()


def _resolve_kernel_package() -> str:
    """Debian unstable's current cloud kernel binary package (its name carries the version)."""
    work = Path(tempfile.mkdtemp(prefix="tdxvm-apt-"))
    try:
        (work / "lists" / "partial").mkdir(parents=True)
        (work / "sources.list").write_text(f"deb {MIRROR} unstable main\n")
        opts = [
            f"-oDir::Etc::SourceList={work / 'sources.list'}",
            "-oDir::Etc::SourceParts=/dev/null",
            f"-oDir::State::Lists={work / 'lists'}",
            "-oAPT::Sandbox::User=root",
            "-qq",
        ]
        subprocess.run(["apt-get", *opts, "update"], check=True, capture_output=True)
        name = "linux-image-cloud-amd64"
        for _ in range(3):  # metapackage -> linux-image-<version>-cloud-amd64 -> linux-binary-<version>-...
            deps = subprocess.run(["apt-cache", *opts, "depends", name], check=True, capture_output=True, text=True)
            found = re.findall(r"Depends: (linux-(?:image|binary)-\d\S*cloud-amd64)$", deps.stdout, re.M)
            if not found:
                return name
            name = found[0]
        return name
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def debian_kernel() -> Path:
    """A signed bzImage of Debian unstable's cloud kernel (Linux >= 6.9, EFI stub with CC measurement)."""
    patterns = ("usr/lib/modules/*/vmlinuz", "boot/vmlinuz-*")
    cached = sorted(p for pattern in patterns for p in cache_dir().glob(f"linux-*cloud-amd64/{pattern}"))
    if cached:
        return cached[-1]
    try:
        package = _resolve_kernel_package()
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot query Debian unstable for its kernel package ({exc})")
    return _package_file(package, *patterns)


def build_pe(
    *,
    sections: list[tuple[int, bytes]],
    headers_size: int = 0x400,
    trailing: bytes = b"",
    cert: bytes = b"",
    rva_count: int = 16,
    magic: int = 0x20B,
    stub: bytes = b"",
) -> bytes:
    """A small PE32/PE32+ image: ``sections`` are (PointerToRawData, raw data), in
    section-table order; ``trailing`` follows the last section, then ``cert`` (the
    Certificate Table, whose data-directory entry points at it)."""
    pe_at = 0x80
    opt_size = (96 if magic == 0x10B else 112) + 8 * rva_count
    out = bytearray(headers_size)
    out[0:2] = b"MZ"
    struct.pack_into("<I", out, 0x3C, pe_at)
    out[0x40 : 0x40 + len(stub)] = stub
    out[pe_at : pe_at + 4] = b"PE\x00\x00"
    struct.pack_into("<HHIIIHH", out, pe_at + 4, 0x8664, len(sections), 0, 0, 0, opt_size, 0x22)
    opt = pe_at + 24
    struct.pack_into("<H", out, opt, magic)
    struct.pack_into("<I", out, opt + 60, headers_size)  # SizeOfHeaders
    struct.pack_into("<I", out, opt + 64, 0xDEADBEEF)  # CheckSum (skipped by Authenticode)
    struct.pack_into("<I", out, opt + (92 if magic == 0x10B else 108), rva_count)
    table = opt + opt_size
    for i, (pointer, raw) in enumerate(sections):
        struct.pack_into(
            "<8sIIIIIIHHI",
            out,
            table + 40 * i,
            f".s{i}".encode(),
            len(raw),
            0x1000 * (i + 1),
            len(raw),
            pointer,
            0,
            0,
            0,
            0,
            0x60000020,
        )
    body_end = max([headers_size] + [p + len(r) for p, r in sections])
    out.extend(bytes(body_end - len(out)))
    for pointer, raw in sections:
        out[pointer : pointer + len(raw)] = raw
    out.extend(trailing)
    if rva_count > 4:
        cert_entry = opt + (96 if magic == 0x10B else 112) + 32
        struct.pack_into("<II", out, cert_entry, len(out) if cert else 0, len(cert))
    out.extend(cert)
    return bytes(out)


def build_tdvf(sections: list[tuple[int, int, int, int, int, int]], *, size: int = 0x40000, fill: bytes = b"") -> bytes:
    """A minimal TDVF image of ``size`` bytes: ``fill`` at offset 0, the metadata
    (``sections`` as DataOffset, RawDataSize, MemoryAddress, MemoryDataSize, Type,
    Attributes) at ``size - 0x1000``, and the OVMF GUIDed table at the end."""
    fw = bytearray(size)
    fw[: len(fill)] = fill
    meta = size - 0x1000
    struct.pack_into("<4sIII", fw, meta, b"TDVF", 16 + 32 * len(sections), 1, len(sections))
    for i, s in enumerate(sections):
        struct.pack_into("<IIQQII", fw, meta + 16 + 32 * i, *s)
    footer = size - 0x30
    entry = struct.pack("<IH", size - meta, 22) + METADATA_GUID.bytes_le
    fw[footer - 2 - len(entry) : footer - 2] = entry
    struct.pack_into("<H", fw, footer - 2, len(entry) + 18)
    fw[footer : footer + 16] = FOOTER_GUID.bytes_le
    return bytes(fw)


def fake_ext4(*, output: Path, offset: int = 0, **_) -> None:
    """Stands in for :func:`tdxvm.image.ext4.make_ext4`: 16 zero blocks at ``offset`` of
    a sparse ``output``."""
    with open(output, "wb") as f:
        f.truncate(offset + (16 << 12))


def write_lock_for(recipe_path: Path) -> Path:
    """A lock beside ``recipe_path`` taken for its inputs, listing no packages: for tests
    that replace the package steps (a real lock comes from ``tdxvm image lock``)."""
    from tdxvm.image import lockfile
    from tdxvm.image.recipe import load_recipe

    recipe = load_recipe(recipe_path).recipe
    lock = lockfile.Lock(
        recipe=recipe.name,
        taken_at=1_700_000_000,
        inputs=recipe.lock_inputs(),
        debootstrap="1.0.128",
        sources=tuple(
            lockfile.Source(uri=uri, suite=suite, inrelease_sha256="00" * 32, date="Sat, 01 Jun 2024 00:00:00 UTC")
            for uri, suite in recipe.apt_sources()
        ),
        packages=(),
        wheels=(),
        firmware=None,
    )
    path = lockfile.lock_path(recipe_path)
    lockfile.write(lock, path)
    return path
