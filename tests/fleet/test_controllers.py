"""One controller per fleet: a second controller (its own secret store, records and state
folder) applying the same fleet on the same hosts never replaces, deletes or counts the
first's VMs, and says so; VMs of an older tdxvm (no ``controller`` label) are the
fleet's only where the controller keeps their record; a VM relabelled between the plan
and the destroy is not destroyed (docs/fleet.md, 'One controller per fleet'); what a
controller shows of its VMs is what it recorded, not the labels (docs/fleet.md, 'State')."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest

from tdxvm.fleet import inventory as inv
from tdxvm.fleet import planner, reconcile
from tdxvm.fleet.reconcile import ApplyOptions
from tdxvm.fleet.report import fleet_status
from tdxvm.launch import lifecycle
from tdxvm.launch import metadata as md
from tdxvm.launch.domain import TDXVM_NS
from tdxvm.launch.manifest import load_manifest
from tdxvm.launch.records import VmRecords
from tdxvm.launch.spec import VmSpec
from tdxvm.secretstore import SecretStore
from tdxvm.sshkey import controller_id

from .guests import put_test_secrets
from .test_apply import domains, results

WEB = "    web:\n      template: small\n      replicas: {n}\n      placement: [a]\n"
API = "    api:\n      template: small\n      replicas: 1\n      placement: [a]\n"


@dataclass
class Ctl:
    """One controller: its secret store (and the VM records beside it) and its state folder."""

    store: SecretStore
    state: Path

    def apply(self, lab, path, **kw):
        return reconcile.apply(
            lab.load(path),
            connector=lab.connector,
            secrets=self.store,
            trust_for=lambda _b: lab.trust,
            state_dir=self.state,
            options=ApplyOptions(poll=0.05),
            **kw,
        )

    def plan(self, lab, path):
        return planner.plan(lab.load(path), connector=lab.connector, state_dir=self.state, secrets=self.store)

    def destroy(self, lab, path, **kw):
        return reconcile.destroy_fleet(
            lab.load(path), connector=lab.connector, state_dir=self.state, secrets=self.store, **kw
        )

    def status(self, lab, path):
        return fleet_status(lab.load(path), connector=lab.connector, state_dir=self.state, secrets=self.store)

    @property
    def id(self) -> str:
        return controller_id(self.store)


@pytest.fixture
def first(lab) -> Ctl:
    return Ctl(lab.store, lab.folder / "state")


@pytest.fixture
def second(tmp_path) -> Ctl:
    store = SecretStore(directory=tmp_path / "second" / "secrets")
    put_test_secrets(store)
    return Ctl(store, tmp_path / "second" / "state")


def fleet_file(lab, deployments: str, file: str) -> Path:
    """A fleet ``demo`` file of its own name (two controllers may ask for different things)."""
    path = lab.folder / file
    path.write_text(lab.write(deployments).read_text())
    return path


def label(lab, vm: str) -> str | None:
    [st] = lifecycle.status(lab.connector.get(lab.hosts["a"]), vm)
    return st.labels.get(md.CONTROLLER)


def test_a_second_controller_never_replaces_or_destroys_the_firsts_vms(lab, first, second):
    lab.host("a")
    path = fleet_file(lab, WEB.format(n=2), "web.yaml")
    with lab.guests():
        assert first.apply(lab, path).status == "ok"
        before = domains(lab, "a")
        assert label(lab, "demo-web-0") == label(lab, "demo-web-1") == first.id
        assert first.id != second.id and len(first.id) == 16
        report = second.apply(lab, path)
    assert report.status == "partial" and results(report) == {"demo-web-0": "skipped", "demo-web-1": "skipped"}
    [error] = report.outcomes[0].errors
    assert error["code"] == "other-controller"
    assert error["message"] == (
        f"demo-web-0 on a carries fleet demo's label but is controller {first.id}'s (this controller is "
        f"{second.id}); never touched: one controller owns a fleet, apply it from the one that owns this VM "
        "(docs/fleet.md, 'One controller per fleet')"
    )
    assert domains(lab, "a") == before  # same domains, same UUIDs, still running

    report = second.destroy(lab, path)
    assert report.status == "partial" and results(report) == {"demo-web-0": "skipped", "demo-web-1": "skipped"}
    assert domains(lab, "a") == before

    assert first.plan(lab, path).counts()["keep"] == 2  # still the first's fleet, in sync
    report = first.destroy(lab, path)
    assert report.status == "ok" and domains(lab, "a") == {}


def test_two_controllers_with_one_fleet_name_keep_to_their_own_vms(lab, first, second):
    """Each asks for other VMs under the same fleet name: neither deletes the other's as
    "no longer in the file"; plans, reports and status name them."""
    lab.host("a")
    web = fleet_file(lab, WEB.format(n=1), "web.yaml")
    api = fleet_file(lab, API, "api.yaml")
    with lab.guests():
        assert first.apply(lab, web).status == "ok"
        report = second.apply(lab, api)
        assert results(report) == {"demo-api-0": "created", "demo-web-0": "skipped"} and report.status == "partial"
        assert label(lab, "demo-api-0") == second.id
        p = first.plan(lab, web)
        assert [(a.kind, a.vm) for a in p.actions] == [("keep", "demo-web-0"), ("skip", "demo-api-0")]
        assert p.actions[1].deployment == "api" and f"but is controller {second.id}'s" in p.actions[1].reasons[0]
        report = first.apply(lab, web)
        assert results(report) == {"demo-web-0": "unchanged", "demo-api-0": "skipped"}
    assert sorted(domains(lab, "a")) == ["demo-api-0", "demo-web-0"]

    st = first.status(lab, web)
    rows = {r.vm: r for r in st.rows}
    assert rows["demo-web-0"].sync == "in sync"
    assert rows["demo-api-0"].sync == "other controller" and rows["demo-api-0"].state == "running"
    assert rows["demo-api-0"].verdict is None  # nothing of another controller's VM is taken for true

    assert results(second.destroy(lab, api)) == {"demo-api-0": "deleted", "demo-web-0": "skipped"}
    assert results(first.destroy(lab, web)) == {"demo-web-0": "deleted"}
    assert domains(lab, "a") == {}


def _drop_controller_label(dom) -> None:
    meta = md.from_domain_xml(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    del meta.labels[md.CONTROLLER]
    flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG | (libvirt.VIR_DOMAIN_AFFECT_LIVE if dom.isActive() else 0)
    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, md.to_element_xml(meta), md.KEY, TDXVM_NS, flags)


def _old_tdxvm_vm(lab, name: str, replica: int, **labels: str) -> None:
    """A fleet VM as a tdxvm without controller records or labels defined it."""
    spec = VmSpec(name=name, uri=lab.hosts["a"], image=lab.images.good, backend="emulated", vcpus=1, memory=256)
    fleet_labels = {inv.FLEET: "demo", inv.DEPLOYMENT: "web", inv.REPLICA: str(replica), **labels}
    lifecycle.prepare_domain(
        spec, load_manifest(lab.images.good), lab.connector.get(lab.hosts["a"]), labels=fleet_labels
    )


def test_vms_without_the_label_are_the_fleets_only_with_a_record_here(lab, first):
    lab.host("a")
    path = fleet_file(lab, WEB.format(n=3), "web.yaml")
    conn = lab.connector.get(lab.hosts["a"])
    with lab.guests():
        assert first.apply(lab, path).status == "ok"
        _drop_controller_label(conn.lookupByName("demo-web-0"))  # launched by an older tdxvm here: record kept
        for name in ("demo-web-1", "demo-web-2"):
            lifecycle.destroy(conn, name, records=VmRecords.beside(first.store))
        _old_tdxvm_vm(lab, "demo-web-1", 1)  # no label, no record: another controller's, as far as we know
        _old_tdxvm_vm(lab, "demo-web-2", 2, controller=first.id)  # our label, no record: refused, replaced
        assert label(lab, "demo-web-0") is None
        p = first.plan(lab, path)
        assert [(a.kind, a.vm) for a in p.actions] == [
            ("keep", "demo-web-0"),
            ("skip", "demo-web-1"),
            ("replace", "demo-web-2"),
        ]
        assert p.actions[1].reasons[0] == (
            "demo-web-1 on a carries fleet demo's label but is not this controller's: it has no controller label "
            "(an older tdxvm launched it) and this controller keeps no record of it; never touched: one "
            "controller owns a fleet, apply it from the one that owns this VM (docs/fleet.md, 'One controller "
            "per fleet')"
        )
        assert any("was not launched by this controller" in r for r in p.actions[2].reasons)
        legacy = domains(lab, "a")["demo-web-1"]
        report = first.apply(lab, path)
    assert results(report) == {"demo-web-0": "unchanged", "demo-web-1": "skipped", "demo-web-2": "replaced"}
    assert domains(lab, "a")["demo-web-1"] == legacy and label(lab, "demo-web-2") == first.id
    report = first.destroy(lab, path)
    assert results(report) == {"demo-web-0": "deleted", "demo-web-1": "skipped", "demo-web-2": "deleted"}
    assert list(domains(lab, "a")) == ["demo-web-1"]


def test_a_vm_relabelled_after_the_plan_is_not_destroyed(lab, first):
    """destroy_owned reads the labels again: a VM that became another controller's between
    the plan and its delete is left, and the VM fails with the reason."""
    lab.host("a")
    path = fleet_file(lab, WEB.format(n=3), "web.yaml")
    conn = lab.connector.get(lab.hosts["a"])
    other = "0123456789abcdef"

    def relabel(name):
        def confirm(_plan):
            lifecycle.set_labels(conn.lookupByName(name), {md.CONTROLLER: other})
            return True

        return confirm

    with lab.guests():
        assert first.apply(lab, path).status == "ok"
        fewer = fleet_file(lab, WEB.format(n=2), "fewer.yaml")
        report = first.apply(lab, fewer, confirm=relabel("demo-web-2"))
        assert report.status == "partial"
        assert results(report) == {"demo-web-0": "unchanged", "demo-web-1": "unchanged", "demo-web-2": "failed"}
        [error] = next(o for o in report.outcomes if o.vm == "demo-web-2").errors
        assert error == {
            "code": "other-controller",
            "message": f"VM demo-web-2 on a is controller {other}'s (this controller is {first.id}) now; "
            "it is not touched",
        }
        assert "demo-web-2" in domains(lab, "a")
        report = first.destroy(lab, fewer, confirm=relabel("demo-web-1"))
    assert results(report) == {"demo-web-0": "deleted", "demo-web-1": "failed", "demo-web-2": "skipped"}
    assert sorted(domains(lab, "a")) == ["demo-web-1", "demo-web-2"]


def test_status_and_an_unchanged_apply_show_the_state_files_endpoint_not_the_labels(lab, first):
    """The host rewrites a VM's endpoint and measurements labels (to send users who read
    `tdxvm status -f` elsewhere): status and the report of an apply that keeps the VM show
    what the controller recorded when it brought the VM up."""
    lab.host("a")
    path = fleet_file(lab, WEB.format(n=1), "web.yaml")
    with lab.guests():
        assert first.apply(lab, path).status == "ok"
        recorded = {r.vm: (r.endpoint, r.measurements_digest) for r in first.status(lab, path).rows}
        assert recorded["demo-web-0"][0] and recorded["demo-web-0"][1]
        dom = lab.connector.get(lab.hosts["a"]).lookupByName("demo-web-0")
        lifecycle.set_labels(dom, {inv.ENDPOINT: "203.0.113.9:443", inv.MEASUREMENTS: "ff" * 32})
        [row] = first.status(lab, path).rows
        assert (row.endpoint, row.measurements_digest) == recorded["demo-web-0"] and row.sync == "in sync"
        report = first.apply(lab, path)
        assert results(report) == {"demo-web-0": "unchanged"}
        assert report.outcomes[0].endpoint == recorded["demo-web-0"][0]
    assert results(first.destroy(lab, path)) == {"demo-web-0": "deleted"}
