"""``tdxvm launch --dry-run``, ``status``, ``stop``, ``destroy``, ``console`` through the CLI.

Each command opens its own connection; a test-driver host file gives every invocation
the same starting host (one tdxvm VM, running, and one foreign domain).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from typing import Any

import pytest

from tdxvm.cli import main
from tdxvm.launch.domain import PortForward
from tdxvm.launch.lifecycle import render_domain
from tdxvm.launch.records import VmRecord, VmRecords
from tdxvm.launch.spec import effective_policy, parse_vm_spec
from tdxvm.launch.volumes import planned, serial_log_name
from tdxvm.secretstore import SecretStore

from .conftest import host_xml, image_volumes
from .test_lifecycle import FOREIGN

UNREACHABLE = "qemu+ssh://nobody@no-such-host.invalid/system"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def vm_file(tmp_path, image):
    path = tmp_path / "vm.yaml"
    path.write_text(
        f"name: smoke\nuri: {UNREACHABLE}\nimage: build/smoke/manifest.json\nbackend: emulated\n"
        "vcpus: 1\nmemory: 1GiB\npolicy:\n  accepted_tcb_statuses: [UpToDate, SWHardeningNeeded]\n"
    )
    return path


def test_dry_run_prints_domain_and_policy_without_contacting_libvirt(capsys, vm_file, image):
    # The URI names a host that does not resolve: any contact would fail the command.
    code, out, err = run(capsys, "launch", "--dry-run", vm_file)
    assert code == 0, err
    xml_text, _, policy_text = out.partition("\n# effective attestation policy")
    root = ET.fromstring(xml_text.split("-->", 1)[1])
    assert root.get("type") == "qemu" and root.findtext("name") == "smoke"
    assert root.find("devices/disk/driver").get("type") == "qcow2"
    assert root.find("devices/serial/source").get("path").endswith("/smoke.serial.log")
    manifest = image.manifest()
    assert root.findtext("os/cmdline") == manifest.cmdline
    assert "nothing was defined" in out.lower() and "libvirt was not contacted" in out
    assert "(mrtd, rtmr1, rtmr2 from the image manifest)" in policy_text
    assert manifest.measurements.mrtd in policy_text and "SWHardeningNeeded" in policy_text
    assert "# policy exception: accepted_tcb_statuses" in policy_text
    assert (
        "# policy exception: rtmr0 not pinned: " in policy_text
        and "# policy exception: rtmr3 not pinned: " in policy_text
    )
    assert "td_attributes: ['0000001000000000']" in policy_text  # what the emulated quote service signs, pinned


def test_dry_run_json(capsys, vm_file, image):
    code, out, _ = run(
        capsys, "launch", "--dry-run", vm_file, "--uri", "qemu+ssh://other@host.invalid/system", "-o", "json"
    )
    assert code == 0
    doc = json.loads(out)
    assert doc["dry_run"] is True and doc["uri"] == "qemu+ssh://other@host.invalid/system"
    assert doc["policy"]["rtmr2"] == [image.manifest().measurements.rtmr2]
    assert doc["policy_from_manifest"] == ["mrtd", "rtmr1", "rtmr2"]
    assert sorted(f["guest"] for f in doc["forwards"]) == [22, 7300]
    assert ET.fromstring(doc["domain_xml"]).findtext("name") == "smoke"


def test_dry_run_errors_are_one_clear_line(capsys, tmp_path):
    bad = tmp_path / "vm.yaml"
    bad.write_text("name: smoke\nimage: nowhere/manifest.json\nmemory: lots\n")
    code, _, err = run(capsys, "launch", "--dry-run", bad)
    assert code == 2 and f"{bad}:3: memory: " in err and "Traceback" not in err
    bad.write_text("name: smoke\nimage: nowhere/manifest.json\n")
    code, out, _ = run(capsys, "launch", "--dry-run", bad, "-o", "json")
    assert code == 2 and json.loads(out)["error"]["code"] == "manifest"


SMOKE_UUID = "6a1c3f0e-5b2d-4e8f-9a7b-1c2d3e4f5a6b"
FORWARDS = (PortForward(host_port=20001, guest_port=7300), PortForward(host_port=20002, guest_port=22))


@pytest.fixture
def records(tmp_path, monkeypatch) -> VmRecords:
    """The controller's VM records, beside its default secret store (under a private XDG_DATA_HOME)."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    return VmRecords.beside(SecretStore())


def smoke_domain(image, **labels: str) -> tuple[str, Any]:
    spec = parse_vm_spec(f"name: smoke\nimage: {image.manifest_path}\nbackend: emulated\nmemory: 1GiB\n")
    m = image.manifest()
    policy = effective_policy(spec, m)
    dom = render_domain(
        spec,
        m,
        volumes=planned(m, "smoke"),
        forwards=FORWARDS,
        policy=policy,
        uuid=SMOKE_UUID,
        extra_labels=labels or None,
    )
    return dom, policy


def smoke_record(uri: str, policy: Any, m: Any) -> VmRecord:
    """The controller's record of the VM smoke (``smoke_domain``), launched on ``uri``."""
    return VmRecord(
        name="smoke",
        uuid=SMOKE_UUID,
        uri=uri,
        backend="emulated",
        policy=policy,
        manifest=str(m.path),
        manifest_sha256="00" * 32,
        trust_anchor_sha256=None,
        forwards=FORWARDS,
        agent_port=7300,
        ssh_port=22,
    )


@pytest.fixture
def host_uri(image, make_host, records):
    dom, policy = smoke_domain(image)
    m = image.manifest()
    vols = image_volumes(m) + [("smoke.qcow2", 1000), (serial_log_name("smoke"), 0)]
    uri = make_host(host_xml(pool_volumes=vols, domains=[dom, FOREIGN]))
    records.put(smoke_record(uri, policy, m))
    return uri


def test_status_table_and_detail(capsys, host_uri):
    code, out, _ = run(capsys, "status", "--uri", host_uri)
    assert code == 0
    header, row = out.splitlines()
    assert header.split() == ["NAME", "STATE", "BACKEND", "IMAGE", "AGENT", "UPTIME", "ATTESTATION", "POLICY"]
    assert row.split()[:5] == ["smoke", "running", "emulated", "smoke", "127.0.0.1:20001"] and "theirs" not in out
    code, out, _ = run(capsys, "status", "smoke", "--uri", host_uri)
    assert code == 0 and "127.0.0.1:20002 -> 22" in out and "none yet" in out
    # The launch pinned MRTD, RTMR1 and RTMR2 from the manifest; RTMR0 and RTMR3 stay open and say so.
    assert (
        "EXCEPTIONS:" in out
        and "- rtmr0 not pinned: " in out
        and "- rtmr3 not pinned: " in out
        and "mrtd not pinned" not in out
    )
    code, out, _ = run(capsys, "status", "--uri", host_uri, "-o", "json")
    doc = json.loads(out)
    assert [v["name"] for v in doc["vms"]] == ["smoke"] and doc["vms"][0]["agent"] == "127.0.0.1:20001"
    assert [line.split(" not pinned: ")[0] for line in doc["vms"][0]["policy_exceptions"]] == ["rtmr0", "rtmr3"]


def test_status_of_one_vm_shows_what_the_host_wrote_inert(capsys, host_uri, monkeypatch):
    """Labels, names and paths come from the host's libvirt: C1 controls and bidi overrides
    (what XML can carry) reach the terminal escaped, in the detail view too."""
    import dataclasses

    import tdxvm.launch.lifecycle as lifecycle

    real = lifecycle.status

    def hostile(conn, name, **kw):
        return [
            dataclasses.replace(v, image="smoke\x9b2K\u202eexe", serial_log="/x\x9d52;c;\x9c")
            for v in real(conn, name, **kw)
        ]

    monkeypatch.setattr(lifecycle, "status", hostile)
    code, out, _ = run(capsys, "status", "smoke", "--uri", host_uri)
    assert code == 0 and "smoke\\x9b2K\\u202eexe" in out and "/x\\x9d52;c;\\x9c" in out
    assert not any(c in out for c in ("\x9b", "\x9d", "\x9c", "\u202e"))


def test_destroying_a_domain_that_carries_another_vms_uuid_keeps_that_vms_record(capsys, image, make_host, records):
    """Another host presents a throwaway domain with the UUID of this controller's VM smoke:
    destroying it must not delete smoke's record (its policy, pinned keys, model digest)."""
    dom, policy = smoke_domain(image)
    m = image.manifest()
    vols = image_volumes(m) + [("smoke.qcow2", 1000), (serial_log_name("smoke"), 0)]
    uri = make_host(host_xml(pool_volumes=vols, domains=[dom]))
    records.put(smoke_record("qemu+ssh://root@prod.example/system", policy, m))  # smoke runs elsewhere
    code, _, err = run(capsys, "destroy", "smoke", "--uri", uri, "--yes")
    assert code == 0, err
    assert records.get(SMOKE_UUID) is not None  # the record names another host: not this domain's


def test_status_shows_the_attested_model_digest(capsys, host_uri, records):
    """What `tdxvm provision` recorded: the model digest its check of the service's RTMR3 model event named."""
    digest = "sha256:" + "ab" * 32
    records.update(
        SMOKE_UUID,
        model={
            "name": "tiny-llama",
            "url": "https://127.0.0.1:20003",
            "tls_spki_sha256": "cd" * 32,
            "at": "2025-07-01T12:00:00Z",
            "digest": digest,
            "dtype": "float32",
        },
    )
    code, out, _ = run(capsys, "status", "smoke", "--uri", host_uri)
    assert code == 0 and "tiny-llama at https://127.0.0.1:20003" in out
    assert f"model digest {digest} (the service's RTMR3 model event, attested 2025-07-01T12:00:00Z)" in out
    code, out, _ = run(capsys, "status", "smoke", "--uri", host_uri, "-o", "json")
    assert json.loads(out)["model"]["digest"] == digest


def test_status_lists_the_last_verdicts_exceptions_such_as_collateral_from_the_cache(capsys, host_uri, records):
    """The PCS was blocked at the last attestation: the verdict accepted on cached collateral
    (a policy exception it lists). status says so beside the policy's own exceptions, where
    it said "strict defaults" before."""
    cached = "collateral from the cache: https://pccs.example could not be reached (HTTP 503)"
    rtmr0 = records.get(SMOKE_UUID).policy.loosened()
    records.update(
        SMOKE_UUID,
        attestation={"verdict": "accept", "verified_at": "2025-07-01T12:00:00Z", "policy_exceptions": [cached, *rtmr0]},
    )
    code, out, _ = run(capsys, "status", "smoke", "--uri", host_uri)
    assert code == 0 and "EXCEPTIONS:" in out and f"- {cached}" in out and "strict defaults" not in out
    code, out, _ = run(capsys, "status", "--uri", host_uri)
    assert f"{len(rtmr0) + 1} exceptions" in out


def test_status_says_when_the_host_rewrote_the_metadata_or_no_record_exists(capsys, image, make_host, records):
    """The host rewrites the domain's metadata (its own policy, another backend): status shows
    no policy from it, and says the VM is untrusted; a VM with no record is untrusted too."""
    from tdxvm.launch import metadata as md

    dom, policy = smoke_domain(image)
    forged = dom.replace('backend="emulated"', 'backend="tdx"')
    assert forged != dom and md.from_domain_xml(forged).backend == "tdx"
    m = image.manifest()
    uri = make_host(
        host_xml(
            pool_volumes=image_volumes(m) + [("smoke.qcow2", 1000), (serial_log_name("smoke"), 0)], domains=[forged]
        )
    )
    code, out, _ = run(capsys, "status", "--uri", uri)
    assert code == 0 and "UNTRUSTED: no record" in out and "strict" not in out
    records.put(smoke_record(uri, policy, m))
    code, out, _ = run(capsys, "status", "--uri", uri)
    assert code == 0 and "UNTRUSTED: record mismatch" in out
    code, out, _ = run(capsys, "status", "smoke", "--uri", uri)
    assert (
        "UNTRUSTED" in out and "backend: metadata says 'tdx', the record 'emulated'" in out and "EXCEPTIONS" not in out
    )
    code, out, _ = run(capsys, "status", "smoke", "--uri", uri, "-o", "json")
    doc = json.loads(out)
    assert doc["record"] == "mismatch" and doc["policy"] is None and doc["attestation"] is None


def test_status_env_uri_and_refusals(capsys, host_uri, monkeypatch):
    monkeypatch.setenv("TDXVM_URI", host_uri)
    code, _, err = run(capsys, "status", "theirs")
    assert code == 2 and "not created by tdxvm" in err
    code, out, _ = run(capsys, "status", "nope", "-o", "json")
    assert code == 2 and json.loads(out)["error"]["code"] == "no-such-vm"


def test_stop(capsys, host_uri):
    code, out, _ = run(capsys, "stop", "smoke", "--uri", host_uri)
    assert code == 0 and out == "smoke: shut down\n"
    code, _, err = run(capsys, "stop", "theirs", "--uri", host_uri)
    assert code == 2 and "never stops, changes or deletes it" in err


def test_destroy_needs_yes_without_a_terminal(capsys, host_uri):
    code, _, err = run(capsys, "destroy", "smoke", "--uri", host_uri)
    assert code == 2 and "pass --yes" in err
    code, out, _ = run(capsys, "destroy", "smoke", "--uri", host_uri, "--yes", "-o", "json")
    assert code == 0
    doc = json.loads(out)
    assert doc["was_running"] is True and [p.rsplit("/", 1)[1] for p in doc["deleted_volumes"]] == [
        "smoke.qcow2",
        "smoke.serial.log",
    ]
    code, _, err = run(capsys, "destroy", "theirs", "--uri", host_uri, "--yes")
    assert code == 2 and "not created by tdxvm" in err


def test_console_on_test_driver(capsys, host_uri):
    code, out, err = run(capsys, "console", "smoke", "--uri", host_uri, "--lines", "5")
    assert code == 0 and out == ""  # the log exists and the test driver never writes to it


def test_connection_refusal_through_cli(capsys):
    code, _, err = run(capsys, "status", "--uri", "qemu:///system?socket=/nonexistent/sock")
    assert code == 3 and "systemctl start libvirtd" in err and "Traceback" not in err  # unreachable


def test_image_measure_vm_names_what_the_launch_pins_and_why_rtmr0_is_not(capsys, vm_file, image):
    """``tdxvm image measure --vm``: MRTD/RTMR1/RTMR2 from the spec's image manifest; RTMR0
    only where a profile predicts it (here: a remote host that does not answer, so its
    versions cannot select one: not predicted, with the reason, and the rest measured)."""
    manifest = image.manifest()
    code, out, err = run(capsys, "image", "measure", "--vm", vm_file)
    assert code == 0, err
    lines = dict(line.split(None, 1) for line in out.splitlines())
    assert lines["mrtd"] == manifest.measurements.mrtd and lines["rtmr2"] == manifest.measurements.rtmr2
    assert lines["rtmr0"].startswith(
        f"not predicted on {UNREACHABLE}: its libvirt and QEMU versions select the profile, and cannot connect to "
    )
    code, out, _ = run(capsys, "image", "measure", "--vm", vm_file, "-o", "json")
    doc = json.loads(out)
    assert code == 0 and doc["vm"] == "smoke" and doc["measurements"]["rtmr0"] is None
    assert doc["rtmr0"]["value"] is None and doc["rtmr0"]["events"] == [] and UNREACHABLE in doc["rtmr0"]["reason"]


def test_image_measure_takes_either_a_vm_or_files(capsys, vm_file, image):
    code, _, err = run(capsys, "image", "measure", "--vm", vm_file, "--kernel", vm_file)
    assert code != 0 and "give either --vm or --kernel" in err
    code, _, err = run(capsys, "image", "measure")
    assert code != 0 and "give --kernel (with --initrd, --cmdline, --firmware) or --vm VM.yaml" in err


def test_stop_and_destroy_refuse_a_vm_of_another_controller(capsys, image, make_host, records):
    dom, _ = smoke_domain(image, controller="0123456789abcdef")
    uri = make_host(host_xml(pool_volumes=image_volumes(image.manifest()), domains=[dom]))
    for argv in (("stop", "smoke"), ("destroy", "smoke", "--yes")):
        code, out, _ = run(capsys, *argv, "--uri", uri, "-o", "json")
        error = json.loads(out)["error"]
        assert code == 1 and error["code"] == "other-controller", out
        assert "was launched by controller 0123456789abcdef (this controller has no key yet)" in error["message"]
    code, _, err = run(capsys, "destroy", "smoke", "--uri", uri)  # refused before asking
    assert code == 1 and "tdxvm does not destroy another controller's VM" in err


def test_destroying_a_vm_deletes_its_own_record(capsys, host_uri, records):
    assert records.get(SMOKE_UUID) is not None
    code, _, err = run(capsys, "destroy", "smoke", "--uri", host_uri, "--yes")
    assert code == 0, err
    assert records.get(SMOKE_UUID) is None


def test_a_record_that_cannot_be_written_is_a_typed_error(tmp_path, image):
    """A full disk, or a folder where tdxvm cannot write: before, an internal error (exit 4,
    a traceback) in the middle of a launch."""
    from tdxvm.launch.records import RecordError

    (tmp_path / "vms").write_text("a file where the folder should be")
    _, policy = smoke_domain(image)
    with pytest.raises(RecordError, match=r"cannot keep the record of VM smoke in .*vms: "):
        VmRecords(tmp_path / "vms").put(smoke_record("qemu:///system", policy, image.manifest()))
