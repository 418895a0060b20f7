"""Plan, apply and destroy on libvirt's test driver: several hosts (one host file each),
an unreachable host, a VM whose attestation is refused, drift, rolling replacement,
interrupted applies — every VM through the same bring-up as ``tdxvm launch``, its guest
side the real agent (``tests/fleet/guests.py``)."""

from __future__ import annotations

import hashlib
import os
import signal
import threading

import libvirt
import pytest

from tdxvm.fleet import inventory as inv
from tdxvm.fleet import planner, reconcile
from tdxvm.fleet.outcome import FleetEvent, quiet
from tdxvm.fleet.reconcile import ApplyOptions
from tdxvm.fleet.state import FleetLock, FleetLocked, FleetState
from tdxvm.launch import lifecycle
from tdxvm.launch import metadata as md
from tdxvm.launch.manifest import load_manifest
from tdxvm.launch.ownership import Controller
from tdxvm.launch.records import VmRecords
from tdxvm.launch.spec import VmSpec
from tdxvm.launch.volumes import overlay_name

from ..launch.test_lifecycle import FOREIGN
from .guests import DISK_SECRET, make_attestable_image, write_host

WEB3 = "    web:\n      template: small\n      replicas: 3\n      placement: [a, b]\n"


def apply(lab, path, **options):
    events = options.pop("events", None)
    cancel = options.pop("cancel", None)
    progress = options.pop("progress", events.append if events is not None else quiet)
    return reconcile.apply(
        lab.load(path),
        connector=lab.connector,
        secrets=lab.store,
        trust_for=lambda _b: lab.trust,
        state_dir=lab.folder / "state",
        options=ApplyOptions(poll=0.05, **options),
        progress=progress,
        cancel=cancel,
    )


def plan(lab, path):
    return planner.plan(lab.load(path), connector=lab.connector, state_dir=lab.folder / "state", secrets=lab.store)


def results(report):
    return {o.vm: o.result for o in report.outcomes}


def domains(lab, host):
    conn = lab.connector.get(lab.hosts[host])
    return {d.name(): (d.UUIDString(), d.isActive()) for d in conn.listAllDomains()}


def expected_unlock(lab) -> str:
    return hashlib.sha256(lab.store.get(DISK_SECRET)).hexdigest()


def test_unreachable_host_and_refused_vm(lab):
    lab.host("a", domains=[FOREIGN])
    lab.host("b")
    lab.unreachable("c")
    path = lab.write(
        "    web:\n      template: small\n      replicas: 3\n      placement: [a, b, c]\n"
        "    bad:\n      template: bad\n      replicas: 1\n      placement: [b]\n"
    )
    with lab.guests() as guests:
        report = apply(lab, path)
        assert results(report) == {
            "demo-web-0": "created",
            "demo-web-1": "created",
            "demo-web-2": "skipped",
            "demo-bad-0": "refused",
        }
        assert report.status == "refused" and set(report.plan.unreachable()) == {"c"}
        skipped = next(o for o in report.outcomes if o.vm == "demo-web-2")
        assert skipped.errors[0]["message"].startswith("host c unreachable: libvirt test driver test://")
        refused = next(o for o in report.outcomes if o.vm == "demo-bad-0")
        codes = [e["code"] for e in refused.errors]
        assert codes == ["measurement-mismatch", "vm-stopped"]
        assert refused.errors[0]["message"].startswith("quote field RTMR2 is ")
        # The refused VM never got a secret and is left stopped; the others did, exactly the disk's volume key.
        [bad] = guests.by_name("demo-bad-0")
        assert bad.unlocked is None and not bad.system_up
        assert domains(lab, "b")["demo-bad-0"][1] == 0
        for name in ("demo-web-0", "demo-web-1"):
            [g] = guests.by_name(name)
            assert g.unlocked == expected_unlock(lab) and g.system_up and not g.errors
        assert domains(lab, "a")["theirs"][1] == 1  # the foreign domain runs on, untouched
        [vm] = lifecycle.status(lab.connector.get(lab.hosts["b"]), "demo-bad-0", records=VmRecords.beside(lab.store))
        assert vm.attestation["verdict"] == "reject" and vm.labels[inv.FLEET] == "demo"
        # The host writes an accepted verdict into the refused VM's metadata: nothing reads it (the
        # plan below takes the verdict from the controller's record and still replaces the VM).
        forged = {"verdict": "accept", "tcb_status": "UpToDate", "reasons": []}
        bad_dom = lab.connector.get(lab.hosts["b"]).lookupByName("demo-bad-0")
        lifecycle.record_attestation(bad_dom, forged)
        assert md.from_domain_xml(bad_dom.XMLDesc(0)).attestation["verdict"] == "accept"

        # c answers now: a later apply finishes the job; the refused VM is tried again and refused again.
        lab.host("c")
        p = plan(lab, path)
        assert {(a.vm, a.kind) for a in p.changes} == {("demo-web-2", "create"), ("demo-bad-0", "replace")}
        assert (
            next(a for a in p.changes if a.vm == "demo-bad-0")
            .reasons[0]
            .startswith("failed attestation: [measurement-mismatch]")
        )
        report = apply(lab, path, destroy_refused=True)
        assert results(report) == {
            "demo-web-0": "unchanged",
            "demo-web-1": "unchanged",
            "demo-web-2": "created",
            "demo-bad-0": "refused",
        }
        assert "demo-bad-0" not in domains(lab, "b")  # --destroy-refused
        assert next(o for o in report.outcomes if o.vm == "demo-bad-0").errors[-1]["code"] == "vm-destroyed"
        assert all(g.unlocked is None for g in guests.by_name("demo-bad-0"))
        assert FleetState.load(lab.folder / "state", "demo").vm("demo-bad-0")["phase"] == "refused"


def test_apply_twice_does_nothing_and_destroy_removes_only_the_fleet(lab):
    lab.host("a", domains=[FOREIGN])
    lab.host("b")
    other = lab.write("    web:\n      template: small\n      replicas: 1\n      placement: [a]\n", name="other")
    path = lab.write(WEB3)
    conn_a = lab.connector.get(lab.hosts["a"])
    solo = VmSpec(name="solo", uri=lab.hosts["a"], image=lab.images.good, backend="emulated", vcpus=1, memory=256)
    lifecycle.prepare_domain(solo, load_manifest(lab.images.good), conn_a)  # a tdxvm VM outside any fleet
    with lab.guests():
        assert apply(lab, other).status == "ok"
        first = apply(lab, path)
        assert first.status == "ok" and set(results(first).values()) == {"created"}
        before = {
            h: {n: (u, conn.lookupByName(n).XMLDesc(0)) for n, (u, _) in domains(lab, h).items()}
            for h, conn in (("a", conn_a), ("b", lab.connector.get(lab.hosts["b"])))
        }
        second = apply(lab, path)
        assert second.status == "ok" and set(results(second).values()) == {"unchanged"}
        assert not second.plan.changes
        after = {
            h: {
                n: (u, lab.connector.get(lab.hosts[h]).lookupByName(n).XMLDesc(0))
                for n, (u, _) in domains(lab, h).items()
            }
            for h in ("a", "b")
        }
        assert after == before  # not one domain defined, started or changed
    st = planner.plan(lab.load(path), connector=lab.connector, state_dir=lab.folder / "state", secrets=lab.store)
    assert st.counts()["keep"] == 3
    report = reconcile.destroy_fleet(
        lab.load(path), connector=lab.connector, state_dir=lab.folder / "state", secrets=lab.store
    )
    assert report.status == "ok" and results(report) == {f"demo-web-{i}": "deleted" for i in range(3)}
    assert sorted(domains(lab, "a")) == ["other-web-0", "solo", "theirs"] and domains(lab, "b") == {}
    vols = {v.name() for v in conn_a.storagePoolLookupByName("tdxvm").listAllVolumes()}
    assert (
        overlay_name("solo") in vols and overlay_name("other-web-0") in vols and overlay_name("demo-web-0") not in vols
    )
    assert not (lab.folder / "state" / "demo.json").exists() and (lab.folder / "state" / "other.json").exists()


def test_template_change_rolls_one_replica_at_a_time(lab):
    lab.host("a")
    lab.host("b")
    path = lab.write(WEB3)
    with lab.guests() as guests:
        assert apply(lab, path).status == "ok"
        old_uuids = {n: u for h in ("a", "b") for n, (u, _) in domains(lab, h).items()}
        path = lab.write(
            WEB3,
            templates=f"    small:\n      image: {lab.images.good}\n      backend: emulated\n"
            "      vcpus: 2\n      memory: 256MiB\n",
        )
        p = plan(lab, path)
        assert [(a.kind, a.reasons) for a in p.actions] == [("replace", ("spec drift: vcpus: 1 -> 2",))] * 3
        serving_seen: list[int] = []
        events: list[FleetEvent] = []

        def watch(event):
            events.append(event)
            views = [
                inv.read_host(
                    lab.connector.get(lab.hosts[h]),
                    "demo",
                    h,
                    lab.hosts[h],
                    VmRecords.beside(lab.store),
                    controller=Controller.of(lab.store),
                )
                for h in ("a", "b")
            ]
            serving_seen.append(sum(v.serving for view in views for v in view.vms.values()))

        report = apply(lab, path, progress=watch)
        assert report.status == "ok" and set(results(report).values()) == {"replaced"}
        assert min(serving_seen) == 2  # N-1 of 3, never fewer
        order = [e.vm for e in events if e.phase == "define" and e.status == "start"]
        ends = [e.vm for e in events if e.phase == "result"]
        assert order == ends  # each replacement finished before the next began
        new = {n: u for h in ("a", "b") for n, (u, _) in domains(lab, h).items()}
        assert set(new) == set(old_uuids) and not set(new.values()) & set(old_uuids.values())
        for name in new:
            assert [g.unlocked for g in guests.by_name(name)] == [expected_unlock(lab)] * 2  # old boot, new boot
        assert (
            lifecycle.status(lab.connector.get(lab.hosts["a"]), "demo-web-0")[0].labels["spec_hash"]
            == lab.load(path).desired()[0].spec_hash
        )


def test_rollout_halts_when_a_replacement_is_refused(lab):
    lab.host("a")
    path = lab.write("    web:\n      template: small\n      replicas: 3\n      placement: [a]\n")
    with lab.guests():
        assert apply(lab, path).status == "ok"
        bad = (
            f"    small:\n      image: {lab.images.tampered}\n"
            "      backend: emulated\n      vcpus: 1\n      memory: 256MiB\n"
        )
        path = lab.write("    web:\n      template: small\n      replicas: 3\n      placement: [a]\n", templates=bad)
        report = apply(lab, path)
        assert report.status == "refused"
        assert results(report) == {"demo-web-0": "refused", "demo-web-1": "halted", "demo-web-2": "halted"}
        halted = next(o for o in report.outcomes if o.vm == "demo-web-1")
        assert halted.errors[0]["message"].startswith("rollout of deployment web halted: 2 of 3 replicas serve")
        views = inv.read_host(
            lab.connector.get(lab.hosts["a"]),
            "demo",
            "a",
            lab.hosts["a"],
            VmRecords.beside(lab.store),
            controller=Controller.of(lab.store),
        )
        assert sorted(n for n, v in views.vms.items() if v.serving) == [
            "demo-web-1",
            "demo-web-2",
        ]  # old template serves on


def test_image_drift_and_scaling(lab, tmp_path):
    lab.host("a")
    lab.host("b")
    image = make_attestable_image(tmp_path / "rebuilt")  # same artifacts as lab.images.good
    tmpl = f"    small:\n      image: {image}\n      backend: emulated\n      vcpus: 1\n      memory: 256MiB\n"
    path = lab.write(WEB3, templates=tmpl)
    with lab.guests():
        assert apply(lab, path).status == "ok"
        make_attestable_image(
            tmp_path / "rebuilt", name="fleet-v2", initrd=lab.images.v2.parent.joinpath("initrd.img").read_bytes()
        )
        p = plan(lab, path)
        assert {a.kind for a in p.actions} == {"replace"}
        assert p.actions[0].reasons[0].startswith(f"image drift: manifest {image} changed (sha256 ")
        assert apply(lab, path).status == "ok" and not plan(lab, path).changes
        # fewer replicas; a replica moved to the other host
        path = lab.write("    web:\n      template: small\n      placement: {b: 1}\n", templates=tmpl)
        p = plan(lab, path)
        assert {(a.kind, a.vm, a.host, a.reasons[0]) for a in p.changes} == {
            ("create", "demo-web-0", "b", "replica now placed on this host (was on a)"),
            ("delete", "demo-web-0", "a", "moved: replica now placed on host b"),
            ("delete", "demo-web-1", "b", "deployment web has fewer replicas now"),
            ("delete", "demo-web-2", "a", "deployment web has fewer replicas now"),
        }
        report = apply(lab, path)
        assert report.status == "ok"
        assert domains(lab, "a") == {} and list(domains(lab, "b")) == ["demo-web-0"]
        # a deployment removed from the file
        path = lab.write("    {}\n", templates=tmpl)
        assert [(a.kind, a.reasons) for a in plan(lab, path).changes] == [
            ("delete", ("deployment web is no longer in the file",))
        ]
        assert apply(lab, path).status == "ok" and domains(lab, "b") == {}


def test_a_moved_replica_whose_new_copy_fails_keeps_serving_where_it_was(lab):
    """The replica moves to a host where its bring-up fails: the old copy is not deleted (the
    new one is up first, or the old one stays)."""
    lab.host("a")
    path = lab.write("    web:\n      template: small\n      placement: {a: 1}\n")
    with lab.guests():
        assert apply(lab, path).status == "ok"
        # host b holds none of the image's volumes, and the test driver cannot upload them
        lab.hosts["b"] = write_host(lab.folder / "b.xml", [])
        moved = lab.write("    web:\n      template: small\n      placement: {b: 1}\n")
        report = apply(lab, moved)
    by_host = {(o.vm, o.host): o for o in report.outcomes}
    assert by_host[("demo-web-0", "b")].result == "failed"
    kept = by_host[("demo-web-0", "a")]
    assert kept.result == "halted" and kept.errors[0]["code"] == "new-copy-not-up"
    assert "its new copy on b did not come up (failed); the old replica keeps serving" in kept.errors[0]["message"]
    assert list(domains(lab, "a")) == ["demo-web-0"] and domains(lab, "a")["demo-web-0"][1]


def test_host_removed_from_the_file_is_emptied(lab):
    lab.host("a")
    lab.host("b")
    path = lab.write(WEB3)
    with lab.guests():
        assert apply(lab, path).status == "ok"
        path = lab.write(
            "    web:\n      template: small\n      replicas: 3\n      placement: [a]\n", hosts={"a": lab.hosts["a"]}
        )
        p = plan(lab, path)
        assert ("delete", "demo-web-1", "b", "host b is no longer in the file") in {
            (a.kind, a.vm, a.host, a.reasons[0]) for a in p.changes
        }
        assert apply(lab, path).status == "ok"
        assert domains(lab, "b") == {} and sorted(domains(lab, "a")) == ["demo-web-0", "demo-web-1", "demo-web-2"]
        assert FleetState.load(lab.folder / "state", "demo").hosts == {"a": lab.hosts["a"]}


def test_interrupted_apply_leaves_nothing_half_done_and_the_next_converges(lab):
    lab.host("a")
    lab.host("b")
    path = lab.write("    web:\n      template: small\n      replicas: 4\n      placement: [a, b]\n")
    cancel = threading.Event()

    def ctrl_c(event):
        if event.phase == "boot" and event.status == "start":
            cancel.set()  # what Ctrl-C does in the CLI

    with lab.guests() as guests:
        report = apply(lab, path, parallel=2, progress=ctrl_c, cancel=cancel)
        assert report.status == "interrupted" and set(results(report).values()) == {"interrupted"}
        assert domains(lab, "a") == {} and domains(lab, "b") == {}  # the VMs being brought up were removed
        assert all(g.unlocked is None for g in guests.guests.values())  # no secret went out
        records = FleetState.load(lab.folder / "state", "demo").vms()
        assert {r["phase"] for r in records.values()} <= {"interrupted"}
        report = apply(lab, path)
        assert report.status == "ok" and set(results(report).values()) == {"created"}
        assert not plan(lab, path).changes


def _terminated(signum, _frame):
    raise SystemExit(128 + signum)  # what the CLI's SIGTERM handler does (tdxvm.cli.output)


def test_sigterm_during_apply_unwinds_like_ctrl_c_then_exits_terminated(lab):
    """Under systemd or a CI cancel, SIGTERM comes first: nothing new starts, the VMs being
    brought up are removed, the state is saved, and only then the apply exits 143."""
    lab.host("a")
    lab.host("b")
    path = lab.write("    web:\n      template: small\n      replicas: 4\n      placement: [a, b]\n")
    sent = threading.Event()

    def sigterm(event):
        if event.phase == "boot" and event.status == "start" and not sent.is_set():
            sent.set()
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        with lab.guests() as guests:
            with pytest.raises(SystemExit) as exc:
                apply(lab, path, parallel=2, progress=sigterm)
            assert exc.value.code == 143
            assert domains(lab, "a") == {} and domains(lab, "b") == {}  # nothing left half made
            assert all(g.unlocked is None for g in guests.guests.values())  # no secret went out
            records = FleetState.load(lab.folder / "state", "demo").vms()
            assert {r["phase"] for r in records.values()} <= {"interrupted"}
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_sigterm_during_destroy_exits_terminated_too(lab):
    """As apply does: what was started is finished and recorded, nothing new starts, then 143
    (before, destroy -f exited 130 on SIGTERM)."""
    lab.host("a")
    path = lab.write("    web:\n      template: small\n      replicas: 3\n      placement: [a]\n")
    with lab.guests():
        assert apply(lab, path).status == "ok"
    sent = threading.Event()

    def sigterm(event):
        if event.phase == "result" and not sent.is_set():
            sent.set()
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        with pytest.raises(SystemExit) as exc:
            reconcile.destroy_fleet(
                lab.load(path),
                connector=lab.connector,
                state_dir=lab.folder / "state",
                secrets=lab.store,
                parallel=1,
                progress=sigterm,
            )
        assert exc.value.code == 143
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert 0 < len(domains(lab, "a")) < 3  # one deleted, the rest left for the next destroy


class Crash(BaseException):
    """The controller dies here (as under SIGKILL: nothing after it runs)."""


def test_crash_after_unlock_is_repaired_by_the_next_apply(lab):
    lab.host("a")
    path = lab.write("    web:\n      template: small\n      replicas: 2\n      placement: [a]\n")

    def crash(event):
        if event.vm == "demo-web-1" and event.phase == "ready" and event.status == "start":
            raise Crash  # after the disk key went to the attested guest, before the VM was brought up to the end

    conn = lab.connector.get(lab.hosts["a"])
    pool = conn.storagePoolLookupByName("tdxvm")
    with lab.guests() as guests:
        report = apply(lab, path, progress=crash, parallel=1)
        assert results(report) == {"demo-web-0": "created", "demo-web-1": "failed"}
        assert domains(lab, "a")["demo-web-1"][1] == 1  # left running, unlocked, not marked ready
        # and a crash between creating a VM's volumes and defining it: volumes, no domain
        pool.createXML(
            "<volume><name>demo-old-0.qcow2</name><capacity>1</capacity>"
            "<target><format type='qcow2'/></target></volume>",
            0,
        )
        FleetState.load(lab.folder / "state", "demo").update_vm(
            "demo-old-0", phase="creating", host="a", deployment="old"
        )
        p = plan(lab, path)
        assert {(a.kind, a.vm): a.reasons for a in p.changes} == {
            ("replace", "demo-web-1"): ("never brought up to the end (an earlier apply was interrupted or failed)",),
            ("delete", "demo-old-0"): ("left by an interrupted apply with no domain: its volumes are removed",),
        }
        report = apply(lab, path)
        assert report.status == "ok" and results(report) == {
            "demo-web-0": "unchanged",
            "demo-web-1": "replaced",
            "demo-old-0": "deleted",
        }
        assert "demo-old-0.qcow2" not in {v.name() for v in pool.listAllVolumes()}
        assert "demo-old-0" not in FleetState.load(lab.folder / "state", "demo").vms()
        assert len(guests.by_name("demo-web-1")) == 2 and not plan(lab, path).changes


def test_concurrent_apply_is_refused(lab):
    lab.host("a")
    path = lab.write(WEB3.replace("[a, b]", "[a]"))
    with (
        FleetLock(lab.folder / "state", "demo", "apply"),
        pytest.raises(FleetLocked, match=r"fleet demo is locked: another tdxvm apply"),
    ):
        apply(lab, path)
    assert domains(lab, "a") == {}


def test_a_domain_with_the_name_that_is_not_the_fleets_is_never_touched(lab):
    lab.host("a", domains=[FOREIGN.replace("<name>theirs</name>", "<name>demo-web-0</name>")])
    path = lab.write("    web:\n      template: small\n      replicas: 1\n      placement: [a]\n")
    with lab.guests():
        report = apply(lab, path)
    assert report.status == "partial" and results(report) == {"demo-web-0": "skipped"}
    assert "not created by tdxvm, not this fleet's: never touched" in report.outcomes[0].errors[0]["message"]
    dom = lab.connector.get(lab.hosts["a"]).lookupByName("demo-web-0")
    assert dom.isActive() and dom.UUIDString() == "11111111-2222-4333-8444-555555555555"
    report = reconcile.destroy_fleet(
        lab.load(path), connector=lab.connector, state_dir=lab.folder / "state", secrets=lab.store
    )
    assert report.status == "ok" and report.outcomes == []
    with pytest.raises(libvirt.libvirtError):
        lab.connector.get(lab.hosts["a"]).lookupByName("demo-web-1")
    assert lab.connector.get(lab.hosts["a"]).lookupByName("demo-web-0").isActive()


def test_test_driver_host_measures_only_the_manifests_bytes(lab, tmp_path):
    """On test:/// hosts the quote service reads the manifest's local files, checked against
    their hashes: a file changed after the build is never measured."""
    lab.host("a")
    image = make_attestable_image(tmp_path / "img")  # the same artifacts as lab.images.good, so the host has them
    (tmp_path / "img" / "initrd.img").write_bytes(b"changed after the build")
    tmpl = f"    small:\n      image: {image}\n      backend: emulated\n      vcpus: 1\n      memory: 256MiB\n"
    path = lab.write("    web:\n      template: small\n      replicas: 1\n      placement: [a]\n", templates=tmpl)
    with lab.guests() as guests:
        report = apply(lab, path)
    assert results(report) == {"demo-web-0": "failed"}
    assert "initrd.img differs from its manifest" in report.outcomes[0].errors[0]["message"]
    assert domains(lab, "a")["demo-web-0"][1] == 0 and guests.by_name("demo-web-0")[0].unlocked is None


def test_a_host_lost_during_the_work_is_reported_unreachable():
    """A host that answered the survey but whose libvirt went away under a VM's launch is
    listed with the hosts the survey could not reach, and the apply is partial."""
    from tdxvm.fleet.outcome import Outcome, Report
    from tdxvm.fleet.plan import Plan

    plan = Plan("demo", (), {"a": inv.HostView("a", "test:///a"), "c": inv.HostView("c", "qemu+ssh://c/system", "no")})
    lost = Outcome("demo-web-1", "b", "create", "failed", host_lost="lost the connection to libvirt at b")
    report = Report("demo", "apply", plan, [Outcome("demo-web-0", "a", "create", "created"), lost])
    assert report.unreachable() == {"b": "lost the connection to libvirt at b", "c": "no"}
    assert report.status == "partial" and report.to_dict()["unreachable_hosts"] == report.unreachable()
