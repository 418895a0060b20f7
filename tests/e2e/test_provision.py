"""End to end on the real libvirtd: the model-server smoke image launched emulated (TCG)
with ``model:`` in its spec, so the launch goes on to provision a tiny Llama model made
here: model key released to the attested guest, encrypted weights uploaded and installed,
the service started and attested on its TLS key. Then a completion and a streamed chat
through the pinned client, compared with the same model run in this process."""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import time

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tdxvm.emulate.qgsd import running_port
from tdxvm.launch.errors import LaunchError
from tdxvm.launch.lifecycle import _write_metadata, destroy, lookup, status
from tdxvm.launch.records import RecordMismatch, VmRecords
from tdxvm.launch.manifest import load_manifest
from tdxvm.launch.spec import ModelRef, VmSpec
from tdxvm.provision import bringup, handshake
from tdxvm.provision.client import ApiClient, ApiError
from tdxvm.provision.model import attest_service, provision
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
    return str(tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=False))


def test_launch_provisions_and_serves_an_attested_model(conn, model_smoke_build, tiny_encrypted, tmp_path_factory):
    plain, enc = tiny_encrypted
    store = SecretStore(directory=model_smoke_build.secrets)
    trust = for_backend("emulated", emulated_dir=tmp_path_factory.mktemp("emulated"))
    name = f"e2e-model-{secrets.token_hex(3)}"
    spec = VmSpec(name=name, uri=URI, image=model_smoke_build.folder / "manifest.json", backend="emulated", vcpus=2,
                  memory=2048, model=ModelRef(path=enc, name="tiny-llama", key=TINY_KEY))  # fmt: skip
    events: list = []
    try:
        result = bringup.bring_up(spec, load_manifest(spec.image), conn, trust=trust, secrets=store, progress=events.append)
        assert [e.phase for e in events if e.status == "done"] == [*bringup.PHASES, "provision"]
        served = result.provision
        assert served is not None and served["model"] == "tiny-llama"
        up = served["upload"]
        assert up["total_bytes"] == up["sent_bytes"] > 0 and up["via"] == "tcp"  # through the VM's receiver forward
        assert served["install"]["files"] == len([p for p in plain.iterdir() if p.is_file()])

        records = VmRecords.beside(store)
        vm, _ = bringup.trusted_vm(conn, name, records, trust=trust)  # the controller's record of the VM
        endpoint = attest_service(vm, trust)  # a client's view: fresh nonce, quote binding the TLS key, launch policy
        assert endpoint.tls_spki_sha256 == served["endpoint"]["tls_spki_sha256"]
        assert endpoint.verdict.accepted
        with ApiClient(endpoint) as api:
            assert api.models() == ["tiny-llama"]
            prompt = "The quick brown fox"
            doc = api.complete(prompt, max_tokens=MAX_TOKENS, temperature=0)
            assert 0 < doc["usage"]["completion_tokens"] <= MAX_TOKENS
            assert doc["choices"][0]["text"] == _expected_completion(plain, prompt)  # the model it was given, greedy
            pieces = list(api.chat_stream([{"role": "user", "content": "Tell me a story"}], max_tokens=MAX_TOKENS, temperature=0))
            whole = api.session.post(f"{endpoint.url}/v1/chat/completions", json={
                "model": "tiny-llama", "messages": [{"role": "user", "content": "Tell me a story"}],
                "max_tokens": MAX_TOKENS, "temperature": 0}).json()  # fmt: skip
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

        # the guest holds no key file and no ciphertext once installed
        from tdxvm.provision import ssh
        from tdxvm.sshkey import controller_key

        with bringup.reattest(conn, name, records=records, trust=trust) as guest:
            host_key = guest.keys["ssh-host"]
            assert guest.verdict.policy == vm.policy and not guest.verdict.policy.allow_debug
        # the host attests the booted guest itself (a genuine quote) and seals a model key of its own: refused
        agent = vm.address(vm.agent_port, "guest agent")
        hosts = bringup.attest(conn, name, agent, trust, vm.policy, require_keys=("x25519", "ssh-host"))
        with hosts, pytest.raises(handshake.GuestError, match="not sealed by the controller's release key"):
            hosts.release("model-0123456789abcdef", b"the host's model key", sender=X25519PrivateKey.generate())
        with ssh.connect(result.ssh, host_key=host_key, client_key=controller_key(store)) as client:
            left = ssh.run(client, "ls -A /run/tdxvm/secrets /var/lib/tdxvm/uploads 2>/dev/null; true")
            assert not any(x.startswith("model") or len(x) == 64 for x in left.split())  # no key file, no upload, nothing of the host's
            assert ssh.run(client, "systemctl is-active tdxvm-serve").strip() == "active"
            journal = ssh.run(client, "journalctl -u tdxvm-agent --no-pager -o cat")
            assert "refused secret 'model-0123456789abcdef'" in journal and "the host's model key" not in journal

        # the host rewrites the backend in the metadata ("tdx": Intel's root and the host's QGS): refused before any key
        dom, meta = lookup(conn, name)
        meta.backend = "tdx"
        _write_metadata(dom, meta)
        with pytest.raises(RecordMismatch, match="backend: metadata says 'tdx', the record 'emulated'"):
            provision(conn, name, spec.model, trust=trust, secrets=store)
        with pytest.raises(RecordMismatch):
            bringup.trusted_vm(conn, name, records)  # what verify-endpoint --vm and tdxvm attest use
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
