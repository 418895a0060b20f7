"""End to end on the real libvirtd: a fleet of two emulated model servers (the model-smoke
image under TCG), each launched, attested, unlocked, logged in to and provisioned with a
tiny Llama model as ``tdxvm launch`` does; both endpoints attested and queried; a second
apply that does nothing; status; destroy of exactly the fleet's VMs."""

from __future__ import annotations

import secrets

import pytest

from tdxvm.fleet import reconcile
from tdxvm.fleet.inventory import Connector
from tdxvm.fleet.report import fleet_status
from tdxvm.fleet.spec import parse_fleet
from tdxvm.launch.records import VmRecords
from tdxvm.provision import attestation, bringup, ssh
from tdxvm.provision.client import ApiClient
from tdxvm.provision.model import attest_service, service_url
from tdxvm.provision.trust import for_backend
from tdxvm.secretstore import SecretStore
from tdxvm.sshkey import controller_key

from .conftest import TINY_KEY

pytestmark = pytest.mark.vm
URI = "qemu:///system"
REPLICAS = 2  # two TCG guests at once on this project's 2-core machines


@pytest.fixture
def connector():
    c = Connector()
    try:
        c.get(URI)
    except Exception as exc:  # noqa: BLE001 - say why, then fail: CI starts libvirtd
        pytest.fail(f"the real libvirtd is needed ({URI}): {exc}")
    yield c
    c.close()


def test_fleet_of_emulated_model_servers(connector, model_smoke_build, tiny_encrypted, tmp_path):
    name = f"e2e{secrets.token_hex(3)}"
    fleet = parse_fleet(f"""\
apiVersion: tdxvm/v1
kind: Fleet
metadata: {{name: {name}}}
spec:
  hosts: {{local: "{URI}"}}
  templates:
    tiny:
      image: {model_smoke_build.folder / "manifest.json"}
      backend: emulated
      vcpus: 1
      memory: 2GiB
      scratch: 256MiB
      model: {{path: {tiny_encrypted[1]}, name: tiny, key: {TINY_KEY}}}
  deployments:
    web: {{template: tiny, replicas: {REPLICAS}, placement: [local]}}
""")
    store = SecretStore(directory=model_smoke_build.secrets)
    trust = for_backend("emulated", emulated_dir=tmp_path / "emulated")
    state = tmp_path / "state"
    conn = connector.get(URI)
    others = {d.UUIDString() for d in conn.listAllDomains()}

    def run_apply():
        return reconcile.apply(
            fleet,
            connector=connector,
            secrets=store,
            trust_for=lambda _b: trust,
            state_dir=state,
            options=reconcile.ApplyOptions(parallel=REPLICAS),
        )

    try:
        report = run_apply()
        assert report.status == "ok", [o.to_dict() for o in report.outcomes]
        assert [o.result for o in report.outcomes] == ["created"] * REPLICAS
        for o in report.outcomes:
            assert set(o.timings) == {*bringup.PHASES, "provision"} and o.verdict["tcb_status"] == "UpToDate"
            vm, _ = attestation.trusted_vm(conn, o.vm, VmRecords.beside(store), trust=trust)  # the controller's record
            assert o.endpoint == service_url(vm).removeprefix("https://")  # the fleet reports the service
            with ApiClient(attest_service(vm, trust)) as api:  # attested on its TLS key, then queried on it
                assert api.complete("Hello", max_tokens=4, temperature=0)["usage"]["completion_tokens"] >= 1
            # re-attested with a fresh nonce; SSH accepts only the key this quote binds; the root is the verified volume
            with attestation.reattest(conn, o.vm, records=VmRecords.beside(store), trust=trust) as again:
                host_key = again.keys["ssh-host"]
            ssh_port = vm.address(vm.ssh_port, "sshd")[1]
            with ssh.connect(("127.0.0.1", ssh_port), host_key=host_key, client_key=controller_key(store)) as client:
                assert ssh.run(client, "findmnt -no SOURCE /run/tdxvm/root-ro").strip() == "/dev/mapper/root"
        uuids = {d.name(): d.UUIDString() for d in conn.listAllDomains() if d.name().startswith(name)}
        again = run_apply()
        assert again.status == "ok" and [o.result for o in again.outcomes] == ["unchanged"] * REPLICAS
        assert {d.name(): d.UUIDString() for d in conn.listAllDomains() if d.name().startswith(name)} == uuids
        st = fleet_status(fleet, connector=connector, state_dir=state, secrets=store)
        assert [(r.state, r.verdict, r.sync) for r in st.rows] == [("running", "accept", "in sync")] * REPLICAS
    finally:
        gone = reconcile.destroy_fleet(fleet, connector=connector, state_dir=state, secrets=store)
    assert gone.status == "ok" and [o.result for o in gone.outcomes] == ["deleted"] * REPLICAS
    after = {d.UUIDString(): d.name() for d in conn.listAllDomains()}
    assert others <= set(after)  # every other domain is still there (others may have launched more meanwhile)
    assert not [n for n in after.values() if n.startswith(f"{name}-")]  # and none of the fleet's
