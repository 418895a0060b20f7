"""The PCS/PCCS client against a real HTTP server on 127.0.0.1, the cache and the fallback.

The server serves Intel PCS v4 responses rebuilt from the real dcap-qvl-v4 collateral:
the JSON bodies are ``{"tcbInfo":<raw>,"signature":"<hex>"}`` as Intel's PCS sends
them, the issuer chains URL-encoded in headers. Nothing here leaves the loopback.
"""

from __future__ import annotations

import base64
import stat
import threading
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
import requests
from requests.adapters import HTTPAdapter

from tdxvm.attest.collateral import load_bundle
from tdxvm.attest.errors import CollateralError, CollateralFetchError, PckChainError
from tdxvm.attest.pcs import (
    INTEL_PCS_URL,
    CollateralCache,
    PcsClient,
    default_cache_dir,
    get_collateral,
    quote_fmspc_ca,
)
from tdxvm.attest.policyrules import StrictPolicy
from tdxvm.attest.quote import parse_quote
from tdxvm.attest.verdict import appraise
from tests.conftest import utc

FMSPC = bytes.fromhex("B0C06F000000")
TCB = "/tdx/certification/v4/tcb?fmspc=B0C06F000000"
QE = "/tdx/certification/v4/qe/identity"
PCKCRL = "/sgx/certification/v4/pckcrl?ca=platform&encoding=der"
ROOTCRL = "/sgx/certification/v4/rootcacrl"
INSIDE = utc("2025-07-01T00:00:00Z")  # inside the dcap-qvl-v4 window
AFTER = utc("2025-07-20T00:00:00Z")  # a day after its PCK CRL's nextUpdate


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    delay: float = 0.0
    length: int | None = None


class PcsServer:
    def __init__(self, collateral):
        c = collateral
        self.collateral = c
        self.routes: dict[str, Reply] = {
            TCB: Reply(
                headers={"TCB-Info-Issuer-Chain": quote(c.tcb_info_issuer_chain, safe="")},
                body=('{"tcbInfo":' + c.tcb_info + ',"signature":"' + c.tcb_info_signature.hex() + '"}').encode(),
            ),
            QE: Reply(
                headers={"SGX-Enclave-Identity-Issuer-Chain": quote(c.qe_identity_issuer_chain, safe="")},
                body=(
                    '{"enclaveIdentity":' + c.qe_identity + ',"signature":"' + c.qe_identity_signature.hex() + '"}'
                ).encode(),
            ),
            PCKCRL: Reply(headers={"SGX-PCK-CRL-Issuer-Chain": quote(c.pck_crl_issuer_chain, safe="")}, body=c.pck_crl),
            ROOTCRL: Reply(body=c.root_ca_crl.hex().encode()),
            "/IntelSGXRootCA.der": Reply(body=c.root_ca_crl),
        }
        self.seen: list[str] = []
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.seen.append(self.path)
                reply = server.routes.get(self.path, Reply(status=404, body=b"not found"))
                if reply.delay:
                    server.release.wait(reply.delay)
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(reply.length or len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def stop(self):
        self.release.set()
        if self.thread.is_alive():
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join()


@pytest.fixture
def v4(testdata):
    return load_bundle(testdata / "dcap-qvl-v4" / "collateral.json")


@pytest.fixture
def v4_quote(testdata):
    return parse_quote((testdata / "dcap-qvl-v4" / "quote.bin").read_bytes())


@pytest.fixture
def pcs(v4):
    server = PcsServer(v4)
    yield server
    server.stop()


def client(server, timeout=5.0):
    return PcsClient(base_url=server.base_url, timeout=timeout)


def test_fetch_from_pccs(pcs, v4):
    assert client(pcs).fetch(fmspc=FMSPC, ca="platform") == v4
    assert sorted(pcs.seen) == sorted([TCB, QE, PCKCRL, ROOTCRL])


def test_quote_fmspc_and_ca(pcs, v4, v4_quote):
    assert quote_fmspc_ca(v4_quote) == (FMSPC, "platform")
    assert client(pcs).fetch_for_quote(v4_quote) == v4


@pytest.mark.parametrize("suffix", ["/", "/sgx/certification/v4", "/tdx/certification/v4/"])
def test_base_url_forms(pcs, v4, suffix):
    c = PcsClient(base_url=pcs.base_url + suffix)
    assert c.base_url == pcs.base_url
    assert c.fetch(fmspc=FMSPC, ca="platform") == v4


class Reroute(HTTPAdapter):
    """Sends every https:// request to the local server instead (path and query kept)."""

    def __init__(self, base_url):
        super().__init__()
        self.base_url = base_url

    def send(self, request, **kwargs):
        parts = urlsplit(request.url)
        request.url = self.base_url + parts.path + (f"?{parts.query}" if parts.query else "")
        return super().send(request, **kwargs)


def test_intel_pcs_takes_root_crl_from_distribution_point(pcs, v4):
    session = requests.Session()
    session.mount("https://", Reroute(pcs.base_url))
    c = PcsClient(base_url=INTEL_PCS_URL, session=session)
    assert c.is_intel_pcs and not client(pcs).is_intel_pcs
    assert c.fetch(fmspc=FMSPC, ca="platform") == v4
    assert "/IntelSGXRootCA.der" in pcs.seen and ROOTCRL not in pcs.seen


def test_older_header_names_and_body_layouts(pcs, v4):
    c = v4
    pcs.routes[TCB].headers = {"SGX-TCB-Info-Issuer-Chain": quote(c.tcb_info_issuer_chain, safe="")}
    pcs.routes[TCB].body = (
        ' {\n "signature" : "' + c.tcb_info_signature.hex().upper() + '",\n "tcbInfo" : ' + c.tcb_info + "\n}\n"
    ).encode()
    assert client(pcs).fetch(fmspc=FMSPC, ca="platform") == v4


def test_signed_text_is_kept_byte_exact(pcs, v4):
    spaced = v4.tcb_info.replace('"version":3', '"version" : 3')
    pcs.routes[TCB].body = ('{"tcbInfo":' + spaced + ',"signature":"' + v4.tcb_info_signature.hex() + '"}').encode()
    assert client(pcs).fetch(fmspc=FMSPC, ca="platform").tcb_info == spaced


def _pem_crl(der):
    b64 = base64.encodebytes(der).decode()
    return f"-----BEGIN X509 CRL-----\n{b64}-----END X509 CRL-----\n".encode()


@pytest.mark.parametrize("encoding", ["der", "hex", "HEX", "pem"])
def test_crl_encodings(pcs, v4, encoding):
    for path, der in ((PCKCRL, v4.pck_crl), (ROOTCRL, v4.root_ca_crl)):
        pcs.routes[path].body = {
            "der": der,
            "hex": der.hex().encode() + b"\n",
            "HEX": der.hex().upper().encode(),
            "pem": _pem_crl(der),
        }[encoding]
    assert client(pcs).fetch(fmspc=FMSPC, ca="platform") == v4


@pytest.mark.parametrize("path", [TCB, QE, PCKCRL, ROOTCRL])
@pytest.mark.parametrize("status", [404, 500, 503])
def test_http_errors_name_url_and_status(pcs, path, status):
    pcs.routes[path] = Reply(status=status)
    with pytest.raises(CollateralFetchError) as info:
        client(pcs).fetch(fmspc=FMSPC, ca="platform")
    assert f"GET {pcs.base_url}{path} returned HTTP {status}" in str(info.value)


def test_pcs_error_headers_are_reported(pcs):
    pcs.routes[TCB] = Reply(status=404, headers={"Error-Code": "NotFound", "Error-Message": "No%20TCB%20info"})
    with pytest.raises(
        CollateralFetchError, match="HTTP 404 Not Found, Error-Code: NotFound, Error-Message: No TCB info"
    ):
        client(pcs).fetch(fmspc=FMSPC, ca="platform")


def test_timeout(pcs):
    pcs.routes[QE].delay = 5.0
    with pytest.raises(CollateralFetchError) as info:
        client(pcs, timeout=0.2).fetch(fmspc=FMSPC, ca="platform")
    assert str(info.value) == f"QE identity: GET {pcs.base_url}{QE}: no response within 0.2 s"


def test_body_cut_short(pcs):
    pcs.routes[PCKCRL].length = len(pcs.routes[PCKCRL].body) + 100
    with pytest.raises(CollateralFetchError) as info:
        client(pcs).fetch(fmspc=FMSPC, ca="platform")
    assert str(info.value).startswith(f"PCK CRL: GET {pcs.base_url}{PCKCRL} returned HTTP 200, then failed: ")


def test_server_down(pcs):
    pcs.stop()
    with pytest.raises(CollateralFetchError) as info:
        client(pcs).fetch(fmspc=FMSPC, ca="platform")
    assert str(info.value) == f"TCB info: GET {pcs.base_url}{TCB} failed, no HTTP response: Connection refused"


def _garbage(v4):
    sig = v4.tcb_info_signature.hex()
    return [
        (TCB, "body", b"<html>oops</html>", "body is not a JSON object: expected '{' at offset 0"),
        (TCB, "body", b'{"tcbInfo":{"a":1}', "body is not a JSON object: expected ',' or '}'"),
        (TCB, "body", b'\xff{"tcbInfo":{}}', "body is not a JSON object: 'utf-8' codec"),
        (TCB, "body", ('{"signature":"' + sig + '"}').encode(), "body has no 'tcbInfo' object"),
        (TCB, "body", b'{"tcbInfo":[1],"signature":"00"}', "body has no 'tcbInfo' object"),
        (TCB, "body", ('{"tcbInfo":' + v4.tcb_info + "}").encode(), "body has no 'signature' string"),
        (TCB, "body", ('{"tcbInfo":' + v4.tcb_info + ',"signature":"xy"}').encode(), "'signature' is not hex"),
        (TCB, "body", ('{"tcbInfo":' + v4.tcb_info + ',"signature":"0011"}').encode(), "'signature' is 2 bytes"),
        (
            TCB,
            "body",
            (
                '{"tcbInfo":' + v4.tcb_info.replace("B0C06F000000", "00906ED50000") + ',"signature":"' + sig + '"}'
            ).encode(),
            "TCB info is for FMSPC '00906ED50000'",
        ),
        (TCB, "headers", {}, "no TCB-Info-Issuer-Chain or SGX-TCB-Info-Issuer-Chain header"),
        (
            QE,
            "headers",
            {"SGX-Enclave-Identity-Issuer-Chain": "not%20a%20chain"},
            "header: unexpected bytes at offset 0",
        ),
        (QE, "body", b"", "body is not a JSON object"),
        (PCKCRL, "headers", {}, "no SGX-PCK-CRL-Issuer-Chain header"),
        (PCKCRL, "body", b"garbage", "body is not a CRL: neither DER, PEM nor hex"),
        (PCKCRL, "body", b"\x30\x03\x02\x01\x00", "body is not a CRL"),
        (PCKCRL, "body", b"-----BEGIN X509 CRL-----\n!!\n-----END X509 CRL-----", "body is not a CRL"),
        (ROOTCRL, "body", b"0011", "body is not a CRL"),
    ]


@pytest.mark.parametrize("index", range(17))
def test_malformed_responses(pcs, v4, index):
    path, attr, value, message = _garbage(v4)[index]
    setattr(pcs.routes[path], attr, value)
    with pytest.raises(CollateralFetchError) as info:
        client(pcs).fetch(fmspc=FMSPC, ca="platform")
    text = str(info.value)
    assert f"malformed response from {pcs.base_url}{path} (HTTP 200)" in text
    assert message in text


def test_body_size_cap(pcs, monkeypatch):
    monkeypatch.setattr("tdxvm.attest.pcs.MAX_BODY", 1000)
    with pytest.raises(CollateralFetchError) as info:
        client(pcs).fetch(fmspc=FMSPC, ca="platform")
    assert str(info.value) == f"TCB info: response from {pcs.base_url}{TCB} (HTTP 200) exceeds 1000 bytes"


def test_bad_arguments(pcs):
    with pytest.raises(ValueError, match="need a 6-byte FMSPC"):
        client(pcs).fetch(fmspc=b"\x00", ca="platform")
    with pytest.raises(ValueError, match="CA type 'platform' or 'processor', got 'b0c06f000000', 'Platform'"):
        client(pcs).fetch(fmspc=FMSPC, ca="Platform")
    with pytest.raises(ValueError, match="CA type"):
        CollateralCache(directory=Path("/nonexistent")).path_for(base_url="u", fmspc=FMSPC, ca="../x")
    assert pcs.seen == []


def test_quote_without_issuer(v4_quote):
    pem = v4_quote.signature.pck_chain_pem
    one = pem[: pem.index(b"-----END CERTIFICATE-----") + 25]
    q = replace(v4_quote, signature=replace(v4_quote.signature, pck_chain_pem=one))
    with pytest.raises(PckChainError, match="needs the PCK certificate and its issuer"):
        quote_fmspc_ca(q)


def test_a_quote_whose_pck_chain_cannot_be_read_is_refused_before_anything_is_fetched(pcs, v4_quote):
    """What verify-quote --pccs, verify-endpoint and the launch's attest all go through:
    appraise with a function that finds the collateral. The quote's PCK chain is its
    platform's name; without it the answer is no (pck-chain), not an error, and no
    request is made."""
    pem = v4_quote.signature.pck_chain_pem
    one = pem[: pem.index(b"-----END CERTIFICATE-----") + 25]
    q = replace(v4_quote, signature=replace(v4_quote.signature, pck_chain_pem=one))
    find = partial(get_collateral, client=client(pcs), cache=None, at=INSIDE)
    verdict = appraise(q, find, at=INSIDE, policy=StrictPolicy())
    assert not verdict.accepted and verdict.origin is None
    assert [r.code for r in verdict.reasons] == ["pck-chain"]
    assert "needs the PCK certificate and its issuer" in verdict.reasons[0].message
    assert verdict.to_dict()["verdict"] == "reject" and verdict.to_dict()["fmspc"] is None
    assert pcs.seen == []


# --- the cache and the fallback ---------------------------------------------------------


def got(quote, **kw):
    """get_collateral's collateral and how it got it ("fetched" or "cache")."""
    collateral, origin = get_collateral(quote, **kw)
    return collateral, origin.how


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "tdxvm" / "collateral"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "tdxvm" / "collateral"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert CollateralCache().directory == tmp_path / "home" / ".cache" / "tdxvm" / "collateral"


def test_cache_modes_and_keys(tmp_path, v4):
    cache = CollateralCache(directory=tmp_path / "c")
    key = dict(base_url="https://pccs.example", fmspc=FMSPC, ca="platform")
    assert cache.load(**key) is None
    path = cache.store(v4, **key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(cache.directory.stat().st_mode) == 0o700
    assert cache.load(**key) == v4
    for other in ({"base_url": "https://other"}, {"fmspc": bytes(6)}, {"ca": "processor"}):
        assert cache.load(**{**key, **other}) is None
    assert [p.name for p in cache.directory.iterdir()] == [path.name]


def test_fetch_stores_then_falls_back(pcs, v4, v4_quote, tmp_path):
    cache = CollateralCache(directory=tmp_path / "cache")
    c = client(pcs)
    assert got(v4_quote, client=c, cache=cache, at=INSIDE) == (v4, "fetched")
    (stored,) = cache.directory.iterdir()
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    pcs.stop()
    assert got(v4_quote, client=c, cache=cache, at=INSIDE) == (v4, "cache")


def test_fallback_refuses_expired_copy(pcs, v4, v4_quote, tmp_path):
    cache = CollateralCache(directory=tmp_path)
    c = client(pcs)
    get_collateral(v4_quote, client=c, cache=cache, at=INSIDE)
    pcs.stop()
    with pytest.raises(CollateralFetchError) as info:
        get_collateral(v4_quote, client=c, cache=cache, at=AFTER)
    text = str(info.value)
    assert f"GET {pcs.base_url}{TCB} failed, no HTTP response: Connection refused" in text
    assert "the cached copy expired at 2025-07-19T10:00:35Z (PCK CRL nextUpdate)" in text
    with pytest.raises(CollateralFetchError, match="the cached copy is not valid before 2025-06-19T10:32:27Z"):
        get_collateral(v4_quote, client=c, cache=cache, at=utc("2025-06-18T00:00:00Z"))


def test_fallback_without_cached_copy(pcs, v4_quote, tmp_path):
    pcs.routes[TCB] = Reply(status=500)
    with pytest.raises(CollateralFetchError, match=rf"HTTP 500.*; no cached copy in {tmp_path}"):
        get_collateral(v4_quote, client=client(pcs), cache=CollateralCache(directory=tmp_path), at=INSIDE)
    with pytest.raises(CollateralFetchError, match="HTTP 500 Internal Server Error$"):
        get_collateral(v4_quote, client=client(pcs), cache=None, at=INSIDE)


def test_fallback_with_corrupt_copy(pcs, v4_quote, tmp_path):
    cache = CollateralCache(directory=tmp_path)
    c = client(pcs)
    cache.path_for(base_url=c.base_url, fmspc=FMSPC, ca="platform").write_text("{")
    pcs.routes[QE] = Reply(status=503)
    with pytest.raises(CollateralFetchError, match="HTTP 503.*; the cached copy is unusable: .*not valid JSON"):
        get_collateral(v4_quote, client=c, cache=cache, at=INSIDE)


def test_cache_write_failure_does_not_fail_the_fetch(pcs, v4, v4_quote, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache = CollateralCache(directory=blocker / "cache")
    assert got(v4_quote, client=client(pcs), cache=cache, at=INSIDE) == (v4, "fetched")
    assert "cannot cache collateral" in caplog.text


def test_naive_time_means_utc(pcs, v4, v4_quote, tmp_path):
    cache = CollateralCache(directory=tmp_path)
    c = client(pcs)
    get_collateral(v4_quote, client=c, cache=cache, at=INSIDE)
    pcs.stop()
    naive = datetime(2025, 7, 1, tzinfo=timezone.utc).replace(tzinfo=None)
    assert got(v4_quote, client=c, cache=cache, at=naive) == (v4, "cache")


def test_corrupt_cache_load_names_file(tmp_path):
    cache = CollateralCache(directory=tmp_path)
    path = cache.path_for(base_url="u", fmspc=FMSPC, ca="platform")
    path.write_text("[]")
    with pytest.raises(CollateralError, match=f"{path}: expected a JSON object"):
        cache.load(base_url="u", fmspc=FMSPC, ca="platform")


def test_cli_fetch_and_verify_through_pccs(pcs, v4, testdata, tmp_path, monkeypatch, capsys):
    """`tdxvm collateral fetch` and `verify-quote --pccs`: fetched, then from the cache
    once the PCCS is gone, and exit 3 once the cached copy has expired."""
    from tdxvm.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    quote = testdata / "dcap-qvl-v4" / "quote.bin"
    bundle = tmp_path / "bundle.json"
    assert main(["collateral", "fetch", str(quote), "--out", str(bundle), "--pccs", pcs.base_url]) == 0
    assert load_bundle(bundle) == v4
    args = ["verify-quote", str(quote), "--pccs", pcs.base_url, "-o", "json"]
    assert main([*args, "--at", INSIDE.isoformat()]) == 0
    cached = list((tmp_path / "cache" / "tdxvm" / "collateral").iterdir())
    assert len(cached) == 1 and cached[0].stat().st_mode & 0o777 == 0o600
    pcs.stop()
    capsys.readouterr()
    assert main([*args, "--at", INSIDE.isoformat()]) == 0
    assert main([*args, "--at", AFTER.isoformat()]) == 3
    assert "expired" in capsys.readouterr().out


def test_get_collateral_origin_says_why(pcs, v4, v4_quote, tmp_path):
    cache = CollateralCache(directory=tmp_path)
    c = client(pcs)
    _, origin = get_collateral(v4_quote, client=c, cache=cache, at=INSIDE)
    assert (origin.how, origin.where, origin.why, origin.exception()) == ("fetched", pcs.base_url, None, None)
    pcs.stop()
    _, origin = get_collateral(v4_quote, client=c, cache=cache, at=INSIDE)
    assert (origin.how, origin.where) == ("cache", pcs.base_url)
    assert f"GET {pcs.base_url}{TCB} failed, no HTTP response: Connection refused" in origin.why
    assert origin.exception() == f"collateral from the cache: {pcs.base_url} could not be reached ({origin.why})"


def test_cli_cached_collateral_is_listed_and_max_age_refuses_it(pcs, testdata, tmp_path, monkeypatch, capsys):
    """The attack: block the PCCS and the verifier falls back on the cached copy. The
    verdict says so among its policy exceptions; max_collateral_age refuses stale copies."""
    import json

    from tdxvm.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    quote = testdata / "dcap-qvl-v4" / "quote.bin"
    args = ["verify-quote", str(quote), "--pccs", pcs.base_url, "--at", INSIDE.isoformat(), "-o", "json"]
    assert main(args) == 0
    fetched = json.loads(capsys.readouterr().out)
    assert fetched["collateral"]["source"] == f"fetched from {pcs.base_url}"
    assert not any(line.startswith("collateral from the cache") for line in fetched["policy_exceptions"])
    pcs.stop()
    assert main(args) == 0
    cached = json.loads(capsys.readouterr().out)
    assert cached["collateral"]["source"] == f"cache from {pcs.base_url}"
    assert cached["collateral"]["tcb_evaluation_data_number"] == 17
    assert cached["policy_exceptions"][0].startswith(
        f"collateral from the cache: {pcs.base_url} could not be reached (TCB info: GET "
    )
    policy = tmp_path / "policy.yaml"
    policy.write_text("max_collateral_age: 7d\n")  # INSIDE is 11 days after the TCB info's issue date
    assert main([*args, "--policy", str(policy)]) == 1
    refused = json.loads(capsys.readouterr().out)
    assert [r["code"] for r in refused["reasons"]] == ["collateral-too-old"] * 3  # TCB info, QE identity, PCK CRL
    assert main([*args[:-2], "--policy", str(policy)]) == 1  # the text form says it too
    text = capsys.readouterr().out
    assert "policy exception: collateral from the cache:" in text
    assert (
        "TCB evaluation data number 17, issued 2025-06-19T10:16:03Z (11d13h43m57s before the verification time)" in text
    )


def test_cli_collateral_status(pcs, v4, testdata, tmp_path, monkeypatch, capsys):
    import json

    from tdxvm.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert main(["collateral", "status", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["entries"] == []
    quote = testdata / "dcap-qvl-v4" / "quote.bin"
    assert main(["verify-quote", str(quote), "--pccs", pcs.base_url, "--at", INSIDE.isoformat(), "-o", "json"]) == 0
    folder = tmp_path / "cache" / "tdxvm" / "collateral"
    (folder / f"90C06F000000-platform-{CollateralCache.service_id(INTEL_PCS_URL)}.json").write_text("{")
    (folder / "notes.txt").write_text("not a cache entry")
    capsys.readouterr()
    assert main(["collateral", "status", "-o", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["directory"] == str(folder)
    mine, broken = sorted(doc["entries"], key=lambda e: e["fmspc"], reverse=True)
    assert mine == {
        "fmspc": "B0C06F000000",
        "ca": "platform",
        "service": None,
        "service_id": CollateralCache.service_id(pcs.base_url),
        "path": str(folder / f"B0C06F000000-platform-{CollateralCache.service_id(pcs.base_url)}.json"),
        "tcb_evaluation_data_number": 17,
        "issue_date": "2025-06-19T10:16:03Z",
        "next_update": "2025-07-19T10:00:35Z",
        "next_update_of": "PCK CRL",
        "state": "expired",
        "error": None,
    }
    assert (
        broken["service"] == INTEL_PCS_URL and broken["state"] == "unreadable" and "not valid JSON" in broken["error"]
    )
    assert main(["collateral", "status", "--pccs", pcs.base_url + "/sgx/certification/v4", "-o", "json"]) == 0
    only = json.loads(capsys.readouterr().out)["entries"]
    assert [(e["fmspc"], e["service"]) for e in only] == [("B0C06F000000", pcs.base_url)]
    assert main(["collateral", "status", "--pccs", pcs.base_url]) == 0
    text = capsys.readouterr().out
    assert (
        f"B0C06F000000  platform   {pcs.base_url}: TCB evaluation data number 17, issued 2025-06-19T10:16:03Z, "
        "next update 2025-07-19T10:00:35Z (PCK CRL): expired"
    ) in text
