"""Checks of a guest serving a provisioned model, run by tests/e2e/test_fleet.py on the
fleet's VM on this machine (one booted model server for all of them).

Provisioning released the model key to the attested guest, uploaded and installed the
encrypted weights, started the service and attested it on its TLS key. Then: a
completion and a streamed chat through the pinned client, compared with the same model
run in this process; model identity (the service measured the model it loaded into
RTMR3 through the VM's emulated quote daemon; ``verify-endpoint --model-digest`` accepts
the model's digest and refuses another; ``status`` shows the recorded digest);
API keys (the service answers nothing but ``/health`` and ``/v1/attestation`` without
one; the guest holds their hashes only); provisioning the same model again with another
key set uploads nothing, keeps the running service (same process) and rotates the keys,
and adds no RTMR3 event; the host's rewrites of the metadata (policy, backend) and its
own sealed model key and key set are refused."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tdxvm.attest.modelevent import RTMR3
from tdxvm.cli import main as tdxvm_main
from tdxvm.guest import apikeys as guest_apikeys
from tdxvm.guest.modeldigest import folder_digest, show
from tdxvm.launch.lifecycle import _write_metadata, lookup, status
from tdxvm.launch.records import RecordMismatch, VmRecords
from tdxvm.launch.spec import ModelRef
from tdxvm.provision import apikeys, attestation, handshake, ssh
from tdxvm.provision.client import ApiClient, ApiError
from tdxvm.provision.endpoint import EndpointRefused
from tdxvm.provision.model import attest_service, provision, recorded_digest
from tdxvm.provision.pinning import PinMismatchError, pinned_session
from tdxvm.secretstore import SecretStore
from tdxvm.sshkey import controller_key

MAX_TOKENS = 12


def _expected_completion(plain, prompt: str) -> str:
    """Greedy decoding of ``prompt`` by the same model in this process (the server's default)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(plain, local_files_only=True)
    lm = AutoModelForCausalLM.from_pretrained(plain, local_files_only=True, dtype=torch.float32).eval()
    ids = torch.tensor([tok(prompt)["input_ids"]])
    out = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False)
    return str(
        tok.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=False)
    )


def _verify_endpoint_cli(capsys, url: str, trust, policy, folder, *args: str) -> tuple[int, dict]:
    """``tdxvm verify-endpoint URL --collateral --root-ca --policy ARGS -o json`` with this trust and policy."""
    capsys.readouterr()  # what the test printed before: stdout is to hold the command's JSON only
    (folder / "bundle.json").write_text(trust.collateral.to_json())
    (folder / "root.pem").write_text(trust.platform.root_ca_pem)
    (folder / "policy.json").write_text(json.dumps(policy.model_dump(mode="json", exclude_none=True)))  # JSON is YAML
    code = tdxvm_main(
        [
            "verify-endpoint",
            url,
            "--collateral",
            str(folder / "bundle.json"),
            "--root-ca",
            str(folder / "root.pem"),
            "--policy",
            str(folder / "policy.json"),
            *args,
            "-o",
            "json",
        ]
    )
    return code, json.loads(capsys.readouterr().out)


def check_served_model(
    conn,
    name: str,
    served: dict[str, Any],
    model: ModelRef,
    plain: Path,
    *,
    trust,
    store: SecretStore,
    capsys: pytest.CaptureFixture[str],
    work: Path,
) -> None:
    """Everything a client and the controller can check of VM ``name`` serving ``model``
    (``served``: what provisioning it returned; ``plain``: the model's plain folder;
    ``work``: a folder for the CLI's input files)."""
    work.mkdir(parents=True, exist_ok=True)
    up = served["upload"]
    assert up["total_bytes"] == up["sent_bytes"] > 0 and up["via"] == "tcp"  # through the VM's receiver forward
    assert served["install"]["files"] == len([p for p in plain.iterdir() if p.is_file()])

    records = VmRecords.beside(store)
    vm, _ = attestation.trusted_vm(conn, name, records, trust=trust)  # the controller's record of the VM
    endpoint = attest_service(vm, trust)  # a client's view: fresh nonce, quote binding the TLS key, launch policy
    assert endpoint.tls_spki_sha256 == served["endpoint"]["tls_spki_sha256"]
    assert endpoint.verdict.accepted

    # model identity: the guest measured the model it decrypted into RTMR3, through the VM's emulated quote daemon
    digest = folder_digest(plain)  # computed here from the plain model: what the guest must have loaded
    assert served["model_digest"] == show(digest) == vm.model["digest"] and recorded_digest(vm) == digest
    measured = attest_service(vm, trust, model_digest=recorded_digest(vm))  # what verify-endpoint --vm checks
    assert measured.model is not None and (measured.model.name, measured.model.dtype) == (model.name, "float32")
    assert measured.rtmr3.events == 1 and measured.rtmr3.model_checked
    quoted_rtmr3 = measured.verdict.result.quote.body.rtmrs[RTMR3]
    assert quoted_rtmr3 != bytes(48) and measured.verdict.to_dict()["checked_by_event_log"]
    assert not any(line.startswith("rtmr3") for line in measured.verdict.to_dict()["policy_exceptions"])
    with pytest.raises(EndpointRefused) as other:
        attest_service(vm, trust, model_digest=hashlib.sha256(b"another model").digest())
    assert {r.code for r in other.value.reasons} == {"model-digest-mismatch"}
    key = apikeys.get(store, apikeys.DEFAULT)  # made by the first provision, which released its hash
    assert served["api_keys"] == [apikeys.DEFAULT] == vm.model["api_keys"]
    os.environ[apikeys.ENV] = key  # a client without the store gives the key in the environment
    try:
        code, doc = _verify_endpoint_cli(
            capsys, endpoint.url, trust, vm.policy, work, "--model-digest", show(digest), "--complete", "hi"
        )
    finally:
        del os.environ[apikeys.ENV]
    assert code == 0 and doc["model"]["digest"] == show(digest) and doc["rtmr3"]["model_checked"]
    assert doc["usage"]["completion_tokens"] >= 1
    code, doc = _verify_endpoint_cli(
        capsys, endpoint.url, trust, vm.policy, work, "--model-digest", "ab" * 32, "--complete", "hi"
    )
    assert code == 1 and [r["code"] for r in doc["reasons"]] == ["model-digest-mismatch"] and "completion" not in doc
    assert status(conn, name, records=records)[0].model["digest"] == show(digest)  # what `tdxvm status NAME` shows
    # without a key the service answers only /health and the attestation (token counts, models, metrics: 401)
    with ApiClient(endpoint) as anonymous:
        for call in (anonymous.models, lambda: anonymous.complete("hi", model=model.name)):
            with pytest.raises(ApiError) as unauthorized:
                call()
            assert unauthorized.value.status == 401
        assert anonymous.session.get(f"{endpoint.url}/metrics").status_code == 401
        assert anonymous.session.get(f"{endpoint.url}/health").status_code == 200
    with ApiClient(endpoint, api_key=guest_apikeys.generate()) as stranger, pytest.raises(ApiError) as wrong_key:
        stranger.models()
    assert wrong_key.value.status == 401 and "Incorrect API key" in str(wrong_key.value)
    with ApiClient(endpoint, api_key=key) as api:
        assert api.models() == [model.name]
        assert api.session.get(f"{endpoint.url}/metrics").status_code == 200
        prompt = "The quick brown fox"
        doc = api.complete(prompt, max_tokens=MAX_TOKENS, temperature=0)
        assert 0 < doc["usage"]["completion_tokens"] <= MAX_TOKENS
        assert doc["choices"][0]["text"] == _expected_completion(plain, prompt)  # the model it was given, greedy
        pieces = list(
            api.chat_stream([{"role": "user", "content": "Tell me a story"}], max_tokens=MAX_TOKENS, temperature=0)
        )
        whole = api.session.post(
            f"{endpoint.url}/v1/chat/completions",
            json={
                "model": model.name,
                "messages": [{"role": "user", "content": "Tell me a story"}],
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
            },
        ).json()
        assert pieces and "".join(pieces) == whole["choices"][0]["message"]["content"]
        with pytest.raises(ApiError) as bad:
            api.complete(prompt, model="another-model")
        assert bad.value.status == 404
    # the service's TLS key is the attested one: a client pinned to any other key sends nothing
    wrong = hashlib.sha256(b"a man in the middle's key").digest()
    with pinned_session(wrong) as s, pytest.raises(PinMismatchError):
        s.get(f"{endpoint.url}/health", timeout=30)
    with pytest.raises(requests.exceptions.SSLError):  # nor does a client that checks certificates as usual
        requests.get(f"{endpoint.url}/health", timeout=30)

    # the host rewrites the policy in the domain's metadata (DEBUG allowed, its own MRTD): ignored
    dom, meta = lookup(conn, name)
    original = dict(meta.labels)
    meta.labels["policy"] = json.dumps({"allow_debug": True, "mrtd": ["ee" * 48]})
    meta.labels["policy_exceptions"] = "[]"
    _write_metadata(dom, meta)

    # provisioning the same weights again with another key set: nothing uploaded, the running service kept
    # (the same process), the keys rotated: the old one refused, the new one accepted
    with attestation.reattest(conn, name, records=records, trust=trust) as guest:
        pid_before = _service_pid(vm, guest.keys["ssh-host"], store)
    apikeys.create(store, "rotated", replace=True)
    again = provision(conn, name, model.model_copy(update={"api_keys": ("rotated",)}), trust=trust, secrets=store)
    assert again.upload is None and again.install["skipped"] and not again.install["changed"]
    assert again.api_keys == ["rotated"]
    with ApiClient(endpoint, api_key=key) as old, pytest.raises(ApiError) as rotated_out:
        old.models()
    assert rotated_out.value.status == 401
    with ApiClient(endpoint, api_key=apikeys.get(store, "rotated")) as new:
        assert new.models() == [model.name]
    assert again.endpoint["tls_spki_sha256"] == endpoint.tls_spki_sha256
    assert again.endpoint["rtmr3"]["events"] == 1 and again.model_digest == show(digest)  # no second model event
    assert again.endpoint["rtmr3"]["quoted"] == quoted_rtmr3.hex()

    with attestation.reattest(conn, name, records=records, trust=trust) as guest:
        host_key = guest.keys["ssh-host"]
        assert guest.verdict.policy == vm.policy and not guest.verdict.policy.allow_debug
    # the host attests the booted guest itself (a genuine quote) and seals a model key of its own: refused
    agent = vm.reach(vm.agent_port, "guest agent")
    hosts = attestation.attest(conn, name, agent, trust, vm.policy, require_keys=("x25519", "ssh-host"))
    with hosts, pytest.raises(handshake.GuestError, match="not sealed by the controller's release key"):
        hosts.release("model-0123456789abcdef", b"the host's model key", sender=X25519PrivateKey.generate())
    # nor can it give the service a key set of its own (its own key's hash)
    hosts_key = guest_apikeys.generate()
    hosts = attestation.attest(conn, name, agent, trust, vm.policy, require_keys=("x25519", "ssh-host"))
    with hosts, pytest.raises(handshake.GuestError, match="not sealed by the controller's release key"):
        hosts.release(
            guest_apikeys.SECRET_NAME, guest_apikeys.document({"host": hosts_key}), sender=X25519PrivateKey.generate()
        )
    with ApiClient(endpoint, api_key=hosts_key) as host_client, pytest.raises(ApiError) as host_refused:
        host_client.models()
    assert host_refused.value.status == 401
    # the guest holds no key file and no ciphertext once installed
    with ssh.connect(vm.reach(vm.ssh_port, "sshd"), host_key=host_key, client_key=controller_key(store)) as client:
        left = ssh.run(client, "ls -A /run/tdxvm/secrets /var/lib/tdxvm/uploads 2>/dev/null; true")
        assert not any(x.startswith("model") or len(x) == 64 for x in left.split())  # nothing of the host's either
        assert ssh.run(client, "systemctl is-active tdxvm-serve").strip() == "active"
        assert ssh.run(client, "systemctl show -p MainPID --value tdxvm-serve").strip() == pid_before  # not restarted
        argv = ssh.run(client, f"tr '\\0' ' ' < /proc/{pid_before}/cmdline").split()  # the spec's engine bounds
        assert argv[argv.index("--max-batch") + 1] == str(model.max_batch)
        assert argv[argv.index("--kv-cache-mib") + 1] == str(model.kv_cache_mib)
        # the image's pip packages are byte-compiled (unchecked-hash): no service start compiles transformers
        pyc = "/usr/local/lib/python3.11/dist-packages/transformers/__pycache__/__init__.cpython-311.pyc"
        assert ssh.run(client, f"od -An -tu4 -j4 -N4 {pyc}").split() == ["1"]
        held = ssh.run(client, "cat /run/tdxvm/secrets/api-keys")  # the key set the service reads: hashes only
        rotated = apikeys.get(store, "rotated")
        assert guest_apikeys.key_hash(rotated).hex() in held and rotated not in held and key not in held
        serve_log = ssh.run(client, "journalctl -u tdxvm-serve --no-pager -o cat")
        assert f"measured model {model.name} {show(digest)} (float32) into RTMR3" in serve_log
        journal = ssh.run(client, "journalctl -u tdxvm-agent --no-pager -o cat")
        assert "refused secret 'model-0123456789abcdef'" in journal and "the host's model key" not in journal
    dom, meta = lookup(conn, name)
    meta.labels.update({k: original[k] for k in ("policy", "policy_exceptions") if k in original})
    _write_metadata(dom, meta)  # the display copy as the launch wrote it


def _service_pid(vm, host_key: str, store: SecretStore) -> str:
    with ssh.connect(vm.reach(vm.ssh_port, "sshd"), host_key=host_key, client_key=controller_key(store)) as client:
        return ssh.run(client, "systemctl show -p MainPID --value tdxvm-serve").strip()


def check_a_rewritten_backend_is_refused(conn, name: str, model: ModelRef, *, trust, store: SecretStore) -> None:
    """The host rewrites the backend in the metadata ("tdx": Intel's root and the host's QGS):
    refused before any key. (The VM's record no longer matches it: remove the VM after.)"""
    dom, meta = lookup(conn, name)
    meta.backend = "tdx"
    _write_metadata(dom, meta)
    with pytest.raises(RecordMismatch, match="backend: metadata says 'tdx', the record 'emulated'"):
        provision(conn, name, model, trust=trust, secrets=store)
    with pytest.raises(RecordMismatch):
        attestation.trusted_vm(conn, name, VmRecords.beside(store))  # what verify-endpoint --vm and tdxvm attest use
