"""A host of the fleet file whose URI changed: the fleet's VMs at its old URI are emptied
like those of a host that left the file, unless the old URI reaches the same libvirt
(docs/fleet.md, "A host's URI changes")."""

from __future__ import annotations

import json

from tdxvm.fleet import inventory as inv
from tdxvm.fleet.planner import settle_moved
from tdxvm.fleet.state import FleetState, moved_name

from ..launch.test_lifecycle import FOREIGN
from .test_apply import apply, domains, plan, results

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
        assert results(apply(lab, moved)) == {"demo-web-0": "unchanged"}  # the new copy's entry is its own
    assert domains(lab, "a") == {}  # nothing of the fleet is left running at the old URI
    assert list(domains(lab, "a2")) == ["demo-web-0"]
    state = _state(lab)
    assert state.hosts == {"a": new}
    assert {k: (v["host"], v["uri"]) for k, v in state.vms().items()} == {"demo-web-0": ("a", new)}


def _alias(lab, name: str) -> str:
    """A second URI for host ``name``'s libvirt. The test driver opens each URI anew, so
    the connector is told that this one reaches the same connection, as two URIs of one
    libvirtd do."""
    real = lab.hosts[name]
    link = lab.folder / f"{name}-alias.xml"
    link.symlink_to(lab.folder / f"{name}.xml")
    alias = f"test://{link}"
    opener = lab.connector.opener
    lab.connector.opener = lambda uri: lab.connector.get(real) if uri == alias else opener(uri)
    return alias


def test_a_new_uri_for_the_same_libvirt_deletes_nothing(lab):
    lab.host("a")
    path = lab.write(WEB)
    with lab.guests():
        assert apply(lab, path).status == "ok"
        [(uuid, _)] = domains(lab, "a").values()
        alias = _alias(lab, "a")
        moved = lab.write(WEB, hosts={"a": alias})
        assert not [a for a in plan(lab, moved).changes if a.kind == "delete"]
        report = apply(lab, moved)
        assert report.status == "ok" and results(report) == {"demo-web-0": "unchanged"}
    assert domains(lab, "a") == {"demo-web-0": (uuid, True)}
    state = _state(lab)
    assert state.hosts == {"a": alias} and state.vm("demo-web-0")["uri"] == alias


def test_a_host_renamed_at_another_uri_of_the_same_libvirt_keeps_its_vms(lab):
    """Out of the file, host a lists the domain host b of the file lists: they are one
    libvirt, and a's VMs are b's, not VMs of a host that left the file."""
    lab.host("a")
    path = lab.write(WEB)
    with lab.guests():
        assert apply(lab, path).status == "ok"
        [(uuid, _)] = domains(lab, "a").values()
        renamed = lab.write(
            "    web:\n      template: small\n      replicas: 1\n      placement: [b]\n",
            hosts={"b": _alias(lab, "a")},
        )
        assert not [a for a in plan(lab, renamed).changes if a.kind == "delete"]
        assert apply(lab, renamed).status == "ok"
    assert domains(lab, "a") == {"demo-web-0": (uuid, True)}


def test_while_the_new_uri_does_not_answer_nothing_at_the_old_one_is_touched(lab):
    old = lab.host("a")
    path = lab.write(WEB)
    with lab.guests():
        assert apply(lab, path).status == "ok"
        [(uuid, _)] = domains(lab, "a").values()
        report = apply(lab, lab.write(WEB, hosts={"a": lab.unreachable("a2")}))
    assert report.status == "partial"
    [held] = [o for o in report.outcomes if o.host == moved_name("a", old)]
    assert held.result == "skipped" and "left at host a's old URI for now: cannot tell yet" in held.errors[0]["message"]
    assert "--forget-host" not in held.errors[0]["message"]
    assert domains(lab, "a") == {"demo-web-0": (uuid, True)}


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


def test_a_moved_replica_whose_new_copy_is_skipped_is_not_deleted(lab):
    """Its new place holds a domain of that name that is not the fleet's (the same holds
    for an unreadable image or model): the new copy is skipped, so the old one stays."""
    lab.host("a")
    path = lab.write(WEB)
    with lab.guests():
        assert apply(lab, path).status == "ok"
        new = lab.host("a2", domains=[FOREIGN.replace("<name>theirs</name>", "<name>demo-web-0</name>")])
        report = apply(lab, lab.write(WEB, hosts={"a": new}))
    by_host = {o.host: o for o in report.outcomes if o.vm == "demo-web-0"}
    assert by_host["a"].result == "skipped"
    old = by_host[moved_name("a", lab.hosts["a"])]
    assert old.result == "halted" and old.errors[0]["code"] == "new-copy-not-up"
    assert "its new copy on a is skipped" in old.errors[0]["message"]
    assert list(domains(lab, "a")) == ["demo-web-0"]  # still there, still running
    assert report.status != "ok"


def test_a_replica_placed_on_another_host_where_it_is_skipped_stays_where_it_was(lab):
    """The same for a placement moved to another host of the file: before, the old copy
    was deleted at once, since a skip is no unit to wait for."""
    lab.host("a")
    lab.host("b", domains=[FOREIGN.replace("<name>theirs</name>", "<name>demo-web-0</name>")])
    path = lab.write("    web:\n      template: small\n      placement: {a: 1}\n")
    with lab.guests():
        assert apply(lab, path).status == "ok"
        report = apply(lab, lab.write("    web:\n      template: small\n      placement: {b: 1}\n"))
    by_host = {o.host: o for o in report.outcomes if o.vm == "demo-web-0"}
    assert by_host["b"].result == "skipped" and by_host["a"].result == "halted"
    assert list(domains(lab, "a")) == ["demo-web-0"]


def test_a_host_renamed_in_the_file_keeps_its_vms(lab):
    """A host out of the file whose URI a host of the file has now is that host: before,
    its VMs were deleted as those of a host that left the file, the same domains the
    renamed host was asked to keep."""
    uri = lab.host("a")
    path = lab.write(WEB)
    with lab.guests():
        assert apply(lab, path).status == "ok"
        [(uuid, _)] = domains(lab, "a").values()
        renamed = lab.write(
            "    web:\n      template: small\n      replicas: 1\n      placement: [b]\n", hosts={"b": uri}
        )
        p = plan(lab, renamed)
        assert not [a for a in p.changes if a.kind == "delete"]
        assert apply(lab, renamed).status == "ok"
    assert domains(lab, "a")["demo-web-0"][1]  # one domain of that name, running
    assert _state(lab).hosts == {"b": uri} and _state(lab).vm("demo-web-0")["host"] == "b"
    assert domains(lab, "a")["demo-web-0"][0] == uuid, "replaced"


# -- one libvirt reached through the old URI and the new one ---------------------------------


def _vm(name: str, host: str, uri: str, uuid: str) -> inv.ActualVm:
    return inv.ActualVm(name=name, host=host, uri=uri, state="running", labels={}, attestation=None, uuid=uuid)


def _view(name: str, uri: str, *uuids: str, error: str | None = None) -> inv.HostView:
    """A host listing a fleet VM demo-web-0 (the first UUID) and other domains (the rest)."""
    if error is not None:
        return inv.HostView(name, uri, error=error)
    vms = {"demo-web-0": _vm("demo-web-0", name, uri, uuids[0])} if uuids else {}
    return inv.HostView(name, uri, vms=vms, domains=frozenset(uuids))


def _moved_state(tmp_path, *, uuid: str = "") -> FleetState:
    state = FleetState.load(tmp_path, "demo")
    state.remember_host("a", "test:///old")
    state.replace_vm("demo-web-0", {"phase": "ready", "host": "a", "uri": "test:///old", "uuid": uuid})
    state.relocate_moved({"a": "test:///new"})
    return state


GONE = moved_name("a", "test:///old")


def test_the_old_uri_of_the_same_libvirt_is_put_back_together(tmp_path):
    state = _moved_state(tmp_path)
    assert state.hosts == {"a": "test:///old", GONE: "test:///old"}  # a: the URI it was last launched on
    assert state.vm("demo-web-0")["host"] == GONE
    assert FleetState.load(tmp_path, "demo").vm("demo-web-0")["host"] == "a"  # in memory until a save
    views = {"a": _view("a", "test:///new", "u1", "x"), GONE: _view(GONE, "test:///old", "u1", "x")}
    assert set(settle_moved(views, state, {"a"})) == {"a"}  # the same domains at both: one libvirt
    assert state.hosts == {"a": "test:///new"}
    assert (state.vm("demo-web-0")["host"], state.vm("demo-web-0")["uri"]) == ("a", "test:///new")


def test_two_uris_with_no_domain_at_all_are_not_told_apart_and_nothing_is_deleted(tmp_path):
    """An apply interrupted before any domain existed: no domain anywhere, so the old
    URI's entry (volumes to remove) may be the new one's: it goes back to the host."""
    state = _moved_state(tmp_path)
    views = {"a": _view("a", "test:///new"), GONE: _view(GONE, "test:///old")}
    assert set(settle_moved(views, state, {"a"})) == {"a"}
    assert state.vm("demo-web-0")["host"] == "a"


def test_an_old_uri_that_is_gone_is_told_apart_by_the_uuid_the_state_recorded(tmp_path):
    """The machine got a new address: the old URI does not answer, but the domain the
    state file recorded there is at the new one."""
    state = _moved_state(tmp_path, uuid="u1")
    views = {"a": _view("a", "test:///new", "u1"), GONE: _view(GONE, "test:///old", error="no route to host")}
    assert set(settle_moved(views, state, {"a"})) == {"a"}
    assert state.hosts == {"a": "test:///new"}


def test_another_libvirt_at_the_old_uri_stays_apart_and_nothing_is_deleted_blind(tmp_path):
    state = _moved_state(tmp_path, uuid="u1")
    elsewhere = _view(GONE, "test:///old", "u1")
    assert settle_moved({"a": _view("a", "test:///new", "u2", "y"), GONE: elsewhere}, state, {"a"})[GONE] is elsewhere
    assert settle_moved({"a": _view("a", "test:///new"), GONE: elsewhere}, state, {"a"})[GONE] is elsewhere  # none at a
    gone = _view(GONE, "test:///old", error="no route to host")
    assert settle_moved({"a": _view("a", "test:///new", "u2"), GONE: gone}, state, {"a"})[GONE] is gone
    held = settle_moved({"a": _view("a", "test:///new", error="connection refused"), GONE: elsewhere}, state, {"a"})[
        GONE
    ]
    assert not held.reachable and "cannot tell yet whether test:///old reaches" in held.error  # nothing deleted
    assert state.hosts == {"a": "test:///old", GONE: "test:///old"}


def test_an_old_uri_another_host_of_the_file_has_now_goes_to_that_host(tmp_path):
    state = FleetState.load(tmp_path, "demo")
    state.remember_host("a", "test:///one")
    state.replace_vm("demo-web-0", {"phase": "ready", "host": "a", "uri": "test:///one"})
    state.relocate_moved({"a": "test:///two", "b": "test:///one"})  # a and b swapped places
    assert GONE not in state.hosts and not any("@" in h for h in state.hosts)  # no old-URI host: b has it
    assert state.vm("demo-web-0")["host"] == "b"
    state.relocate_moved({"a": "test:///two", "b": "test:///one"})  # idempotent
    assert state.vm("demo-web-0")["host"] == "b"


def test_the_uri_a_host_was_last_launched_on_is_surveyed_without_entries(tmp_path):
    """A copy left there (halted, its entry moved on with the new copy) is not lost."""
    state = FleetState.load(tmp_path, "demo")
    state.remember_host("a", "test:///old")
    state.relocate_moved({"a": "test:///new"})
    assert state.hosts == {"a": "test:///old", GONE: "test:///old"}


def test_a_mistyped_uri_put_back_leaves_no_host_behind(tmp_path):
    state = _moved_state(tmp_path)  # the file said test:///new by mistake
    state.relocate_moved({"a": "test:///old"})  # put back
    assert state.hosts == {"a": "test:///old"}
    assert (state.vm("demo-web-0")["host"], state.vm("demo-web-0")["uri"]) == ("a", "test:///old")


def test_an_entry_an_older_tdxvm_wrote_gets_its_vms_uuid_on_the_next_apply(lab):
    lab.host("a")
    path = lab.write(WEB)
    file = lab.folder / "state" / "demo.json"
    with lab.guests():
        assert apply(lab, path).status == "ok"
        data = json.loads(file.read_text())
        uuid = data["vms"]["demo-web-0"].pop("uuid")
        file.write_text(json.dumps(data))
        assert results(apply(lab, path)) == {"demo-web-0": "unchanged"}
    assert _state(lab).vm("demo-web-0")["uuid"] == uuid
