"""UEFI variables as TDVF measures them: the CFV variable store, ``UEFI_VARIABLE_DATA``
and boot options.

* Variable store (edk2 ``MdeModulePkg/Include/Guid/VariableFormat.h``): the CFV is a
  firmware volume (``EFI_FIRMWARE_VOLUME_HEADER``, signature ``_FVH`` at byte 40, u16
  header length at 48) followed by a ``VARIABLE_STORE_HEADER`` (GUID, u32 size, u8
  format 0x5A, u8 state 0xFE, 6 reserved bytes). With the authenticated-variable GUID
  aaf32c78-947b-439a-a180-2e144ec37792 each variable is an
  ``AUTHENTICATED_VARIABLE_HEADER`` (u16 StartId 0x55AA, u8 State, u8 reserved, u32
  attributes, u64 monotonic count, 16-byte time stamp, u32 public-key index, u32
  NameSize, u32 DataSize, vendor GUID; 60 bytes), the UCS-2 name with its NUL, the
  data, then padding to 4 bytes. Only State 0x3F (VAR_ADDED) is a live variable.
* ``UEFI_VARIABLE_DATA`` (TCG PC Client PFP §10.4.2): vendor GUID, u64 name length in
  characters (no NUL), u64 data length, UCS-2 name (no NUL), data.
  ``EV_EFI_VARIABLE_DRIVER_CONFIG`` and ``EV_EFI_VARIABLE_AUTHORITY`` digests cover the
  whole structure; an ``EV_EFI_VARIABLE_BOOT`` digest covers only the data
  (``OvmfPkg/Tcg/TdTcg2Dxe/TdTcg2Dxe.c``, ``MeasureVariable``).
* ``EFI_LOAD_OPTION`` (UEFI 2.10 §3.1.3): u32 attributes, u16 FilePathListLength, UCS-2
  description with NUL, the device path, optional data. A firmware-volume file path
  is ``Fv(<FV name>)/FvFile(<file>)/End``: media nodes type 4 subtype 7 and 6 (20
  bytes each: 4-byte header + GUID), then the end node ``7F FF 04 00`` (PI spec
  vol. 3 §8.2-8.3).
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from tdxvm.image.measureerrors import MeasureError

EFI_GLOBAL_VARIABLE = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
EFI_IMAGE_SECURITY_DATABASE = uuid.UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")
AUTHENTICATED_VARIABLE_STORE = uuid.UUID("aaf32c78-947b-439a-a180-2e144ec37792")
VARIABLE_STORE = uuid.UUID("ddcf3616-3275-4164-98b6-fe85707ffe7d")
FV_SIGNATURE = b"_FVH"
STORE_HEADER_SIZE = 28
AUTH_HEADER_SIZE = 60
PLAIN_HEADER_SIZE = 32
START_ID = 0x55AA
VAR_ADDED = 0x3F

LOAD_OPTION_ACTIVE = 0x1
LOAD_OPTION_HIDDEN = 0x8
LOAD_OPTION_CATEGORY_APP = 0x100
MEDIA_DEVICE_PATH = 4
MEDIA_PIWG_FW_FILE_DP = 6
MEDIA_PIWG_FW_VOL_DP = 7
END_DEVICE_PATH = b"\x7f\xff\x04\x00"


@dataclass(frozen=True)
class Variable:
    """One live variable of a variable store; ``offset`` is its header's byte offset."""

    name: str
    vendor: uuid.UUID
    attributes: int
    data: bytes
    offset: int


def _fail(message: str, offset: int) -> MeasureError:
    return MeasureError(f"CFV variable store at byte offset {offset}: {message}", code="varstore", offset=offset)


def parse_variable_store(cfv: bytes, *, base: int = 0) -> dict[tuple[uuid.UUID, str], Variable]:
    """The live variables of a CFV image, keyed by (vendor GUID, name).

    ``base`` is the CFV's offset in the firmware file, added to every offset in errors.
    """
    raw = bytes(cfv)
    if len(raw) < 56 or raw[40:44] != FV_SIGNATURE:
        raise _fail("no firmware volume header (signature _FVH at byte 40)", base)
    (hdr_len,) = struct.unpack_from("<H", raw, 48)
    at = hdr_len
    if at + STORE_HEADER_SIZE > len(raw):
        raise _fail(f"variable store header at {hdr_len} runs past the CFV ({len(raw)} bytes)", base + at)
    guid = uuid.UUID(bytes_le=raw[at : at + 16])
    (size,) = struct.unpack_from("<I", raw, at + 16)
    if guid not in (AUTHENTICATED_VARIABLE_STORE, VARIABLE_STORE):
        raise _fail(f"unknown variable store GUID {guid}", base + at)
    if at + size > len(raw) or size < STORE_HEADER_SIZE:
        raise _fail(f"variable store size {size:#x} does not fit the CFV ({len(raw):#x} bytes)", base + at + 16)
    auth = guid == AUTHENTICATED_VARIABLE_STORE
    header = AUTH_HEADER_SIZE if auth else PLAIN_HEADER_SIZE
    end, pos = at + size, at + STORE_HEADER_SIZE
    found: dict[tuple[uuid.UUID, str], Variable] = {}
    while pos + header <= end:
        start_id, state, _, attrs = struct.unpack_from("<HBBI", raw, pos)
        if start_id != START_ID:
            break  # erased space (0xFF) after the last variable
        if auth:
            name_size, data_size = struct.unpack_from("<II", raw, pos + 36)
        else:
            name_size, data_size = struct.unpack_from("<II", raw, pos + 8)
        vendor = uuid.UUID(bytes_le=raw[pos + header - 16 : pos + header])
        name_at = pos + header
        if name_at + name_size + data_size > end or name_size < 2 or name_size % 2:
            raise _fail(f"variable with NameSize {name_size} and DataSize {data_size} runs past the store", base + pos)
        name = raw[name_at : name_at + name_size].decode("utf-16-le").rstrip("\x00")
        data = raw[name_at + name_size : name_at + name_size + data_size]
        if state == VAR_ADDED:
            found[(vendor, name)] = Variable(name, vendor, attrs, data, base + pos)
        pos = (name_at + name_size + data_size + 3) & ~3
    return found


def variable_data(vendor: uuid.UUID, name: str, data: bytes) -> bytes:
    """``UEFI_VARIABLE_DATA`` for a variable (name without NUL)."""
    ucs2 = name.encode("utf-16-le")
    return vendor.bytes_le + struct.pack("<QQ", len(ucs2) // 2, len(data)) + ucs2 + data


def fv_file_path(fv_name: uuid.UUID, file_name: uuid.UUID) -> bytes:
    """The device path ``Fv(fv_name)/FvFile(file_name)/End``."""
    node = struct.Struct("<BBH16s")
    return (
        node.pack(MEDIA_DEVICE_PATH, MEDIA_PIWG_FW_VOL_DP, 20, fv_name.bytes_le)
        + node.pack(MEDIA_DEVICE_PATH, MEDIA_PIWG_FW_FILE_DP, 20, file_name.bytes_le)
        + END_DEVICE_PATH
    )


def load_option(attributes: int, description: str, file_path: bytes, optional: bytes = b"") -> bytes:
    """An ``EFI_LOAD_OPTION`` (the data of a ``Boot####`` variable)."""
    return (
        struct.pack("<IH", attributes, len(file_path))
        + description.encode("utf-16-le")
        + b"\x00\x00"
        + file_path
        + optional
    )
