"""predict() and ``tdxvm image measure``: the real TDVF with a small EFI-stub kernel."""

from __future__ import annotations

import hashlib
import json

import click
import pytest

from tdxvm.cli.image import image as image_group
from tdxvm.cli.output import run_guarded
from tdxvm.image import PROFILES, REGISTERS, MeasureError, predict
from tdxvm.image.authenticode import authenticode_digest
from tdxvm.image.measure import EFI_CC_MEASUREMENT_PROTOCOL_GUID, EFI_TCG2_PROTOCOL_GUID
from tdxvm.image.tdvf import mrtd

from .conftest import build_pe

CMDLINE = "console=ttyS0 root=/dev/vda ro"
INITRD = b"070701" + bytes(range(256)) * 40  # looks like a cpio archive; any bytes do


def kernel(stub_guids: bytes = EFI_TCG2_PROTOCOL_GUID.bytes_le + EFI_CC_MEASUREMENT_PROTOCOL_GUID.bytes_le) -> bytes:
    return build_pe(sections=[(0x400, stub_guids + b"\x90" * 0x1E0), (0x600, b"\xcc" * 0x400)])


def h(data: bytes) -> bytes:
    return hashlib.sha384(data).digest()


def extend(*digests: bytes) -> str:
    value = bytes(48)
    for d in digests:
        value = h(value + d)
    return value.hex()


def test_predict_upstream(tdvf_image):
    k = kernel()
    m = predict(firmware=tdvf_image, kernel=k, initrd=INITRD, cmdline=CMDLINE)
    assert m.profile == "upstream"
    assert m.mrtd == mrtd(tdvf_image).hex()
    assert m.rtmr1 == extend(
        authenticode_digest(k),
        h(b"Calling EFI Application from Boot Option"),
        h(bytes(4)),
        h(b"Exit Boot Services Invocation"),
        h(b"Exit Boot Services Returned with Success"),
    )
    options = ("initrd=initrd " + CMDLINE + "\0").encode("utf-16-le")
    assert m.rtmr2 == extend(h(options), h(INITRD))
    assert m.rtmr0 is None and m.rtmr3 is None
    assert m.predicted == {"mrtd": True, "rtmr0": False, "rtmr1": True, "rtmr2": True, "rtmr3": False}
    assert m.notes["rtmr0"].startswith("not predicted:") and m.notes["rtmr3"].startswith("not predicted:")
    d = json.loads(json.dumps(m.to_dict()))
    assert [d[r] for r in REGISTERS] == [m.mrtd, None, m.rtmr1, m.rtmr2, None]
    assert [e["register"] for e in d["events"]] == ["rtmr1"] * 5 + ["rtmr2"] * 2
    assert d["inputs"]["kernel_authenticode_sha384"] == authenticode_digest(k).hex()
    assert d["inputs"]["load_options_sha384"] == h(options).hex()


def test_profiles(tdvf_image):
    k = kernel()
    old = predict(firmware=tdvf_image, kernel=k, initrd=INITRD, cmdline=CMDLINE, profile="edk2-202505")
    assert old.rtmr2 == extend(h((CMDLINE + " initrd=initrd\0").encode("utf-16-le")), h(INITRD))
    q8 = predict(firmware=tdvf_image, kernel=k, initrd=INITRD, cmdline=CMDLINE, profile="qemu8")
    assert q8.mrtd == mrtd(tdvf_image, order="two-pass").hex()
    assert q8.rtmr1 is None and "setup header" in q8.notes["rtmr1"]
    assert q8.rtmr2 == old.rtmr2
    assert set(PROFILES) == {"upstream", "edk2-202505", "qemu9", "qemu8"}
    with pytest.raises(MeasureError, match="unknown profile"):
        predict(firmware=None, kernel=k, initrd=b"", cmdline="", profile="qemu7")


def test_without_firmware_initrd_or_cmdline():
    m = predict(firmware=None, kernel=kernel(), initrd=b"", cmdline="")
    assert m.mrtd is None and m.notes["mrtd"] == "not predicted: no firmware given"
    assert m.rtmr2 == bytes(48).hex()  # NULL load options and no initrd: nothing measured
    assert m.predicted["rtmr2"]


def test_kernel_whose_stub_cannot_measure_in_a_td():
    m = predict(firmware=None, kernel=kernel(EFI_TCG2_PROTOCOL_GUID.bytes_le), initrd=INITRD, cmdline=CMDLINE)
    assert m.rtmr2 == bytes(48).hex() and "NOT measured" in m.notes["rtmr2"]
    unknown = predict(firmware=None, kernel=kernel(b""), initrd=INITRD, cmdline=CMDLINE)
    assert unknown.rtmr2 is None and unknown.notes["rtmr2"].startswith("not predicted:")
    assert unknown.rtmr1 is not None


def test_bad_kernel_raises_with_offset():
    with pytest.raises(MeasureError) as info:
        predict(firmware=None, kernel=b"\x7fELF" + bytes(100), initrd=b"", cmdline="")
    assert info.value.code == "pe" and info.value.offset == 0


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    group = click.Group("tdxvm")
    group.add_command(image_group)
    rc = run_guarded(group, argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture()
def files(tmp_path, tdvf_path):
    (tmp_path / "vmlinuz").write_bytes(kernel())
    (tmp_path / "initrd.img").write_bytes(INITRD)
    return {
        "firmware": str(tdvf_path),
        "kernel": str(tmp_path / "vmlinuz"),
        "initrd": str(tmp_path / "initrd.img"),
        "dir": tmp_path,
    }


def test_cli_text(files, capsys, tdvf_image):
    rc, out, err = run_cli(
        [
            "image",
            "measure",
            "--firmware",
            files["firmware"],
            "--kernel",
            files["kernel"],
            "--initrd",
            files["initrd"],
            "--cmdline",
            CMDLINE,
        ],
        capsys,
    )
    assert rc == 0, err
    lines = out.splitlines()
    assert [line.split()[0] for line in lines[:-1]] == list(REGISTERS)
    assert lines[-1] == "rootfs not pinned (no tdxvm.verity= on the command line)"
    expected = predict(firmware=tdvf_image, kernel=kernel(), initrd=INITRD, cmdline=CMDLINE)
    assert lines[0].split()[1] == expected.mrtd
    assert lines[1].startswith("rtmr0  not predicted: ")
    assert lines[3].split()[1] == expected.rtmr2


def test_cli_json(files, capsys):
    rc, out, _ = run_cli(["image", "measure", "--kernel", files["kernel"], "--profile", "qemu8", "-o", "json"], capsys)
    assert rc == 0
    d = json.loads(out)
    assert d["profile"] == "qemu8" and d["mrtd"] is None and d["predicted"]["rtmr2"] is True


def test_cli_reports_the_pinned_root_filesystem(files, capsys):
    cmdline = f"{CMDLINE} tdxvm.verity=262144:{'ab' * 32}"
    rc, out, _ = run_cli(["image", "measure", "--kernel", files["kernel"], "--cmdline", cmdline], capsys)
    assert (
        rc == 0 and out.splitlines()[-1] == f"rootfs verity root hash {'ab' * 32} (sha256, 262144 x 4096-byte blocks)"
    )
    rc, out, _ = run_cli(["image", "measure", "--kernel", files["kernel"], "--cmdline", cmdline, "-o", "json"], capsys)
    v = json.loads(out)["verity"]
    assert (v["root_hash"], v["data_blocks"], v["hash_algorithm"], v["hash_offset"]) == (
        "ab" * 32,
        262144,
        "sha256",
        1 << 30,
    )


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--kernel", "{kernel}", "--cmdline", "tdxvm.verity=1:ab"], "--cmdline: tdxvm.verity='1:ab' is not"),
        (["--kernel", "{firmware}"], "kernel: PE/COFF image at byte offset 0: no MZ signature"),
        (["--kernel", "{kernel}", "--firmware", "{kernel}"], "firmware: TDVF firmware at byte offset"),
        (["--kernel", "{dir}/missing"], "kernel {dir}/missing: No such file"),
        (["--kernel", "{kernel}", "--cmdline", "a\0b"], "NUL"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(files, capsys, argv, words):
    argv = [a.format(**files) for a in argv]
    rc, out, err = run_cli(["image", "measure", *argv], capsys)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and words.format(**files) in err


def test_cli_bad_input_json(files, capsys):
    rc, out, _ = run_cli(["image", "measure", "--kernel", files["firmware"], "-o", "json"], capsys)
    assert rc == 2 and json.loads(out)["error"]["code"] == "pe"


def test_cli_warns_when_the_kernel_cannot_measure_rtmr2(files, capsys):
    """measure stays a report (exit 0, the zero shown), but says that build and launch refuse the kernel."""
    old = files["dir"] / "old-vmlinuz"
    old.write_bytes(kernel(EFI_TCG2_PROTOCOL_GUID.bytes_le))
    rc, out, err = run_cli(["image", "measure", "--kernel", str(old), "--cmdline", CMDLINE], capsys)
    assert rc == 0 and out.splitlines()[3] == "rtmr2  " + "0" * 96
    assert err.startswith("warning: rtmr2 is zero") and "NOT measured" in err and err.count("\n") == 1
    assert "`tdxvm image build` and `tdxvm launch` refuse this kernel" in err
    assert (
        "use a Linux >= 6.9 kernel, e.g. `kernel: {package: linux-image-cloud-amd64, suite: bookworm-backports}`" in err
    )
    rc, out, err = run_cli(["image", "measure", "--kernel", str(old), "-o", "json"], capsys)
    assert rc == 0 and json.loads(out)["inputs"]["efi_stub_cc_measurement"] == "no" and "refuse this kernel" in err


def test_cli_warns_when_the_stub_cannot_be_told(files, capsys):
    unknown = files["dir"] / "unknown-vmlinuz"
    unknown.write_bytes(kernel(b""))
    rc, out, err = run_cli(["image", "measure", "--kernel", str(unknown)], capsys)
    assert rc == 0 and out.splitlines()[3].startswith("rtmr2  not predicted: ")
    assert err.startswith("warning: rtmr2 is not predicted: cannot tell") and "refuse this kernel" in err


def test_cli_does_not_warn_for_a_measuring_kernel(files, capsys):
    rc, _, err = run_cli(["image", "measure", "--kernel", files["kernel"], "--cmdline", CMDLINE], capsys)
    assert rc == 0 and err == ""


def test_predict_real_firmware_and_kernel(tdvf_image, debian_kernel):
    k = debian_kernel.read_bytes()
    m = predict(firmware=tdvf_image, kernel=k, initrd=INITRD, cmdline=CMDLINE)
    assert m.inputs["efi_stub_cc_measurement"] == "yes"
    assert [r for r in REGISTERS if m.predicted[r]] == ["mrtd", "rtmr1", "rtmr2"]
    assert m.rtmr1 == extend(*(bytes.fromhex(e.digest) for e in m.events[:5]))
    assert m.events[0].digest == authenticode_digest(k).hex()
