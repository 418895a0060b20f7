"""Model identity in RTMR3: the model digest, the model event, the extend through the
emulated quote service, the RTMR3 log in ``/v1/attestation``, and clients that check it.

Everything runs for real on 127.0.0.1: the emulated quote service (:mod:`tdxvm.emulate.qgs`)
plays the TDX module (it keeps RTMR3 and signs quotes carrying it), the guest reaches it
through :class:`~tdxvm.guest.tdquote.EmulatedQgs` as an emulated TD does, the service is
uvicorn on an attested TLS key, and the client is :func:`verify_endpoint` and
``tdxvm verify-endpoint``. Models are small folders written here, the tiny Llama of
``tdxvm emulate tiny-llama`` where one is served.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

pytest.importorskip("fastapi")

from tdxvm.attest.eventlog import parse_json_event_log, runtime_event_digest  # noqa: E402
from tdxvm.attest.eventlog import replay as attest_replay  # noqa: E402
from tdxvm.cli import main as tdxvm_main  # noqa: E402
from tdxvm.emulate.qgs import QuoteService  # noqa: E402
from tdxvm.guest.attestation import Attester  # noqa: E402
from tdxvm.guest.modeldigest import ModelDigestError, folder_digest, parse_digest, show  # noqa: E402
from tdxvm.guest.rtmr3 import (  # noqa: E402
    MODEL_EVENT,
    Rtmr3Error,
    load_log,
    make_event,
    measure,
    measure_model,
    model_payload,
    replay,
)
from tdxvm.guest.server import ModelHolder, create_app  # noqa: E402
from tdxvm.guest.tdquote import ConfigfsTsm, EmulatedQgs, QuoteError, TdxGuestDevice, detect  # noqa: E402
from tdxvm.guest.tls import ensure_identity  # noqa: E402
from tdxvm.guest.weights import decrypt_model, encrypt_model, generate_model_key, model_digest, read_index  # noqa: E402
from tdxvm.provision.client import ApiClient, ApiError  # noqa: E402
from tdxvm.provision.endpoint import AttestedEndpoint, EndpointRefused, verify_endpoint  # noqa: E402
from tdxvm.provision.pinning import PinMismatchError  # noqa: E402
from tests.clirun import run

from ..attested_guest import AT, anchor, artifacts, platform, policy_for  # noqa: E402
from ..provision.servers import free_port  # noqa: E402
from .test_attested_endpoint import TlsUvicorn  # noqa: E402

NAME = "tiny-llama"


def measure_folder(provider, folder, **settings):
    """``(model digest, outcome)``: the digest of the files in ``folder``, measured (what the
    service does with the copy it loads)."""
    digest = folder_digest(folder)
    return digest, measure_model(provider, digest, **settings)


def write_model(folder: Path, seed: str) -> Path:
    """A small model-like folder: a config, a tokenizer, weights in a subfolder."""
    (folder / "shards").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "seed": seed}))
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    (folder / "shards" / "model-00001.safetensors").write_bytes(hashlib.sha256(seed.encode()).digest() * 1000)
    return folder


def independent_digest(folder: Path) -> bytes:
    """The model digest as docs/provision.md defines it, computed here without tdxvm's code."""
    files = sorted((p.relative_to(folder).as_posix().encode(), p) for p in folder.rglob("*") if p.is_file())
    h = hashlib.sha256(b"tdxvm model digest v1\x00")
    for rel, p in files:
        data = p.read_bytes()
        h.update(struct.pack(">I", len(rel)) + rel + struct.pack(">Q", len(data)) + hashlib.sha256(data).digest())
    return h.digest()


@pytest.fixture
def qgs() -> Iterator[QuoteService]:
    """A fresh emulated TD: its quote service, RTMR3 zero."""
    with QuoteService(platform(), artifacts()) as service:
        yield service


def provider(service: QuoteService) -> EmulatedQgs:
    return EmulatedQgs(service.address)


# -- the model digest --------------------------------------------------------------------


def test_model_digest_is_canonical_and_covers_every_file(tmp_path):
    a = write_model(tmp_path / "a", "one")
    assert folder_digest(a) == independent_digest(a)
    assert (
        folder_digest(a).hex() == independent_digest(a).hex() != folder_digest(write_model(tmp_path / "b", "two")).hex()
    )
    before = folder_digest(a)
    (a / "tokenizer.json").rename(a / "tokenizer2.json")  # same bytes, another name
    assert folder_digest(a) not in (before, b"")
    (a / "tokenizer2.json").rename(a / "tokenizer.json")
    assert folder_digest(a) == before
    (a / "extra").write_bytes(b"")  # an added empty file changes it too
    assert folder_digest(a) != before
    (a / "extra").unlink()
    os.symlink(a / "config.json", a / "linked.json")
    with pytest.raises(ModelDigestError, match="symbolic link"):
        folder_digest(a)
    (tmp_path / "empty/sub").mkdir(parents=True)
    with pytest.raises(ModelDigestError, match="no files"):
        folder_digest(tmp_path / "empty")
    assert parse_digest(show(before)) == parse_digest(before.hex()) == before
    for bad in ("sha256:abc", "zz" * 32, ""):
        with pytest.raises(ValueError):
            parse_digest(bad)


def test_encrypt_records_the_digest_the_guest_computes_after_decrypting(tmp_path):
    plain = write_model(tmp_path / "plain", "weights")
    key = generate_model_key()
    entries = encrypt_model(plain, tmp_path / "enc", key)
    assert model_digest(entries) == model_digest(read_index(tmp_path / "enc", key)) == folder_digest(plain)
    decrypt_model(tmp_path / "enc", tmp_path / "out", key)
    assert folder_digest(tmp_path / "out") == folder_digest(plain)


def test_cli_weights_encrypt_prints_the_digest_and_digest_recomputes_it(tmp_path, capsys):
    plain = write_model(tmp_path / "plain", "cli")
    store = str(tmp_path / "store")
    code = tdxvm_main(
        ["weights", "encrypt", str(plain), "--out", str(tmp_path / "enc"), "--secrets", store, "-o", "json"]
    )
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["model_digest"] == show(folder_digest(plain))
    assert tdxvm_main(["weights", "digest", str(plain)]) == 0
    assert capsys.readouterr().out.strip() == doc["model_digest"]
    assert tdxvm_main(["weights", "digest", str(tmp_path / "enc"), "--secrets", store, "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["model_digest"] == doc["model_digest"]


# -- the event and its replay ------------------------------------------------------------


def test_model_event_is_a_runtime_event_the_attest_parser_replays(tmp_path):
    payload = model_payload(bytes(range(32)), name=NAME, dtype="float32")
    assert payload == (
        b'{"digest":"sha256:'
        + bytes(range(32)).hex().encode()
        + b'","dtype":"float32","name":"tiny-llama","quantization":"none"}'
    )
    ev = make_event(MODEL_EVENT, payload)
    assert ev["digest"] == runtime_event_digest(MODEL_EVENT, payload).hex()
    assert ev["digest"] == hashlib.sha384(b"\x01\x00\x00\x08:tdxvm.model:" + payload).hexdigest()
    events = [ev, make_event(MODEL_EVENT, payload.replace(b"float32", b"bfloat16"))]
    parsed = parse_json_event_log(events)
    assert [e.mr_index for e in parsed] == [3, 3] and attest_replay(parsed)[3] == replay(events)
    want = hashlib.sha384(
        hashlib.sha384(bytes(48) + bytes.fromhex(events[0]["digest"])).digest() + bytes.fromhex(events[1]["digest"])
    ).digest()
    assert replay(events) == want


# -- measuring through the emulated quote service ----------------------------------------


def test_measure_extends_rtmr3_once_per_model_and_quotes_carry_it(tmp_path, qgs):
    from tdxvm.attest import parse_quote

    log = tmp_path / "run/rtmr3.json"
    a, b = write_model(tmp_path / "a", "a"), write_model(tmp_path / "b", "b")
    assert qgs.rtmr(3) == bytes(48)
    digest, done = measure_folder(provider(qgs), a, name=NAME, dtype="float32", log_path=log)
    assert digest == folder_digest(a) and done.extended and done.events == 1
    assert qgs.rtmr(3) == done.rtmr3 == replay(load_log(log)) != bytes(48)
    assert parse_quote(provider(qgs).quote(bytes(64))).body.rtmrs[3] == done.rtmr3  # later quotes carry it

    _, again = measure_folder(
        provider(qgs), a, name=NAME, dtype="float32", log_path=log
    )  # re-provisioned, or restarted
    assert not again.extended and again.events == 1 and qgs.rtmr(3) == done.rtmr3

    _, other = measure_folder(
        provider(qgs), a, name=NAME, dtype="bfloat16", log_path=log
    )  # another output-changing setting
    _, swapped = measure_folder(provider(qgs), b, name=NAME, dtype="bfloat16", log_path=log)  # another model, same TD
    _, back = measure_folder(provider(qgs), a, name=NAME, dtype="float32", log_path=log)
    assert other.extended and swapped.extended and back.extended and back.events == 4
    history = [json.loads(bytes.fromhex(e["event_payload"])) for e in load_log(log)]
    assert [(h["digest"], h["dtype"]) for h in history] == [
        (show(folder_digest(a)), "float32"),
        (show(folder_digest(a)), "bfloat16"),
        (show(folder_digest(b)), "bfloat16"),
        (show(folder_digest(a)), "float32"),
    ]
    assert qgs.rtmr(3) == replay(load_log(log))


def test_an_interrupted_measure_is_completed_and_an_unexplained_rtmr3_refused(tmp_path, qgs):
    log = tmp_path / "rtmr3.json"
    payload = model_payload(b"\x11" * 32, name=NAME, dtype="float32")
    log.write_text(json.dumps([make_event(MODEL_EVENT, payload)]))  # logged, then the service died before the extend
    done = measure(provider(qgs), payload, log_path=log)
    assert not done.extended and qgs.rtmr(3) == replay(load_log(log)) == done.rtmr3

    qgs.extend_rtmr(3, b"\x22" * 48)  # something else extends RTMR3
    with pytest.raises(Rtmr3Error, match="something else extended RTMR3") as err:
        measure(provider(qgs), model_payload(b"\x33" * 32, name=NAME, dtype="float32"), log_path=log)
    assert err.value.code == "rtmr3-unexplained" and len(load_log(log)) == 1  # nothing added

    log.write_text(
        '[{"imr": 3, "event_type": 134217729, "event": "tdxvm.model", "event_payload": "00", "digest": "00"}]'
    )
    with pytest.raises(Rtmr3Error, match="damaged"):
        load_log(log)


def test_emulated_service_extends_only_rtmr3_and_says_why(qgs):
    p = provider(qgs)
    with pytest.raises(QuoteError, match="only RTMR3 can be extended") as err:
        p.extend_rtmr(2, b"\x01" * 48)
    assert err.value.code == "qgs-refused"
    with pytest.raises(QuoteError, match="48-byte"):
        p.extend_rtmr(3, b"\x01" * 32)
    assert p.read_rtmr(2) == qgs.rtmr(2) != bytes(48) and p.read_rtmr(3) == bytes(48)
    p.extend_rtmr(3, b"\x01" * 48)
    assert p.read_rtmr(3) == hashlib.sha384(bytes(48) + b"\x01" * 48).digest()
    qgs.reset()  # the TD booted again
    assert p.read_rtmr(3) == bytes(48)


def test_td_providers_extend_through_the_kernel_measurement_registers(tmp_path):
    """A folder laid out like Linux >= 6.16's /sys/class/misc/tdx_guest/measurements: the
    provider writes exactly the 48-byte digest to rtmr3:sha384 and reads 48 bytes back."""
    mr = tmp_path / "sys/class/misc/tdx_guest/measurements"
    mr.mkdir(parents=True)
    (mr / "rtmr3:sha384").write_bytes(bytes(48))
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/tdx_guest").write_bytes(b"")
    (tmp_path / "sys/kernel/config/tsm/report").mkdir(parents=True)
    for p in (detect(None, root=tmp_path), TdxGuestDevice(tmp_path / "dev/tdx_guest", measurements=mr)):
        p.extend_rtmr(3, b"\xab" * 48)
        assert (mr / "rtmr3:sha384").read_bytes() == b"\xab" * 48  # what the kernel was given
        assert p.read_rtmr(3) == b"\xab" * 48
    assert isinstance(detect(None, root=tmp_path), ConfigfsTsm)
    with pytest.raises(QuoteError, match="48-byte"):
        TdxGuestDevice(mr, measurements=mr).extend_rtmr(3, b"\x00" * 47)


def test_a_kernel_without_the_extend_interface_refuses_to_measure(tmp_path):
    older = ConfigfsTsm(tmp_path / "report", measurements=tmp_path / "sys/class/misc/tdx_guest/measurements")
    with pytest.raises(QuoteError, match="Linux >= 6.16") as err:
        measure_folder(
            older, write_model(tmp_path / "m", "m"), name=NAME, dtype="float32", log_path=tmp_path / "log.json"
        )
    assert err.value.code == "no-rtmr-extend" and not (tmp_path / "log.json").exists()


# -- the service's attestation, and clients ----------------------------------------------


@pytest.fixture
def service(tmp_path, qgs) -> Iterator[dict[str, Any]]:
    """An attested service (no model loaded: attestation needs none) whose RTMR3 log is ``log``."""
    identity = ensure_identity(tmp_path / "tls", ["127.0.0.1", "localhost"])
    log = tmp_path / "rtmr3.json"
    attester = Attester(provider(qgs), {"tls": identity.spki}, event_log=None, rtmr3_log=log)
    server = TlsUvicorn(create_app(ModelHolder(NAME), attester=attester), identity)
    yield {"url": server.url, "log": log, "qgs": qgs, "identity": identity}
    server.stop()


def verify(url: str, **kw: Any) -> AttestedEndpoint:
    return verify_endpoint(
        url, collateral=platform().collateral(), policy=policy_for(artifacts()), trust_anchor=anchor(), at=AT, **kw
    )


def codes(exc: EndpointRefused) -> set[str]:
    return {r.code for r in exc.reasons}


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_attestation_answer_carries_the_rtmr3_log(tmp_path, service):
    url, log = service["url"], service["log"]
    doc = requests.get(f"{url}/v1/attestation?nonce={'00' * 32}", verify=False, timeout=30).json()
    assert doc["rtmr3_log"] == []  # nothing measured yet
    measure_folder(provider(service["qgs"]), write_model(tmp_path / "m", "m"), name=NAME, dtype="float32", log_path=log)
    doc = requests.get(f"{url}/v1/attestation?nonce={'00' * 32}", verify=False, timeout=30).json()
    assert doc["rtmr3_log"] == load_log(log) and len(doc["rtmr3_log"]) == 1
    log.write_text("not json")
    r = requests.get(f"{url}/v1/attestation?nonce={'00' * 32}", verify=False, timeout=30)
    assert r.status_code == 503 and r.json()["error"]["code"] == "rtmr3_log_unavailable"


def test_verify_endpoint_accepts_the_expected_model_and_says_rtmr3_is_checked(tmp_path, service):
    model = write_model(tmp_path / "m", "m")
    digest, _ = measure_folder(provider(service["qgs"]), model, name=NAME, dtype="float32", log_path=service["log"])
    unchecked = verify(service["url"])  # no digest expected: the model is reported, RTMR3 still an exception
    assert unchecked.model is not None and unchecked.model.digest == digest and unchecked.model.name == NAME
    assert any(line.startswith("rtmr3 not pinned") for line in unchecked.verdict.to_dict()["policy_exceptions"])
    assert unchecked.verdict.to_dict()["checked_by_event_log"] == []

    ep = verify(service["url"], model_digest=digest)
    d = ep.verdict.to_dict()
    assert ep.verdict.accepted and ep.rtmr3 is not None and ep.rtmr3.model_checked and ep.rtmr3.replays
    assert not any(line.startswith("rtmr3") for line in d["policy_exceptions"])
    assert d["checked_by_event_log"] == [
        f"rtmr3 checked through the model event log: its 1 event(s) replay to the quoted RTMR3, "
        f"and the latest model event names model {NAME} {show(digest)} (float32, quantization "
        "none), the digest expected"
    ]
    assert ep.to_dict()["model"] == {
        "event": 0,
        "digest": show(digest),
        "name": NAME,
        "dtype": "float32",
        "quantization": "none",
    }
    assert d["measurements"]["rtmr3"] == service["qgs"].rtmr(3).hex()


def test_verify_endpoint_refuses_another_model_or_none(tmp_path, service):
    expected = folder_digest(write_model(tmp_path / "expected", "expected"))
    with pytest.raises(EndpointRefused) as err:
        verify(service["url"], model_digest=expected)
    assert codes(err.value) == {"model-not-measured"}
    measure_folder(
        provider(service["qgs"]),
        write_model(tmp_path / "other", "other"),
        name=NAME,
        dtype="float32",
        log_path=service["log"],
    )
    with pytest.raises(EndpointRefused) as err:
        verify(service["url"], model_digest=expected)
    assert codes(err.value) == {"model-digest-mismatch"} and f"not the expected {show(expected)}" in str(err.value)
    assert err.value.verdict is not None and err.value.verdict.result.genuine  # a genuine TD, serving another model


def test_the_latest_model_event_decides(tmp_path, service):
    first, second = write_model(tmp_path / "first", "1"), write_model(tmp_path / "second", "2")
    d1, _ = measure_folder(provider(service["qgs"]), first, name=NAME, dtype="float32", log_path=service["log"])
    d2, _ = measure_folder(provider(service["qgs"]), second, name=NAME, dtype="float32", log_path=service["log"])
    assert verify(service["url"], model_digest=d2).verdict.accepted
    with pytest.raises(EndpointRefused) as err:
        verify(service["url"], model_digest=d1)  # served once, no longer
    assert codes(err.value) == {"model-digest-mismatch"} and "an earlier event names the expected one" in str(err.value)


def test_a_log_that_does_not_replay_to_the_quote_is_refused(tmp_path, service):
    real, claimed = write_model(tmp_path / "real", "real"), write_model(tmp_path / "claimed", "claimed")
    measure_folder(provider(service["qgs"]), real, name=NAME, dtype="float32", log_path=service["log"])
    # the service's log now claims another model than the one RTMR3 was extended with
    forged = [make_event(MODEL_EVENT, model_payload(folder_digest(claimed), name=NAME, dtype="float32"))]
    service["log"].write_text(json.dumps(forged))
    with pytest.raises(EndpointRefused) as err:
        verify(service["url"], model_digest=folder_digest(claimed))
    assert codes(err.value) == {"rtmr3-log-mismatch"} and "does not say what the TD measured" in str(err.value)
    with pytest.raises(EndpointRefused) as err:
        verify(service["url"])  # refused with or without an expected digest
    assert codes(err.value) == {"rtmr3-log-mismatch"}


def test_pinned_client_holds_the_endpoint_to_the_model(tmp_path, service):
    digest, _ = measure_folder(
        provider(service["qgs"]), write_model(tmp_path / "m", "m"), name=NAME, dtype="float32", log_path=service["log"]
    )
    with ApiClient(verify(service["url"]), model_digest=digest) as api:
        assert api.model(None) == NAME  # the name the attested event gives, asked of no one
    with pytest.raises(ApiError, match="not the expected model") as err:
        ApiClient(verify(service["url"]), model_digest=b"\x00" * 32)
    assert err.value.code == "model-digest"
    with pytest.raises(EndpointRefused):
        ApiClient.attest(
            service["url"],
            model_digest=b"\x00" * 32,
            collateral=platform().collateral(),
            policy=policy_for(artifacts()),
            trust_anchor=anchor(),
            at=AT,
        )


def test_cli_verify_endpoint_model_digest(tmp_path, capsys, service):
    p = policy_for(artifacts())
    (tmp_path / "root.pem").write_text(platform().root_ca_pem)
    (tmp_path / "bundle.json").write_text(platform().collateral().to_json())
    (tmp_path / "policy.yaml").write_text("".join(f"{k}: {getattr(p, k)[0]}\n" for k in ("mrtd", "rtmr1", "rtmr2")))
    trust = [
        "--collateral",
        tmp_path / "bundle.json",
        "--root-ca",
        tmp_path / "root.pem",
        "--policy",
        tmp_path / "policy.yaml",
        "--at",
        AT.isoformat(),
    ]
    digest, _ = measure_folder(
        provider(service["qgs"]), write_model(tmp_path / "m", "m"), name=NAME, dtype="float32", log_path=service["log"]
    )

    code, out, _ = run(capsys, "verify-endpoint", service["url"], *trust, "--model-digest", show(digest), "-o", "json")
    doc = json.loads(out)
    assert code == 0 and doc["model"]["digest"] == show(digest) and doc["rtmr3"]["model_checked"]
    assert doc["attestation"]["checked_by_event_log"][0].startswith("rtmr3 checked through the model event log")
    code, out, _ = run(capsys, "verify-endpoint", service["url"], *trust, "--model-digest", digest.hex())
    assert (
        code == 0
        and "checked: rtmr3 checked through the model event log" in out
        and f"model: {NAME} {show(digest)}" in out
    )
    assert "policy exception: rtmr3" not in out

    code, out, _ = run(
        capsys, "verify-endpoint", service["url"], *trust, "--model-digest", "ab" * 32, "--complete", "hi"
    )
    assert code == 1 and out.startswith("REFUSED") and "[model-digest-mismatch]" in out and "completion" not in out
    code, _, err = run(capsys, "verify-endpoint", service["url"], *trust, "--model-digest", "xyz")
    assert code == 2 and "--model-digest" in err


# -- python -m tdxvm.guest.serve --tls-dir --qgs: measures, then serves ---------------------


def _start_serve(args: list[str], port: int, stderr: Path) -> subprocess.Popen:
    with stderr.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "tdxvm.guest.serve", *args], stderr=f)
    deadline = time.monotonic() + 90
    while True:
        assert time.monotonic() < deadline and proc.poll() is None, stderr.read_text()
        try:
            if requests.get(f"https://127.0.0.1:{port}/health", verify=False, timeout=5).status_code == 200:
                return proc
        except requests.ConnectionError:
            pass
        time.sleep(0.1)


def _stop(proc: subprocess.Popen, stderr: Path) -> str:
    proc.terminate()
    proc.wait(timeout=75)  # asyncio may wait its 30 s TLS-close timeout on a kept-alive connection
    return stderr.read_text()


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_serve_measures_the_model_before_serving(tiny_model, tmp_path, qgs):
    port, log = free_port(), tmp_path / "run/rtmr3.json"
    args = [
        "--model",
        str(tiny_model),
        "--name",
        NAME,
        "--port",
        str(port),
        "--threads",
        "1",
        "--log-level",
        "info",
        "--tls-dir",
        str(tmp_path / "tls"),
        "--qgs",
        qgs.address,
        "--rtmr3-log",
        str(log),
    ]
    digest, err_file = folder_digest(tiny_model), tmp_path / "serve.err"
    proc = _start_serve(args, port, err_file)
    try:
        ep = verify(f"https://127.0.0.1:{port}", model_digest=digest)
        assert ep.provider == "emulated" and ep.model is not None and ep.model.name == NAME and ep.rtmr3.events == 1
        with ApiClient(ep, model_digest=digest) as api:
            assert api.complete("hi", max_tokens=3)["usage"]["completion_tokens"] >= 1
    finally:
        err = _stop(proc, err_file)
    assert f"measured model {NAME} {show(digest)} (float32) into RTMR3" in err
    proc = _start_serve(args, port, err_file)  # a restart (or the same model provisioned again): no second event
    try:
        again = verify(f"https://127.0.0.1:{port}", model_digest=digest)
        assert again.rtmr3.events == 1 and len(load_log(log)) == 1
        assert again.tls_spki == ep.tls_spki  # the same model keeps its key: pinned clients keep working
        with ApiClient(ep, model_digest=digest) as api:
            assert api.models() == [NAME]
    finally:
        err = _stop(proc, err_file)
    assert "already names; RTMR3 unchanged" in err and "made a new TLS key" not in err

    other = [*args]
    other[other.index(NAME)] = "other-model"  # another model event (as another model provisioned would be)
    proc = _start_serve(other, port, err_file)
    try:
        with ApiClient(ep, model_digest=digest) as api, pytest.raises(PinMismatchError, match="attest the endpoint"):
            api.models()  # the session pinned to the first model's key reaches nothing of the new one
        now = verify(f"https://127.0.0.1:{port}", model_digest=digest)
        assert now.tls_spki != ep.tls_spki and now.model.name == "other-model" and now.rtmr3.events == 2
    finally:
        err = _stop(proc, err_file)
    assert "made a new TLS key for this model" in err


def test_serve_refuses_to_start_when_it_cannot_measure(tiny_model, tmp_path):
    """The emulated quote service refuses the extend (its domain booted again, as qgsd's guard says): no serving."""

    def gone() -> str:
        return "domain booted again: this emulated quote service has stopped"

    with QuoteService(platform(), artifacts(), guard=gone) as refusing:
        port = free_port()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "tdxvm.guest.serve",
                "--model",
                str(tiny_model),
                "--name",
                NAME,
                "--port",
                str(port),
                "--tls-dir",
                str(tmp_path / "tls"),
                "--qgs",
                refusing.address,
                "--rtmr3-log",
                str(tmp_path / "rtmr3.json"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 2
    assert (
        "refusing to serve" in done.stderr
        and "cannot be measured into RTMR3" in done.stderr
        and "booted again" in done.stderr
    )
    with pytest.raises(requests.ConnectionError):
        requests.get(f"https://127.0.0.1:{port}/health", verify=False, timeout=5)


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_a_service_in_memory_never_reads_the_model_again(tiny_model, tmp_path, qgs):
    """The host rolls the scratch disk's sectors of the model back (zeros: valid since the
    format) after the service measured it. Loaded from the disk, the weights stay mapped
    from the files there, so what answers is no longer what was measured; copied into
    memory first (--in-memory), nothing maps the disk's files and the answers do not
    change."""
    import shutil as _shutil

    from .test_inmemory import SHM

    model = tmp_path / "scratch" / "model"
    _shutil.copytree(tiny_model, model)
    memory = SHM / f"tdxvm-test-{os.getpid()}-{time.monotonic_ns()}"
    memory.mkdir(mode=0o700)
    port, err_file = free_port(), tmp_path / "serve.err"
    base = [*("--model", str(model), "--name", NAME, "--port", str(port), "--threads", "1")]
    base += [*("--tls-dir", str(tmp_path / "tls"), "--qgs", qgs.address, "--rtmr3-log", str(tmp_path / "rtmr3.json"))]

    def maps_of(proc: subprocess.Popen) -> str:
        return Path(f"/proc/{proc.pid}/maps").read_text()

    proc = _start_serve(base, port, err_file)  # from the disk: the control
    try:
        assert str(model / "model.safetensors") in maps_of(proc)
    finally:
        _stop(proc, err_file)
    digest = folder_digest(model)
    proc = _start_serve([*base, "--in-memory", str(memory)], port, err_file)
    try:
        assert str(model) not in maps_of(proc) and list(memory.iterdir()) == []  # loaded, and the copy's files gone
        ep = verify(f"https://127.0.0.1:{port}", model_digest=digest)
        with ApiClient(ep, model_digest=digest) as api:
            before = api.complete("the host", max_tokens=6, temperature=0)["choices"][0]["text"]
            weights = model / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[:4096] + bytes(weights.stat().st_size - 4096))  # rolled back
            assert api.complete("the host", max_tokens=6, temperature=0)["choices"][0]["text"] == before
    finally:
        err = _stop(proc, err_file)
        _shutil.rmtree(memory, ignore_errors=True)
    assert f"into memory at {memory} ({show(digest)})" in err
