"""Everything RTMR0 needs from QEMU, from one qtest run of the controller's QEMU.

:func:`platform_inputs` sanitizes a libvirt QEMU argv (:func:`acpiblobs.sanitize_argv`),
starts QEMU once under qtest with the q35 chipset programmed as the firmware programs
it (:func:`acpiblobs.read_machine`), and reads in that one session:

* ``acpi``: ``etc/table-loader`` and every file it ALLOCATEs (what AcpiPlatformLib
  measures);
* ``fw_cfg``: the items edk2 >= stable202505 caches and measures at start-up
  (``QemuFwCfgCacheInit.c`` ``mCacheFwCfgList``, :data:`rtmr0.FW_CFG_MEASURED_202505`):
  ``BootMenu`` is the fixed item 0x000e (2 bytes), the others are files, given as QEMU
  serves them when QEMU has them (:func:`rtmr0.fw_cfg_events` applies the size rules);
* ``smbios``: QEMU's ``etc/smbios/smbios-tables`` once the firmware's anchor check
  passes (:func:`smbios.qemu_structures`), with the type 4 ProcessorId replaced when
  the caller gives one. The table the firmware publishes also depends on the firmware
  (its type 0 strings): :func:`smbios.published_table` builds it from this;

and takes ``memory_mib`` from the argv's ``-m`` (:func:`memory_mib_from_argv`).
:func:`predict_for_argv` feeds them to :func:`rtmr0.rtmr0_events`.

``-cpu host`` and ``-cpu max`` are refused unless ``processor_id`` is given: SMBIOS
type 4 ProcessorId is CPUID leaf 1 of the host's CPU there, not reproducible on the
controller, and the measurement does not filter it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from tdxvm.errors import TdxvmError
from tdxvm.image.acpiblobs import (
    AcpiBlobError,
    ExtractError,
    ExtractInfo,
    FwCfgReader,
    option_props,
    parse_keyval,
    read_machine,
    sanitize_argv,
)
from tdxvm.image.measure import ExpectedEvent, replay
from tdxvm.image.measureerrors import MeasureError
from tdxvm.image.rtmr0 import FW_CFG_MEASURED_202505, TABLE_LOADER, firmware_build, loader_allocations, rtmr0_events
from tdxvm.image.smbios import ANCHOR_FILE, TABLES_FILE, SmbiosError, published_table, qemu_structures, set_processor_id

BOOT_MENU_ITEM = ("BootMenu", 0x000E, 2)
"""The measured fw_cfg item that is not a file: FW_CFG_BOOT_MENU, u16."""
HOST_CPU_MODELS = frozenset({"host", "max"})
MIB = 1 << 20
_SIZE = re.compile(r"^(\d+)([bBkKmMgGtT]?)$")
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class PlatformInputError(TdxvmError):
    """Base of this module's errors; ``code`` is stable."""

    code = "platform-inputs"


class MemoryArgvError(PlatformInputError, ValueError):
    """The argv's guest memory is missing, not whole MiB, hot-pluggable, or inconsistent."""

    code = "platform-memory"


class HostCpuError(PlatformInputError, ValueError):
    """``-cpu host``/``max`` without a processor ID: SMBIOS type 4 cannot be reproduced."""

    code = "platform-host-cpu"


# Everything predict_for_argv raises for an input it cannot predict from (SmbiosError and
# Rtmr0Error are MeasureErrors): what its callers turn into their own refusal.
PREDICTION_ERRORS = (AcpiBlobError, PlatformInputError, MeasureError)


@dataclass(frozen=True)
class PlatformInputs:
    """What RTMR0 needs from QEMU (see the module docstring): guest memory in MiB, the
    ACPI fw_cfg files, the measured fw_cfg items QEMU has, and QEMU's SMBIOS structures
    (``etc/smbios/smbios-tables``, end structure included)."""

    memory_mib: int
    acpi: dict[str, bytes]
    fw_cfg: dict[str, bytes]
    smbios: bytes


def _size(text: str, *, default_unit: str, what: str) -> int:
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise MemoryArgvError(f"{what}: size {text!r} is not a whole number with an optional b/k/M/G/T suffix")
    return int(match[1]) * _UNITS[(match[2] or default_unit).lower()]


def _options(argv: list[str], opt: str) -> list[str]:
    return [argv[i + 1] for i in range(len(argv) - 1) if argv[i] in (opt, "-" + opt)]


def memory_mib_from_argv(argv: list[str]) -> int:
    """Guest RAM in MiB from ``-m`` as libvirt writes it (``-m 1024``, ``-m size=1048576k``;
    no suffix means MiB, as in QEMU). Refused: no or several ``-m``, ``slots``/``maxmem``
    (memory hot-plug adds ``etc/reserved-memory-end`` and moves RAM), a size that is not
    whole MiB, a ``memory-backend`` or NUMA ``memdev`` total that differs from ``-m``."""
    values = _options(argv, "-m")
    if len(values) != 1:
        raise MemoryArgvError(f"the argv has {len(values)} -m options; expected one (libvirt always writes it)")
    size = None
    for key, value in parse_keyval(values[0]):
        if key in (None, "size"):
            size = _size(value, default_unit="M", what="-m")
        else:
            raise MemoryArgvError(f"-m {values[0]!r}: {key}= (memory hot-plug) is not supported")
    if size is None or size <= 0 or size % MIB:
        raise MemoryArgvError(f"-m {values[0]!r}: guest memory must be a positive whole number of MiB")
    backends = {}
    for arg in _options(argv, "-object"):
        props = option_props(arg, "qom-type")
        if str(props.get("qom-type", "")).startswith("memory-backend-") and "size" in props:
            raw = props["size"]
            backends[str(props.get("id"))] = (
                raw
                if isinstance(raw, int)
                else _size(str(raw), default_unit="b", what=f"memory backend {props.get('id')}")
            )
    used = [v for arg in _options(argv, "-machine") for k, v in parse_keyval(arg) if k == "memory-backend"]
    used += [str(option_props(arg, "type").get("memdev")) for arg in _options(argv, "-numa") if "memdev" in arg]
    if used:
        missing = [b for b in used if b not in backends]
        if missing:
            raise MemoryArgvError(f"memory backends {missing} are used but not defined by -object with a size")
        total = sum(backends[b] for b in dict.fromkeys(used))
        if total != size:
            raise MemoryArgvError(f"memory backends {list(dict.fromkeys(used))} hold {total} bytes, -m says {size}")
    return size // MIB


def _cpu_model(argv: list[str]) -> str | None:
    cpus = _options(argv, "-cpu")
    return cpus[-1].split(",", 1)[0] if cpus else None


def _read_all(reader: FwCfgReader, processor_id: bytes | None) -> tuple[dict[str, bytes], dict[str, bytes], bytes]:
    if not reader.has(TABLE_LOADER):
        raise ExtractError(f"QEMU's fw_cfg has no {TABLE_LOADER} (ACPI disabled with acpi=off or -no-acpi?)")
    loader = reader.file(TABLE_LOADER)
    allocated = loader_allocations(loader)
    missing = [name for name in allocated if not reader.has(name)]
    if missing:
        raise ExtractError(f"{TABLE_LOADER} allocates {missing}, which QEMU's fw_cfg does not have")
    acpi = {TABLE_LOADER: loader, **{name: reader.file(name) for name in allocated}}
    fw_cfg = {}
    for name in FW_CFG_MEASURED_202505:
        if name == BOOT_MENU_ITEM[0]:
            fw_cfg[name] = reader.item(*BOOT_MENU_ITEM[1:])
        elif reader.has(name):
            fw_cfg[name] = reader.file(name)
    anchor = reader.file(ANCHOR_FILE) if reader.has(ANCHOR_FILE) else b""
    tables = qemu_structures(anchor, reader.file(TABLES_FILE) if reader.has(TABLES_FILE) else b"")
    if processor_id is not None:
        tables = set_processor_id(tables, processor_id)
    return acpi, fw_cfg, tables


def platform_inputs(
    qemu_binary: str,
    argv: list[str],
    *,
    tdx: bool,
    path_map: Mapping[str, str] | None = None,
    processor_id: bytes | None = None,
    timeout: float = 60,
    info: list[ExtractInfo] | None = None,
) -> PlatformInputs:
    """:class:`PlatformInputs` for ``argv`` (binary first, as libvirt runs it or
    :func:`acpiblobs.qemu_argv_for` returns it), read from ``qemu_binary`` in one qtest
    session. ``processor_id``: the 8 bytes (CPUID.1 EAX, EDX) QEMU puts in SMBIOS type 4
    on the host; required for ``-cpu host``/``max``. Raises :class:`MemoryArgvError`,
    :class:`HostCpuError`, :class:`acpiblobs.ArgvRefusedError`,
    :class:`acpiblobs.ExtractError`, :class:`smbios.SmbiosError` or
    :class:`rtmr0.Rtmr0Error` (a malformed loader script)."""
    memory_mib = memory_mib_from_argv(argv)
    if _cpu_model(argv) in HOST_CPU_MODELS and processor_id is None:
        raise HostCpuError(
            f"-cpu {_cpu_model(argv)}: SMBIOS type 4 ProcessorId is the host CPU's CPUID leaf 1, "
            "which the controller cannot reproduce; pass processor_id= (8 bytes, EAX then EDX, "
            "as the host's QEMU reports them) from the host profile"
        )
    clean = sanitize_argv(argv, tdx=tdx, path_map=path_map)
    acpi, fw_cfg, smbios = read_machine(
        qemu_binary, clean, lambda r: _read_all(r, processor_id), timeout=timeout, info=info
    )
    return PlatformInputs(memory_mib=memory_mib, acpi=acpi, fw_cfg=fw_cfg, smbios=smbios)


def rtmr0_for_inputs(firmware: bytes, inputs: PlatformInputs) -> tuple[str, list[ExpectedEvent]]:
    """RTMR0 (hex) and its events for ``firmware`` (a known build) booting directly on
    the platform ``inputs`` describe."""
    build = firmware_build(firmware)
    table = None
    if build.measures_smbios:
        if build.smbios_bios is None:
            raise SmbiosError(f"{build.name} measures SMBIOS but its type 0 strings are not known")
        table = published_table(inputs.smbios, bios=build.smbios_bios)
    fw_cfg = {k: v for k, v in inputs.fw_cfg.items() if k in build.fw_cfg_measured}
    events = rtmr0_events(firmware, memory_mib=inputs.memory_mib, acpi=inputs.acpi, fw_cfg=fw_cfg, smbios=table)
    return replay(bytes.fromhex(e.digest) for e in events).hex(), events


def predict_for_argv(
    firmware: bytes,
    qemu_binary: str,
    argv: list[str],
    *,
    tdx: bool,
    path_map: Mapping[str, str] | None = None,
    processor_id: bytes | None = None,
    timeout: float = 60,
) -> tuple[str, list[ExpectedEvent]]:
    """RTMR0 (hex) and its events for a direct kernel boot of ``firmware`` in the VM
    ``argv`` describes: :func:`platform_inputs`, then :func:`rtmr0_for_inputs`."""
    inputs = platform_inputs(qemu_binary, argv, tdx=tdx, path_map=path_map, processor_id=processor_id, timeout=timeout)
    return rtmr0_for_inputs(firmware, inputs)
