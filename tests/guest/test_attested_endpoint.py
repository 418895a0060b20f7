"""The attested inference endpoint end to end, on real uvicorn HTTPS servers on 127.0.0.1.

Quotes are signed by the emulated platform (the real emulated signer) for the
measurements of a real TD: MR_TD and RTMR0..3 of the Google Cloud quote in
``go-tdx-guest-ccel``, whose CCEL event log the service hands out, so the log replays
to the quoted RTMRs. The client is :func:`tdxvm.provision.endpoint.verify_endpoint` and
``tdxvm verify-endpoint``; the attacks are a TLS man in the middle on loopback, another
key on the pinned address, and a replayed attestation.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from tdxvm.attest.chain import TrustAnchor  # noqa: E402
from tdxvm.attest.policy import Policy  # noqa: E402
from tdxvm.attest.quote import parse_quote  # noqa: E402
from tdxvm.emulate import EmulatedPlatform  # noqa: E402
from tdxvm.guest.attestation import Attester  # noqa: E402
from tdxvm.guest.padding import PAD  # noqa: E402
from tdxvm.guest.server import ModelHolder, create_app  # noqa: E402
from tdxvm.guest.tls import TlsIdentity, ensure_identity  # noqa: E402
from tdxvm.provision.endpoint import (  # noqa: E402
    AttestedEndpoint,
    EndpointRefused,
    EndpointUnreachable,
    fetch_attestation,
    verify_endpoint,
)
from tdxvm.provision.pinning import PinMismatchError  # noqa: E402
from tests.clirun import run  # noqa: E402

from ..conftest import TESTDATA  # noqa: E402
from ..provision.servers import HttpsServer, TlsProxy, free_port  # noqa: E402
from .uvserver import Served  # noqa: E402

NAME = "tiny-llama"
CCEL = TESTDATA / "go-tdx-guest-ccel"
CHAT = [{"role": "user", "content": "Tell me a story."}]


class PlatformSigner:
    """A quote provider: the emulated platform signs a TD report with this TD's measurements."""

    name = "emulated-platform"

    def __init__(self, platform: EmulatedPlatform, mr_td: bytes, rtmrs: tuple[bytes, ...]) -> None:
        self.platform, self.mr_td, self.rtmrs, self.calls = platform, mr_td, rtmrs, 0

    def quote(self, report_data: bytes) -> bytes:
        self.calls += 1
        return self.platform.sign_quote(report_data=report_data, mr_td=self.mr_td, rtmrs=self.rtmrs)


class BrokenProvider:
    name = "configfs-tsm"

    def quote(self, report_data: bytes) -> bytes:
        raise OSError("/sys/kernel/config/tsm/report: No such file or directory")


class TlsUvicorn(Served):
    """uvicorn serving HTTPS with ``identity`` in a thread, on a socket of 127.0.0.1."""

    def __init__(self, app: Any, identity: TlsIdentity, *, port: int = 0) -> None:
        super().__init__(app, identity, port=port)


@pytest.fixture(scope="module")
def td(testdata: Path) -> dict[str, Any]:
    """The real TD's measurements and event log, the platform, and what a client trusts."""
    real = parse_quote((CCEL / "quote.bin").read_bytes()).body
    platform = EmulatedPlatform()
    policy = Policy(mrtd=real.mr_td.hex(), **{f"rtmr{i}": r.hex() for i, r in enumerate(real.rtmrs)})
    return {
        "signer": PlatformSigner(platform, real.mr_td, real.rtmrs),
        "event_log": CCEL / "ccel_data.bin",
        "policy": policy,
        "collateral": platform.collateral(),
        "anchor": TrustAnchor.from_der(platform.root_ca_der),
        "platform": platform,
    }


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TlsIdentity]:
    root = tmp_path_factory.mktemp("tls")
    return {
        name: ensure_identity(root / name, ["127.0.0.1", "localhost"]) for name in ("service", "attacker", "other-td")
    }


def attested_app(td: dict[str, Any], identity: TlsIdentity, holder: ModelHolder | None = None) -> Any:
    attester = Attester(td["signer"], {"tls": identity.spki}, event_log=td["event_log"])
    return create_app(holder or ModelHolder(NAME), attester=attester)


@pytest.fixture(scope="module")
def service(td, keys) -> Iterator[TlsUvicorn]:
    """The attested service without a model loaded (attestation needs none)."""
    s = TlsUvicorn(attested_app(td, keys["service"]), keys["service"])
    yield s
    s.stop()


def verify(td: dict[str, Any], url: str, **kw: Any) -> AttestedEndpoint:
    args = {"collateral": td["collateral"], "policy": td["policy"], "trust_anchor": td["anchor"], **kw}
    return verify_endpoint(url, **args)


def codes(exc: EndpointRefused) -> set[str]:
    return {r.code for r in exc.reasons}


# -- accepted, then the API over the pin -------------------------------------------------


def test_attested_completions_over_the_pinned_session(td, keys, tiny_model):
    from tdxvm.guest.engine import Engine, EngineConfig

    holder = ModelHolder(NAME)
    holder.engine = Engine.load(EngineConfig(model_dir=tiny_model, name=NAME, threads=1))
    server = TlsUvicorn(attested_app(td, keys["service"], holder), keys["service"])
    try:
        ep = verify(td, server.url + "/v1")  # the OpenAI base URL works too
        assert (
            ep.url == server.url
            and ep.tls_spki == keys["service"].spki
            and ep.tls_spki_sha256 == keys["service"].spki_sha256
        )
        assert ep.verdict.accepted and ep.verdict.reasons == () and ep.provider == "emulated-platform"
        assert ep.event_log == td["event_log"].read_bytes()
        assert ep.event_log_check() == {
            "bytes": 262144,
            "events": ep.event_log_check()["events"],
            "rtmrs_match": [True] * 4,
        }

        s = ep.session()
        r = s.post(
            server.url + "/v1/completions",
            json={"model": NAME, "prompt": "Hello, how are you", "max_tokens": 6, "temperature": 0},
        )
        assert r.status_code == 200, r.text
        assert r.json()["object"] == "text_completion" and 1 <= r.json()["usage"]["completion_tokens"] <= 6

        body = {"model": NAME, "messages": CHAT, "max_tokens": 20, "temperature": 0}
        whole = s.post(server.url + "/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        with s.post(server.url + "/v1/chat/completions", json={**body, "stream": True}, stream=True) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = [line.removeprefix(b"data: ").decode() for line in r.iter_lines() if line]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == whole
        assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")) > 1  # really streamed
    finally:
        server.stop()
        holder.engine.close()


def test_each_verification_asks_a_fresh_quote(td, service):
    before = td["signer"].calls
    a, b = verify(td, service.url), verify(td, service.url)
    assert a.nonce != b.nonce and a.quote != b.quote and td["signer"].calls == before + 2
    assert parse_quote(a.quote).body.report_data != parse_quote(b.quote).body.report_data


# -- attacks -----------------------------------------------------------------------------


def test_man_in_the_middle_with_another_certificate_is_refused(td, keys, service):
    proxy = TlsProxy(keys["attacker"], ("127.0.0.1", service.port))
    try:
        with pytest.raises(EndpointRefused) as err:
            verify(td, proxy.url)
        exc = err.value
        assert codes(exc) == {"tls-key-not-attested", "report-data-binding"}
        assert (
            exc.verdict is not None and exc.verdict.result.genuine
        )  # the real TD's quote, relayed: genuine but not for this key
        assert exc.tls_spki_sha256 == keys["attacker"].spki_sha256
        assert "another party terminates TLS" in str(
            exc
        ) and f"not this connection's ({keys['attacker'].spki_sha256})" in str(exc)

        pinned = verify(td, service.url).session()
        sent = proxy.client_bytes
        with pytest.raises(PinMismatchError) as err2:
            pinned.post(proxy.url + "/v1/completions", json={"model": NAME, "prompt": "secret prompt"})
        assert err2.value.presented == keys["attacker"].spki_sha256
        assert proxy.client_bytes == sent  # not one byte of the request reached the man in the middle
    finally:
        proxy.stop()


def test_pinned_session_refuses_another_key_on_the_same_address(td, keys):
    port = free_port()
    first = TlsUvicorn(attested_app(td, keys["service"]), keys["service"], port=port)
    try:
        ep = verify(td, first.url)
        s = ep.session()
        assert s.get(first.url + "/v1/models").json()["data"][0]["id"] == NAME
    finally:
        first.stop()
    # Another genuine TD (same measurements, its own key) now answers on that address.
    second = TlsUvicorn(attested_app(td, keys["other-td"]), keys["other-td"], port=port)
    try:
        with pytest.raises(PinMismatchError) as err:
            s.get(second.url + "/v1/models")
        assert err.value.pinned == keys["service"].spki_sha256 and err.value.presented == keys["other-td"].spki_sha256
        assert (
            verify(td, second.url).tls_spki == keys["other-td"].spki
        )  # it attests fine: the pin, not the quote, refuses it
    finally:
        second.stop()


def test_replayed_attestation_is_refused(td, keys, service):
    """A server with the service's own key but no fresh quote replays a recorded answer."""
    _, status, recorded = fetch_attestation(service.url, bytes(range(32)))
    assert status == 200
    replay = HttpsServer(keys["service"], lambda path: (200, {}, recorded))
    try:
        with pytest.raises(EndpointRefused) as err:
            verify(td, replay.url)
        assert codes(err.value) == {"report-data-binding"}
        assert "binds another nonce: a replayed or stale attestation" in str(err.value)
    finally:
        replay.stop()

    def stale_with_our_nonce(path: str) -> tuple[int, dict[str, str], bytes]:
        doc = json.loads(recorded)
        doc["nonce"] = path.split("nonce=")[1]  # claims the fresh nonce, carries the old quote
        return 200, {}, json.dumps(doc).encode()

    forged = HttpsServer(keys["service"], stale_with_our_nonce)
    try:
        with pytest.raises(EndpointRefused) as err:
            verify(td, forged.url)
        assert codes(err.value) == {"report-data-binding"} and "matches neither" in str(err.value)
    finally:
        forged.stop()


def test_policy_must_name_and_match_the_measurements(td, service):
    with pytest.raises(EndpointRefused) as err:
        verify(td, service.url, policy=Policy())
    assert codes(err.value) == {"policy-measurements"} and "mrtd, rtmr1, rtmr2" in str(err.value)
    assert verify(td, service.url, policy=Policy(), require_measurements=False).verdict.accepted
    wrong = td["policy"].model_copy(update={"rtmr2": ("00" * 48,)})
    with pytest.raises(EndpointRefused) as err:
        verify(td, service.url, policy=wrong)
    assert codes(err.value) == {"measurement-mismatch"} and "RTMR2" in str(err.value)
    other_root = EmulatedPlatform(at=td["platform"].at)
    with pytest.raises(EndpointRefused) as err:
        verify(td, service.url, trust_anchor=TrustAnchor.from_der(other_root.root_ca_der))
    assert err.value.verdict is not None and not err.value.verdict.result.genuine


# -- the endpoint itself -----------------------------------------------------------------


def get(url: str) -> tuple[int, dict[str, Any]]:
    r = requests.get(url, verify=False, timeout=30)
    return r.status_code, r.json()


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_attestation_endpoint_answers_and_refuses_bad_nonces(td, keys, service):
    status, doc = get(f"{service.url}/v1/attestation?nonce={'ab' * 32}")
    assert status == 200 and set(doc) == {"quote", "report_data", "nonce", "keys", "event_log", "rtmr3_log", "provider"}
    assert doc["rtmr3_log"] is None  # this service keeps none (tests/guest/test_model_identity.py: one that does)
    assert doc["nonce"] == "ab" * 32 and list(doc["keys"]) == ["tls"] and doc["provider"] == "emulated-platform"
    for query, code, words in [
        ("", "missing_nonce", "nonce: missing; pass ?nonce=<64 hex digits (32 random bytes)>"),
        ("?nonce=", "missing_nonce", "missing"),
        ("?nonce=abc", "invalid_nonce", "expected 64 hex digits (32 random bytes), got 3 characters 'abc'"),
        (f"?nonce={'zz' * 32}", "invalid_nonce", "got 64 characters"),
        (f"?nonce={'ab' * 33}", "invalid_nonce", "got 66 characters"),
    ]:
        status, body = get(f"{service.url}/v1/attestation{query}")
        assert status == 400 and body["error"]["code"] == code and body["error"]["param"] == "nonce", (query, body)
        assert words in body["error"]["message"]


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_attestation_endpoint_without_key_or_quotes(td, keys):
    plain = TlsUvicorn(create_app(ModelHolder(NAME)), keys["service"])
    broken = TlsUvicorn(
        create_app(
            ModelHolder(NAME), attester=Attester(BrokenProvider(), {"tls": keys["service"].spki}, event_log=None)
        ),
        keys["service"],
    )
    try:
        status, body = get(f"{plain.url}/v1/attestation?nonce={'00' * 32}")
        assert status == 404 and "--tls-dir" in body["error"]["message"]
        status, body = get(f"{broken.url}/v1/attestation?nonce={'00' * 32}")
        assert status == 503 and body["error"]["code"] == "quote_unavailable"
        assert (
            "quote provider configfs-tsm failed" in body["error"]["message"]
            and "No such file" in body["error"]["message"]
        )
        with pytest.raises(EndpointRefused) as err:
            verify(td, broken.url)
        assert (
            codes(err.value) == {"attestation-unavailable"}
            and "HTTP 503" in str(err.value)
            and err.value.verdict is None
        )
    finally:
        plain.stop()
        broken.stop()


def test_unreachable_and_unusable_urls(td):
    with pytest.raises(EndpointUnreachable, match="127.0.0.1"):
        verify(td, f"https://127.0.0.1:{free_port()}")
    for url in ("http://127.0.0.1:1", "https://127.0.0.1:1/?x=1", "https://user:pw@127.0.0.1:1"):
        with pytest.raises(Exception, match="https") as err:
            verify(td, url)
        assert err.value.code == "endpoint"


# -- the CLI -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trust_files(td, tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("trust")
    (d / "root.pem").write_text(td["platform"].root_ca_pem)
    (d / "bundle.json").write_text(td["collateral"].to_json())
    p = td["policy"]
    (d / "policy.yaml").write_text(
        "".join(f"{k}: {getattr(p, k)[0]}\n" for k in ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3"))
    )
    return [
        "--collateral",
        str(d / "bundle.json"),
        "--root-ca",
        str(d / "root.pem"),
        "--policy",
        str(d / "policy.yaml"),
    ]


def test_cli_verify_endpoint(capsys, td, keys, service, trust_files):
    code, out, _ = run(capsys, "verify-endpoint", service.url, *trust_files, "-o", "json")
    doc = json.loads(out)
    assert code == 0 and doc["verdict"] == "accept" and doc["reasons"] == []
    assert doc["tls_spki_sha256"] == keys["service"].spki_sha256 and doc["provider"] == "emulated-platform"
    assert doc["attestation"]["measurements"]["mrtd"] == td["policy"].mrtd[0]
    assert doc["event_log"]["rtmrs_match"] == [True] * 4

    code, out, _ = run(capsys, "verify-endpoint", service.url, *trust_files)
    assert code == 0 and out.startswith("ACCEPTED") and f"SPKI SHA-256 {keys['service'].spki_sha256} (pin this)" in out
    assert td["policy"].rtmr2[0] in out and "replay matches RTMR 0,1,2,3" in out


def test_cli_verify_endpoint_refusals(capsys, td, keys, service, trust_files):
    proxy = TlsProxy(keys["attacker"], ("127.0.0.1", service.port))
    try:
        code, out, _ = run(capsys, "verify-endpoint", proxy.url, *trust_files, "-o", "json")
        doc = json.loads(out)
        assert code == 1 and doc["verdict"] == "reject" and doc["tls_spki_sha256"] == keys["attacker"].spki_sha256
        assert {r["code"] for r in doc["reasons"]} == {"tls-key-not-attested", "report-data-binding"}
        code, out, _ = run(capsys, "verify-endpoint", proxy.url, *trust_files)
        assert (
            code == 1
            and out.startswith("REFUSED")
            and "[tls-key-not-attested]" in out
            and "(presented, not trusted)" in out
        )
    finally:
        proxy.stop()
    code, out, _ = run(capsys, "verify-endpoint", service.url, *trust_files[:4], "-o", "json")  # no policy
    assert code == 1 and [r["code"] for r in json.loads(out)["reasons"]] == ["policy-measurements"]
    code, out, _ = run(capsys, "verify-endpoint", f"https://127.0.0.1:{free_port()}", *trust_files, "-o", "json")
    assert code == 3 and json.loads(out)["error"]["code"] == "endpoint-unreachable"
    code, _, err = run(capsys, "verify-endpoint", "http://127.0.0.1:1", *trust_files)
    assert code == 2 and "must be https://" in err
    code, _, err = run(capsys, "verify-endpoint", service.url, *trust_files, "--pccs", "https://127.0.0.1:1")
    assert code == 2 and "either --collateral or --pccs" in err


# -- the pinned API client and verify-endpoint --complete/--chat --------------------------


@pytest.fixture(scope="module")
def serving(td, keys, tiny_model) -> Iterator[TlsUvicorn]:
    """The attested service with the tiny model loaded."""
    from tdxvm.guest.engine import Engine, EngineConfig

    holder = ModelHolder(NAME)
    holder.engine = Engine.load(EngineConfig(model_dir=tiny_model, name=NAME, threads=1))
    server = TlsUvicorn(attested_app(td, keys["service"], holder), keys["service"])
    yield server
    server.stop()
    holder.engine.close()


def test_api_client_talks_only_on_the_attested_key(td, keys, serving):
    from tdxvm.provision.client import ApiClient, ApiError

    with ApiClient(verify(td, serving.url)) as api:
        assert api.models() == [NAME]
        sent: list[int] = []  # the size of each request body, as the host sees it (tdxvm.guest.padding)
        api.session.hooks["response"].append(
            lambda r, *_, **__: sent.append(len(r.request.body)) if r.request.method == "POST" else None
        )
        done = api.complete("Hello, how are you", max_tokens=6, temperature=0)  # model: the one served
        assert done["model"] == NAME and 1 <= done["usage"]["completion_tokens"] <= 6
        assert api.complete("Hi", max_tokens=6, temperature=0)["usage"]["completion_tokens"] >= 1
        assert sent[-2:] == [PAD, PAD]  # two prompts of different lengths, one size
        body = {"model": NAME, "messages": CHAT, "max_tokens": 20, "temperature": 0}
        whole = api.session.post(serving.url + "/v1/chat/completions", json=body).json()["choices"][0]["message"][
            "content"
        ]
        pieces = list(api.chat_stream(CHAT, max_tokens=20, temperature=0))
        assert len(pieces) > 1 and "".join(pieces) == whole
        with pytest.raises(ApiError) as err:
            api.complete("hi", model="gpt-4")
        assert err.value.status == 404 and "gpt-4" in str(err.value)
        with pytest.raises(ApiError) as err:
            list(api.chat_stream(CHAT, max_tokens=100000))
        assert err.value.status == 400
    proxy = TlsProxy(keys["attacker"], ("127.0.0.1", serving.port))
    try:
        endpoint = verify(td, serving.url)
        moved = dataclasses.replace(endpoint, url=proxy.url)  # the attested key, someone else's address
        sent = proxy.client_bytes
        with ApiClient(moved) as api, pytest.raises(PinMismatchError):
            api.complete("a secret prompt", model=NAME)
        assert proxy.client_bytes == sent  # the prompt never reached the man in the middle
    finally:
        proxy.stop()


def test_cli_verify_endpoint_complete_and_chat(capsys, keys, serving, trust_files):
    code, out, _ = run(
        capsys,
        "verify-endpoint",
        serving.url,
        *trust_files,
        "--complete",
        "Hello",
        "--chat",
        "Tell me a story.",
        "--max-tokens",
        "5",
        "-o",
        "json",
    )
    doc = json.loads(out)
    assert code == 0 and doc["verdict"] == "accept" and doc["tls_spki_sha256"] == keys["service"].spki_sha256
    assert (
        isinstance(doc["completion"], str)
        and 1 <= doc["usage"]["completion_tokens"] <= 5
        and isinstance(doc["chat"], str)
    )
    code, out, _ = run(capsys, "verify-endpoint", serving.url, *trust_files, "--complete", "Hello", "--max-tokens", "3")
    assert code == 0 and out.startswith("ACCEPTED") and f"completion: ({NAME}, pinned) Hello" in out
    code, _, err = run(capsys, "verify-endpoint", *trust_files)
    assert code == 2 and "URL or --vm NAME" in err
