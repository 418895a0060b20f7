"""Where a guest gets its TDX quotes: configfs-tsm, ``/dev/tdx_guest``, or the emulated service.

A quote provider has a ``name`` and ``quote(report_data: bytes) -> bytes`` (64 bytes of
REPORTDATA in, a signed quote out). :func:`detect` picks the first the guest has:

* :class:`ConfigfsTsm` (``configfs-tsm``): the kernel's TSM report interface, Linux >= 6.7
  (``Documentation/ABI/testing/configfs-tsm``). One report entry per request under
  ``/sys/kernel/config/tsm/report``: ``mkdir``, check ``provider`` is ``tdx_guest``, write
  ``inblob``, read ``outblob``, and compare the ``generation`` counter before the write,
  after it and after the read (the ABI's way to detect a conflicting writer), ``rmdir``.
* :class:`TdxGuestDevice` (``tdx-guest``): ``/dev/tdx_guest``. Mainline Linux's driver has
  only ``TDX_CMD_GET_REPORT0`` (``include/uapi/linux/tdx-guest.h``), which returns the
  1024-byte TDREPORT: MAC'd for this CPU only, not a quote anyone else can verify. Turning
  it into a quote needs the host's quoting enclave; mainline kernels do that behind
  configfs-tsm, which :func:`detect` prefers. The GetQuote ioctl this class also speaks
  (``TDX_CMD_GET_QUOTE``, ``_IOR('T', 4, struct tdx_quote_req)``, the buffer a
  ``tdx_quote_hdr`` around a QGS ``GET_QUOTE_REQ`` message) exists only in Intel's
  out-of-tree TDX guest kernels, as Intel's ``libtdx_attest`` uses it. On a mainline
  kernel without configfs-tsm this provider fails with ``code`` ``tdx-guest-no-getquote``.
* :class:`EmulatedQgs` (``emulated``): a TCP connection to tdxvm's emulated quote service
  (:mod:`tdxvm.emulate.qgs`), for a guest launched by the ``emulated`` backend: request line
  ``{"report_data": "<128 hex>"}``, answer ``{"quote": "<b64>"}`` or ``{"error": "..."}``.

Each provider also extends and reads the run-time measurement registers
(``extend_rtmr(index, digest)``, ``read_rtmr(index)``; :mod:`tdxvm.guest.rtmr3` uses
RTMR3). In a TD that is the kernel's TSM measurement-register interface, Linux >= 6.16
(``Documentation/ABI/testing/sysfs-devices-virtual-misc-tdx_guest``):
``/sys/class/misc/tdx_guest/measurements/rtmr<N>:sha384``, whose read gives the
register's current 48 bytes and whose write of exactly 48 bytes (a SHA-384 digest) is
``TDG.MR.RTMR.EXTEND`` (:class:`SysfsRtmrs`). Older kernels have no extend interface:
``extend_rtmr`` then fails with ``code`` ``no-rtmr-extend``, and a service that must
measure what it serves refuses to start. The emulated service takes
``{"op": "extend", "rtmr": N, "digest": "<96 hex>"}`` and ``{"op": "read", "rtmr": N}``
and answers ``{"rtmr": N, "value": "<96 hex>"}``: it keeps the emulated TD's RTMR3 and
puts it into later quotes.

This module runs inside the guest (and its initramfs): standard library only.
"""

from __future__ import annotations

import base64
import binascii
import errno
import fcntl
import json
import logging
import os
import secrets
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tdxvm.errors import TdxvmError

REPORT_DATA_SIZE = 64
TDREPORT_SIZE = 1024
TSM_REPORT_DIR = "sys/kernel/config/tsm/report"  # under the root given to detect()
TDX_GUEST_DEVICE = "dev/tdx_guest"
TSM_PROVIDER_TDX = "tdx_guest"
MEASUREMENTS_DIR = "sys/class/misc/tdx_guest/measurements"  # Linux >= 6.16: TSM measurement registers
RTMR_SIZE = 48
QUOTE_MIN_SIZE = 48 + 584  # a v4 header and TD report body, before any signature
MAX_QUOTE_SIZE = 1 << 20
EMULATED_TIMEOUT = 30.0

# include/uapi/linux/tdx-guest.h: _IOWR('T', 1, struct tdx_report_req), 64 + 1024 bytes.
TDX_CMD_GET_REPORT0 = (3 << 30) | ((REPORT_DATA_SIZE + TDREPORT_SIZE) << 16) | (ord("T") << 8) | 1
# Intel's out-of-tree driver: TDX_CMD_GET_QUOTE on a 16-byte struct tdx_quote_req {u64 buf; u64 len},
# _IOR in most releases and _IOWR in the "V3" one; libtdx_attest defines both.
TDX_CMD_GET_QUOTE = ((2 << 30) | (16 << 16) | (ord("T") << 8) | 4, (3 << 30) | (16 << 16) | (ord("T") << 8) | 4)
GET_QUOTE_BUFFER = 4 * 4096  # libtdx_attest's REQ_BUF_SIZE
GET_QUOTE_IN_FLIGHT = 0xFFFFFFFFFFFFFFFF
GET_QUOTE_SERVICE_UNAVAILABLE = 0x8000000000000001
_QUOTE_HDR = struct.Struct("<QQII")  # struct tdx_quote_hdr: version, status, in_len, out_len; then data
# QGS message library (QuoteGeneration/quote_wrapper/qgs_msg_lib): header u16 major, u16 minor,
# u32 type, u32 size (whole message), u32 error_code; GET_QUOTE_REQ/RESP add two u32 sizes.
_QGS_MSG = struct.Struct("<HHIIIII")
QGS_GET_QUOTE_REQ, QGS_GET_QUOTE_RESP = 0, 1

log = logging.getLogger(__name__)
_T = TypeVar("_T")


class QuoteError(TdxvmError):
    """No quote: the message says which provider, which file or address, and what failed."""

    code = "quote"


class NoQuoteProvider(QuoteError):
    code = "no-quote-provider"


def _check_rtmr(index: int, digest: bytes | None = None) -> None:
    if not isinstance(index, int) or not 0 <= index <= 3:
        raise QuoteError(f"RTMR index {index!r} is not 0..3", code="rtmr-index")
    if digest is not None and len(digest) != RTMR_SIZE:
        raise QuoteError(
            f"an RTMR extend takes a {RTMR_SIZE}-byte SHA-384 digest, got {len(digest)} bytes", code="rtmr-digest"
        )


class SysfsRtmrs:
    """RTMRs through ``/sys/class/misc/tdx_guest/measurements`` (``folder`` may point elsewhere)."""

    def __init__(self, folder: Path = Path("/") / MEASUREMENTS_DIR) -> None:
        self.folder = Path(folder)

    def path(self, index: int) -> Path:
        return self.folder / f"rtmr{index}:sha384"

    def _missing(self, index: int, exc: OSError) -> QuoteError:
        return QuoteError(
            f"{self.path(index)}: {exc.strerror or exc}: this kernel has no RTMR extend interface (Linux >= 6.16 "
            "has it, as the TSM measurement registers of the tdx_guest driver); nothing can be measured into "
            f"RTMR{index}",
            code="no-rtmr-extend",
        )

    def extend(self, index: int, digest: bytes) -> None:
        _check_rtmr(index, digest)
        path = self.path(index)
        try:
            fd = os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError as exc:
            raise self._missing(index, exc) from None
        except OSError as exc:
            raise QuoteError(
                f"cannot open {path} to extend RTMR{index}: {exc.strerror or exc}", code="rtmr-extend"
            ) from None
        try:
            if os.write(fd, bytes(digest)) != RTMR_SIZE:
                raise OSError(errno.EIO, "short write")
        except OSError as exc:
            raise QuoteError(
                f"extending RTMR{index} through {path} failed: {exc.strerror or exc}", code="rtmr-extend"
            ) from None
        finally:
            os.close(fd)

    def read(self, index: int) -> bytes:
        _check_rtmr(index)
        path = self.path(index)
        try:
            with open(path, "rb") as f:
                data = f.read(4 * RTMR_SIZE)
        except FileNotFoundError as exc:
            raise self._missing(index, exc) from None
        except OSError as exc:
            raise QuoteError(f"cannot read RTMR{index} from {path}: {exc.strerror or exc}", code="rtmr-read") from None
        if len(data) == RTMR_SIZE:  # the kernel's binary attribute
            return data
        try:  # a hex rendering, should a kernel print it
            value = bytes.fromhex(data.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            value = b""
        if len(value) != RTMR_SIZE:
            raise QuoteError(f"{path} holds {len(data)} bytes, not a {RTMR_SIZE}-byte RTMR", code="rtmr-read")
        return value


def _check_report_data(report_data: bytes) -> bytes:
    if len(report_data) != REPORT_DATA_SIZE:
        raise QuoteError(f"REPORTDATA must be {REPORT_DATA_SIZE} bytes, got {len(report_data)}", code="report-data")
    return bytes(report_data)


# -- configfs-tsm ------------------------------------------------------------------------


class ConfigfsTsm:
    """Quotes through ``/sys/kernel/config/tsm/report`` (``report_dir`` may point elsewhere)."""

    name = "configfs-tsm"

    def __init__(
        self,
        report_dir: Path = Path("/") / TSM_REPORT_DIR,
        *,
        attribute_wait: float = 1.0,
        busy_retries: int = 3,
        busy_wait: float = 1.0,
        measurements: Path = Path("/") / MEASUREMENTS_DIR,
    ) -> None:
        self.report_dir = Path(report_dir)
        self.attribute_wait, self.busy_retries, self.busy_wait = attribute_wait, busy_retries, busy_wait
        self.rtmrs = SysfsRtmrs(measurements)

    def extend_rtmr(self, index: int, digest: bytes) -> None:
        self.rtmrs.extend(index, digest)

    def read_rtmr(self, index: int) -> bytes:
        return self.rtmrs.read(index)

    def quote(self, report_data: bytes) -> bytes:
        rd = _check_report_data(report_data)
        entry = self.report_dir / f"tdxvm-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(entry, 0o700)
        except OSError as exc:
            raise QuoteError(
                f"configfs-tsm: cannot create report entry {entry}: {exc.strerror or exc}", code="tsm-entry"
            ) from None
        try:
            return self._quote(entry, rd)
        finally:
            try:
                os.rmdir(entry)
            except OSError as exc:  # the kernel frees a leftover entry at reboot; the quote is still good
                log.warning("configfs-tsm: cannot remove report entry %s: %s", entry, exc.strerror or exc)

    def _quote(self, entry: Path, rd: bytes) -> bytes:
        # The kernel creates the attributes with the entry; libtdx_attest still waits for them briefly.
        deadline = time.monotonic() + self.attribute_wait
        while not (entry / "provider").exists():
            if time.monotonic() > deadline:
                raise QuoteError(
                    f"configfs-tsm: {entry} has no 'provider' attribute (is a TSM driver loaded?)", code="tsm-provider"
                )
            time.sleep(0.001)
        provider = self._read(entry / "provider").strip().decode("ascii", "replace")
        if provider != TSM_PROVIDER_TDX:
            raise QuoteError(
                f"configfs-tsm: {entry}/provider is {provider!r}, not {TSM_PROVIDER_TDX!r}: this is not a TDX guest",
                code="tsm-provider",
            )
        before = self._generation(entry)
        self._write_inblob(entry / "inblob", rd)
        written = self._generation(entry)
        # The kernel counts the write synchronously; libtdx_attest re-reads in case it has not yet.
        deadline = time.monotonic() + self.attribute_wait
        while written == before and time.monotonic() < deadline:
            time.sleep(0.001)
            written = self._generation(entry)
        if written != before + 1:
            raise QuoteError(
                f"configfs-tsm: {entry}/generation went from {before} to {written} for one write of inblob: "
                "another writer used this report entry",
                code="tsm-conflict",
            )
        quote = self._read_outblob(entry / "outblob")
        after = self._generation(entry)
        if after != written:
            raise QuoteError(
                f"configfs-tsm: {entry}/generation changed from {written} to {after} while outblob was read: "
                "the quote may not be for this REPORTDATA",
                code="tsm-conflict",
            )
        if len(quote) < QUOTE_MIN_SIZE:
            raise QuoteError(
                f"configfs-tsm: {entry}/outblob holds {len(quote)} bytes, too few for a TDX quote", code="tsm-outblob"
            )
        return quote

    def _read(self, path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise QuoteError(f"configfs-tsm: cannot read {path}: {exc.strerror or exc}", code="tsm-read") from None

    def _generation(self, entry: Path) -> int:
        text = self._read(entry / "generation").strip()
        try:
            return int(text)
        except ValueError:
            raise QuoteError(
                f"configfs-tsm: {entry}/generation is {text[:20]!r}, not a number", code="tsm-read"
            ) from None

    def _retrying(self, what: Path, op: Callable[[], _T]) -> _T:
        for attempt in range(self.busy_retries + 1):
            try:
                return op()
            except OSError as exc:
                if (
                    exc.errno in (errno.EBUSY, errno.EINTR, errno.ETIMEDOUT, errno.EAGAIN)
                    and attempt < self.busy_retries
                ):
                    time.sleep(self.busy_wait)
                    continue
                code = "quote-busy" if exc.errno in (errno.EBUSY, errno.EAGAIN) else "tsm-io"
                raise QuoteError(f"configfs-tsm: {what}: {exc.strerror or exc}", code=code) from None
        raise AssertionError("unreachable")

    def _write_inblob(self, path: Path, rd: bytes) -> None:
        def write() -> None:
            fd = os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                if os.write(fd, rd) != len(rd):
                    raise OSError(errno.EIO, "short write")
            finally:
                os.close(fd)

        self._retrying(path, write)

    def _read_outblob(self, path: Path) -> bytes:
        def read() -> bytes:
            with open(path, "rb") as f:
                return f.read(MAX_QUOTE_SIZE + 1)

        data = self._retrying(path, read)
        if len(data) > MAX_QUOTE_SIZE:
            raise QuoteError(f"configfs-tsm: {path} is larger than {MAX_QUOTE_SIZE} bytes", code="tsm-outblob")
        return data


# -- /dev/tdx_guest ----------------------------------------------------------------------


def qgs_get_quote_request(tdreport: bytes) -> bytes:
    """A QGS ``GET_QUOTE_REQ`` message for ``tdreport`` (no attestation key id list)."""
    return _QGS_MSG.pack(1, 0, QGS_GET_QUOTE_REQ, _QGS_MSG.size + len(tdreport), 0, len(tdreport), 0) + tdreport


def qgs_get_quote_response_quote(message: bytes) -> bytes:
    """The quote in a QGS ``GET_QUOTE_RESP`` message; :class:`QuoteError` for anything else."""
    if len(message) < _QGS_MSG.size:
        raise QuoteError(
            f"GetQuote: response of {len(message)} bytes is shorter than its header", code="getquote-format"
        )
    major, _minor, kind, size, error, id_size, quote_size = _QGS_MSG.unpack_from(message)
    if major != 1 or kind != QGS_GET_QUOTE_RESP:
        raise QuoteError(
            f"GetQuote: response is version {major} type {kind}, expected version 1 GET_QUOTE_RESP (1)",
            code="getquote-format",
        )
    if size != len(message) or size != _QGS_MSG.size + id_size + quote_size:
        raise QuoteError(
            f"GetQuote: response sizes disagree (header {size}, message {len(message)}, "
            f"id {id_size}, quote {quote_size})",
            code="getquote-format",
        )
    if error:
        raise QuoteError(f"GetQuote: the quote service answered error {error:#x}", code="getquote-failed")
    if not quote_size:
        raise QuoteError("GetQuote: the quote service answered an empty quote", code="getquote-format")
    return message[_QGS_MSG.size + id_size :]


class TdxGuestDevice:
    """Quotes through ``/dev/tdx_guest``: TDREPORT by ``TDX_CMD_GET_REPORT0``, then the
    out-of-tree ``TDX_CMD_GET_QUOTE`` (see the module doc: mainline kernels lack it)."""

    name = "tdx-guest"

    def __init__(
        self, device: Path = Path("/") / TDX_GUEST_DEVICE, *, measurements: Path = Path("/") / MEASUREMENTS_DIR
    ) -> None:
        self.device = Path(device)
        self.rtmrs = SysfsRtmrs(measurements)

    def extend_rtmr(self, index: int, digest: bytes) -> None:
        self.rtmrs.extend(index, digest)

    def read_rtmr(self, index: int) -> bytes:
        return self.rtmrs.read(index)

    def _open(self) -> int:
        try:
            return os.open(self.device, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise QuoteError(
                f"tdx-guest: cannot open {self.device}: {exc.strerror or exc}", code="tdx-guest-open"
            ) from None

    def report(self, report_data: bytes) -> bytes:
        """The 1024-byte TDREPORT for ``report_data`` (verifiable only on this CPU)."""
        rd = _check_report_data(report_data)
        fd = self._open()
        try:
            return self._report(fd, rd)
        finally:
            os.close(fd)

    def _report(self, fd: int, rd: bytes) -> bytes:
        req = bytearray(rd + bytes(TDREPORT_SIZE))
        try:
            fcntl.ioctl(fd, TDX_CMD_GET_REPORT0, req, True)
        except OSError as exc:
            raise QuoteError(
                f"tdx-guest: TDX_CMD_GET_REPORT0 on {self.device} failed: {exc.strerror or exc}",
                code="tdx-guest-report",
            ) from None
        return bytes(req[REPORT_DATA_SIZE:])

    def quote(self, report_data: bytes) -> bytes:
        import ctypes  # only this path needs a buffer at a fixed address

        rd = _check_report_data(report_data)
        fd = self._open()
        try:
            message = qgs_get_quote_request(self._report(fd, rd))
            payload = struct.pack(">I", len(message)) + message
            buf = ctypes.create_string_buffer(_QUOTE_HDR.pack(1, 0, len(payload), 0) + payload, GET_QUOTE_BUFFER)
            req = bytearray(struct.pack("<QQ", ctypes.addressof(buf), GET_QUOTE_BUFFER))
            last: OSError | None = None
            for number in TDX_CMD_GET_QUOTE:
                try:
                    fcntl.ioctl(fd, number, req, True)
                    last = None
                    break
                except OSError as exc:
                    last = exc
                    if exc.errno not in (errno.ENOTTY, errno.EINVAL):
                        break
        finally:
            os.close(fd)
        if last is not None:
            if last.errno in (errno.ENOTTY, errno.EINVAL):
                raise QuoteError(
                    f"tdx-guest: {self.device} has no GetQuote ioctl ({last.strerror}): mainline kernels give quotes "
                    "only through configfs-tsm (Linux >= 6.7; mount configfs at /sys/kernel/config)",
                    code="tdx-guest-no-getquote",
                )
            code = "quote-busy" if last.errno == errno.EBUSY else "tdx-guest-getquote"
            raise QuoteError(
                f"tdx-guest: TDX_CMD_GET_QUOTE on {self.device} failed: {last.strerror or last}", code=code
            )
        _version, status, _in_len, out_len = _QUOTE_HDR.unpack_from(buf.raw)
        if status:
            why = {
                GET_QUOTE_IN_FLIGHT: "still in flight",
                GET_QUOTE_SERVICE_UNAVAILABLE: "the host's quote service is unavailable",
            }
            raise QuoteError(
                f"tdx-guest: GetQuote status {status:#x} ({why.get(status, 'error')})",
                code="quote-busy" if status == GET_QUOTE_IN_FLIGHT else "getquote-failed",
            )
        data = buf.raw[_QUOTE_HDR.size : _QUOTE_HDR.size + out_len]
        if (
            out_len <= 4
            or out_len > GET_QUOTE_BUFFER - _QUOTE_HDR.size
            or struct.unpack(">I", data[:4])[0] != out_len - 4
        ):
            raise QuoteError(
                f"tdx-guest: GetQuote returned {out_len} bytes that do not frame a QGS message", code="getquote-format"
            )
        return qgs_get_quote_response_quote(data[4:])


# -- the emulated quote service ----------------------------------------------------------


def parse_address(address: str | tuple[str, int]) -> tuple[str, int]:
    """``(host, port)`` from ``"HOST:PORT"`` (``[v6]:PORT`` too) or a tuple."""
    if isinstance(address, tuple):
        host, port = address
    else:
        host, sep, port_text = address.strip().rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not sep or not host or not port_text.isdigit():
            raise QuoteError(f"quote service address {address!r}: expected HOST:PORT", code="qgs-address")
        port = int(port_text)
    if not 0 < int(port) < 65536:
        raise QuoteError(f"quote service address {address!r}: port out of range", code="qgs-address")
    return str(host), int(port)


class EmulatedQgs:
    """Quotes from tdxvm's emulated quote service at ``address`` (``HOST:PORT``)."""

    name = "emulated"

    def __init__(self, address: str | tuple[str, int], *, timeout: float = EMULATED_TIMEOUT) -> None:
        self.host, self.port = parse_address(address)
        self.timeout = timeout

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _ask(self, request: dict) -> dict:
        """One request line, one answer object; :class:`QuoteError` for anything else."""
        where = f"emulated quote service {self.address}"
        try:
            with socket.create_connection((self.host, self.port), timeout=self.timeout) as sock:
                sock.sendall(json.dumps(request).encode() + b"\n")
                with sock.makefile("rb") as f:
                    line = f.readline(2 * MAX_QUOTE_SIZE)
        except TimeoutError:
            raise QuoteError(f"{where}: no answer within {self.timeout:g} s", code="qgs-timeout") from None
        except OSError as exc:
            raise QuoteError(f"{where}: {exc.strerror or exc}", code="qgs-unreachable") from None
        if not line.endswith(b"\n"):
            raise QuoteError(
                f"{where}: the answer is cut short or longer than {2 * MAX_QUOTE_SIZE} bytes", code="qgs-protocol"
            )
        try:
            answer = json.loads(line)
        except ValueError:
            raise QuoteError(f"{where}: the answer is not JSON", code="qgs-protocol") from None
        if not isinstance(answer, dict):
            raise QuoteError(f"{where}: the answer is not a JSON object", code="qgs-protocol")
        if "error" in answer:
            raise QuoteError(f"{where}: {answer['error']}", code="qgs-refused")
        return answer

    def quote(self, report_data: bytes) -> bytes:
        rd = _check_report_data(report_data)
        answer = self._ask({"report_data": rd.hex()})
        where = f"emulated quote service {self.address}"
        try:
            quote = base64.b64decode(answer.get("quote") or "", validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise QuoteError(f"{where}: 'quote' is not base64", code="qgs-protocol") from None
        if len(quote) < QUOTE_MIN_SIZE:
            raise QuoteError(f"{where}: the quote is {len(quote)} bytes, too few for a TDX quote", code="qgs-protocol")
        return quote

    def _rtmr(self, request: dict) -> bytes:
        answer = self._ask(request)
        try:
            value = bytes.fromhex(answer["value"]) if answer.get("rtmr") == request["rtmr"] else b""
        except (KeyError, TypeError, ValueError):
            value = b""
        if len(value) != RTMR_SIZE:
            raise QuoteError(
                f'emulated quote service {self.address}: expected {{"rtmr": {request["rtmr"]}, "value": '
                f"<{2 * RTMR_SIZE} hex>}}, got {str(answer)[:120]}",
                code="qgs-protocol",
            )
        return value

    def extend_rtmr(self, index: int, digest: bytes) -> None:
        """Extend the emulated TD's RTMR ``index`` (the service keeps it, as the TDX module would)."""
        _check_rtmr(index, digest)
        self._rtmr({"op": "extend", "rtmr": index, "digest": bytes(digest).hex()})

    def read_rtmr(self, index: int) -> bytes:
        _check_rtmr(index)
        return self._rtmr({"op": "read", "rtmr": index})


# -- choosing one ------------------------------------------------------------------------

QuoteProvider = ConfigfsTsm | TdxGuestDevice | EmulatedQgs


def _cpu_is_td(root: Path) -> bool:
    """Whether /proc/cpuinfo lists the ``tdx_guest`` flag (Linux sets it inside a TD)."""
    try:
        text = (root / "proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return any(line.startswith("flags") and " tdx_guest" in f"{line} " for line in text.splitlines())


def detect(qgs_address: str | tuple[str, int] | None = None, root: Path = Path("/")) -> QuoteProvider:
    """The guest's quote provider: configfs-tsm, else ``/dev/tdx_guest``, else the emulated
    service at ``qgs_address``; :class:`NoQuoteProvider` when none applies. ``root`` is where
    the guest's ``/sys`` and ``/dev`` are (tests point it at a folder of their own)."""
    root = Path(root)
    tsm = root / TSM_REPORT_DIR
    device = root / TDX_GUEST_DEVICE
    # configfs-tsm is there whenever the tsm module is loaded, but it has a TDX provider only
    # when the tdx-guest driver is bound, which also makes /dev/tdx_guest: outside a TD,
    # creating a report fails with ENXIO.
    measurements = root / MEASUREMENTS_DIR
    if tsm.is_dir() and (device.exists() or _cpu_is_td(root)):
        return ConfigfsTsm(tsm, measurements=measurements)
    if device.exists():
        return TdxGuestDevice(device, measurements=measurements)
    if qgs_address:
        return EmulatedQgs(qgs_address)
    raise NoQuoteProvider(
        f"no TDX quote source: neither {tsm} (configfs-tsm) nor {device} exists, and no emulated quote "
        "service address was given"
    )
