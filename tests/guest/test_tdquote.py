"""Quote providers: configfs-tsm against a folder laid out like the kernel's, the device
path's QGS messages, the emulated service for real, and detect()."""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from pathlib import Path

import pytest

from tdxvm.attest import parse_quote
from tdxvm.emulate.qgs import QuoteService
from tdxvm.guest.tdquote import (
    ConfigfsTsm,
    EmulatedQgs,
    NoQuoteProvider,
    QuoteError,
    TdxGuestDevice,
    detect,
    parse_address,
    qgs_get_quote_request,
    qgs_get_quote_response_quote,
)

from ..attested_guest import artifacts, platform, silent_server


class FakeTsm:
    """``/sys/kernel/config/tsm/report`` as a plain folder, with a thread playing the kernel:
    it fills each new entry with its attributes (``provider`` last), and on every write of
    ``inblob`` puts a quote signed by the emulated platform into ``outblob`` and counts
    ``generation`` up by ``step`` (1, as the kernel does; 2 plays a second writer)."""

    def __init__(
        self, folder: Path, *, provider: str = "tdx_guest", step: int = 1, outblob: bytes | None = None
    ) -> None:
        self.folder, self.provider, self.step, self.outblob = folder, provider, step, outblob
        folder.mkdir(parents=True)
        self.entries: list[str] = []
        self._seen: dict[str, bytes] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _put(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def _run(self) -> None:
        while not self._stop.is_set():
            for entry in self.folder.iterdir():
                if entry.name not in self._seen:
                    self.entries.append(entry.name)
                    for name, data in (("inblob", b""), ("outblob", b""), ("generation", b"0\n")):
                        self._put(entry / name, data)
                    self._put(entry / "provider", self.provider.encode() + b"\n")
                    self._seen[entry.name] = b""
                inblob = (entry / "inblob").read_bytes() if (entry / "inblob").exists() else b""
                if len(inblob) == 64 and inblob != self._seen[entry.name]:
                    self._seen[entry.name] = inblob
                    out = self.outblob if self.outblob is not None else platform().sign_quote(report_data=inblob)
                    self._put(entry / "outblob", out)
                    gen = int((entry / "generation").read_text())
                    self._put(entry / "generation", f"{gen + self.step}\n".encode())
            time.sleep(0.001)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def tsm(tmp_path):
    fakes: list[FakeTsm] = []

    def make(**kw) -> FakeTsm:
        fake = FakeTsm(tmp_path / "sys/kernel/config/tsm/report", **kw)
        fakes.append(fake)
        return fake

    yield make
    for f in fakes:
        f.stop()


def test_configfs_tsm_without_a_tdx_provider_is_not_used(tmp_path, tsm):
    tsm()  # the tsm module is loaded, but this is no TD: creating a report would fail (ENXIO)
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text("processor\t: 0\nflags\t\t: fpu vme sse2 aes\n")
    assert isinstance(detect("10.0.2.2:4050", root=tmp_path), EmulatedQgs)


def test_configfs_tsm_quote(tmp_path, tsm, caplog):
    fake = tsm()
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text("processor\t: 0\nflags\t\t: fpu vme sse2 aes tdx_guest\n")
    provider = detect(None, root=tmp_path)
    assert isinstance(provider, ConfigfsTsm) and provider.name == "configfs-tsm"
    rd = bytes(range(64))
    with caplog.at_level(logging.WARNING, logger="tdxvm.guest.tdquote"):
        quote = provider.quote(rd)
    assert parse_quote(quote).body.report_data == rd
    [entry] = fake.entries
    assert entry.startswith(f"tdxvm-{os.getpid()}-")
    assert (fake.folder / entry / "inblob").read_bytes() == rd
    # configfs removes an entry with its attributes; a plain folder cannot, so the provider says so and goes on
    assert f"cannot remove report entry {fake.folder / entry}" in caplog.text


def test_configfs_tsm_each_quote_has_its_own_entry(tmp_path, tsm):
    fake = tsm()
    provider = ConfigfsTsm(fake.folder)
    quotes = [provider.quote(bytes([i]) * 64) for i in range(3)]
    assert [parse_quote(q).body.report_data[0] for q in quotes] == [0, 1, 2]
    assert len(set(fake.entries)) == 3


def test_configfs_tsm_detects_a_second_writer(tmp_path, tsm):
    fake = tsm(step=2)
    with pytest.raises(QuoteError, match="generation went from 0 to 2") as exc:
        ConfigfsTsm(fake.folder).quote(bytes(64))
    assert exc.value.code == "tsm-conflict"


def test_configfs_tsm_refuses_another_tsm(tmp_path, tsm):
    fake = tsm(provider="sev_guest")
    with pytest.raises(QuoteError, match="'sev_guest', not 'tdx_guest'") as exc:
        ConfigfsTsm(fake.folder).quote(bytes(64))
    assert exc.value.code == "tsm-provider"


def test_configfs_tsm_short_outblob(tmp_path, tsm):
    fake = tsm(outblob=b"\x04\x00" * 10)
    with pytest.raises(QuoteError, match="holds 20 bytes, too few") as exc:
        ConfigfsTsm(fake.folder).quote(bytes(64))
    assert exc.value.code == "tsm-outblob"


def test_configfs_tsm_without_a_driver(tmp_path):
    folder = tmp_path / "report"
    folder.mkdir()
    with pytest.raises(QuoteError, match="no 'provider' attribute"):
        ConfigfsTsm(folder, attribute_wait=0.05).quote(bytes(64))
    with pytest.raises(QuoteError, match="cannot create report entry") as exc:
        ConfigfsTsm(tmp_path / "missing").quote(bytes(64))
    assert exc.value.code == "tsm-entry"
    with pytest.raises(QuoteError, match="REPORTDATA must be 64 bytes"):
        ConfigfsTsm(folder).quote(bytes(32))


def test_qgs_messages():
    report = bytes(range(256)) * 4
    req = qgs_get_quote_request(report)
    assert struct.unpack_from("<HHIIIII", req) == (1, 0, 0, 24 + 1024, 0, 1024, 0) and req[24:] == report
    quote = b"Q" * 700
    resp = struct.pack("<HHIIIII", 1, 1, 1, 24 + 16 + 700, 0, 16, 700) + b"I" * 16 + quote
    assert qgs_get_quote_response_quote(resp) == quote
    for bad, match in [
        (resp[:20], "shorter than its header"),
        (struct.pack("<HHIIIII", 1, 0, 0, 24, 0, 0, 0), "expected version 1 GET_QUOTE_RESP"),
        (resp[:-1], "sizes disagree"),
        (struct.pack("<HHIIIII", 1, 0, 1, 24, 0x12, 0, 0), "error 0x12"),
        (struct.pack("<HHIIIII", 1, 0, 1, 24, 0, 0, 0), "empty quote"),
    ]:
        with pytest.raises(QuoteError, match=match):
            qgs_get_quote_response_quote(bad)


def test_tdx_guest_device_on_something_else(tmp_path):
    """The real ioctls against a file that is not the TDX guest device: a typed error, never a quote."""
    not_device = tmp_path / "dev/tdx_guest"
    not_device.parent.mkdir()
    not_device.write_bytes(b"")
    provider = detect("127.0.0.1:1", root=tmp_path)  # the device wins over the emulated service
    assert isinstance(provider, TdxGuestDevice) and provider.name == "tdx-guest"
    with pytest.raises(QuoteError, match=r"TDX_CMD_GET_REPORT0 on .*tdx_guest failed") as exc:
        provider.quote(bytes(64))
    assert exc.value.code == "tdx-guest-report"
    with pytest.raises(QuoteError, match="cannot open") as exc:
        TdxGuestDevice(tmp_path / "none").report(bytes(64))
    assert exc.value.code == "tdx-guest-open"


def test_emulated_qgs_against_the_real_service():
    with QuoteService(platform(), artifacts()) as service:
        provider = detect(service.address, root=Path("/nonexistent-root"))
        assert isinstance(provider, EmulatedQgs) and provider.name == "emulated"
        assert parse_quote(provider.quote(b"\x42" * 64)).body.report_data == b"\x42" * 64


def test_emulated_qgs_failures():
    with QuoteService(platform(), artifacts()) as service:
        port = service.port
    with pytest.raises(QuoteError, match=f"emulated quote service 127.0.0.1:{port}") as exc:
        EmulatedQgs(("127.0.0.1", port)).quote(bytes(64))
    assert exc.value.code == "qgs-unreachable"
    with silent_server() as (host, silent), pytest.raises(QuoteError, match="no answer within 0.3 s") as exc:
        EmulatedQgs(f"{host}:{silent}", timeout=0.3).quote(bytes(64))
    assert exc.value.code == "qgs-timeout"


def test_detect_without_any_source(tmp_path):
    with pytest.raises(NoQuoteProvider, match="no TDX quote source") as exc:
        detect(None, root=tmp_path)
    assert exc.value.code == "no-quote-provider"


@pytest.mark.parametrize("text,expected", [("10.0.2.2:7301", ("10.0.2.2", 7301)), ("[::1]:9", ("::1", 9))])
def test_parse_address(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["10.0.2.2", ":80", "host:0", "host:x", "host:70000"])
def test_parse_address_errors(text):
    with pytest.raises(QuoteError, match="HOST:PORT|out of range"):
        parse_address(text)
