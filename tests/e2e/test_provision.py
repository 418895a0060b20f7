"""End to end on the real libvirtd: the model-server smoke image launched emulated (TCG)
with ``model:`` in its spec, so the launch goes on to provision a tiny Llama model made
here: model key released to the attested guest, encrypted weights uploaded and installed,
the service started and attested on its TLS key. Then a completion and a streamed chat
through the pinned client, compared with the same model run in this process.

Model identity: the service in the guest measured the model it loaded into RTMR3 through
the VM's emulated quote daemon; ``verify-endpoint --model-digest`` accepts the model's
digest and refuses another, ``status`` shows the recorded digest, and provisioning the
same model again adds no RTMR3 event."""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import time

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tdxvm.attest.modelevent import RTMR3
from tdxvm.cli import main as tdxvm_main
from tdxvm.emulate.qgsd import running_port
from tdxvm.guest.modeldigest import folder_digest, show
from tdxvm.launch.errors import LaunchError
from tdxvm.launch.lifecycle import _write_metadata, destroy, lookup, status
from tdxvm.launch.manifest import load_manifest
from tdxvm.launch.records import RecordMismatch, VmRecords
from tdxvm.launch.spec import ModelRef, VmSpec
from tdxvm.provision import attestation, bringup, handshake
from tdxvm.provision.client import ApiClient, ApiError
from tdxvm.provision.endpoint import EndpointRefused
from tdxvm.provision.model import attest_service, provision, recorded_digest
from tdxvm.provision.pinning import PinMismatchError, pinned_session
from tdxvm.provision.trust import for_backend
from tdxvm.secretstore import SecretStore

from .conftest import TINY_KEY

pytestmark = pytest.mark.vm
URI = "qemu:///system"
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


def test_launch_provisions_and_serves_an_attested_model(
    conn, model_smoke_build, tiny_encrypted, tmp_path_factory, capsys
):
    plain, enc = tiny_encrypted
    store = SecretStore(directory=model_smoke_build.secrets)
    trust = for_backend("emulated", emulated_dir=tmp_path_factory.mktemp("emulated"))
    name = f"e2e-model-{secrets.token_hex(3)}"
    spec = VmSpec(
        name=name,
        uri=URI,
        image=model_smoke_build.folder / "manifest.json",
        backend="emulated",
        vcpus=2,
        memory=2048,
        scratch=256,
        model=ModelRef(path=enc, name="tiny-llama", key=TINY_KEY),
    )
    events: list = []
    try:
        result = bringup.bring_up(
            spec, load_manifest(spec.image), conn, trust=trust, secrets=store, progress=events.append
        )
        assert [e.phase for e in events if e.status == "done"] == [*bringup.PHASES, "provision"]
        served = result.provision
        assert served is not None and served["model"] == "tiny-llama"
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
        assert measured.model is not None and (measured.model.name, measured.model.dtype) == ("tiny-llama", "float32")
        assert measured.rtmr3.events == 1 and measured.rtmr3.model_checked
        quoted_rtmr3 = measured.verdict.result.quote.body.rtmrs[RTMR3]
        assert quoted_rtmr3 != bytes(48) and measured.verdict.to_dict()["checked_by_event_log"]
        assert not any(line.startswith("rtmr3") for line in measured.verdict.to_dict()["policy_exceptions"])
        with pytest.raises(EndpointRefused) as other:
            attest_service(vm, trust, model_digest=hashlib.sha256(b"another model").digest())
        assert {r.code for r in other.value.reasons} == {"model-digest-mismatch"}
        cli = tmp_path_factory.mktemp("cli")
        code, doc = _verify_endpoint_cli(capsys, endpoint.url, trust, vm.policy, cli, "--model-digest", show(digest))
        assert code == 0 and doc["model"]["digest"] == show(digest) and doc["rtmr3"]["model_checked"]
        code, doc = _verify_endpoint_cli(
            capsys, endpoint.url, trust, vm.policy, cli, "--model-digest", "ab" * 32, "--complete", "hi"
        )
        assert (
            code == 1 and [r["code"] for r in doc["reasons"]] == ["model-digest-mismatch"] and "completion" not in doc
        )
        assert status(conn, name, records=records)[0].model["digest"] == show(digest)  # what `tdxvm status NAME` shows
        with ApiClient(endpoint) as api:
            assert api.models() == ["tiny-llama"]
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
                    "model": "tiny-llama",
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
        meta.labels["policy"] = json.dumps({"allow_debug": True, "mrtd": ["ee" * 48]})
        meta.labels["policy_exceptions"] = "[]"
        _write_metadata(dom, meta)

        # provisioning the same weights again: nothing uploaded, the running service kept
        again = provision(conn, name, spec.model, trust=trust, secrets=store)
        assert again.upload is None and again.install["skipped"] and not again.install["changed"]
        assert again.endpoint["tls_spki_sha256"] == endpoint.tls_spki_sha256
        assert again.endpoint["rtmr3"]["events"] == 1 and again.model_digest == show(digest)  # no second model event
        assert again.endpoint["rtmr3"]["quoted"] == quoted_rtmr3.hex()

        # the guest holds no key file and no ciphertext once installed
        from tdxvm.provision import ssh
        from tdxvm.sshkey import controller_key

        with attestation.reattest(conn, name, records=records, trust=trust) as guest:
            host_key = guest.keys["ssh-host"]
            assert guest.verdict.policy == vm.policy and not guest.verdict.policy.allow_debug
        # the host attests the booted guest itself (a genuine quote) and seals a model key of its own: refused
        agent = vm.address(vm.agent_port, "guest agent")
        hosts = attestation.attest(conn, name, agent, trust, vm.policy, require_keys=("x25519", "ssh-host"))
        with hosts, pytest.raises(handshake.GuestError, match="not sealed by the controller's release key"):
            hosts.release("model-0123456789abcdef", b"the host's model key", sender=X25519PrivateKey.generate())
        with ssh.connect(result.ssh, host_key=host_key, client_key=controller_key(store)) as client:
            left = ssh.run(client, "ls -A /run/tdxvm/secrets /var/lib/tdxvm/uploads 2>/dev/null; true")
            assert not any(
                x.startswith("model") or len(x) == 64 for x in left.split()
            )  # no key file, no upload, nothing of the host's
            assert ssh.run(client, "systemctl is-active tdxvm-serve").strip() == "active"
            serve_log = ssh.run(client, "journalctl -u tdxvm-serve --no-pager -o cat")
            assert f"measured model tiny-llama {show(digest)} (float32) into RTMR3" in serve_log
            journal = ssh.run(client, "journalctl -u tdxvm-agent --no-pager -o cat")
            assert "refused secret 'model-0123456789abcdef'" in journal and "the host's model key" not in journal

        # the host rewrites the backend in the metadata ("tdx": Intel's root and the host's QGS): refused before any key
        dom, meta = lookup(conn, name)
        meta.backend = "tdx"
        _write_metadata(dom, meta)
        with pytest.raises(RecordMismatch, match="backend: metadata says 'tdx', the record 'emulated'"):
            provision(conn, name, spec.model, trust=trust, secrets=store)
        with pytest.raises(RecordMismatch):
            attestation.trusted_vm(conn, name, records)  # what verify-endpoint --vm and tdxvm attest use
    finally:
        uuid = None
        with contextlib.suppress(LaunchError):
            uuid = status(conn, name)[0].uuid
            destroy(conn, name)
    # the emulated quote daemon of that VM goes away with it
    deadline = time.monotonic() + 30
    while uuid and running_port(trust.emulated_dir, uuid) is not None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert uuid is None or running_port(trust.emulated_dir, uuid) is None
