"""End to end on two real libvirt hosts: this machine's libvirtd and the namespace host
of tests/nshost.py, reached only as ``qemu+ssh://``. A fleet of two emulated model servers
(the model-smoke image under TCG), one on each host, each launched, attested, unlocked,
logged in to and provisioned with a tiny Llama model as ``tdxvm launch`` does. The first
apply loses the remote host mid-apply (its sshd killed as its VM's define begins): that
VM fails with the lost connection, the local one converges, the apply is partial (exit
5). The next apply finishes the remote VM; both endpoints are attested and queried; a
third apply does nothing; status. The local VM then takes every check of a served model
(tests/e2e/served.py: completions against the same model run here, model identity in
RTMR3, re-provisioning, the host's rewrites and its own model key refused). Destroy
removes exactly the fleet's VMs on both hosts, and the VMs' quote daemons with them."""

from __future__ import annotations

import secrets
import threading
import time

import pytest

from tdxvm.cli.fleet import exit_code
from tdxvm.emulate.qgsd import running_port
from tdxvm.fleet import reconcile
from tdxvm.fleet.inventory import Connector
from tdxvm.fleet.report import fleet_status, report_lines
from tdxvm.fleet.spec import parse_fleet
from tdxvm.fleet.state import FleetState
from tdxvm.launch import tunnel
from tdxvm.launch.records import VmRecords
from tdxvm.launch.spec import ModelRef
from tdxvm.provision import apikeys, attestation, bringup, ssh
from tdxvm.provision.client import ApiClient
from tdxvm.provision.model import attest_service, service_url
from tdxvm.provision.trust import for_backend
from tdxvm.secretstore import SecretStore
from tdxvm.sshkey import controller_key

from . import served
from .conftest import TINY_KEY

pytestmark = pytest.mark.vm
URI = "qemu:///system"


@pytest.fixture
def connector():
    c = Connector()
    try:
        c.get(URI)
    except Exception as exc:  # noqa: BLE001 - say why, then fail: CI starts libvirtd
        pytest.fail(f"the real libvirtd is needed ({URI}): {exc}")
    yield c
    c.close()
    tunnel.close_all()


def test_fleet_of_model_servers_over_two_hosts(connector, ns_host, model_smoke_build, tiny_encrypted, tmp_path, capsys):
    name = f"e2e{secrets.token_hex(3)}"
    fleet = parse_fleet(f"""\
apiVersion: tdxvm/v1
kind: Fleet
metadata: {{name: {name}}}
spec:
  hosts: {{local: "{URI}", remote: "{ns_host.uri}"}}
  templates:
    tiny:
      image: {model_smoke_build.folder / "manifest.json"}
      backend: emulated
      vcpus: 1
      memory: 2GiB
      scratch: 256MiB
      model: {{path: {tiny_encrypted[1]}, name: tiny, key: {TINY_KEY}, max_batch: 4, kv_cache_mib: 64}}
  deployments:
    web: {{template: tiny, replicas: 2, placement: [local, remote]}}
""")
    store = SecretStore(directory=model_smoke_build.secrets)
    records = VmRecords.beside(store)
    model = ModelRef(path=tiny_encrypted[1], name="tiny", key=TINY_KEY, max_batch=4, kv_cache_mib=64)  # the template's
    trust = for_backend("emulated", emulated_dir=tmp_path / "emulated")
    state = tmp_path / "state"
    local = connector.get(URI)
    others = {d.UUIDString() for d in local.listAllDomains()}
    killed = threading.Event()

    def kill_the_remote_sshd(event) -> None:
        if event.host == "remote" and event.phase == "define" and event.status == "start" and not killed.is_set():
            killed.set()
            ns_host.stop_sshd()  # every session to it ends too: libvirt's, the tunnels'

    def run_apply(progress=reconcile.quiet):
        return reconcile.apply(
            fleet,
            connector=connector,
            secrets=store,
            trust_for=lambda _b: trust,
            state_dir=state,
            options=reconcile.ApplyOptions(parallel=2),
            progress=progress,
        )

    try:
        first = run_apply(kill_the_remote_sshd)
        by_host = {o.host: o for o in first.outcomes}
        assert killed.is_set() and by_host["local"].result == "created", [o.to_dict() for o in first.outcomes]
        lost = by_host["remote"]
        assert lost.result == "failed" and lost.errors[0]["code"] == "libvirt-connection-lost", lost.to_dict()
        assert "during define" in lost.errors[0]["message"] and "does not answer now" in lost.errors[0]["message"]
        assert first.status == "partial" and exit_code(first.status) == 5
        assert list(first.unreachable()) == ["remote"]  # reported as the host gone, not only as its VM failing
        assert any(line.startswith("host remote unreachable: lost the connection") for line in report_lines(first))

        ns_host.start_sshd()
        second = run_apply()
        assert second.status == "ok", [o.to_dict() for o in second.outcomes]
        assert sorted((o.host, o.result) for o in second.outcomes) == [("local", "unchanged"), ("remote", "created")]
        for o in (by_host["local"], *[o for o in second.outcomes if o.host == "remote"]):
            assert set(o.timings) == {*bringup.PHASES, "provision"} and o.verdict["tcb_status"] == "UpToDate"
            print(f"{o.vm} on {o.host}: " + ", ".join(f"{k} {v:.1f} s" for k, v in o.timings.items()))
        for host, conn in (("local", local), ("remote", connector.get(ns_host.uri))):
            vm_name = f"{name}-web-{0 if host == 'local' else 1}"
            vm, _ = attestation.trusted_vm(conn, vm_name, records, trust=trust)  # the controller's record
            assert vm.uri == conn.getURI()
            created = [o for o in (*first.outcomes, *second.outcomes) if o.vm == vm_name and o.result == "created"]
            assert created[0].endpoint == service_url(vm).removeprefix("https://")  # the fleet reports the service
            key = apikeys.get(store, apikeys.DEFAULT)  # made by the fleet's first provision
            with ApiClient(attest_service(vm, trust), api_key=key) as api:  # attested on its TLS key, then queried
                assert api.complete("Hello", max_tokens=4, temperature=0)["usage"]["completion_tokens"] >= 1
            # re-attested with a fresh nonce; SSH accepts only the key this quote binds; the root is the verified volume
            with attestation.reattest(conn, vm_name, records=records, trust=trust) as again:
                host_key = again.keys["ssh-host"]
            address = vm.reach(vm.ssh_port, "sshd")  # a tunnel through the host's SSH for the remote one
            with ssh.connect(address, host_key=host_key, client_key=controller_key(store)) as client:
                assert ssh.run(client, "findmnt -no SOURCE /run/tdxvm/root-ro").strip() == "/dev/mapper/root"
        uuids = {(h, d.name()): d.UUIDString() for h, c in _hosts(connector, ns_host) for d in _fleet_vms(c, name)}
        assert sorted(h for h, _ in uuids) == ["local", "remote"]
        third = run_apply()
        assert third.status == "ok" and [o.result for o in third.outcomes] == ["unchanged"] * 2
        # the state file knows which model each VM serves (what a model encrypted again in place is compared with)
        served_digest = by_host["local"].provision["model_digest"]
        assert served_digest.startswith("sha256:")
        assert [e["model_digest"] for e in FleetState.load(state, name).vms().values()] == [served_digest] * 2
        assert {(h, d.name()): d.UUIDString() for h, c in _hosts(connector, ns_host) for d in _fleet_vms(c, name)} == (
            uuids
        )
        st = fleet_status(fleet, connector=connector, state_dir=state, secrets=store)
        assert [(r.host, r.state, r.verdict, r.sync) for r in st.rows] == [
            ("local", "running", "accept", "in sync"),
            ("remote", "running", "accept", "in sync"),
        ]
        # every check of a served model, on the local VM (one booted model server for all of them)
        local_vm = by_host["local"].vm
        uuid = local.lookupByName(local_vm).UUIDString()
        served.check_served_model(
            local,
            local_vm,
            by_host["local"].provision,
            model,
            tiny_encrypted[0],
            trust=trust,
            store=store,
            capsys=capsys,
            work=tmp_path / "cli",
        )
        served.check_a_rewritten_backend_is_refused(local, local_vm, model, trust=trust, store=store)
    finally:
        if not ns_host.sshd_running:
            ns_host.start_sshd()
        gone = reconcile.destroy_fleet(fleet, connector=connector, state_dir=state, secrets=store)
    assert gone.status == "ok" and sorted((o.host, o.result) for o in gone.outcomes) == [
        ("local", "deleted"),
        ("remote", "deleted"),
    ]
    after = {d.UUIDString(): d.name() for d in local.listAllDomains()}
    assert others <= set(after)  # every other domain is still there (others may have launched more meanwhile)
    assert not [n for n in after.values() if n.startswith(f"{name}-")]  # and none of the fleet's
    assert _fleet_vms(connector.get(ns_host.uri), name) == []
    # the emulated quote daemon of a VM goes away with it
    deadline = time.monotonic() + 30
    while running_port(trust.emulated_dir, uuid) is not None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert running_port(trust.emulated_dir, uuid) is None


def _hosts(connector, ns_host):
    return (("local", connector.get(URI)), ("remote", connector.get(ns_host.uri)))


def _fleet_vms(conn, name: str) -> list:
    return [d for d in conn.listAllDomains() if d.name().startswith(f"{name}-")]
