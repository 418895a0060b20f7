"""A host gone for good, out of the file: every apply stays partial (exit 5) until
``--forget-host`` forgets it; only such a host can be forgotten (docs/fleet.md, Faults)."""

from __future__ import annotations

import pytest

from tdxvm.fleet.executor import FleetError
from tdxvm.fleet.state import FleetState

from .test_apply import apply

WEB = "    web:\n      template: small\n      replicas: 1\n      placement: [a]\n"


@pytest.fixture
def gone(lab):
    """Fleet demo on host a; the state file remembers VM demo-old-0 on host c, which never answers again."""
    lab.host("a")
    uri = lab.unreachable("c")
    path = lab.write(WEB, hosts={"a": lab.hosts["a"]})
    state = FleetState.load(lab.folder / "state", "demo")
    state.remember_host("c", uri)
    state.replace_vm("demo-old-0", {"phase": "ready", "host": "c", "uri": uri, "deployment": "old", "replica": 0})
    return path, uri


def test_a_host_gone_for_good_keeps_apply_partial_until_forgotten(lab, gone):
    path, uri = gone
    with lab.guests():
        first = apply(lab, path)
        assert first.status == "partial" and "c" in first.unreachable()
        [skipped] = [o for o in first.outcomes if o.vm == "demo-old-0"]
        assert "--forget-host c" in skipped.errors[0]["message"]
        second = apply(lab, path, forget_hosts=("c",))
    assert second.status == "ok" and second.forgotten == {"c": {"uri": uri, "vms": ["demo-old-0"]}}
    assert second.to_dict()["forgotten_hosts"] == {"c": {"uri": uri, "vms": ["demo-old-0"]}}
    state = FleetState.load(lab.folder / "state", "demo")
    assert "c" not in state.hosts and "demo-old-0" not in state.vms() and "demo-web-0" in state.vms()
    with lab.guests():
        assert apply(lab, path).status == "ok"  # and it stays forgotten


def test_only_a_host_out_of_the_file_that_does_not_answer_is_forgotten(lab, gone):
    path, _ = gone
    lab.host("b")
    FleetState.load(lab.folder / "state", "demo").remember_host("b", lab.hosts["b"])
    for name, words in (
        ("a", "still names host a; take it out of the file first"),
        ("zz", "no VMs on a host zz that the file left (hosts it still remembers out of the file: b, c)"),
        ("b", "answers: an apply without --forget-host deletes its VMs"),
    ):
        with pytest.raises(FleetError, match="forget") as refused:
            apply(lab, path, forget_hosts=("c", name))
        assert words in str(refused.value) and refused.value.code == "forget-host"
    assert "c" in FleetState.load(lab.folder / "state", "demo").hosts  # nothing was forgotten: each name first
