"""The plan, pure: desired VMs against hand-made host views and state records."""

from __future__ import annotations

import dataclasses

from tdxvm.fleet import inventory as inv
from tdxvm.fleet.inventory import ActualVm, ContestedVm, HostView
from tdxvm.fleet.plan import make_plan, model_ref
from tdxvm.fleet.spec import parse_fleet, spec_document
from tdxvm.launch.errors import ManifestError

FLEET = """\
apiVersion: tdxvm/v1
kind: Fleet
metadata: {name: f}
spec:
  hosts: {a: "test:///a.xml", b: "test:///b.xml"}
  templates:
    t: {image: /img/manifest.json, backend: emulated, vcpus: VCPUS, memory: 1GiB}
  deployments:
    web: {template: t, replicas: REPLICAS, placement: [a, b]}
"""
SHA = "ab" * 32


def desired(vcpus: int = 1, replicas: int = 2):
    return parse_fleet(FLEET.replace("VCPUS", str(vcpus)).replace("REPLICAS", str(replicas))).desired()


def actual(
    d, *, host=None, spec_hash=None, image_sha=SHA, state="running", verdict="accept", ready=True, **labels
) -> ActualVm:
    all_labels = {
        inv.FLEET: "f",
        inv.DEPLOYMENT: d.deployment,
        inv.SPEC_HASH: spec_hash or d.spec_hash,
        inv.IMAGE_SHA: image_sha,
        **({inv.READY_AT: "2026-01-01T00:00:00Z"} if ready else {}),
        **labels,
    }
    att = (
        None
        if verdict is None
        else {
            "verdict": verdict,
            "reasons": [{"code": "measurement-mismatch", "message": "RTMR2 differs"}] if verdict == "reject" else [],
        }
    )
    return ActualVm(
        name=d.name,
        host=host or d.host,
        uri=f"test:///{host or d.host}.xml",
        state=state,
        labels=all_labels,
        attestation=att,
    )


def views(*vms: ActualVm, unreachable: dict[str, str] | None = None, foreign: dict[str, dict[str, str]] | None = None):
    out = {}
    for h in ("a", "b"):
        if h in (unreachable or {}):
            out[h] = HostView(h, f"test:///{h}.xml", error=unreachable[h])
        else:
            out[h] = HostView(
                h, f"test:///{h}.xml", vms={v.name: v for v in vms if v.host == h}, foreign=(foreign or {}).get(h, {})
            )
    return out


def applied(a: ActualVm) -> dict:
    """The state file's entry of a VM an apply launched as ``a``'s labels say (the host's
    labels themselves decide nothing: test_labels_the_host_rewrites_decide_nothing)."""
    return {
        "host": a.host,
        inv.SPEC_HASH: a.labels.get(inv.SPEC_HASH),
        inv.IMAGE_SHA: a.labels.get(inv.IMAGE_SHA),
        "phase": "ready" if a.labels.get(inv.READY_AT) else "creating",
    }


def plan(ds, hosts, *, records=None, shas=None):
    """The plan; without ``records``, the state file describes every VM on the hosts as launched."""
    if records is None:
        records = {name: applied(a) for view in hosts.values() for name, a in view.vms.items()}
    return make_plan(
        "f", ds, hosts, file_hosts={"a", "b"}, image_shas=shas or {"/img/manifest.json": SHA}, records=records
    )


def kinds(p):
    return [(a.kind, a.vm, a.host) for a in p.actions]


def test_new_fleet_creates_everything():
    p = plan(desired(), views())
    assert kinds(p) == [("create", "f-web-0", "a"), ("create", "f-web-1", "b")]
    assert all(a.reasons == ("new replica",) for a in p.actions)
    assert p.counts() == {"create": 2, "replace": 0, "delete": 0, "keep": 0, "skip": 0}


def test_matching_fleet_keeps_everything():
    ds = desired()
    p = plan(ds, views(*(actual(d) for d in ds)))
    assert kinds(p) == [("keep", "f-web-0", "a"), ("keep", "f-web-1", "b")] and not p.changes


def test_spec_drift_names_the_changed_keys():
    old = desired(vcpus=1)
    new = desired(vcpus=2)
    hosts = views(*(actual(d, spec_hash=o.spec_hash) for d, o in zip(new, old, strict=True)))
    records = {d.name: {**applied(hosts[d.host].vms[d.name]), "spec": spec_document(d.spec)} for d in old}
    p = plan(new, hosts, records=records)
    assert [a.kind for a in p.actions] == ["replace", "replace"]
    assert p.actions[0].reasons == ("spec drift: vcpus: 1 -> 2",)
    assert p.actions[0].serving  # rolling: it serves now
    # without the spec it was applied with, the hashes say it
    p = plan(new, hosts)
    assert (
        p.actions[0].reasons[0].startswith(f"spec drift: spec hash {old[0].spec_hash[:12]} -> {new[0].spec_hash[:12]}")
    )


def test_image_drift():
    ds = desired()
    p = plan(ds, views(*(actual(d, image_sha="cd" * 32) for d in ds)))
    assert p.actions[0].kind == "replace"
    assert p.actions[0].reasons == (
        f"image drift: manifest /img/manifest.json changed (sha256 {'cd' * 6} -> {'ab' * 6})",
    )


def test_labels_the_host_rewrites_decide_nothing():
    """The host relabels a VM of the old image as current (to keep it from being replaced
    by a fixed image): the state file says what it was launched with, so it is replaced.
    Labels that say "old" on a VM the state file calls current change nothing either."""
    ds = desired()
    hosts = views(*(actual(d) for d in ds))  # every label says: current spec, current image, ready
    records = {name: {**applied(a), inv.IMAGE_SHA: "cd" * 32} for name, a in hosts["a"].vms.items()}
    records |= {name: applied(a) for name, a in hosts["b"].vms.items()}
    p = plan(ds, hosts, records=records)
    assert kinds(p) == [("replace", "f-web-0", "a"), ("keep", "f-web-1", "b")]
    assert p.actions[0].reasons == (
        f"image drift: manifest /img/manifest.json changed (sha256 {'cd' * 6} -> {'ab' * 6})",
    )
    stale = views(*(actual(d, spec_hash="ee" * 32, image_sha="cd" * 32, ready=False) for d in ds))
    assert [a.kind for a in plan(ds, stale, records={d.name: applied(actual(d)) for d in ds}).actions] == ["keep"] * 2


def test_a_vm_the_state_file_does_not_describe_is_replaced():
    """No entry (the state file was lost or is another's), or an entry for another host:
    nothing the controller holds says what runs there."""
    ds = desired()
    hosts = views(*(actual(d) for d in ds))
    p = plan(ds, hosts, records={ds[1].name: {**applied(hosts["b"].vms[ds[1].name]), "host": "a"}})
    assert [a.kind for a in p.actions] == ["replace", "replace"]
    assert p.actions[0].reasons == ("not what this controller launched here (no entry in the fleet's state file)",)
    assert p.actions[1].reasons == (
        "not what this controller launched here (its entry is for host a in the fleet's state file)",
    )


def test_refused_stopped_and_unfinished_vms_are_replaced():
    ds = desired(replicas=4)
    p = plan(
        ds,
        views(
            actual(ds[0], verdict="reject", state="shut-off", ready=False),
            actual(ds[1], state="shut-off"),
            actual(ds[2], verdict=None, ready=False),
            actual(ds[3], ready=False),
        ),
    )
    assert [a.kind for a in p.actions] == ["replace"] * 4
    assert p.actions[0].reasons == ("failed attestation: [measurement-mismatch] RTMR2 differs",)
    assert p.actions[1].reasons == ("not running (shut-off)",)
    assert p.actions[2].reasons == ("never brought up to the end (an earlier apply was interrupted or failed)",)
    assert p.actions[3].reasons == p.actions[2].reasons
    assert not any(a.serving for a in p.actions)


def test_deletes_say_why():
    ds = desired(replicas=4)
    now = desired(replicas=1)
    stray = ActualVm(
        name="f-old-0",
        host="b",
        uri="test:///b.xml",
        state="running",
        labels={inv.FLEET: "f", inv.DEPLOYMENT: "old"},
        attestation=None,
    )
    moved = actual(ds[0], host="b")  # f-web-0 now runs on b, but belongs on a
    p = plan(now, views(moved, actual(ds[1]), actual(ds[2]), actual(ds[3]), stray))
    got = {(a.kind, a.vm, a.host): a.reasons for a in p.actions}
    assert got == {
        ("create", "f-web-0", "a"): ("replica now placed on this host (was on b)",),
        ("delete", "f-web-0", "b"): ("moved: replica now placed on host a",),
        ("delete", "f-web-1", "b"): ("deployment web has fewer replicas now",),
        ("delete", "f-web-2", "a"): ("deployment web has fewer replicas now",),
        ("delete", "f-web-3", "b"): ("deployment web has fewer replicas now",),
        ("delete", "f-old-0", "b"): ("deployment old is no longer in the file",),
    }


def test_unreachable_host_is_skipped_and_the_rest_planned():
    ds = desired(replicas=3)
    records = {"f-gone-0": {"host": "b", "deployment": "gone", "phase": "ready"}, ds[0].name: applied(actual(ds[0]))}
    p = plan(
        ds, views(actual(ds[0]), unreachable={"b": "cannot connect to libvirt at test:///b.xml: no"}), records=records
    )
    assert kinds(p) == [
        ("keep", "f-web-0", "a"),
        ("skip", "f-web-1", "b"),
        ("create", "f-web-2", "a"),
        ("skip", "f-gone-0", "b"),
    ]
    assert p.actions[1].reasons == ("host b unreachable: cannot connect to libvirt at test:///b.xml: no",)
    assert "not asked for any more, but host b is unreachable" in p.actions[3].reasons[0]
    assert p.unreachable() == {"b": "cannot connect to libvirt at test:///b.xml: no"}


def test_a_name_held_by_another_domain_is_never_touched():
    ds = desired()
    p = plan(ds, views(foreign={"a": {"f-web-0": "not created by tdxvm"}}))
    assert (
        p.actions[0].kind == "skip"
        and "f-web-0 on a is not created by tdxvm, not this fleet's: never touched" in p.actions[0].reasons[0]
    )


def test_the_fleets_vms_of_another_controller_are_skipped_whether_asked_for_or_not():
    ds = desired()
    theirs = {
        n: ContestedVm(n, "a", "running", dep, "controller 0123456789abcdef's (this controller is fedcba9876543210)")
        for n, dep in (("f-web-0", "web"), ("f-api-0", "api"), ("f-old-0", ""))
    }
    hosts = views(actual(ds[1]), foreign={"a": {n: c.owner for n, c in theirs.items()}})
    hosts["a"] = dataclasses.replace(hosts["a"], contested=theirs)
    records = {"f-old-0": {"host": "a", "phase": "creating"}}  # a leftover whose name another's VM holds now
    records[ds[1].name] = applied(hosts["b"].vms[ds[1].name])
    p = plan(ds, hosts, records=records)
    assert kinds(p) == [
        ("skip", "f-web-0", "a"),
        ("keep", "f-web-1", "b"),
        ("skip", "f-api-0", "a"),
        ("skip", "f-old-0", "a"),
    ]  # never replaced or deleted, and no sweep of the leftover's volumes either
    assert p.actions[0].reasons == (
        "f-web-0 on a carries fleet f's label but is controller 0123456789abcdef's (this controller is "
        "fedcba9876543210); never touched: one controller owns a fleet, apply it from the one that owns this VM "
        "(docs/fleet.md, 'One controller per fleet')",
    )
    assert [a.deployment for a in p.actions] == ["web", "web", "api", None]


def test_unreadable_image_skips_its_vms():
    unreadable = ManifestError("image manifest /img/manifest.json: no such file")  # Images.read names the manifest
    p = plan(desired(), views(), shas={"/img/manifest.json": unreadable})
    assert [a.kind for a in p.actions] == ["skip", "skip"] and p.actions[0].reasons == (
        "image manifest /img/manifest.json: no such file",
    )


def test_interrupted_leftovers():
    ds = desired()
    records = {
        "f-web-0": {"host": "a", "phase": "creating"},
        "f-web-1": {"host": "b", "phase": "refused", "reasons": ["[x] y"]},
        "f-old-0": {"host": "a", "phase": "creating", "deployment": "old"},
        "f-old-1": {"host": "a", "phase": "ready"},
    }
    p = plan(ds, views(), records=records)
    got = {(a.kind, a.vm): a.reasons for a in p.actions}
    assert got == {
        ("create", "f-web-0"): ("an earlier apply did not finish it (creating)",),
        ("create", "f-web-1"): ("an earlier apply was refused at attestation ([x] y)",),
        ("delete", "f-old-0"): ("left by an interrupted apply with no domain: its volumes are removed",),
    }


# -- where images and models lie, and what they hold -----------------------------------------

MODEL_FLEET = FLEET.replace("memory: 1GiB}", "memory: 1GiB, model: {path: MODEL}}")
M1, M2 = "sha256:" + "11" * 32, "sha256:" + "22" * 32


def with_model(path: str = "/models/m", image: str = "/img/manifest.json"):
    text = MODEL_FLEET.replace("MODEL", path).replace("/img/manifest.json", image).replace("VCPUS", "1")
    return parse_fleet(text.replace("REPLICAS", "1")).desired()


def launched(d, model_digest: str | None = M1) -> dict:
    """The state file's entry of ``d`` as an apply launched it (spec document included)."""
    entry = {**applied(actual(d)), "spec": spec_document(d.spec)}
    return entry if model_digest is None else {**entry, inv.MODEL_DIGEST: model_digest}


def model_plan(ds, entry, *, models, image_sha=SHA):
    hosts = views(*(actual(d) for d in ds))
    shas = {str(d.spec.image): image_sha for d in ds}
    return make_plan(
        "f", ds, hosts, file_hosts={"a", "b"}, image_shas=shas, records={ds[0].name: entry}, model_digests=models
    )


def test_an_image_or_model_folder_moved_with_the_same_contents_changes_nothing():
    """Moving the build or the encrypted weights elsewhere (and editing the file to match)
    would have replaced every VM: the spec's paths changed. Their contents decide."""
    [before] = with_model()
    [after] = with_model(path="/srv/models/m", image="/srv/img/manifest.json")
    assert after.spec_hash != before.spec_hash
    p = model_plan([after], launched(before), models={model_ref(after.spec.model): M1})
    assert [(a.kind, a.reasons) for a in p.actions] == [("keep", ())]


def test_a_model_encrypted_again_in_place_with_other_weights_is_rolled_out():
    [d] = with_model()
    p = model_plan([d], launched(d), models={model_ref(d.spec.model): M2})
    assert [a.kind for a in p.actions] == ["replace"]
    assert p.actions[0].reasons == (f"model drift: /models/m holds another model (digest {'11' * 6} -> {'22' * 6})",)
    # the same weights encrypted again (new key, new ciphertext): the same model
    assert [a.kind for a in model_plan([d], launched(d), models={model_ref(d.spec.model): M1}).actions] == ["keep"]


def test_a_moved_folder_with_other_contents_is_drift_and_older_entries_stay_put():
    [before] = with_model()
    [after] = with_model(path="/srv/models/m")
    p = model_plan([after], launched(before), models={model_ref(after.spec.model): M2})
    assert [a.kind for a in p.actions] == ["replace"]
    assert p.actions[0].reasons[0].startswith("spec drift: model: {")
    assert p.actions[0].reasons[1].startswith("model drift: /srv/models/m holds another model")
    # an entry of an earlier tdxvm records no model digest: the folder in place is taken as unchanged
    p = model_plan([before], launched(before, model_digest=None), models={model_ref(before.spec.model): M2})
    assert [a.kind for a in p.actions] == ["keep"]


def test_a_model_that_cannot_be_read_skips_its_vms():
    [d] = with_model()
    error = ManifestError("model /models/m (key weights/m): secret weights/m is not in /s")
    p = model_plan([d], launched(d), models={model_ref(d.spec.model): error})
    assert [(a.kind, a.reasons) for a in p.actions] == [("skip", (str(error),))]
