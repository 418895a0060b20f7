"""The fleet file: what it expands to, and errors that name the file, line and field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tdxvm.fleet.spec import load_fleet, parse_fleet, spec_hash
from tdxvm.yamlfile import SpecError

REPO = Path(__file__).resolve().parents[2]

BASE = """\
apiVersion: tdxvm/v1
kind: Fleet
metadata:
  name: llama
spec:
  hosts:
    a: qemu:///system
    b: qemu+ssh://admin@tdx-b/system
  templates:
    small:
      image: build/smoke/manifest.json
      backend: emulated
      vcpus: 1
      memory: 1GiB
  deployments:
    web:
      template: small
      replicas: 3
      placement: [a, b]
      overrides:
        b: {vcpus: 2, memory: 2GiB, pinning: {vcpus: ["2", "3"]}}
"""


def problems(text: str) -> list[str]:
    with pytest.raises(SpecError) as err:
        parse_fleet(text, source="fleet.yaml", base_dir="/srv/fleet")
    return str(err.value).splitlines()


def test_expands_to_named_vms_on_their_hosts(tmp_path):
    fleet = parse_fleet(BASE, source="fleet.yaml", base_dir=tmp_path)
    vms = fleet.desired()
    assert [(v.name, v.host, v.uri) for v in vms] == [
        ("llama-web-0", "a", "qemu:///system"),
        ("llama-web-1", "b", "qemu+ssh://admin@tdx-b/system"),
        ("llama-web-2", "a", "qemu:///system"),
    ]
    a0, b1, a2 = (v.spec for v in vms)
    assert (a0.vcpus, a0.memory_mib, a0.pinning) == (1, 1024, None)
    assert (b1.vcpus, b1.memory_mib, b1.pinning.vcpus) == (2, 2048, ("2", "3"))  # the host's override
    assert a0.image == tmp_path / "build/smoke/manifest.json"  # relative to the file's folder
    assert vms[0].spec_hash == vms[2].spec_hash != vms[1].spec_hash
    assert (
        spec_hash(a0.model_copy(update={"name": "other", "uri": "qemu:///x"})) == vms[0].spec_hash
    )  # name, host: not spec


def test_placement_mapping_fills_hosts_in_order():
    text = BASE.replace("      replicas: 3\n      placement: [a, b]\n", "      placement: {a: 1, b: 2}\n")
    vms = parse_fleet(text, base_dir="/srv").desired()
    assert [(v.name, v.host) for v in vms] == [("llama-web-0", "a"), ("llama-web-1", "b"), ("llama-web-2", "b")]


def test_errors_name_file_line_and_field():
    text = BASE.replace("name: llama\n", "name: llama\n  owner: me\n").replace("template: small", "template: big")
    text = text.replace("placement: [a, b]", "placement: [a, c]")
    assert problems(text) == [
        "fleet.yaml:5: metadata.owner: unknown key",
        "fleet.yaml:18: spec.deployments.web.template: no template 'big' under spec.templates (defined: small)",
        "fleet.yaml:20: spec.deployments.web.placement: unknown host c (spec.hosts defines: a, b)",
    ]


def test_override_is_checked_with_its_template():
    text = BASE.replace('pinning: {vcpus: ["2", "3"]}', 'pinning: {vcpus: ["2"]}')
    [line] = problems(text)
    assert line.startswith(
        "fleet.yaml:21: spec.deployments.web.overrides: b: the template with this override is not a valid VM"
    )
    assert "vcpus lists 1 host cpusets for 2 vCPUs" in line
    text = BASE.replace("        b: {", "        c: {")
    assert problems(text) == [
        "fleet.yaml:21: spec.deployments.web.overrides: host 'c' is not in this deployment's placement (a, b)"
    ]
    text = BASE.replace("vcpus: 2, memory: 2GiB", "vcpus: 2, memory: lots")
    [line] = problems(text)
    assert line.startswith("fleet.yaml:21: spec.deployments.web.overrides.b.memory: 'lots' is not a size")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("apiVersion: tdxvm/v1", "apiVersion: v1"), "fleet.yaml:1: apiVersion: Input should be 'tdxvm/v1'"),
        (("kind: Fleet", "kind: VM"), "fleet.yaml:2: kind: Input should be 'Fleet'"),
        (
            ("name: " + "l" * 30, "name: Llama_2"),
            "fleet.yaml:4: metadata.name: 'Llama_2': a fleet name is lowercase letters",
        ),
        (("a: qemu:///system", "a: localhost"), "fleet.yaml:7: spec.hosts: host a: 'localhost' is not a libvirt URI"),
        (
            ("b: qemu+ssh://admin@tdx-b/system", "b: qemu:///system"),
            "fleet.yaml:7: spec.hosts: hosts a and b are the same libvirt (qemu:///system): name it once",
        ),
        (
            ("      vcpus: 1\n", "      vcpus: 1\n      name: x\n"),
            "fleet.yaml:14: spec.templates.small.name: a template has no name: "
            "VMs are named <fleet>-<deployment>-<index>",
        ),
        (
            ("      vcpus: 1\n", "      vcpus: 1\n      uri: qemu:///system\n"),
            "fleet.yaml:14: spec.templates.small.uri: a template has no uri",
        ),
        (
            ("      vcpus: 1\n", "      vcpus: 0\n"),
            "fleet.yaml:13: spec.templates.small.vcpus: Input should be greater than or equal to 1",
        ),
        (
            ("replicas: 3", "replicas: -1"),
            "fleet.yaml:18: spec.deployments.web.replicas: Input should be greater than or equal to 0",
        ),
        (("      replicas: 3\n", ""), "fleet.yaml:17: spec.deployments.web: replicas is missing"),
        (
            ("placement: [a, b]", "placement: {a: 1, b: 1}"),
            "fleet.yaml:17: spec.deployments.web: replicas is 3 but the placement puts 2",
        ),
        (
            ("placement: [a, b]", "placement: {a: -1, b: 4}"),
            "fleet.yaml:19: spec.deployments.web.placement: a: '-1' is not a replica count (a whole number",
        ),
        (
            ("placement: [a, b]", "placement: {a: 1000, b: 1}"),
            "fleet.yaml:17: spec.deployments.web: the placement puts 1001 replicas on hosts; at most 1000",
        ),
        (
            ("placement: [a, b]", "placement: a"),
            "fleet.yaml:19: spec.deployments.web.placement: expected a list of host names ([a, b]: round-robin) "
            "or a mapping of host name to replica count",
        ),
        (
            ("placement: [a, b]", "placement: []"),
            "fleet.yaml:19: spec.deployments.web.placement: expected at least one host",
        ),
        (
            ("    web:\n", "    " + "w" * 30 + ":\n"),
            "fleet.yaml:16: spec.deployments: deployment " + "w" * 30 + ": VM names like",
        ),
    ],
)
def test_each_problem_says_what_was_expected(change, expected):
    lines = problems(BASE.replace("name: llama", "name: " + "l" * 30).replace(*change))
    assert any(line.startswith(expected) for line in lines), lines


def test_not_yaml_and_not_a_mapping():
    assert problems("a: [")[0].startswith("fleet.yaml:1: not valid YAML")
    assert problems("- a\n") == ["fleet.yaml:1: expected a mapping of keys to values at the top level"]


def test_example_file_loads():
    fleet = load_fleet(REPO / "configs" / "fleet-example.yaml")
    names = [v.name for v in fleet.desired()]
    assert names and len(set(names)) == len(names)
    assert all(v.uri.startswith(("qemu:///", "qemu+ssh://")) for v in fleet.desired())


def test_policy_file_relative_to_the_fleet_file(tmp_path):
    (tmp_path / "policy.yaml").write_text("accepted_tcb_statuses: [UpToDate, SWHardeningNeeded]\n")
    text = BASE.replace("      memory: 1GiB\n", "      memory: 1GiB\n      policy: policy.yaml\n")
    fleet = parse_fleet(textwrap.dedent(text), base_dir=tmp_path)
    assert fleet.desired()[0].spec.policy.accepted_tcb_statuses == ("UpToDate", "SWHardeningNeeded")


@pytest.mark.parametrize(
    "model",
    ["      model: {path: rel/dir, name: x}\n", "      model: rel/dir\n"],
    ids=["mapping", "short"],
)
def test_model_path_relative_to_the_fleet_file(tmp_path, model):
    text = BASE.replace("      memory: 1GiB\n", "      memory: 1GiB\n" + model)
    vms = parse_fleet(text, source="fleet.yaml", base_dir=tmp_path).desired()
    ref = vms[0].spec.model
    assert ref.path == (tmp_path / "rel" / "dir").resolve()
    assert ref.served_name == ("x" if "name:" in model else "dir") and ref.key_name == "dir"
    assert all(v.spec.model == ref for v in vms)  # the host's override keeps the template's model


def test_model_path_in_an_override_and_absolute_paths(tmp_path):
    text = BASE.replace("b: {vcpus: 2,", "b: {model: {path: other/enc, threads: 4}, vcpus: 2,")
    text = text.replace("      memory: 1GiB\n", "      memory: 1GiB\n      model: /srv/models/enc\n")
    a0, b1, _ = (v.spec.model for v in parse_fleet(text, base_dir=tmp_path).desired())
    assert a0.path == Path("/srv/models/enc")
    assert (b1.path, b1.threads) == ((tmp_path / "other" / "enc").resolve(), 4)


def test_a_deployment_or_host_listed_twice_is_refused():
    text = BASE.replace(
        "    b: qemu+ssh://admin@tdx-b/system\n", "    b: qemu+ssh://admin@tdx-b/system\n    a: qemu:///other\n"
    )
    text += "    web:\n      template: small\n      replicas: 1\n      placement: [a]\n"
    assert problems(text) == [
        "fleet.yaml:9: spec.hosts.a: duplicate key (first at line 7)",
        "fleet.yaml:23: spec.deployments.web: duplicate key (first at line 17)",
    ]


def test_null_in_a_fleet_is_refused():
    assert problems(BASE.replace("replicas: 3", "replicas:")) == [
        "fleet.yaml:18: spec.deployments.web.replicas: null is not allowed; remove the key to allow any value"
    ]
    text = BASE.replace("placement: [a, b]", "placement: [a, ~]")
    assert problems(text) == ["fleet.yaml:19: spec.deployments.web.placement.1: null list item"]
