"""The emulated quote service: signs TD reports for guests of the ``emulated`` backend.

An emulated guest has no TDX module, so it cannot measure itself. This service plays the
TDX module and the quoting enclave for one launched domain: it knows the artifacts the
domain really boots (:class:`LaunchArtifacts`: kernel, initrd, command line, the TDVF the
TD stands for) and puts into each quote the measurements a real TD booting them would
have, computed by :func:`tdxvm.image.measure.predict` from those bytes — never copied
from a manifest. The guest sends only REPORTDATA.

Register by register:

* MRTD: the TDVF's, from the firmware file (zero when no firmware is known, which a
  policy naming an MRTD refuses).
* RTMR1, RTMR2: as predicted for direct kernel boot (kernel Authenticode; load options
  and initrd), under ``profile`` (default ``upstream``). A kernel whose RTMR2 cannot be
  predicted is refused: the service would have to make a value up.
* RTMR0: what a TD booting that firmware in that machine would hold
  (:mod:`tdxvm.image.rtmr0`): TD HOB, variable store, fw_cfg items, ACPI tables and SMBIOS
  table, the last three read over qtest from the QEMU libvirt actually runs with its
  real argv (:func:`emulated_rtmr0`; the caller passes the argv,
  :func:`tdxvm.launch.rtmr0pin.running_argv`; a remote host's argv runs on the
  controller's own QEMU, with the kernel and initrd the host has). So a device, vCPU or
  memory the host adds to the domain changes it, as on hardware. 48 zero bytes where it
  cannot be computed: no argv (libvirt's test driver runs no QEMU) or a firmware build
  whose events are not known; the launch does not pin RTMR0 then either
  (:mod:`tdxvm.launch.rtmr0pin`).
* RTMR3: what the guest extended it with, as a TD's TDX module keeps it: zero at the
  start, then ``SHA-384(RTMR3 ‖ digest)`` for each extend request, in order (the
  guest's inference service measures the model it serves, :mod:`tdxvm.guest.rtmr3`).
  The value lives in this service's memory only: a new service (a new boot of the
  domain, :mod:`tdxvm.emulate.qgsd`) starts from zero, as a rebooted TD does. RTMR0..2
  are never extended (they are what the boot artifacts predict).
* TD_ATTRIBUTES: the domain's ``<launchSecurity><policy>`` if it has one, else
  :data:`tdxvm.attest.quote.LAUNCH_TD_ATTRIBUTES` (SEPT_VE_DISABLE: what a launch's
  policy pins); DEBUG is refused. XFAM and MRCONFIGID/MROWNER/MROWNERCONFIG from the
  launch (defaults: the platform's usual XFAM, zeros).

Anyone who can reach the port gets quotes for these measurements with any REPORTDATA:
it binds 127.0.0.1 and stands in for hardware only where the host is trusted (tests, CI,
demos), with its own root CA as the verifier's trust anchor.

Wire: TCP, one JSON object per line (at most :data:`MAX_REQUEST` bytes), each answered
with one line, ``{"error": "<message>"}`` when refused:

* ``{"report_data": "<128 hex>"}`` → ``{"quote": "<b64>"}``;
* ``{"op": "extend", "rtmr": 3, "digest": "<96 hex>"}`` → ``{"rtmr": 3, "value": "<96 hex>"}``
  (the register after the extend; only RTMR3 may be extended);
* ``{"op": "read", "rtmr": N}`` → ``{"rtmr": N, "value": "<96 hex>"}`` (what a quote would carry).

A guest behind QEMU user networking reaches it at ``10.0.2.2:<port>``.

Domain XML: :meth:`LaunchArtifacts.from_domain_xml` reads ``<os><kernel>``, ``<initrd>``,
``<cmdline>``, ``<launchSecurity type='tdx'>`` (policy and the
MR* values) and the firmware: the tdxvm metadata element ``<tdxvm:firmware path='/abs/
OVMF.inteltdx.fd'/>`` (namespace :data:`tdxvm.launch.domain.TDXVM_NS`), which the emulated
backend records because its TDVF is not the loader; else ``<os><loader>`` (the TDX
backend). libvirt keeps one metadata element per namespace, so the element belongs inside
``<tdxvm:owner>``; it is found anywhere under ``<metadata>``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import socketserver
import tempfile
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tdxvm.attest.quote import LAUNCH_TD_ATTRIBUTES, TD_ATTR_DEBUG
from tdxvm.emulate.platform import EmulatedPlatform
from tdxvm.emulate.quote import DEFAULT_XFAM, TdReportFields
from tdxvm.errors import TdxvmError
from tdxvm.image.measure import DEFAULT_PROFILE, Measurements, predict
from tdxvm.image.platforminputs import PREDICTION_ERRORS, predict_for_argv
from tdxvm.image.rtmr0 import UnknownFirmwareError, firmware_build
from tdxvm.launch.domain import TDXVM_NS

MAX_REQUEST = 4096
IDLE_TIMEOUT = 30.0
GUEST_GATEWAY = "10.0.2.2"  # the host as a guest on QEMU user networking sees it
EXTENDABLE_RTMR = 3
RTMR_SIZE = 48
FIRMWARE_ELEMENT = f"{{{TDXVM_NS}}}firmware"

log = logging.getLogger(__name__)


class QuoteServiceError(TdxvmError):
    """The service cannot stand for this launch; the message names the element or file."""

    code = "qgs"


def emulated_rtmr0(
    firmware: bytes | None,
    argv: list[str] | None,
    qemu: str | None = None,
    files: Mapping[str, bytes] | None = None,
) -> bytes:
    """RTMR0 of a TD booting ``firmware`` in the QEMU started with ``argv`` (see the module
    doc), computed with ``qemu`` (default: that argv's own binary); zeros where it cannot be
    computed. A remote host's binary and files are not on this machine: ``files`` (a path
    in ``argv`` -> the bytes the host has there: kernel, initrd) are put where ``qemu``
    reads them instead."""
    if firmware is None or not argv:
        return bytes(48)
    try:
        firmware_build(firmware)
    except UnknownFirmwareError:
        return bytes(48)
    try:
        with tempfile.TemporaryDirectory(prefix="tdxvm-machine-") as folder:
            path_map = {}
            for i, (path, data) in enumerate((files or {}).items()):
                copy = Path(folder) / f"{i}-{Path(path).name}"
                copy.write_bytes(data)
                path_map[path] = str(copy)
            value, _events = predict_for_argv(firmware, qemu or argv[0], argv, tdx=False, path_map=path_map)
    except PREDICTION_ERRORS as exc:
        raise QuoteServiceError(f"cannot compute the emulated TD's RTMR0 from its QEMU: {exc}", code="rtmr0") from None
    return bytes.fromhex(value)


def _read_local(path: str) -> bytes:
    return Path(path).read_bytes()


@dataclass(frozen=True, slots=True, kw_only=True)
class LaunchArtifacts:
    """What an emulated TD boots, as bytes, and the launch settings its quotes report."""

    kernel: bytes
    initrd: bytes
    cmdline: str
    firmware: bytes | None
    td_attributes: int = LAUNCH_TD_ATTRIBUTES
    xfam: bytes = DEFAULT_XFAM
    mr_config_id: bytes = bytes(48)
    mr_owner: bytes = bytes(48)
    mr_owner_config: bytes = bytes(48)
    rtmr0: bytes = bytes(48)
    profile: str = DEFAULT_PROFILE

    def __post_init__(self) -> None:
        if self.td_attributes & TD_ATTR_DEBUG:
            raise QuoteServiceError(
                "the emulated quote service never signs for a DEBUG TD (TD_ATTRIBUTES bit 0)", code="debug-td"
            )
        if len(self.xfam) != 8:
            raise QuoteServiceError(f"XFAM must be 8 bytes, got {len(self.xfam)}", code="launch")
        for name in ("mr_config_id", "mr_owner", "mr_owner_config"):
            if len(getattr(self, name)) != 48:
                raise QuoteServiceError(f"{name} must be 48 bytes, got {len(getattr(self, name))}", code="launch")

    @classmethod
    def from_domain_xml(
        cls,
        xml_text: str,
        *,
        read: Callable[[str], bytes] = _read_local,
        profile: str = DEFAULT_PROFILE,
        argv: list[str] | None = None,
        qemu: str | None = None,
    ) -> LaunchArtifacts:
        """The artifacts a libvirt domain boots; ``read(path)`` gives a file's bytes as the
        libvirt host has it (default: this machine's file); ``argv``: the QEMU libvirt runs
        for it, whose machine RTMR0 describes, run with ``qemu`` (:func:`emulated_rtmr0`)."""
        try:
            dom = ET.fromstring(xml_text)
        except ET.ParseError as exc:
            raise QuoteServiceError(f"domain XML: {exc}", code="domain-xml") from None
        name = dom.findtext("name") or "?"
        where = f"domain {name}"

        def file(element: str, path: str | None) -> bytes:
            if not path or not path.startswith("/"):
                raise QuoteServiceError(f"{where}: {element} needs an absolute path, got {path!r}", code="domain-xml")
            try:
                return read(path)
            except OSError as exc:
                raise QuoteServiceError(
                    f"{where}: cannot read {element} {path}: {exc.strerror or exc}", code="domain-file"
                ) from None

        kernel_path = dom.findtext("os/kernel")
        if kernel_path is None:
            raise QuoteServiceError(
                f"{where}: no <os><kernel> (the emulated TD boots a kernel directly)", code="domain-xml"
            )
        initrd_path = dom.findtext("os/initrd")
        fw_element = dom.find(f"metadata//{FIRMWARE_ELEMENT}")
        if fw_element is not None:
            firmware: bytes | None = file(f"<tdxvm:firmware path=...> ({TDXVM_NS})", fw_element.get("path"))
        elif dom.findtext("os/loader"):
            firmware = file("<os><loader>", dom.findtext("os/loader"))
        else:
            firmware = None
        settings: dict[str, Any] = {}
        sec = dom.find("launchSecurity")
        if sec is not None and sec.get("type") == "tdx":
            settings.update(_launch_security(sec, where))
        kernel = file("<os><kernel>", kernel_path)
        initrd = file("<os><initrd>", initrd_path) if initrd_path else b""
        copies = None if qemu is None else {kernel_path: kernel, **({initrd_path: initrd} if initrd_path else {})}
        return cls(
            kernel=kernel,
            initrd=initrd,
            cmdline=dom.findtext("os/cmdline") or "",
            firmware=firmware,
            rtmr0=emulated_rtmr0(firmware, argv, qemu, copies),
            profile=profile,
            **settings,
        )

    def measurements(self) -> Measurements:
        return predict(
            firmware=self.firmware, kernel=self.kernel, initrd=self.initrd, cmdline=self.cmdline, profile=self.profile
        )

    def report(self, measured: Measurements, report_data: bytes, *, rtmr3: bytes = bytes(48)) -> TdReportFields:
        """The TD report fields of a quote with ``report_data`` and the run-time ``rtmr3`` (see the module doc)."""
        for register in ("rtmr1", "rtmr2"):
            if measured.value(register) is None:
                raise QuoteServiceError(
                    f"cannot emulate this TD: {register.upper()} is {measured.notes[register]}", code="unpredictable"
                )
        return TdReportFields(
            td_attributes=self.td_attributes,
            xfam=self.xfam,
            mr_td=bytes.fromhex(measured.mrtd) if measured.mrtd else bytes(48),
            mr_config_id=self.mr_config_id,
            mr_owner=self.mr_owner,
            mr_owner_config=self.mr_owner_config,
            rtmrs=(self.rtmr0, bytes.fromhex(measured.rtmr1 or ""), bytes.fromhex(measured.rtmr2 or ""), bytes(rtmr3)),
            report_data=report_data,
        )


def _int(text: str | None, where: str) -> int | None:
    if text is None:
        return None
    try:
        return int(text.strip(), 0)
    except ValueError:
        raise QuoteServiceError(f"{where} is {text!r}, not a number", code="domain-xml") from None


def _launch_security(sec: ET.Element, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    policy = _int(sec.findtext("policy"), f"{where}: <launchSecurity><policy>")
    if policy is not None:
        out["td_attributes"] = policy
    for tag, key in (("mrConfigId", "mr_config_id"), ("mrOwner", "mr_owner"), ("mrOwnerConfig", "mr_owner_config")):
        text = sec.findtext(tag)
        if text:
            try:
                out[key] = base64.b64decode(text.strip(), validate=True)
            except ValueError:
                raise QuoteServiceError(f"{where}: <launchSecurity><{tag}> is not base64", code="domain-xml") from None
    return out


def _rtmr_index(request: Any) -> int:
    index = request.get("rtmr")
    if isinstance(index, bool) or not isinstance(index, int):
        raise QuoteServiceError(f'expected "rtmr": an RTMR index, got {index!r}', code="rtmr-index")
    return index


def _hex_field(request: Any, key: str, size: int) -> bytes:
    text = request.get(key) if isinstance(request, dict) else None
    try:
        if not isinstance(text, str) or len(text) != 2 * size:
            raise ValueError
        return bytes.fromhex(text)
    except ValueError:
        raise QuoteServiceError(f'expected "{key}": {2 * size} hex digits', code="request") from None


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(IDLE_TIMEOUT)

    def handle(self) -> None:
        while True:
            try:
                line = self.rfile.readline(MAX_REQUEST + 1)
            except OSError:
                return
            if not line:
                return
            if len(line) > MAX_REQUEST or not line.endswith(b"\n"):
                self._send({"error": f"request longer than {MAX_REQUEST} bytes or cut short"})
                return
            self._send(self.server.service.answer(line))

    def _send(self, answer: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            self.wfile.write(json.dumps(answer).encode() + b"\n")


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    block_on_close = False

    def __init__(self, service: QuoteService, address: tuple[str, int]) -> None:
        self.service = service
        super().__init__(address, _Handler)


class QuoteService:
    """Signs quotes for one launch with ``platform``'s keys; serves them on ``host:port``
    (default 127.0.0.1 and a free port) while used as a context manager.

    ``guard``, if given, is asked before every request; a message it returns refuses the
    request with that message (:mod:`tdxvm.emulate.qgsd`: the domain booted again)."""

    def __init__(
        self,
        platform: EmulatedPlatform,
        launch: LaunchArtifacts,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        version: int = 4,
        guard: Callable[[], str | None] | None = None,
    ) -> None:
        self.platform, self.launch, self.version, self.guard = platform, launch, version, guard
        self.measurements = launch.measurements()
        launch.report(self.measurements, bytes(64))  # refuse an unpredictable launch now, not per request
        self._rtmr3 = bytes(RTMR_SIZE)
        self._rtmr_lock = threading.Lock()  # an extend and a quote never interleave
        self._bind = (host, port)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def sign(self, report_data: bytes) -> bytes:
        """A quote over this launch's measurements and the current RTMR3 with ``report_data`` (64 bytes)."""
        if len(report_data) != 64:
            raise QuoteServiceError(f"REPORTDATA must be 64 bytes, got {len(report_data)}", code="report-data")
        with self._rtmr_lock:
            report = self.launch.report(self.measurements, report_data, rtmr3=self._rtmr3)
        return self.platform.sign_quote(version=self.version, report=report, tee_tcb_svn=self.platform.tee_tcb_svn)

    def extend_rtmr(self, index: int, digest: bytes) -> bytes:
        """``RTMR = SHA-384(RTMR ‖ digest)`` for RTMR3 (the only one a guest extends here); the new value."""
        if index != EXTENDABLE_RTMR:
            raise QuoteServiceError(
                f"only RTMR{EXTENDABLE_RTMR} can be extended (RTMR0..2 are the boot's), not RTMR{index}",
                code="rtmr-index",
            )
        if len(digest) != RTMR_SIZE:
            raise QuoteServiceError(
                f"an extend takes a {RTMR_SIZE}-byte SHA-384 digest, got {len(digest)} bytes", code="rtmr-digest"
            )
        with self._rtmr_lock:
            self._rtmr3 = hashlib.sha384(self._rtmr3 + bytes(digest)).digest()
            return self._rtmr3

    def rtmr(self, index: int) -> bytes:
        """RTMR ``index`` as the next quote will carry it."""
        if index == EXTENDABLE_RTMR:
            with self._rtmr_lock:
                return self._rtmr3
        if index not in (0, 1, 2):
            raise QuoteServiceError(f"RTMR index {index!r} is not 0..3", code="rtmr-index")
        return self.launch.report(self.measurements, bytes(64)).rtmrs[index]

    def reset(self) -> None:
        """RTMR3 back to zero, as a TD that boots again."""
        with self._rtmr_lock:
            self._rtmr3 = bytes(RTMR_SIZE)

    def answer(self, line: bytes) -> dict[str, Any]:
        """The answer to one request line (see the module doc)."""
        try:
            request = json.loads(line)
        except ValueError:
            request = None
        op = request.get("op", "quote") if isinstance(request, dict) else "quote"
        if self.guard is not None and (refusal := self.guard()) is not None:
            return {"error": refusal}
        try:
            if op == "extend":
                index, digest = _rtmr_index(request), _hex_field(request, "digest", RTMR_SIZE)
                value = self.extend_rtmr(index, digest)
                log.info("extended RTMR%d with %s…", index, digest.hex()[:16])
                return {"rtmr": index, "value": value.hex()}
            if op == "read":
                index = _rtmr_index(request)
                return {"rtmr": index, "value": self.rtmr(index).hex()}
        except QuoteServiceError as exc:
            return {"error": str(exc)}
        if op != "quote":
            return {"error": f'unknown op {op!r}: expected a quote ({{"report_data": ...}}), "extend" or "read"'}
        try:
            report_data = _hex_field(request, "report_data", 64)
        except QuoteServiceError:
            return {"error": 'expected {"report_data": "<128 hex digits>"}'}
        quote = self.sign(report_data)
        log.info("signed a quote for REPORTDATA %s…", report_data.hex()[:16])
        return {"quote": base64.b64encode(quote).decode("ascii")}

    # -- serving ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise QuoteServiceError("the quote service is not running", code="qgs-stopped")
        return int(self._server.server_address[1])

    @property
    def address(self) -> str:
        """``HOST:PORT`` where it listens (for a guest on this machine's loopback)."""
        return f"{self._bind[0]}:{self.port}"

    def guest_address(self, gateway: str = GUEST_GATEWAY) -> str:
        """Where a guest on QEMU user networking reaches it."""
        return f"{gateway}:{self.port}"

    def start(self) -> QuoteService:
        if self._server is None:
            self._server = _Server(self, self._bind)
            self._thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="tdxvm-qgs", daemon=True
            )
            self._thread.start()
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(timeout=10)
            self._server = self._thread = None

    def __enter__(self) -> QuoteService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
