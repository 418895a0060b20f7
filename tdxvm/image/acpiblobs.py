"""QEMU's ACPI fw_cfg files for a domain, computed with the controller's own QEMU.

A TD's RTMR0 holds the SHA-384 of the raw fw_cfg files ``etc/table-loader``,
``etc/acpi/rsdp`` and ``etc/acpi/tables`` as the firmware downloads them (edk2
``OvmfPkg/AcpiPlatformDxe/QemuFwCfgAcpi.c`` measures each before processing it), and
newer edk2 also measures ``bootorder``. The host builds them; the controller computes
them itself, without TDX hardware, the way dstack-mr and Contrast's tdx-measure do:

1. :func:`qemu_argv_for`: the argv libvirt would run for the domain XML
   (``virConnectDomainXMLToNative('qemu-argv', ...)``);
2. :func:`sanitize_argv`: the same machine with every host resource replaced by a null
   one and nothing that could run guest code (rules below, one per option);
3. :func:`acpi_blobs`: that argv on the controller's QEMU of the host's version, under
   qtest, with the q35 chipset registers programmed as the firmware programs them
   before it reads the tables, then the files read over fw_cfg
   (:mod:`tdxvm.image.qtest`). :func:`read_machine` is that session for any reader
   (:mod:`tdxvm.image.platforminputs` reads ACPI, fw_cfg items and SMBIOS in one run).

Rules of :func:`sanitize_argv` (evidence in ``docs/measurements.md``, "ACPI tables
(fw_cfg) over qtest"). Kept as given, because they shape the tables: ``-machine`` (less
the host-only properties below), ``-m``, ``-smp``, ``-numa``, ``-cpu``, ``-device``,
``-global``, ``-boot``, ``-kernel``/``-initrd``/``-append`` (``-kernel`` adds the
linuxboot option ROM with boot index 0, so it shows in ``bootorder``), ``-bios``,
``-nodefaults``, ``-no-user-config``, ``-rtc``, ``-uuid``, ``-smbios``, ``-vga``,
``-no-hpet``, ``-fw_cfg ...,string=``. Replaced: ``-blockdev`` chains by one ``null-co``
node under the top node's name, ``-netdev`` by a ``hubport`` of the same id (no host
network, no ``hostfwd`` listeners), ``-chardev`` by ``null`` of the same id,
``-audiodev`` by ``none``, memory backends by ``memory-backend-ram`` of the same id and
size, ``rng-random``/``rng-egd`` by ``rng-builtin``, ``-cpu host`` by ``max`` (``host``
needs KVM). Dropped (host side only): ``-name``, ``-S`` (added back), ``-accel`` and
``accel=``/``kernel_irqchip=``/``dump-guest-core=``/``mem-merge=`` (the accelerator is
chosen by :func:`acpi_blobs`), ``-overcommit``, ``-sandbox``, ``-msg``, ``-display``,
``-vnc``, ``-spice``, ``-no-shutdown``, ``-mon`` or ``-object monitor-qmp`` (newer
libvirt) and the monitor's chardev, ``-add-fd``, ``-daemonize``, ``-pidfile``,
``-watchdog-action`` (what the host does when a watchdog fires), ``-object secret``,
``-object iothread``. For
``tdx=True`` (upstream QEMU's ``tdx_kvm_init`` in ``target/i386/kvm/tdx.c``): the
``tdx-guest`` object and ``confidential-guest-support=`` are dropped (they need KVM),
``smm=off`` and ``pic=off`` are forced (TDX turns both off when unset and refuses
``on``), ``kernel_irqchip`` must be ``split`` or unset. Anything else is refused with
:class:`ArgvRefusedError`: dropping an unknown option could silently change the tables.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from tdxvm.errors import TdxvmError
from tdxvm.image.qtest import (
    FwCfgError,
    FwCfgFile,
    QtestError,
    QtestSession,
    fwcfg_directory,
    fwcfg_has_dma,
    fwcfg_read,
    fwcfg_read_item,
    qemu_accelerators,
)

T = TypeVar("T")

ACPI_FILES = ("etc/table-loader", "etc/acpi/rsdp", "etc/acpi/tables")
"""The files edk2's AcpiPlatformDxe downloads and measures, in its order."""
OPTIONAL_FILES = ("bootorder",)
"""Returned when QEMU has them (newer edk2 measures ``bootorder`` too)."""

Q35_MCH = (0, 0)  # device, function of the MCH (host bridge)
Q35_LPC = (0x1F, 0)  # ICH9 LPC bridge
MCH_PCIEXBAR = 0x60
ICH9_PMBASE = 0x40
ICH9_ACPI_CNTL = 0x44
ICH9_ACPI_EN = 0x80
DEFAULT_PCIEXBAR = 0xE0000000
"""PcdPciExpressBaseAddress of current edk2 (IntelTdxX64.dsc, OvmfPkgX64.dsc); older
edk2 releases used 0xB0000000. It reaches the MCFG table and the 32-bit PCI hole."""
DEFAULT_PMBASE = 0x600
"""ICH9 PM I/O base that OVMF (``PlatformInitLib``, ``ICH9_PMBASE_VALUE``) programs."""


class AcpiBlobError(TdxvmError):
    """Base of this module's errors; ``code`` is stable."""

    code = "acpi-blobs"


class ArgvRefusedError(AcpiBlobError, ValueError):
    """The argv holds an option the sanitizer has no rule for, or a value it cannot reproduce."""

    code = "acpi-argv-refused"


class LibvirtArgvError(AcpiBlobError):
    """libvirt could not turn the domain XML into a QEMU argv."""

    code = "acpi-libvirt-argv"


class ExtractError(AcpiBlobError):
    """QEMU ran but the files could not be obtained; ``cause`` is the qtest error."""

    code = "acpi-extract"


# -- 1. libvirt's argv ---------------------------------------------------------------


def qemu_argv_for(conn: object, domain_xml: str) -> list[str]:
    """libvirt's native argv for ``domain_xml``: ``[qemu binary, option, ...]`` (the
    environment assignments libvirt prints before the binary are left out)."""
    import libvirt

    try:
        text = conn.domainXMLToNative("qemu-argv", domain_xml, 0)  # type: ignore[attr-defined]
    except libvirt.libvirtError as exc:
        msg = exc.get_error_message() or str(exc)
        hint = ""
        if "launchSecurity" in msg and "tdx" in msg:
            hint = (
                "\nfix: this libvirt predates TDX (11.3 does not know <launchSecurity type='tdx'>); convert the "
                "XML without <launchSecurity> and sanitize it with tdx=True (libvirt 12.9's argv of both "
                "sanitize to the same machine)"
            )
        raise LibvirtArgvError(f"libvirt cannot convert the domain XML to a QEMU argv: {msg}{hint}") from None
    return argv_from_command_line(text)


def argv_from_command_line(text: str) -> list[str]:
    """Split libvirt's shell-quoted command line; drop leading ``NAME=value`` words."""
    words = shlex.split(text)
    while words and "=" in words[0] and not words[0].startswith("-") and "/" not in words[0].split("=", 1)[0]:
        words.pop(0)
    if not words or words[0].startswith("-"):
        raise LibvirtArgvError(f"no QEMU binary in libvirt's command line {text[:200]!r}")
    return words


def argv_from_cmdline(raw: bytes) -> list[str]:
    """The argv in the bytes of a ``/proc/PID/cmdline`` (NUL-separated words)."""
    return [w.decode() for w in raw.split(b"\0") if w]


# -- 2. sanitizing (pure) --------------------------------------------------------------


def _keyval(text: str) -> list[tuple[str | None, str]]:
    """QEMU keyval (``a,b=c,d=e,,f``): (key, value) pairs; key None for a bare word."""
    parts, cur, i = [], "", 0
    while i < len(text):
        if text[i] == "," and text[i + 1 : i + 2] == ",":
            cur += ","
            i += 2
            continue
        if text[i] == ",":
            parts.append(cur)
            cur = ""
        else:
            cur += text[i]
        i += 1
    parts.append(cur)
    out: list[tuple[str | None, str]] = []
    for part in parts:
        key, eq, value = part.partition("=")
        out.append((key, value) if eq else (None, part))
    return out


def parse_keyval(text: str) -> list[tuple[str | None, str]]:
    """QEMU keyval option text as (key, value) pairs (key None for a bare word)."""
    return _keyval(text)


def option_props(arg: str, implied: str) -> dict[str, object]:
    """An option argument, JSON or keyval, as a dict (a bare first word is ``implied``)."""
    return _props(arg, implied)


def _unkeyval(pairs: list[tuple[str | None, str]]) -> str:
    return ",".join((v if k is None else f"{k}={v}").replace(",", ",,") for k, v in pairs)


def _props(arg: str, implied: str) -> dict[str, object]:
    """An option argument as a dict, JSON or keyval (a bare first word is ``implied``)."""
    if arg.startswith("{"):
        try:
            value = json.loads(arg)
        except ValueError as exc:
            raise ArgvRefusedError(f"unparsable JSON option argument {arg[:120]!r}: {exc}") from None
        if not isinstance(value, dict):
            raise ArgvRefusedError(f"option argument {arg[:120]!r} is not a JSON object")
        return value
    out: dict[str, object] = {}
    for i, (k, v) in enumerate(_keyval(arg)):
        out[k if k is not None else (implied if i == 0 else v)] = v
    return out


_HOST_ONLY_MACHINE = {"accel", "dump-guest-core", "mem-merge", "kernel_irqchip", "kernel-irqchip"}
_DROP_WITH_ARG = {
    "-name",
    "-accel",
    "-overcommit",
    "-sandbox",
    "-msg",
    "-display",
    "-vnc",
    "-spice",
    "-mon",
    "-add-fd",
    "-pidfile",
    "-watchdog-action",
}
_DROP_FLAG = {"-S", "-no-shutdown", "-daemonize", "-enable-kvm"}
_KEEP_WITH_ARG = {
    "-m",
    "-smp",
    "-numa",
    "-device",
    "-global",
    "-boot",
    "-kernel",
    "-initrd",
    "-append",
    "-bios",
    "-rtc",
    "-uuid",
    "-smbios",
    "-vga",
}
_KEEP_FLAG = {"-nodefaults", "-no-user-config", "-no-hpet"}
_MEMORY_BACKENDS = {"memory-backend-ram", "memory-backend-file", "memory-backend-memfd"}


@dataclass
class _State:
    tdx: bool
    path_map: Mapping[str, str]
    out: list[str]
    monitor_chardevs: set[str]
    blockdevs: list[dict[str, object]]
    tdx_objects: set[str]


def sanitize_argv(argv: list[str], *, tdx: bool, path_map: Mapping[str, str] | None = None) -> list[str]:
    """The options to run ``argv`` (binary first, as :func:`qemu_argv_for` returns it)
    under qtest: same machine, null backends, ``-S``. ``tdx`` applies what upstream
    QEMU forces for a TD. ``path_map`` rewrites host paths (kernel, initrd, firmware) to
    where the controller has the same files. Raises :class:`ArgvRefusedError`."""
    if not argv or argv[0].startswith("-"):
        raise ArgvRefusedError("argv must start with the QEMU binary")
    opts = argv[1:]
    monitor_chardevs = {
        p.partition("chardev=")[2].split(",")[0]
        for i, p in enumerate(opts)
        if i and opts[i - 1] == "-mon" and "chardev=" in p
    } | {
        str(props.get("chardev", ""))
        for i, p in enumerate(opts)
        if i and opts[i - 1] == "-object" and (props := _props(p, "qom-type")).get("qom-type") == "monitor-qmp"
    }
    st = _State(
        tdx=tdx,
        path_map=dict(path_map or {}),
        out=[],
        monitor_chardevs=monitor_chardevs,
        blockdevs=[],
        tdx_objects=set(),
    )
    i = 0
    while i < len(opts):
        opt = opts[i]
        if not opt.startswith("-"):
            raise ArgvRefusedError(f"stray argument {opt!r} (not after an option that takes one)")
        if opt.startswith("--"):
            opt = opt[1:]
        if opt in _DROP_FLAG:
            i += 1
            continue
        if opt in _KEEP_FLAG:
            st.out.append(opt)
            i += 1
            continue
        if i + 1 >= len(opts):
            raise ArgvRefusedError(f"option {opt} has no argument, or is not one tdxvm knows")
        arg = opts[i + 1]
        i += 2
        if opt in _DROP_WITH_ARG:
            continue
        if opt in _KEEP_WITH_ARG:
            st.out += [opt, st.path_map.get(arg, arg) if opt in ("-kernel", "-initrd", "-bios") else arg]
            continue
        handler = _HANDLERS.get(opt)
        if handler is None:
            raise ArgvRefusedError(
                f"option {opt} {arg[:80]!r}: no sanitizing rule for it (it could change the ACPI tables)"
            )
        handler(st, arg)
    _emit_blockdevs(st)
    _finish_machine(st)
    return [*st.out, "-S"]


def _machine(st: _State, arg: str) -> None:
    pairs = []
    for key, value in _keyval(arg):
        if key in _HOST_ONLY_MACHINE:
            if key.startswith("kernel") and st.tdx and value != "split":
                raise ArgvRefusedError(
                    f"-machine kernel_irqchip={value}: a TD needs kernel_irqchip=split (QEMU refuses it)"
                )
            continue
        if key == "confidential-guest-support":
            if not st.tdx:
                raise ArgvRefusedError(f"-machine confidential-guest-support={value} in an argv sanitized as not TDX")
            st.tdx_objects.add(value)
            continue
        if st.tdx and key in ("smm", "pic"):
            if value == "on":
                raise ArgvRefusedError(f"-machine {key}=on: QEMU refuses it for a TD")
            continue  # forced off by _finish_machine
        pairs.append((key, value))
    st.out += ["-machine", _unkeyval(pairs)]


def _finish_machine(st: _State) -> None:
    if "-machine" not in st.out:
        raise ArgvRefusedError("the argv has no -machine option (libvirt always writes one)")
    if st.tdx:
        at = st.out.index("-machine") + 1
        st.out[at] += ",smm=off,pic=off"


def _cpu(st: _State, arg: str) -> None:
    model, sep, rest = arg.partition(",")
    st.out += ["-cpu", ("max" if model == "host" else model) + sep + rest]


def _object(st: _State, arg: str) -> None:
    props = _props(arg, "qom-type")
    qom = props.get("qom-type")
    oid = str(props.get("id", ""))
    if qom in ("secret", "iothread", "monitor-qmp"):  # host side only (the monitor's chardev is dropped too)
        return
    if qom == "tdx-guest":
        if not st.tdx:
            raise ArgvRefusedError(f"-object tdx-guest ({oid}) in an argv sanitized as not TDX")
        st.tdx_objects.add(oid)
        return
    if qom in _MEMORY_BACKENDS:
        size = props.get("size")
        if size is None:
            raise ArgvRefusedError(f"memory backend {oid} has no size")
        st.out += ["-object", json.dumps({"qom-type": "memory-backend-ram", "id": oid, "size": size})]
        return
    if qom in ("rng-random", "rng-egd"):
        st.out += ["-object", json.dumps({"qom-type": "rng-builtin", "id": oid})]
        return
    raise ArgvRefusedError(f"-object {qom} ({oid}): no sanitizing rule for it")


def _blockdev(st: _State, arg: str) -> None:
    props = _props(arg, "driver")
    if "node-name" not in props:
        raise ArgvRefusedError(f"-blockdev without node-name: {arg[:120]!r}")
    st.blockdevs.append(props)


def _emit_blockdevs(st: _State) -> None:
    """Each chain (format over protocol, backing files) becomes one null-co node named
    like its top node, which is what the devices refer to."""
    referenced = {v for bd in st.blockdevs for k, v in bd.items() if k in ("file", "backing") and isinstance(v, str)}
    for bd in st.blockdevs:
        if bd["node-name"] in referenced:
            continue
        node = {"driver": "null-co", "node-name": bd["node-name"], "read-only": bool(bd.get("read-only", False))}
        st.out += ["-blockdev", json.dumps(node)]


def _netdev(st: _State, arg: str) -> None:
    props = _props(arg, "type")
    if "id" not in props:
        raise ArgvRefusedError(f"-netdev without id: {arg[:120]!r}")
    st.out += ["-netdev", f"hubport,id={props['id']},hubid=0"]


def _chardev(st: _State, arg: str) -> None:
    props = _props(arg, "backend")
    cid = str(props.get("id", ""))
    if not cid:
        raise ArgvRefusedError(f"-chardev without id: {arg[:120]!r}")
    if cid in st.monitor_chardevs:
        return
    st.out += ["-chardev", f"null,id={cid}"]


def _audiodev(st: _State, arg: str) -> None:
    props = _props(arg, "driver")
    st.out += ["-audiodev", json.dumps({"id": props.get("id"), "driver": "none"})]


def _fw_cfg(st: _State, arg: str) -> None:
    if "file=" in arg:
        raise ArgvRefusedError(
            f"-fw_cfg {arg[:80]!r}: a file item from the host cannot be reproduced; give it as string="
        )
    st.out += ["-fw_cfg", arg]


def _serial(st: _State, arg: str) -> None:
    st.out += ["-serial", "null" if arg != "none" else "none"]


_HANDLERS: dict[str, Callable[[_State, str], None]] = {
    "-machine": _machine,
    "-M": _machine,
    "-cpu": _cpu,
    "-object": _object,
    "-blockdev": _blockdev,
    "-netdev": _netdev,
    "-chardev": _chardev,
    "-audiodev": _audiodev,
    "-fw_cfg": _fw_cfg,
    "-serial": _serial,
}


# -- 3. extraction (I/O) ---------------------------------------------------------------


def _program_q35(session: QtestSession, *, pciexbar: int, pmbase: int) -> None:
    """What OVMF's PlatformInitLib does before AcpiPlatformDxe reads the tables: enable
    MMCONFIG at ``pciexbar`` (MCH PCIEXBAR, 256 buses) and the ACPI PM I/O block at
    ``pmbase`` (ICH9 PMBASE, then ACPI_CNTL.ACPI_EN)."""
    dev, fn = Q35_MCH
    session.pci_write32(dev, fn, MCH_PCIEXBAR + 4, pciexbar >> 32)
    session.pci_write32(dev, fn, MCH_PCIEXBAR, (pciexbar & 0xFFFFFFFF) | 1)
    dev, fn = Q35_LPC
    session.pci_write32(dev, fn, ICH9_PMBASE, pmbase)
    session.pci_write8(dev, fn, ICH9_ACPI_CNTL, ICH9_ACPI_EN)


@dataclass(frozen=True, slots=True)
class ExtractInfo:
    accel: str
    seconds: float
    dma: bool


@dataclass(frozen=True, slots=True)
class FwCfgReader:
    """The fw_cfg of one QEMU under qtest, its chipset already programmed (see
    :func:`read_machine`): files by name, fixed items by selector."""

    session: QtestSession
    dma: bool
    directory: dict[str, FwCfgFile]

    def has(self, name: str) -> bool:
        return name in self.directory

    def file(self, name: str) -> bytes:
        if name not in self.directory:
            raise FwCfgError(f"QEMU's fw_cfg has no file {name!r}")
        return fwcfg_read(self.session, self.directory[name], dma=self.dma)

    def item(self, selector: int, size: int) -> bytes:
        return fwcfg_read_item(self.session, selector, size, dma=self.dma)


def read_machine(
    qemu_binary: str,
    argv: list[str],
    read: Callable[[FwCfgReader], T],
    *,
    pciexbar: int = DEFAULT_PCIEXBAR,
    pmbase: int = DEFAULT_PMBASE,
    timeout: float = 60.0,
    info: list[ExtractInfo] | None = None,
) -> T:
    """Start ``qemu_binary`` once with ``argv`` (from :func:`sanitize_argv`) under qtest,
    check it is a q35, program the chipset as the firmware does (:func:`_program_q35`),
    and return ``read(reader)``. Runs QEMU with ``-accel qtest`` when the binary has it,
    else ``-accel tcg`` (with ``-S`` no vCPU runs, so no guest code does). QEMU and
    fw_cfg failures become :class:`ExtractError`; ``info``, if given, receives an
    :class:`ExtractInfo`."""
    if "-S" not in argv:
        raise ArgvRefusedError("argv lacks -S: give the output of sanitize_argv (firmware must never run)")
    try:
        accel = "qtest" if "qtest" in qemu_accelerators(qemu_binary) else "tcg"
    except QtestError as exc:
        raise ExtractError(str(exc)) from None
    start = time.monotonic()
    try:
        with QtestSession(qemu_binary, [*argv, "-accel", accel], timeout=timeout) as session:
            if session.pci_read32(*Q35_MCH, 0) != 0x29C08086:
                raise ExtractError("the machine is not a q35 (no Intel 82G33 MCH at 00:00.0); only q35 is supported")
            _program_q35(session, pciexbar=pciexbar, pmbase=pmbase)
            dma = fwcfg_has_dma(session)
            result = read(FwCfgReader(session=session, dma=dma, directory=fwcfg_directory(session, dma=dma)))
    except FwCfgError as exc:
        raise ExtractError(f"fw_cfg read failed: {exc}") from None
    except QtestError as exc:
        raise ExtractError(f"QEMU under qtest failed: {exc}") from None
    if info is not None:
        info.append(ExtractInfo(accel=accel, seconds=time.monotonic() - start, dma=dma))
    return result


def read_acpi(reader: FwCfgReader) -> dict[str, bytes]:
    """The ACPI files (and ``bootorder`` when present) from a programmed machine."""
    missing = [name for name in ACPI_FILES if not reader.has(name)]
    if missing:
        raise ExtractError(f"QEMU's fw_cfg has no {', '.join(missing)} (ACPI disabled with acpi=off or -no-acpi?)")
    return {name: reader.file(name) for name in ACPI_FILES + OPTIONAL_FILES if reader.has(name)}


def acpi_blobs(
    qemu_binary: str,
    argv: list[str],
    *,
    pciexbar: int = DEFAULT_PCIEXBAR,
    pmbase: int = DEFAULT_PMBASE,
    timeout: float = 60.0,
    info: list[ExtractInfo] | None = None,
) -> dict[str, bytes]:
    """The ACPI fw_cfg files (and ``bootorder`` when present) that ``qemu_binary`` builds
    for ``argv`` (from :func:`sanitize_argv`), read in one :func:`read_machine` run.
    ``info``, if given, receives an :class:`ExtractInfo`."""
    return read_machine(qemu_binary, argv, read_acpi, pciexbar=pciexbar, pmbase=pmbase, timeout=timeout, info=info)
