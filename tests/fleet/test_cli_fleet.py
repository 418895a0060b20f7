"""``tdxvm plan|apply|status|destroy -f`` on libvirt's test driver: exit codes, outputs,
confirmation, the lock, and ``status``/``destroy`` still taking a VM name.

The CLI's connections are the process's (:func:`tdxvm.fleet.inventory.shared_connector`),
so the test-driver hosts keep their state from one command to the next; the guests'
side watches the same connections.
"""

from __future__ import annotations

import json
import os

import pytest
import yaml

from tdxvm.fleet.inventory import reset_shared_connector, shared_connector
from tdxvm.fleet.state import FleetLock, FleetState
from tdxvm.launch import lifecycle
from tdxvm.secretstore import SecretStore
from tdxvm.sshkey import controller_id
from tests.clirun import run

from ..launch.test_lifecycle import FOREIGN
from .guests import put_test_secrets

WEB = "    web:\n      template: small\n      replicas: 3\n      placement: [a, b, c]\n"


@pytest.fixture
def cli_lab(lab, tmp_path, monkeypatch):
    """The lab, with the CLI's own connector, secret store, emulated platform and state dir."""
    reset_shared_connector()
    lab.connector = shared_connector()
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("TDXVM_STATE_DIR", str(tmp_path / "state"))
    put_test_secrets(SecretStore())
    lab.store = SecretStore()
    yield lab
    reset_shared_connector()


def test_partial_apply_then_the_next_finishes_then_nothing_to_do(cli_lab, capsys):
    cli_lab.host("a")
    cli_lab.host("b")
    cli_lab.unreachable("c")
    path = cli_lab.write(WEB)
    code, out, _ = run(capsys, "plan", "-f", path)
    assert code == 5
    assert "fleet demo: 2 to create, 0 to replace, 0 to delete, 0 unchanged, 1 cannot be handled now" in out
    assert "+  demo-web-0  on a  create  new replica" in out and "!  demo-web-2  on c  skip" in out
    assert "host c unreachable: libvirt test driver" in out
    with cli_lab.guests():
        code, out, err = run(capsys, "apply", "-f", path, "--yes", "-o", "json")
        assert code == 5, err
        doc = json.loads(out)
        assert doc["status"] == "partial" and doc["summary"] == {"created": 2, "skipped": 1}
        assert [v["result"] for v in doc["vms"]] == ["created", "created", "skipped"]
        assert doc["vms"][0]["tcb_status"] == "UpToDate" and doc["vms"][0]["endpoint"].startswith("127.0.0.1:")
        assert (
            doc["vms"][2]["errors"][0]["message"].startswith("host c unreachable") and "c" in doc["unreachable_hosts"]
        )
        assert "plan" not in out.split("{", 1)[0]  # stdout is the one JSON document; the plan went to stderr
        cli_lab.host("c")
        code, out, err = run(capsys, "apply", "-f", path, "--yes")
        assert code == 0, out + err
        assert "fleet demo: apply ok in" in out and "1 created, 2 unchanged" in out
        assert "demo-web-2 on c: created" in err  # progress
        code, out, _ = run(capsys, "apply", "-f", path, "--yes")
        assert code == 0 and "nothing to do: the hosts match the file" in out and "3 unchanged" in out


def test_status_outputs(cli_lab, capsys):
    cli_lab.host("a")
    cli_lab.host("b")
    cli_lab.host("c")
    path = cli_lab.write(WEB)
    with cli_lab.guests():
        assert run(capsys, "apply", "-f", path, "--yes")[0] == 0
    code, out, _ = run(capsys, "status", "-f", path)
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == [
        "VM",
        "HOST",
        "STATE",
        "ATTESTATION",
        "TCB",
        "MEASUREMENTS",
        "ENDPOINT",
        "LAST",
        "ATTESTED",
        "SYNC",
    ]
    assert [r.split()[:5] for r in rows] == [
        [f"demo-web-{i}", h, "running", "accept", "UpToDate"] for i, h in enumerate("abc")
    ]
    assert all(r.rstrip().endswith("in sync") for r in rows)
    code, out, _ = run(capsys, "status", "-f", path, "-o", "json")
    doc = json.loads(out)
    vm = doc["vms"][0]
    assert set(vm) == {
        "vm",
        "deployment",
        "host",
        "state",
        "verdict",
        "tcb_status",
        "measurements_digest",
        "endpoint",
        "last_attested",
        "sync",
        "reasons",
    }
    assert len(vm["measurements_digest"]) == 64 and vm["last_attested"].endswith("Z")
    assert len({v["measurements_digest"] for v in doc["vms"]}) == 1  # same image, same measurements
    code, out, _ = run(capsys, "status", "-f", path, "-o", "yaml")
    assert code == 0 and yaml.safe_load(out) == doc
    # a VM removed outside the fleet shows as missing
    lifecycle.destroy(shared_connector().get(cli_lab.hosts["b"]), "demo-web-1")
    doc = json.loads(run(capsys, "status", "-f", path, "-o", "json")[1])
    assert doc["vms"][1]["state"] == "missing" and doc["vms"][1]["sync"] == "create"


def test_refused_vm_exit_1_with_every_reason(cli_lab, capsys):
    cli_lab.host("a")
    path = cli_lab.write("    bad:\n      template: bad\n      replicas: 1\n      placement: [a]\n")
    with cli_lab.guests():
        code, out, _ = run(capsys, "apply", "-f", path, "--yes")
    assert code == 1
    assert "fleet demo: apply refused" in out and "demo-bad-0  a     create  refused" in out
    assert "- [measurement-mismatch] quote field RTMR2 is " in out
    assert "- [vm-stopped] nothing was released; the VM is left stopped" in out
    doc = json.loads(run(capsys, "status", "-f", path, "-o", "json")[1])
    assert doc["vms"][0]["state"] == "shut-off" and doc["vms"][0]["verdict"] == "reject"
    assert doc["vms"][0]["sync"] == "replace" and doc["vms"][0]["reasons"][0].startswith(
        "failed attestation: [measurement-mismatch]"
    )


def test_confirmation_and_destroy(cli_lab, capsys):
    cli_lab.host("a", domains=[FOREIGN])
    path = cli_lab.write("    web:\n      template: small\n      replicas: 2\n      placement: [a]\n")
    code, _, err = run(capsys, "apply", "-f", path)
    assert code == 2 and "apply would change 2 VMs of fleet demo; pass --yes" in err
    conn = shared_connector().get(cli_lab.hosts["a"])
    assert [d.name() for d in conn.listAllDomains()] == ["theirs"]  # nothing was done
    with cli_lab.guests():
        assert run(capsys, "apply", "-f", path, "-y")[0] == 0
    code, _, err = run(capsys, "destroy", "-f", path)
    assert code == 2 and "destroy deletes 2 VMs of fleet demo" in err and "pass --yes" in err
    code, out, _ = run(capsys, "destroy", "-f", path, "--yes", "-o", "json")
    doc = json.loads(out)
    assert (
        code == 0
        and doc["status"] == "ok"
        and {v["vm"]: v["result"] for v in doc["vms"]} == {"demo-web-0": "deleted", "demo-web-1": "deleted"}
    )
    assert [d.name() for d in conn.listAllDomains()] == ["theirs"]
    code, _, err = run(capsys, "destroy", "theirs", "--uri", cli_lab.hosts["a"], "--yes")
    assert code == 2 and "not created by tdxvm" in err  # the name form, as before


def test_concurrent_apply_is_refused_with_the_holder(cli_lab, capsys, tmp_path):
    cli_lab.host("a")
    path = cli_lab.write("    web:\n      template: small\n      replicas: 1\n      placement: [a]\n")
    with FleetLock(tmp_path / "state", "demo", "apply"):
        code, _, err = run(capsys, "apply", "-f", path, "--yes")
        assert (
            code == 2
            and "error: fleet demo is locked: another tdxvm apply holds" in err
            and f"pid {os.getpid()}" in err
        )
        code, out, _ = run(capsys, "destroy", "-f", path, "--yes", "-o", "json")
        assert code == 2 and json.loads(out)["error"]["code"] == "fleet-locked"


def test_a_second_controller_is_told_and_touches_nothing(cli_lab, capsys, tmp_path, monkeypatch):
    """Another controller (its own secret store and state folder) with the same fleet file:
    plan, apply and destroy exit 5 naming the VMs' controller; status lists them."""
    cli_lab.host("a")
    path = cli_lab.write("    web:\n      template: small\n      replicas: 1\n      placement: [a]\n")
    with cli_lab.guests():
        assert run(capsys, "apply", "-f", path, "--yes")[0] == 0
    first = controller_id(SecretStore())
    conn = shared_connector().get(cli_lab.hosts["a"])
    uuid = conn.lookupByName("demo-web-0").UUIDString()
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "second"))
    monkeypatch.setenv("TDXVM_STATE_DIR", str(tmp_path / "second-state"))
    put_test_secrets(SecretStore())
    code, out, _ = run(capsys, "plan", "-f", path)
    assert code == 5 and "0 to create, 0 to replace, 0 to delete, 0 unchanged, 1 cannot be handled now" in out
    assert (
        f"!  demo-web-0  on a  skip  demo-web-0 on a carries fleet demo's label but is controller {first}'s "
        "(this controller has no key yet); never touched" in out
    )
    assert not SecretStore().exists("ssh/controller")  # a plan makes no key
    with cli_lab.guests():
        code, out, _ = run(capsys, "apply", "-f", path, "--yes")
    second = controller_id(SecretStore())
    assert code == 5 and "fleet demo: apply partial" in out and "1 skipped" in out
    assert f"- [other-controller] demo-web-0 on a carries fleet demo's label but is controller {first}'s (this " in out
    assert f"(this controller is {second}); never touched" in out
    assert "VMs with fleet demo's label that another controller owns were left untouched" in out
    assert "run the apply again" not in out  # it would not help
    doc = json.loads(run(capsys, "status", "-f", path, "-o", "json")[1])
    assert [(v["vm"], v["state"], v["sync"]) for v in doc["vms"]] == [("demo-web-0", "running", "other controller")]
    code, out, _ = run(capsys, "destroy", "-f", path, "--yes", "-o", "json")
    doc = json.loads(out)
    assert code == 5 and doc["status"] == "partial" and doc["vms"][0]["errors"][0]["code"] == "other-controller"
    dom = conn.lookupByName("demo-web-0")
    assert dom.UUIDString() == uuid and dom.isActive()  # never replaced, never destroyed


def test_file_errors_and_help(cli_lab, capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: tdxvm/v1\nkind: Fleet\nmetadata: {name: x}\nspec:\n  hosts: {a: qemu:///system}\n  extra: 1\n"
    )
    for verb in ("plan", "apply", "status", "destroy"):
        code, _, err = run(capsys, verb, "-f", bad)
        assert code == 2 and f"{bad}:6: spec.extra: unknown key" in err and "Traceback" not in err
    code, out, _ = run(capsys, "status", "--help")
    assert (
        code == 0
        and "Usage: tdxvm status [OPTIONS] [NAME]" in out
        and "With -f, for a fleet" in out
        and "--file FLEET.yaml" in out
    )
    code, out, _ = run(capsys, "destroy", "-f", bad, "--help")
    assert code == 0 and "every VM fleet" in out and "[NAME]" not in out


CTRL_C_SCRIPT = """
import json, os, signal, sys
from pathlib import Path
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if the test runs in the background
tmp = Path(sys.argv[1])
os.environ["XDG_DATA_HOME"] = str(tmp / "data"); os.environ["TDXVM_STATE_DIR"] = str(tmp / "state")
from tests.fleet.guests import TestDriverGuests, make_attestable_image, put_test_secrets, write_host
from tdxvm.cli import main
from tdxvm.fleet.inventory import shared_connector
from tdxvm.launch import metadata as md
from tdxvm.secretstore import SecretStore
image = make_attestable_image(tmp / "image")
hosts = {h: write_host(tmp / f"{h}.xml", [image]) for h in ("a", "b")}
put_test_secrets(SecretStore())
(tmp / "fleet.yaml").write_text(
    "apiVersion: tdxvm/v1\\nkind: Fleet\\nmetadata: {name: demo}\\nspec:\\n"
    f"  hosts: {json.dumps(hosts)}\\n  templates:\\n"
    f"    t: {{image: {image}, backend: emulated, vcpus: 1, memory: 256MiB}}\\n"
    "  deployments:\\n    web: {template: t, replicas: 6, placement: [a, b]}\\n")
with TestDriverGuests(shared_connector(), hosts.values(), tmp / "guests") as guests:
    code = main(["apply", "-f", str(tmp / "fleet.yaml"), "--yes", "--parallel", "2"])
    left = {}
    for h, uri in hosts.items():
        for d in shared_connector().get(uri).listAllDomains():
            meta = md.from_domain_xml(d.XMLDesc(0))
            left[d.name()] = {"active": bool(d.isActive()), "ready": bool(meta.labels.get("ready_at"))}
    unlocked = sorted(g.name for g in guests.guests.values() if g.unlocked)
print(json.dumps({"code": code, "left": left, "unlocked": unlocked}))
"""


def test_ctrl_c_stops_cleanly(tmp_path):
    """A real SIGINT to `tdxvm apply` (in a child process: a test-driver host lives as long
    as the process holding it): VMs being brought up are removed, nothing half-done stays."""
    import signal
    import subprocess
    import sys

    from ..attested_guest import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", CTRL_C_SCRIPT, str(tmp_path)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stderr:
            if ": created" in line:  # the first VM is up; others are on their way
                proc.send_signal(signal.SIGINT)
                break
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    doc = json.loads(out.splitlines()[-1])
    assert doc["code"] == 130, out + err
    assert "fleet demo: apply interrupted" in out
    assert doc["left"] and all(vm["ready"] and vm["active"] for vm in doc["left"].values())  # only finished VMs stay
    assert len(doc["left"]) < 6
    assert set(doc["unlocked"]) >= set(doc["left"])


def test_apply_forget_host_says_what_it_forgot(cli_lab, capsys, tmp_path):
    """tests/fleet/test_forget.py has the rules; here the CLI's report, in text and JSON."""
    cli_lab.host("a")
    uri = cli_lab.unreachable("c")
    path = cli_lab.write(
        "    web:\n      template: small\n      replicas: 1\n      placement: [a]\n", hosts={"a": cli_lab.hosts["a"]}
    )
    state = FleetState.load(tmp_path / "state", "demo")
    state.remember_host("c", uri)
    state.replace_vm("demo-old-0", {"phase": "ready", "host": "c", "uri": uri, "deployment": "old", "replica": 0})
    with cli_lab.guests():
        code, out, err = run(capsys, "apply", "-f", path, "--yes")
        assert code == 5 and "--forget-host c" in out + err
        code, out, err = run(capsys, "apply", "-f", path, "--yes", "--forget-host", "c", "-o", "json")
        assert code == 0, err
        assert json.loads(out)["forgotten_hosts"] == {"c": {"uri": uri, "vms": ["demo-old-0"]}}
    state.remember_host("c", uri)
    state.replace_vm("demo-old-0", {"phase": "ready", "host": "c", "uri": uri, "deployment": "old", "replica": 0})
    with cli_lab.guests():
        code, out, err = run(capsys, "apply", "-f", path, "--yes", "--forget-host", "c")
    assert code == 0 and f"forgot host c ({uri}) and its VMs demo-old-0: if it comes back" in out
    code, _, err = run(capsys, "apply", "-f", path, "--yes", "--forget-host", "a")
    assert code == 2 and "still names host a" in err
