"""Host preflight: real domain capabilities XML and fake sysfs folders, every failure with a fix.

``data/domcaps-qemu-7.2-libvirt-9.0-{kvm,tcg}.xml`` are ``virsh domcapabilities`` of this
project's Debian 12 host (libvirt 9.0, QEMU 7.2; see data/README.md). The TDX-capable
variants are made from the kvm one by adding the elements libvirt 12.x reports, and the
test checks them against libvirt 12.8's domaincaps schema, so they have the real shape.
"""

from __future__ import annotations

import grp
import os
import socket
import subprocess
from pathlib import Path

import pytest

from tdxvm.launch.errors import PreflightError
from tdxvm.launch.preflight import HostFacts, evaluate, kvm_device, require, tdx_advertised
from tdxvm.launch.spec import parse_vm_spec

from ..debian_data import unstable_package

DATA = Path(__file__).parent / "data"
KVM_9 = (DATA / "domcaps-qemu-7.2-libvirt-9.0-kvm.xml").read_text()
TCG_9 = (DATA / "domcaps-qemu-7.2-libvirt-9.0-tcg.xml").read_text()
TDX_FEATURE = "    <tdx supported='yes'/>\n"
LAUNCH_SECURITY = (
    "    <launchSecurity supported='yes'>\n      <enum name='sectype'>\n        <value>tdx</value>\n"
    "      </enum>\n    </launchSecurity>\n"
)


def with_tdx(xml: str, *, feature: bool = True, launch_security: bool = True, supported: str = "yes") -> str:
    """A libvirt 12.x shape: <tdx/> before <sev/>, <launchSecurity/> last in <features>."""
    if feature:
        xml = xml.replace(
            "    <sev supported='no'/>\n", TDX_FEATURE.replace("yes", supported) + "    <sev supported='no'/>\n"
        )
    if launch_security:
        ls = LAUNCH_SECURITY if supported == "yes" else "    <launchSecurity supported='no'/>\n"
        xml = xml.replace("  </features>", ls + "  </features>")
    return xml.replace("pc-q35-7.2", "pc-q35-10.1")


V = {"libvirt-9.0": 9_000_000, "libvirt-12.8": 12_008_000, "qemu-7.2": 7_002_022, "qemu-10.1": 10_001_000}


def facts(
    *,
    domcaps: dict[str, str] | None = None,
    errors: dict[str, str] | None = None,
    libvirt: int = V["libvirt-12.8"],
    qemu: int = V["qemu-10.1"],
    local: bool = True,
    memory_mib: int | None = 65536,
    driver: str = "QEMU",
    kvm_device: tuple[str, int] | None = None,
) -> HostFacts:
    return HostFacts(
        uri="qemu:///system" if local else "qemu+ssh://admin@tdx-host/system",
        driver=driver,
        local=local,
        libvirt_version=libvirt,
        hypervisor_version=qemu,
        domcaps=domcaps or {},
        domcaps_errors=errors or {},
        available_memory=None if memory_mib is None else memory_mib << 20,
        memory_source="free",
        kvm_device=kvm_device,
    )


def sysfs(tmp_path: Path, tdx: str | None, *, module: str = "kvm_intel") -> Path:
    root = tmp_path / "sys"
    params = root / "module" / module / "parameters"
    params.mkdir(parents=True)
    if tdx is not None:
        (params / "tdx").write_text(tdx + "\n")
    return root


@pytest.fixture
def qgs(tmp_path):
    path = tmp_path / "qgs.socket"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    yield path
    s.close()


def tdx_spec(image, qgs_path, **extra) -> object:
    lines = [f"name: td\nimage: {image.manifest_path}\nbackend: tdx\nmemory: 4GiB\nqgs_socket: {qgs_path}"]
    lines += [f"{k}: {v}" for k, v in extra.items()]
    return parse_vm_spec("\n".join(lines) + "\n")


def by_check(findings):
    return {f.check: f for f in findings}


def test_tdx_capable_variants_fit_libvirt_12_8_schema(tmp_path):
    schema = unstable_package("libvirt-common") / "usr" / "share" / "libvirt" / "schemas" / "domaincaps.rng"
    for i, xml in enumerate((with_tdx(KVM_9), with_tdx(KVM_9, supported="no"), KVM_9, TCG_9)):
        f = tmp_path / f"caps{i}.xml"
        f.write_text(xml)
        proc = subprocess.run(["xmllint", "--noout", "--relaxng", str(schema), str(f)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


def test_tdx_advertised_by_either_element():
    assert tdx_advertised(with_tdx(KVM_9))[0]
    assert tdx_advertised(with_tdx(KVM_9, launch_security=False)) == (True, "<tdx supported='yes'/>")
    assert tdx_advertised(with_tdx(KVM_9, feature=False)) == (True, "<launchSecurity> sectype tdx")
    assert tdx_advertised(with_tdx(KVM_9, supported="no")) == (False, "the domain capabilities list TDX as unsupported")
    ok, why = tdx_advertised(KVM_9)
    assert not ok and "does not know it" in why


def test_tdx_host_that_is_ready(tmp_path, image, qgs):
    found = evaluate(
        tdx_spec(image, qgs), image.manifest(), facts(domcaps={"kvm": with_tdx(KVM_9)}), sysfs_root=sysfs(tmp_path, "Y")
    )
    assert [f.check for f in found] == ["measurements", "kvm-tdx", "libvirt-tdx", "firmware", "qgs", "memory"]
    assert [f.status for f in found] == ["ok"] * 6, [str(f) for f in found]
    assert require(found) == found


def test_this_hosts_libvirt_9_and_qemu_7_2_refused_with_versions(tmp_path, image, qgs):
    found = by_check(
        evaluate(
            tdx_spec(image, qgs),
            image.manifest(),
            facts(domcaps={"kvm": KVM_9}, libvirt=V["libvirt-9.0"], qemu=V["qemu-7.2"]),
            sysfs_root=sysfs(tmp_path, "N"),
        )
    )
    lv = found["libvirt-tdx"]
    assert lv.status == "fail"
    assert "libvirt 9.0.0 is older than 11.8.0" in lv.message and "QEMU 7.2.22 is older than 10.1.0" in lv.message
    assert "QEMU >= 10.1.0" in lv.fix and "backend: emulated" in lv.fix
    kvm = found["kvm-tdx"]
    assert kvm.status == "fail" and "'N'" in kvm.message and "kvm_intel.tdx=1" in kvm.fix


def test_new_stack_without_kernel_tdx_blames_the_kernel(image, qgs, tmp_path):
    found = by_check(
        evaluate(
            tdx_spec(image, qgs),
            image.manifest(),
            facts(domcaps={"kvm": with_tdx(KVM_9, supported="no")}),
            sysfs_root=sysfs(tmp_path, "Y"),
        )
    )
    assert found["libvirt-tdx"].status == "fail"
    assert "kernel's KVM does not offer TDX" in found["libvirt-tdx"].message


def test_canonical_vsock_form_only_warns_when_tdx_not_advertised(image, tmp_path):
    spec = parse_vm_spec(f"name: td\nimage: {image.manifest_path}\nqgs_form: vsock\n")
    found = by_check(
        evaluate(
            spec,
            image.manifest(),
            facts(domcaps={"kvm": KVM_9}, libvirt=10_000_000, qemu=8_002_002),
            sysfs_root=sysfs(tmp_path, "Y"),
        )
    )
    assert found["libvirt-tdx"].status == "warn" and "Canonical" in found["libvirt-tdx"].message
    assert found["qgs"].status == "skip" and "vsock" in found["qgs"].message


@pytest.mark.parametrize(
    ("setup", "needle", "fix"),
    [
        (lambda t: sysfs(t, None), "no TDX support", "Linux >= 6.16"),
        (lambda t: sysfs(t, None, module="kvm_amd"), "runs kvm_amd", "backend: emulated"),
        (lambda t: t / "empty-sys", "kvm_intel is not loaded", "modprobe kvm_intel tdx=1"),
    ],
)
def test_kvm_tdx_sysfs_cases(tmp_path, image, qgs, setup, needle, fix):
    found = by_check(
        evaluate(
            tdx_spec(image, qgs), image.manifest(), facts(domcaps={"kvm": with_tdx(KVM_9)}), sysfs_root=setup(tmp_path)
        )
    )
    f = found["kvm-tdx"]
    assert f.status == "fail" and needle in f.message and fix in f.fix


def test_remote_host_skips_local_files_and_sysfs(tmp_path, image):
    spec = parse_vm_spec(f"name: td\nimage: {image.manifest_path}\nqgs_socket: /nonexistent/qgs\n")
    found = by_check(
        evaluate(
            spec,
            image.manifest(),
            facts(domcaps={"kvm": with_tdx(KVM_9)}, local=False),
            sysfs_root=tmp_path / "nothing",
        )
    )
    assert found["kvm-tdx"].status == "skip" and "remote" in found["kvm-tdx"].message
    assert found["qgs"].status == "skip" and found["libvirt-tdx"].status == "ok"
    assert found["firmware"].status == "warn" and "build machine" in found["firmware"].message


def test_all_failures_raised_together_each_with_its_fix(tmp_path, image):
    spec = parse_vm_spec(
        f"name: td\nimage: {image.manifest_path}\nmemory: 64GiB\nfirmware: /nonexistent/TDVF.fd\n"
        f"qgs_socket: {tmp_path / 'no-qgs'}\n"
    )
    found = evaluate(
        spec,
        image.manifest(),
        facts(domcaps={"kvm": KVM_9}, libvirt=V["libvirt-9.0"], memory_mib=8192),
        sysfs_root=sysfs(tmp_path, "N"),
    )
    with pytest.raises(PreflightError) as info:
        require(found, vm="td")
    text = str(info.value)
    assert text.startswith("host preflight refused VM td (5 problems):")
    for needle in (
        "TDX is not enabled in KVM",
        "does not offer TDX",
        "TDVF firmware /nonexistent/TDVF.fd does not exist",
        "QGS socket",
        "needs 65536 MiB",
        "fix: lower memory",
    ):
        assert needle in text, text
    assert text.count("fix: ") == 5
    assert {f.check for f in info.value.findings} == {"kvm-tdx", "libvirt-tdx", "firmware", "qgs", "memory"}


def test_qgs_path_that_is_not_a_socket(tmp_path, image):
    spec = parse_vm_spec(f"name: td\nimage: {image.manifest_path}\nqgs_socket: {image.manifest_path}\n")
    found = by_check(
        evaluate(spec, image.manifest(), facts(domcaps={"kvm": with_tdx(KVM_9)}), sysfs_root=sysfs(tmp_path, "Y"))
    )
    assert found["qgs"].status == "fail" and "not a socket" in found["qgs"].message


def test_firmware_other_than_the_predicted_one_warns(tmp_path, image, qgs):
    other = tmp_path / "other.fd"
    other.write_bytes(b"another TDVF")
    found = by_check(
        evaluate(
            tdx_spec(image, qgs, firmware=str(other)),
            image.manifest(),
            facts(domcaps={"kvm": with_tdx(KVM_9)}),
            sysfs_root=sysfs(tmp_path, "Y"),
        )
    )
    assert found["firmware"].status == "warn" and "MRTD" in found["firmware"].message


def test_kvm_unusable(tmp_path, image, qgs):
    found = by_check(
        evaluate(
            tdx_spec(image, qgs),
            image.manifest(),
            facts(errors={"kvm": "unsupported configuration: KVM is not supported on this host"}),
            sysfs_root=sysfs(tmp_path, "Y"),
        )
    )
    assert found["libvirt-tdx"].status == "fail" and "KVM is not supported" in found["libvirt-tdx"].message


def test_emulated_on_this_host(image):
    spec = parse_vm_spec(f"name: smoke\nimage: {image.manifest_path}\nbackend: emulated\nmemory: 1GiB\n")
    found = evaluate(spec, image.manifest(), facts(domcaps={"qemu": TCG_9}, memory_mib=4096))
    assert [(f.check, f.status) for f in found] == [
        ("measurements", "ok"),
        ("qemu-tcg", "ok"),
        ("kvm-device", "skip"),
        ("firmware", "ok"),
        ("memory", "ok"),
    ]
    assert "/usr/bin/qemu-system-x86_64" in found[1].message and "pc-q35-7.2" in found[1].message


@pytest.mark.parametrize("device", [("ssl-cert", 0o660), ("kvm", 0o600)])
def test_a_kvm_device_the_kvm_group_cannot_open_is_a_warning_with_the_fix(image, tmp_path, device):
    """/dev/kvm in another group than kvm, or mode 0600 (a fresh machine here): libvirt
    re-probes QEMU on every lookup (issue 15; 3.4-4.0 s per `virsh domcapabilities` at
    0600, 0.01 s at 0660)."""
    spec = parse_vm_spec(f"name: smoke\nimage: {image.manifest_path}\nbackend: emulated\nmemory: 1GiB\n")
    slow = by_check(evaluate(spec, image.manifest(), facts(domcaps={"qemu": TCG_9}, kvm_device=device)))["kvm-device"]
    assert slow.status == "warn" and f"group {device[0]}, mode {device[1]:04o}" in slow.message
    assert slow.fix == "chgrp kvm /dev/kvm && chmod 660 /dev/kvm"
    fine = facts(domcaps={"qemu": TCG_9}, kvm_device=("kvm", 0o660))
    assert by_check(evaluate(spec, image.manifest(), fine))["kvm-device"].status == "ok"


def test_kvm_device_reads_group_and_mode(tmp_path):
    device = tmp_path / "kvm"
    device.write_text("")
    os.chown(device, -1, 0)
    device.chmod(0o640)
    assert kvm_device(device) == (grp.getgrgid(0).gr_name, 0o640) and kvm_device(tmp_path / "none") is None


def test_emulated_firmware_record(image):
    data = image.data()
    data["firmware"] = None
    data["measurements"]["mrtd"] = None
    image.write(data)
    spec = parse_vm_spec(f"name: smoke\nimage: {image.manifest_path}\nbackend: emulated\n")
    found = by_check(evaluate(spec, image.manifest(), facts(domcaps={"qemu": TCG_9})))
    assert found["firmware"].status == "skip" and "zero MRTD" in found["firmware"].message
    spec = parse_vm_spec(
        f"name: smoke\nimage: {image.manifest_path}\nbackend: emulated\nfirmware: /nonexistent/TDVF.fd\n"
    )
    found = by_check(evaluate(spec, image.manifest(), facts(domcaps={"qemu": TCG_9})))
    assert found["firmware"].status == "fail" and "emulated quote service" in found["firmware"].message


def test_emulated_on_a_remote_host_checks_the_tdvf_it_puts_into_the_hosts_pool(image):
    """The emulated TD's TDVF is never booted; on a remote host the manifest's file goes into
    the host's pool (tdxvm.launch.lifecycle.firmware_upload), so this machine's copy is checked."""
    spec = parse_vm_spec(f"name: smoke\nimage: {image.manifest_path}\nbackend: emulated\nmemory: 1GiB\n")
    remote = facts(domcaps={"qemu": TCG_9}, local=False)
    found = by_check(evaluate(spec, image.manifest(), remote))
    assert (
        found["firmware"].status == "ok"
        and "goes into qemu+ssh://admin@tdx-host/system's pool" in found["firmware"].message
    )
    firmware = Path(image.manifest().firmware_path)
    firmware.write_bytes(firmware.read_bytes() + b"changed")
    found = by_check(evaluate(spec, image.manifest(), remote))
    assert found["firmware"].status == "fail" and "cannot be put into the host's pool" in found["firmware"].message
    firmware.unlink()
    found = by_check(evaluate(spec, image.manifest(), remote))
    assert found["firmware"].status == "fail" and "does not exist on this machine" in found["firmware"].message


def test_emulated_without_qemu(image):
    spec = parse_vm_spec(f"name: smoke\nimage: {image.manifest_path}\nbackend: emulated\nmemory: 1GiB\n")
    err = "invalid argument: unable to find any emulator to serve 'x86_64' architecture"
    found = evaluate(spec, image.manifest(), facts(errors={"qemu": err}))
    f = by_check(found)["qemu-tcg"]
    assert f.status == "fail" and err in f.message and "apt-get install qemu-system-x86" in f.fix


def test_test_driver_skips_what_it_cannot_know(image):
    spec = parse_vm_spec(f"name: smoke\nimage: {image.manifest_path}\nbackend: emulated\n")
    found = evaluate(spec, image.manifest(), facts(driver="TEST", memory_mib=0))
    assert {f.status for f in found if f.check != "measurements"} == {"skip"}
    assert by_check(found)["measurements"].status == "ok"  # the image's own, whatever the host
    assert require(found) == found


# The measurement floor: a manifest whose quote would not cover the kernel, initrd or
# command line is refused before anything reaches the host, on both backends.
ZERO = "00" * 48


def emulated_spec(image, extra: str = ""):
    return parse_vm_spec(f"name: smoke\nimage: {image.manifest_path}\nbackend: emulated\nmemory: 1GiB\n{extra}")


def with_measurements(image, *, stub: str | None = None, **registers):
    data = image.data()
    if stub is not None:
        data["measurements"]["inputs"] = {"efi_stub_cc_measurement": stub}
    data["measurements"].update(registers)
    image.write(data)
    return image.manifest()


def floor(image, manifest, spec=None):
    found = by_check(evaluate(spec or emulated_spec(image), manifest, facts(domcaps={"qemu": TCG_9}, memory_mib=4096)))
    return found["measurements"]


def test_floor_refuses_a_manifest_predicting_zero_rtmr2(image):
    """An older manifest (no efi_stub_cc_measurement) is judged by its predicted RTMR2."""
    f = floor(image, with_measurements(image, rtmr2=ZERO))
    assert f.status == "fail" and "RTMR2 = 0" in f.message and "initramfs and the command line" in f.message
    assert "Linux >= 6.9" in f.fix and "suite: bookworm-backports" in f.fix


def test_floor_refuses_a_kernel_whose_stub_does_not_measure(image):
    manifest = with_measurements(image, stub="no")  # RTMR2 as a (tampered) non-zero value: the stub decides
    assert manifest.measurements.rtmr2 != ZERO
    f = floor(image, manifest)
    assert f.status == "fail" and "predates CC measurement (Linux < 6.9)" in f.message
    assert "Linux >= 6.9" in f.fix and "bookworm-backports" in f.fix


def test_floor_refuses_a_stub_that_could_not_be_told(image):
    f = floor(image, with_measurements(image, stub="unknown", rtmr2=None))
    assert f.status == "fail" and "'unknown'" in f.message and "Linux >= 6.9" in f.fix


def test_floor_refuses_zero_rtmr1(image):
    f = floor(image, with_measurements(image, stub="yes", rtmr1=ZERO))
    assert f.status == "fail" and "RTMR1 = 0" in f.message and "choose the kernel" in f.message


def test_floor_opt_out_is_a_loud_warning(image):
    """The policy's explicit allow_zero_rtmrs (listed in every verdict) is the one way past."""
    opted_out = emulated_spec(image, f"policy:\n  allow_zero_rtmrs: true\n  rtmr2: [{ZERO}]\n")
    pinned = floor(image, image.manifest(), opted_out)  # a measuring image, but the policy would accept zero
    assert pinned.status == "warn" and "policy lets rtmr2 be 0" in pinned.message
    f = floor(image, with_measurements(image, stub="no", rtmr2=ZERO), opted_out)
    assert f.status == "warn" and "predates CC measurement" in f.message
    assert "continuing ONLY because" in f.message and "allow_zero_rtmrs: true" in f.message and "Linux >= 6.9" in f.fix


def test_floor_accepts_a_measuring_kernel_and_old_manifests(image):
    assert floor(image, image.manifest()).status == "ok"  # no field: judged by the non-zero RTMR1/RTMR2
    f = floor(image, with_measurements(image, stub="yes"))
    assert f.status == "ok" and "measures the command line and initrd" in f.message


@pytest.mark.parametrize("backend", ["tdx", "emulated"])
def test_floor_failure_stops_the_launch(image, host, backend):
    """A failed floor is a preflight failure: prepare_domain raises before any volume or domain."""
    from tdxvm.launch import lifecycle
    from tdxvm.launch.connection import open_connection

    manifest = with_measurements(image, stub="no")  # RTMR2 non-zero: the launch policy has a value to pin
    spec = parse_vm_spec(f"name: smoke\nuri: {host}\nimage: {image.manifest_path}\nbackend: {backend}\nmemory: 1GiB\n")
    conn = open_connection(host)
    before = sorted(v.name() for v in conn.storagePoolLookupByName("tdxvm").listAllVolumes())
    events = []
    with pytest.raises(PreflightError) as info:
        lifecycle.prepare_domain(spec, manifest, conn, events.append)
    assert [f.check for f in info.value.findings] == ["measurements"]
    assert "refused VM smoke" in str(info.value) and "fix: rebuild the image with a Linux >= 6.9 kernel" in str(
        info.value
    )
    assert conn.listAllDomains() == []
    assert sorted(v.name() for v in conn.storagePoolLookupByName("tdxvm").listAllVolumes()) == before
