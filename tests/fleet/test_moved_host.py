"""A host of the fleet file whose URI changed: the fleet's VMs at its old URI are emptied
like those of a host that left the file, unless the old URI reaches the same libvirt
(docs/fleet.md, "A host's URI changes")."""

from __future__ import annotations

from tdxvm.fleet import inventory as inv
from tdxvm.fleet.planner import settle_moved
from tdxvm.fleet.state import FleetState, moved_name

from .test_apply import apply, domains, plan

WEB = "    web:\n      template: small\n      replicas: 1\n      placement: [a]\n"


def _state(lab) -> FleetState:
    return FleetState.load(lab.folder / "state", "demo")


def test_a_new_uri_for_a_host_empties_its_old_uri(lab):
    old = lab.host("a")
    path = lab.write(WEB)
    with lab.guests():
        assert apply(lab, path).status == "ok"
        [(old_uuid, _)] = domains(lab, "a").values()
        assert _state(lab).vm("demo-web-0")["uuid"] == old_uuid  # recorded when it came up
        new = lab.host("a2")  # another libvirt
        moved = lab.write(WEB, hosts={"a": new})
        state_file = (lab.folder / "state" / "demo.json").read_bytes()
        p = plan(lab, moved)
        assert (lab.folder / "state" / "demo.json").read_bytes() == state_file  # a plan writes nothing
        gone = moved_name("a", old)
        assert {(a.kind, a.vm, a.host) for a in p.changes} == {
            ("create", "demo-web-0", "a"),
            ("delete", "demo-web-0", gone),
        }
        [delete] = [a for a in p.changes if a.kind == "delete"]
        assert delete.reasons == (f"host a has another URI in the file now: its VMs at {old} go",)
        report = apply(lab, moved)
        assert report.status == "ok", report.to_dict()
        assert {(o.vm, o.host): o.result for o in report.outcomes} == {
            ("demo-web-0", "a"): "created",
            ("demo-web-0", gone): "deleted",
        }
    assert domains(lab, "a") == {}  # nothing of the fleet is left running at the old URI
    assert list(domains(lab, "a2")) == ["demo-web-0"]
    state = _state(lab)
    assert state.hosts == {"a": new}
    assert {k: (v["host"], v["uri"]) for k, v in state.vms().items()} == {"demo-web-0": ("a", new)}


def test_an_old_uri_that_never_answers_again_can_be_forgotten(lab):
    lab.host("a")
    path = lab.write(WEB)
    with lab.guests():
        assert apply(lab, path).status == "ok"
        old = lab.hosts["a"]
        (lab.folder / "a.xml").unlink()  # the old URI leads nowhere any more
        lab.connector.close()
        new = lab.host("a2")
        moved = lab.write(WEB, hosts={"a": new})
        first = apply(lab, moved)
        gone = moved_name("a", old)
        assert first.status == "partial" and gone in first.unreachable()
        assert ("demo-web-0", "a") in {(o.vm, o.host) for o in first.outcomes if o.result == "created"}
        second = apply(lab, moved, forget_hosts=(gone,))
    assert second.status == "ok" and second.forgotten == {gone: {"uri": old, "vms": []}}
    assert _state(lab).hosts == {"a": new}


# -- one libvirt reached through the old URI and the new one ---------------------------------


def _vm(name: str, host: str, uri: str, uuid: str) -> inv.ActualVm:
    return inv.ActualVm(name=name, host=host, uri=uri, state="running", labels={}, attestation=None, uuid=uuid)


def _moved_state(tmp_path, *, uuid: str = "") -> FleetState:
    state = FleetState.load(tmp_path, "demo")
    state.remember_host("a", "test:///old")
    state.replace_vm("demo-web-0", {"phase": "ready", "host": "a", "uri": "test:///old", "uuid": uuid})
    state.relocate_moved({"a": "test:///new"})
    return state


GONE = moved_name("a", "test:///old")


def test_the_old_uri_of_the_same_libvirt_is_put_back_together(tmp_path):
    state = _moved_state(tmp_path)
    assert state.hosts == {"a": "test:///new", GONE: "test:///old"}
    assert state.vm("demo-web-0")["host"] == GONE
    views = {
        "a": inv.HostView("a", "test:///new", vms={"demo-web-0": _vm("demo-web-0", "a", "test:///new", "u1")}),
        GONE: inv.HostView(GONE, "test:///old", vms={"demo-web-0": _vm("demo-web-0", GONE, "test:///old", "u1")}),
    }
    assert set(settle_moved(views, state)) == {"a"}  # the same domain at both: one libvirt
    assert state.hosts == {"a": "test:///new"}
    assert state.vm("demo-web-0")["host"] == "a" and state.vm("demo-web-0")["uri"] == "test:///new"
    assert FleetState.load(tmp_path, "demo").hosts == {"a": "test:///new"}  # saved


def test_an_old_uri_that_is_gone_is_told_apart_by_the_uuid_the_state_recorded(tmp_path):
    """The machine got a new address: the old URI does not answer, but the domain the
    state file recorded there is at the new one."""
    state = _moved_state(tmp_path, uuid="u1")
    views = {
        "a": inv.HostView("a", "test:///new", vms={"demo-web-0": _vm("demo-web-0", "a", "test:///new", "u1")}),
        GONE: inv.HostView(GONE, "test:///old", error="no route to host"),
    }
    assert set(settle_moved(views, state)) == {"a"}
    assert state.hosts == {"a": "test:///new"}


def test_another_libvirt_at_the_old_uri_stays_apart_and_nothing_is_deleted_blind(tmp_path):
    state = _moved_state(tmp_path, uuid="u1")
    elsewhere = inv.HostView(GONE, "test:///old", vms={"demo-web-0": _vm("demo-web-0", GONE, "test:///old", "u1")})
    other = {
        "a": inv.HostView("a", "test:///new", vms={"demo-web-0": _vm("demo-web-0", "a", "test:///new", "u2")}),
        GONE: elsewhere,
    }
    assert settle_moved(other, state)[GONE] is elsewhere  # another domain at the new URI: emptied by the plan
    silent = {"a": inv.HostView("a", "test:///new", error="connection refused"), GONE: elsewhere}
    held = settle_moved(silent, state)[GONE]
    assert not held.reachable and "cannot tell yet whether test:///old reaches" in held.error  # nothing deleted
    assert state.hosts == {"a": "test:///new", GONE: "test:///old"}


def test_an_old_uri_another_host_of_the_file_has_now_goes_to_that_host(tmp_path):
    state = FleetState.load(tmp_path, "demo")
    state.remember_host("a", "test:///one")
    state.replace_vm("demo-web-0", {"phase": "ready", "host": "a", "uri": "test:///one"})
    state.relocate_moved({"a": "test:///two", "b": "test:///one"})  # a and b swapped places
    assert state.hosts == {"a": "test:///two"}
    assert state.vm("demo-web-0")["host"] == "b"
    state.relocate_moved({"a": "test:///two", "b": "test:///one"})  # idempotent
    assert state.vm("demo-web-0")["host"] == "b"
