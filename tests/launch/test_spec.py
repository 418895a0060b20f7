"""VM spec YAML: file:line:field errors, path resolution, shipped configs, effective policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tdxvm.attest.quote import TD_ATTR_PKS, TD_ATTR_SEPT_VE_DISABLE
from tdxvm.launch.domain import td_policy
from tdxvm.launch.errors import LaunchPolicyError, ManifestError
from tdxvm.launch.manifest import load_manifest
from tdxvm.launch.spec import ModelRef, effective_policy, filled_from_manifest, load_vm_spec, parse_vm_spec
from tdxvm.yamlfile import SpecError

from .conftest import make_image

REPO = Path(__file__).resolve().parents[2]
HEX48 = "ab" * 48


def load(tmp_path: Path, text: str):
    path = tmp_path / "vm.yaml"
    path.write_text(text)
    return load_vm_spec(path)


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(SpecError) as info:
        load(tmp_path, text)
    return str(info.value).splitlines()


def test_minimal_spec_defaults_and_relative_image(tmp_path):
    spec = load(tmp_path, "name: smoke\nimage: ../build/smoke/manifest.json\n")
    assert spec.uri == "qemu:///system" and spec.backend == "tdx"
    assert spec.image == (tmp_path.parent / "build" / "smoke" / "manifest.json").resolve()
    assert spec.vcpus == 2 and spec.memory_mib == 2048


@pytest.mark.parametrize(
    ("text", "line", "field", "needle"),
    [
        ("name: smoke\nimage: m.json\nmemory: 2GB\n", 3, "memory", "not a size"),
        ("name: smoke\nimage: m.json\nmemory: 1536KiB\n", 3, "memory", "whole number of MiB"),
        ("name: smoke\nimage: m.json\nmemory: 128MiB\n", 3, "memory", "greater than or equal to 256"),
        ("name: bad name\nimage: m.json\n", 1, "name", "letters, digits"),
        ("name: smoke\nimage: m.json\nuri: /var/run/libvirt\n", 3, "uri", "not a libvirt URI"),
        ("name: smoke\nimage: m.json\nbackend: sev\n", 3, "backend", "'tdx' or 'emulated'"),
        ('name: smoke\nimage: m.json\nvcpus: 2\npinning:\n  vcpus: ["1"]\n', 5, "pinning", "1 host cpusets for 2"),
        ('name: smoke\nimage: m.json\npinning:\n  vcpus: ["1", "x"]\n', 4, "pinning.vcpus", "not a host cpuset"),
        (
            "name: smoke\nimage: m.json\nnetwork:\n  forwards:\n    - {guest: 22, host: 70000}\n",
            5,
            "network.forwards.0.host",
            "less than or equal to 65535",
        ),
        (
            "name: smoke\nimage: m.json\nnetwork:\n  forwards:\n    - {guest: 22, address: localhost}\n",
            5,
            "network.forwards.0.address",
            "not an IPv4 address",
        ),
        (
            "name: smoke\nimage: m.json\nnetwork:\n  forwards:\n    - {guest: 22}\n    - {guest: 22}\n",
            5,
            "network.forwards",
            "forwarded twice",
        ),
        ("name: smoke\nimage: m.json\nfirmware: OVMF.fd\n", 3, "firmware", "absolute path on the libvirt host"),
        ("name: smoke\nimage: m.json\nmr_owner: abcd\n", 3, "mr_owner", "expected 48 bytes"),
        (
            "name: smoke\nimage: m.json\nbackend: emulated\nqgs_socket: /run/qgs\n",
            4,
            "qgs_socket",
            "TDX launch setting",
        ),
        ("name: smoke\nimage: m.json\npolicy:\n  allow_debug: false\n  mrtd: zz\n", 5, "policy.mrtd", "is not hex"),
        ("name: smoke\nimage: m.json\npolicy:\n  alow_debug: true\n", 4, "policy.alow_debug", "unknown key"),
        (
            "name: smoke\nimage: m.json\npolicy:\n  allow_debug: false\n  rtmr2: " + "0" * 96 + "\n",
            5,
            "policy.rtmr2",
            "all-zero RTMR2",
        ),
        ("name: smoke\nimage: m.json\nvcpu: 4\n", 3, "vcpu", "unknown key"),
        ("image: m.json\n", 1, "name", "Field required"),
    ],
)
def test_errors_name_file_line_field(tmp_path, text, line, field, needle):
    lines = problems(tmp_path, text)
    want = f"{tmp_path / 'vm.yaml'}:{line}: {field}: "
    assert any(p.startswith(want) and needle in p for p in lines), lines


def test_every_problem_reported_at_once(tmp_path):
    lines = problems(tmp_path, "name: smoke\nimage: m.json\nvcpus: 0\nmemory: lots\nbackend: sev\n")
    assert [p.split(": ")[1] for p in lines] == ["vcpus", "memory", "backend"]


def test_policy_file_relative_to_spec_and_its_errors(tmp_path):
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.yaml").write_text(f"allow_debug: false\nrtmr1: {HEX48}\n")
    spec = load(tmp_path, "name: smoke\nimage: m.json\npolicy: policies/p.yaml\n")
    assert spec.policy.rtmr1 == (HEX48,) and spec.policy.model_fields_set == {"allow_debug", "rtmr1"}
    (tmp_path / "policies" / "p.yaml").write_text("allow_debug: false\nmrtd: 12\n")
    lines = problems(tmp_path, "name: smoke\nimage: m.json\npolicy: policies/p.yaml\n")
    # The VM spec's line, and inside the message the policy file's own file:line.
    assert lines[0].startswith(f"{tmp_path / 'vm.yaml'}:3: policy: ")
    assert any(f"{tmp_path / 'policies' / 'p.yaml'}:2: mrtd" in p for p in lines), lines


def test_shipped_configs_load():
    smoke = load_vm_spec(REPO / "configs" / "smoke.yaml")
    assert smoke.backend == "emulated" and smoke.vcpus == 1 and smoke.memory_mib == 1024
    assert smoke.image == REPO / "build" / "smoke" / "manifest.json"
    tdx = load_vm_spec(REPO / "configs" / "tdx-example.yaml")
    assert tdx.backend == "tdx" and tdx.uri.startswith("qemu+ssh://")
    assert len(tdx.pinning.vcpus) == tdx.vcpus and tdx.pinning.numa_node == 0
    assert tdx.firmware.startswith("/") and tdx.policy is not None


def test_effective_policy_fills_measurements_from_manifest(image):
    manifest = image.manifest()
    spec = parse_vm_spec(f"name: smoke\nimage: {image.manifest_path}\npolicy:\n  rtmr1: {HEX48}\n")
    policy = effective_policy(spec, manifest)
    assert policy.mrtd == (manifest.measurements.mrtd,)
    assert policy.rtmr2 == (manifest.measurements.rtmr2,)
    assert policy.rtmr1 == (HEX48,)  # given keys win
    assert policy.rtmr0 is None and policy.rtmr3 is None  # not predicted: not required
    assert filled_from_manifest(spec, manifest) == ("mrtd", "rtmr2")
    assert policy.accepted_tcb_statuses == ("UpToDate",) and policy.allow_debug is False  # strict defaults


def test_effective_policy_expects_launch_mr_values_for_tdx_only(image):
    manifest = image.manifest()
    tdx = parse_vm_spec(f"name: a\nimage: {image.manifest_path}\nmr_config_id: {HEX48}\n")
    assert effective_policy(tdx, manifest).mr_config_id == (HEX48,)
    other = "cd" * 48
    given = parse_vm_spec(
        f"name: a\nimage: {image.manifest_path}\nmr_config_id: {HEX48}\npolicy:\n  mr_config_id: {other}\n"
    )
    assert effective_policy(given, manifest).mr_config_id == (other,)


def test_effective_policy_refuses_without_expected_mrtd(image):
    data = image.data()
    data["measurements"]["mrtd"] = None
    image.write(data)
    spec = parse_vm_spec(f"name: a\nimage: {image.manifest_path}\n")
    with pytest.raises(LaunchPolicyError, match="no expected MRTD") as info:
        effective_policy(spec, image.manifest())
    assert str(image.manifest_path) in str(info.value)
    spec = parse_vm_spec(f"name: a\nimage: {image.manifest_path}\npolicy:\n  mrtd: {HEX48}\n")
    assert effective_policy(spec, image.manifest()).mrtd == (HEX48,)


@pytest.mark.parametrize("backend", ["tdx", "emulated"])
def test_effective_policy_pins_the_launched_td_attributes(image, backend):
    manifest = image.manifest()
    spec = parse_vm_spec(f"name: a\nimage: {image.manifest_path}\nbackend: {backend}\n")
    policy = effective_policy(spec, manifest)
    launched = (td_policy() if backend == "tdx" else TD_ATTR_SEPT_VE_DISABLE).to_bytes(8, "little").hex()
    assert policy.td_attributes == (launched,) == ("0000001000000000",)
    if backend == "tdx":  # PKS, KL, PERFMON come from the host CPU (QEMU), not the domain XML: left out, and said so
        assert policy.td_attributes_mask == "ffffff3fffffff7f"
        assert any("PKS, KL, PERFMON" in line for line in policy.loosened())
    else:
        assert policy.td_attributes_mask is None
    # The user's own value wins; a mask alone keeps the launched value and compares fewer bits.
    other = (TD_ATTR_SEPT_VE_DISABLE | TD_ATTR_PKS).to_bytes(8, "little").hex()
    given = parse_vm_spec(
        f"name: a\nimage: {image.manifest_path}\nbackend: {backend}\npolicy:\n  td_attributes: {other}\n"
    )
    assert effective_policy(given, manifest).td_attributes == (other,)
    mask = (~TD_ATTR_PKS & (1 << 64) - 1).to_bytes(8, "little").hex()
    masked = parse_vm_spec(
        f"name: a\nimage: {image.manifest_path}\nbackend: {backend}\npolicy:\n  td_attributes_mask: {mask}\n"
    )
    p = effective_policy(masked, manifest)
    assert (
        p.td_attributes == (launched,)
        and p.td_attributes_mask == mask
        and "TD attributes not compared: PKS" in p.loosened()[0]
    )


def test_effective_policy_refuses_a_manifest_predicting_zero_rtmr2(image):
    data = image.data()
    data["measurements"]["rtmr2"] = "00" * 48
    image.write(data)
    spec = parse_vm_spec(f"name: a\nimage: {image.manifest_path}\n")
    with pytest.raises(
        LaunchPolicyError, match="predicts an all-zero RTMR2: the image's kernel does not measure"
    ) as info:
        effective_policy(spec, image.manifest())
    message = str(info.value)
    assert (
        str(image.manifest_path) in message
        and "kernel >= 6.9" in message
        and "kernel.suite: bookworm-backports" in message
    )
    allowed = parse_vm_spec(f"name: a\nimage: {image.manifest_path}\npolicy:\n  allow_zero_rtmrs: true\n")
    policy = effective_policy(allowed, image.manifest())
    assert policy.rtmr2 == ("00" * 48,) and any(line.startswith("allow_zero_rtmrs: true") for line in policy.loosened())
    pinned = parse_vm_spec(f"name: a\nimage: {image.manifest_path}\npolicy:\n  rtmr2: {HEX48}\n")
    assert effective_policy(pinned, image.manifest()).rtmr2 == (HEX48,)  # the manifest's zero is not used


def test_manifest_loads_from_folder_or_file(image):
    a = load_manifest(image.folder)
    b = load_manifest(image.manifest_path)
    assert a == b and a.kernel.path == image.folder / "vmlinuz" and a.guest_ports() == {"agent": 7300, "ssh": 22}


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda d: d.pop("cmdline"), "cmdline: Field required"),
        (lambda d: d["artifacts"].pop("initrd.img"), "artifacts.initrd.img: Field required"),
        (lambda d: d["artifacts"]["vmlinuz"].update(sha256="12"), "artifacts.vmlinuz.sha256"),
        (lambda d: d["measurements"].update(rtmr1="ab"), "measurements.rtmr1"),
        (lambda d: d.update(format="something/2"), "format 'something/2'"),
        (
            lambda d: d.update(format="tdxvm-image-manifest/1"),
            "built by an older tdxvm, whose root filesystem is not verified",
        ),
        (lambda d: d.update(guest_agent_port=0), "guest_agent_port"),
    ],
)
def test_manifest_errors_name_file_and_field(image, change, needle):
    data = image.data()
    change(data)
    image.write(data)
    with pytest.raises(ManifestError) as info:
        load_manifest(image.manifest_path)
    assert str(image.manifest_path) in str(info.value) and needle in str(info.value)


def test_manifest_missing_or_not_json(tmp_path):
    with pytest.raises(ManifestError, match="does not exist .*tdxvm image build"):
        load_manifest(tmp_path / "nope" / "manifest.json")
    (tmp_path / "manifest.json").write_text('{"name": 1,\n oops}')
    with pytest.raises(ManifestError, match=r"manifest.json:2: not valid JSON"):
        load_manifest(tmp_path / "manifest.json")


def test_manifest_with_service_port(tmp_path):
    img = make_image(tmp_path / "llama", name="llama2", service_port=8443)
    assert img.manifest().guest_ports() == {"agent": 7300, "ssh": 22, "service": 8443, "upload": 7301}
    assert json.loads(img.manifest_path.read_text())["service_port"] == 8443


def test_model_short_form_is_a_path_beside_the_spec(tmp_path):
    spec = load(tmp_path, "name: smoke\nimage: m.json\nmodel: ../build/llama2-7b.enc\n")
    assert isinstance(spec.model, ModelRef)
    assert spec.model.path == (tmp_path.parent / "build" / "llama2-7b.enc").resolve()
    assert (spec.model.served_name, spec.model.key_name) == ("llama2-7b.enc", "llama2-7b.enc")  # the folder's name
    assert (spec.model.dtype, spec.model.threads) == ("float32", None)
    assert load(tmp_path, "name: smoke\nimage: m.json\n").model is None


def test_model_long_form(tmp_path):
    spec = load(
        tmp_path,
        "name: smoke\nimage: m.json\nmodel:\n  path: enc/tiny\n  name: org/tiny:v1\n  key: tiny-key\n"
        "  dtype: bfloat16\n  threads: 8\n  max_batch: 4\n  kv_cache_mib: 256\n",
    )
    assert spec.model.path == (tmp_path / "enc" / "tiny").resolve()
    assert (spec.model.served_name, spec.model.key_name) == ("org/tiny:v1", "tiny-key")
    assert (spec.model.dtype, spec.model.threads) == ("bfloat16", 8)
    assert (spec.model.max_batch, spec.model.kv_cache_mib) == (4, 256)
    absolute = load(tmp_path, "name: smoke\nimage: m.json\nmodel: {path: /srv/models/tiny, key: k}\n").model
    assert absolute.path == Path("/srv/models/tiny") and absolute.served_name == "tiny" and absolute.key_name == "k"


@pytest.mark.parametrize(
    ("text", "line", "field", "needle"),
    [
        ("model:\n  path: enc/tiny\n  nmae: tiny\n", 5, "model.nmae", "unknown key"),
        ("model: {path: enc/tiny, dtype: float16}\n", 3, "model.dtype", "'float32', 'bfloat16' or 'int8'"),
        ("model: {path: enc/tiny, name: my model}\n", 3, "model.name", "should match pattern"),
        ('model: {path: enc/tiny, name: "tiny\\n"}\n', 3, "model.name", "should match pattern"),
        ("model: {path: enc/tiny, key: ../other}\n", 3, "model.key", "should match pattern"),
        ("model: {path: enc/tiny, threads: 0}\n", 3, "model.threads", "greater than or equal to 1"),
        ("model: {path: enc/tiny, max_batch: 257}\n", 3, "model.max_batch", "less than or equal to 256"),
        ("model: {path: enc/tiny, kv_cache_mib: 0}\n", 3, "model.kv_cache_mib", "greater than or equal to 1"),
        ("model: {name: tiny}\n", 3, "model.path", "Field required"),
        ('model: ""\n', 3, "model.path", "expected a path"),
    ],
)
def test_model_errors_name_file_line_field(tmp_path, text, line, field, needle):
    lines = problems(tmp_path, "name: smoke\nimage: m.json\n" + text)
    want = f"{tmp_path / 'vm.yaml'}:{line}: {field}: "
    assert any(p.startswith(want) and needle in p for p in lines), lines


def test_null_and_duplicate_keys_in_a_vm_spec_and_its_policy(tmp_path):
    text = (
        "name: smoke\nimage: m.json\nvcpus: 2\npolicy:\n  mrtd:\n  allow_debug: false\n  allow_debug: true\nvcpus: 4\n"
    )
    assert problems(tmp_path, text) == [
        f"{tmp_path / 'vm.yaml'}:5: policy.mrtd: null is not allowed; remove the key to allow any value",
        f"{tmp_path / 'vm.yaml'}:7: policy.allow_debug: duplicate key (first at line 6)",
        f"{tmp_path / 'vm.yaml'}:8: vcpus: duplicate key (first at line 3)",
    ]
    with pytest.raises(SpecError, match=r"^<vm spec>:2: image: null is not allowed"):
        parse_vm_spec("name: smoke\nimage: ~\n")
