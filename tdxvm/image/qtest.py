"""A small client for QEMU's qtest protocol, and fw_cfg file reads over it.

qtest (QEMU ``docs/devel/testing/qtest.rst``, ``system/qtest.c``) is a line protocol on a
character device: the client sends ``outw 0x510 0x19``, QEMU answers ``OK`` (with a value
for reads: ``OK 0x0019``) or ``FAIL <reason>``. ``-qtest unix:PATH`` makes QEMU connect to
a UNIX socket that the client listens on; QEMU waits for that connection before it
finishes starting. Nothing here runs guest code: QEMU is started with ``-S`` (no vCPU
ever runs), and the I/O and memory accesses are the client's.

:class:`QtestSession` starts QEMU with a given argv plus the qtest socket, sends commands
with a timeout, and stops QEMU (SIGTERM, then SIGKILL). Every failure is a
:class:`QtestError` carrying the tail of QEMU's stderr.

fw_cfg (QEMU ``docs/specs/fw_cfg.rst``) on x86: selector port 0x510 (16-bit write), data
port 0x511 (byte reads), DMA address ports 0x514 (high 32 bits) and 0x518 (low 32 bits,
the write that starts the transfer), both big-endian registers, as a guest writes them
(edk2 ``QemuFwCfgLib`` swaps the bytes of the address before ``IoWrite32``). The file
directory is selector 0x19: a big-endian u32 count, then 64-byte entries (u32 size BE,
u16 select BE, u16 reserved, 56-byte NUL-padded name). :func:`fwcfg_directory` and
:func:`fwcfg_read` read it by DMA when QEMU offers DMA (feature bit 1 of selector 0x01),
else byte by byte through port 0x511.
"""

from __future__ import annotations

import base64
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tdxvm.errors import TdxvmError

FW_CFG_SELECTOR_PORT = 0x510
FW_CFG_DATA_PORT = 0x511
FW_CFG_DMA_HIGH_PORT = 0x514
FW_CFG_DMA_LOW_PORT = 0x518
FW_CFG_ID = 0x01
FW_CFG_FILE_DIR = 0x19
FW_CFG_FEATURE_DMA = 0x02
DIR_ENTRY_SIZE = 64
NAME_SIZE = 56

_DMA_ERROR, _DMA_READ, _DMA_SELECT = 0x01, 0x02, 0x08
_DMA_ACCESS_ADDR = 0x1000  # the 16-byte FWCfgDmaAccess, in low guest RAM
_DMA_BUFFER_ADDR = 0x200000  # 2 MiB: RAM on every PC machine with >= 4 MiB, clear of VGA/BIOS holes
_DMA_CHUNK = 0x10000
_MAX_FILE = 64 << 20
_STDERR_TAIL = 4000


class QtestError(TdxvmError):
    """QEMU under qtest failed; ``stderr`` holds the tail of what QEMU printed."""

    code = "qtest"

    def __init__(self, message: str, *, stderr: str = "") -> None:
        self.stderr = stderr
        text = message + (f"\nQEMU stderr:\n{stderr.rstrip()}" if stderr.strip() else "")
        super().__init__(text)


class QemuStartError(QtestError):
    """QEMU exited, or never connected to the qtest socket (bad argv, missing file)."""

    code = "qtest-start"


class QtestTimeoutError(QtestError):
    code = "qtest-timeout"


class QtestProtocolError(QtestError):
    """QEMU answered FAIL, an unexpected line, or closed the connection."""

    code = "qtest-protocol"


class FwCfgError(QtestError):
    """The fw_cfg directory or a file could not be read as the specification says."""

    code = "fw-cfg"


@dataclass(frozen=True, slots=True)
class FwCfgFile:
    name: str
    select: int
    size: int


class QtestSession:
    """One QEMU process under qtest. Use as a context manager, or call :meth:`close`."""

    def __init__(self, binary: str, argv: list[str], *, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self._dir = Path(tempfile.mkdtemp(prefix="tdxvm-qtest-"))
        self._stderr_path = self._dir / "stderr"
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._conn: socket.socket | None = None
        self._buf = b""
        self._proc: subprocess.Popen[bytes] | None = None
        sock_path = self._dir / "qtest.sock"
        try:
            self._listener.bind(str(sock_path))
            self._listener.listen(1)
            cmd = [binary, *argv, "-qtest", f"unix:{sock_path}", "-qtest-log", "/dev/null"]
            with open(self._stderr_path, "wb") as err:
                self._proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True
                )
            self._conn = self._accept()
            self._handshake()
        except OSError as exc:
            self.close()
            raise QemuStartError(f"cannot start {binary}: {exc}") from None
        except BaseException:  # QtestError, and Ctrl-C or SIGTERM: QEMU is in a session of its own, so it would run on
            self.close()
            raise

    def __enter__(self) -> QtestSession:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def stderr(self) -> str:
        try:
            data = self._stderr_path.read_bytes()
        except OSError:
            return ""
        return data[-_STDERR_TAIL:].decode(errors="replace")

    def _accept(self) -> socket.socket:
        deadline = time.monotonic() + self.timeout
        assert self._proc is not None
        while True:
            code = self._proc.poll()
            if code is not None:
                raise QemuStartError(f"QEMU exited with status {code} before connecting to qtest", stderr=self.stderr())
            left = deadline - time.monotonic()
            if left <= 0:
                raise QtestTimeoutError(
                    f"QEMU did not connect to qtest within {self.timeout:g} s", stderr=self.stderr()
                )
            ready, _, _ = select.select([self._listener], [], [], min(left, 0.1))
            if ready:
                conn, _ = self._listener.accept()
                return conn

    def _handshake(self) -> None:
        """QEMU connects before it builds the machine and answers only once its main loop
        runs: a first answer means the machine exists; a closed socket means QEMU died."""
        try:
            self.command("readb 0x0")
        except QtestProtocolError:
            assert self._proc is not None
            try:
                code = self._proc.wait(5)
            except subprocess.TimeoutExpired:
                code = None
            raise QemuStartError(f"QEMU stopped while starting (exit status {code})", stderr=self.stderr()) from None

    def command(self, line: str) -> str:
        """Send one command; return what follows ``OK`` (may be empty)."""
        if self._conn is None:
            raise QtestProtocolError(f"qtest command {line!r}: session is closed")
        try:
            self._conn.sendall(line.encode() + b"\n")
            while True:
                reply = self._readline(line)
                if not reply.startswith("IRQ "):  # asynchronous, only after irq_intercept_*
                    break
        except OSError as exc:
            raise QtestProtocolError(f"qtest command {line!r}: {exc}", stderr=self.stderr()) from None
        if reply == "OK" or reply.startswith("OK "):
            return reply[3:]
        raise QtestProtocolError(f"qtest command {line!r} answered {reply!r}", stderr=self.stderr())

    def _readline(self, line: str) -> str:
        assert self._conn is not None
        deadline = time.monotonic() + self.timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QtestTimeoutError(
                    f"no answer to qtest command {line!r} within {self.timeout:g} s", stderr=self.stderr()
                )
            self._conn.settimeout(left)
            try:
                chunk = self._conn.recv(1 << 20)
            except TimeoutError:
                continue
            if not chunk:
                raise QtestProtocolError(f"QEMU closed qtest while answering {line!r}", stderr=self.stderr())
            self._buf += chunk
        reply, _, self._buf = self._buf.partition(b"\n")
        return reply.decode(errors="replace").rstrip("\r")

    def _value(self, line: str) -> int:
        text = self.command(line)
        try:
            return int(text, 16)
        except ValueError:
            raise QtestProtocolError(f"qtest command {line!r}: expected a value, got {text!r}") from None

    def outb(self, port: int, value: int) -> None:
        self.command(f"outb {port:#x} {value:#x}")

    def outw(self, port: int, value: int) -> None:
        self.command(f"outw {port:#x} {value:#x}")

    def outl(self, port: int, value: int) -> None:
        self.command(f"outl {port:#x} {value:#x}")

    def inb(self, port: int) -> int:
        return self._value(f"inb {port:#x}")

    def inl(self, port: int) -> int:
        return self._value(f"inl {port:#x}")

    def read(self, addr: int, size: int) -> bytes:
        """Guest-physical memory, ``size`` bytes (``b64read``)."""
        text = self.command(f"b64read {addr:#x} {size:#x}")
        data = base64.b64decode(text)
        if len(data) != size:
            raise QtestProtocolError(f"b64read {addr:#x} returned {len(data)} bytes, asked {size}")
        return data

    def write(self, addr: int, data: bytes) -> None:
        self.command(f"b64write {addr:#x} {len(data):#x} {base64.b64encode(data).decode()}")

    def pci_write32(self, dev: int, fn: int, offset: int, value: int, *, bus: int = 0) -> None:
        """PCI configuration write through the 0xcf8/0xcfc mechanism (as firmware does)."""
        self.outl(0xCF8, _cf8(bus, dev, fn, offset))
        self.outl(0xCFC, value)

    def pci_write8(self, dev: int, fn: int, offset: int, value: int, *, bus: int = 0) -> None:
        self.outl(0xCF8, _cf8(bus, dev, fn, offset))
        self.outb(0xCFC + (offset & 3), value)

    def pci_read32(self, dev: int, fn: int, offset: int, *, bus: int = 0) -> int:
        self.outl(0xCF8, _cf8(bus, dev, fn, offset))
        return self.inl(0xCFC)

    def close(self) -> None:
        """Close the socket and stop QEMU (SIGTERM, then SIGKILL after 5 s)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._listener.close()
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None


def _cf8(bus: int, dev: int, fn: int, offset: int) -> int:
    return 0x80000000 | bus << 16 | dev << 11 | fn << 8 | (offset & 0xFC)


def fwcfg_has_dma(session: QtestSession) -> bool:
    session.outw(FW_CFG_SELECTOR_PORT, FW_CFG_ID)
    features = int.from_bytes(bytes(session.inb(FW_CFG_DATA_PORT) for _ in range(4)), "little")
    return bool(features & FW_CFG_FEATURE_DMA)


def _read_item(session: QtestSession, select_: int, size: int, dma: bool) -> bytes:
    if not dma:
        session.outw(FW_CFG_SELECTOR_PORT, select_)
        return bytes(session.inb(FW_CFG_DATA_PORT) for _ in range(size))
    out = bytearray()
    while len(out) < size:
        n = min(_DMA_CHUNK, size - len(out))
        control = _DMA_READ | ((select_ << 16 | _DMA_SELECT) if not out else 0)
        session.write(_DMA_ACCESS_ADDR, struct.pack(">IIQ", control, n, _DMA_BUFFER_ADDR))
        session.outl(FW_CFG_DMA_HIGH_PORT, 0)
        session.outl(FW_CFG_DMA_LOW_PORT, int.from_bytes(_DMA_ACCESS_ADDR.to_bytes(4, "big"), "little"))
        status = struct.unpack(">I", session.read(_DMA_ACCESS_ADDR, 4))[0]
        if status:  # QEMU clears the control word on success, sets bit 0 on error
            error = "error bit set" if status & _DMA_ERROR else "not completed"
            raise FwCfgError(
                f"fw_cfg DMA read of selector {select_:#x}: {error} (control {status:#x})", stderr=session.stderr()
            )
        out += session.read(_DMA_BUFFER_ADDR, n)
    return bytes(out)


def fwcfg_read_item(session: QtestSession, selector: int, size: int, *, dma: bool | None = None) -> bytes:
    """``size`` bytes of the fixed fw_cfg item ``selector`` (e.g. 0x000e, the boot menu flag)."""
    if not 0 <= selector <= 0xFFFF or not 0 <= size <= _MAX_FILE:
        raise FwCfgError(f"fw_cfg item {selector:#x}, {size} bytes: selector or size out of range")
    dma = fwcfg_has_dma(session) if dma is None else dma
    return _read_item(session, selector, size, dma)


def fwcfg_directory(session: QtestSession, *, dma: bool | None = None) -> dict[str, FwCfgFile]:
    """The fw_cfg file directory (selector 0x19), by name."""
    dma = fwcfg_has_dma(session) if dma is None else dma
    count = struct.unpack(">I", _read_item(session, FW_CFG_FILE_DIR, 4, dma))[0]
    if not 0 < count < 4096:
        raise FwCfgError(f"fw_cfg directory count {count} is implausible (is this an x86 PC machine?)")
    raw = _read_item(session, FW_CFG_FILE_DIR, 4 + count * DIR_ENTRY_SIZE, dma)
    files: dict[str, FwCfgFile] = {}
    for i in range(count):
        at = 4 + i * DIR_ENTRY_SIZE
        size, sel = struct.unpack_from(">IH", raw, at)
        name = raw[at + 8 : at + 8 + NAME_SIZE].split(b"\0", 1)[0].decode("ascii", errors="replace")
        if not name or name in files:
            raise FwCfgError(f"fw_cfg directory entry {i} has an empty or repeated name {name!r}")
        files[name] = FwCfgFile(name=name, select=sel, size=size)
    return files


def fwcfg_read(session: QtestSession, entry: FwCfgFile, *, dma: bool | None = None) -> bytes:
    """The content of one fw_cfg file. Selecting it runs QEMU's select callback (for the
    ACPI files: ``acpi_build_update``, which rebuilds the tables once, from the chipset
    state at that moment)."""
    if entry.size > _MAX_FILE:
        raise FwCfgError(f"fw_cfg file {entry.name} is {entry.size} bytes, more than {_MAX_FILE}")
    dma = fwcfg_has_dma(session) if dma is None else dma
    return _read_item(session, entry.select, entry.size, dma)


def qemu_accelerators(binary: str) -> set[str]:
    """The accelerators ``binary -accel help`` lists (Debian 12's QEMU 7.2 has no qtest one)."""
    try:
        out = subprocess.run(
            [binary, "-accel", "help"], capture_output=True, text=True, timeout=30, env={**os.environ, "LC_ALL": "C"}
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise QemuStartError(f"cannot run {binary} -accel help: {exc}") from None
    lines = out.stdout.splitlines()[1:]
    return {line.strip() for line in lines if line.strip()}
