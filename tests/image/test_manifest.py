"""The image manifest: one typed model that the build writes and a launch reads.

``data/manifest-v2.json`` is a ``manifest.json`` that ``tdxvm image build`` wrote before
the manifest was a typed model (the slow steps replaced as below, so the artifacts are
tiny), with its paths and date made fixed and ``provenance.kernel_package`` filled in as
a real lock gives it: the model must read that format and write it back byte for byte.

The build here is real from the lock to the manifest except debootstrap/apt (a tarball
holding a kernel whose EFI stub measures), the configure step (it ships that kernel and
a tiny initramfs), mkfs.ext4 (a file of zeros; veritysetup runs on it) and cryptsetup
(a four-byte disk image).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

from tdxvm.image import build as build_mod
from tdxvm.image import manifest, rootimage
from tdxvm.image.build import build
from tdxvm.image.cache import StepCache, file_digest
from tdxvm.image.configure import BootFiles
from tdxvm.image.manifest import ImageManifest, ImageManifestError
from tdxvm.image.recipe import load_recipe
from tdxvm.image.reproduce import ReproduceError, reproduce
from tdxvm.launch.errors import ManifestError
from tdxvm.launch.manifest import load_manifest
from tdxvm.releasekey import public_hex, release_key
from tdxvm.secretstore import SecretStore

from ..attested_guest import firmware, kernel
from ..killedwriter import Writer
from .conftest import fake_ext4, write_lock_for
from .test_kernel_floor import rootfs_tar

GOLDEN = Path(__file__).parent / "data" / "manifest-v2.json"


def _keys(value: object) -> object:
    """The shape of JSON data: its keys, recursively (lists by their first item)."""
    if isinstance(value, dict):
        return {k: _keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_keys(value[0])] if value else []
    return None


@pytest.fixture
def fake_steps(tmp_path, monkeypatch):
    k = kernel()

    def rootfs_step(loaded, lock, lock_file, cache, work, epoch):
        tar = rootfs_tar(work / "rootfs.tar", {"boot/vmlinuz-6.12.0-x": k, "etc/hostname": b"x\n"})
        return tar, file_digest(tar), "0" * 64, False

    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / "vmlinuz").write_bytes(k)
    (boot / "initrd.img").write_bytes(b"070701")

    class Header:
        cipher = "aes-xts-plain64"

    def encrypt_in_place(image, **_):
        image.write_bytes(b"LUKS")
        return Header()

    monkeypatch.setattr(rootimage, "_rootfs_step", rootfs_step)
    monkeypatch.setattr(
        rootimage.configure,
        "configure",
        lambda *a, **kw: BootFiles(kernel=boot / "vmlinuz", initrd=boot / "initrd.img", version="6.12.0-x"),
    )
    monkeypatch.setattr(rootimage, "make_ext4", fake_ext4)
    monkeypatch.setattr(build_mod.luks, "encrypt_in_place", encrypt_in_place)


@pytest.fixture
def built(tmp_path, fake_steps) -> tuple[Path, dict, SecretStore]:
    recipe = tmp_path / "floor.yaml"
    recipe.write_text("name: floor\n")
    write_lock_for(recipe)
    fw = tmp_path / "OVMF.inteltdx.fd"
    fw.write_bytes(firmware())
    store = SecretStore(directory=tmp_path / "secrets")
    out = tmp_path / "build" / "floor"
    result = build(
        load_recipe(recipe), output=out, secret_store=store, cache=StepCache(tmp_path / "cache"), firmware=str(fw)
    )
    return out, result, store


def test_the_committed_manifest_reads_and_writes_back_byte_for_byte():
    text = GOLDEN.read_text()
    m = manifest.read(GOLDEN)
    assert m.to_json() == text
    assert m.path == GOLDEN.resolve() and m.kernel.path == GOLDEN.parent / "vmlinuz"
    assert m.provenance is not None and m.provenance.kernel_package is not None
    assert m.provenance.kernel_package.version == "6.12.0-1~bpo12+1" and m.provenance.firmware_package is None
    assert m.measurements.inputs is not None and m.measurements.inputs.efi_stub_cc_measurement == "yes"
    assert m.measurements.events[0].rtmr == "rtmr1" and m.verity is not None and m.verity.salt is None
    assert m.luks is not None and m.luks.key_secret == f"disk/{m.luks.uuid}"


def test_a_build_writes_the_committed_format_and_a_launch_reads_it(built):
    out, result, store = built
    text = (out / "manifest.json").read_text()
    data = json.loads(text)
    golden = json.loads(GOLDEN.read_text())
    assert data["provenance"]["kernel_package"] is None  # the test lock lists no packages
    golden["provenance"]["kernel_package"] = None
    assert _keys(data) == _keys(golden)  # every field, nested, and no other
    assert {k: v for k, v in result.items() if k != "timings"} == data
    assert list(result["timings"]) == ["rootfs", "python", "configure", "ext4", "verity", "encrypt", "measure"]

    m = load_manifest(out)
    assert m.to_json() == text
    assert m.luks is not None and store.exists(m.luks.key_secret)
    assert m.release_key == public_hex(release_key(store))
    assert m.measurements.inputs is not None and m.measurements.inputs.firmware_sha256 == m.firmware_sha256
    assert m.measurements.mrtd is not None and m.measurements.registers()["mrtd"] == m.measurements.mrtd
    assert m.kernel.sha256 == manifest.file_sha256(out / "vmlinuz") and m.disk.size == 4
    assert manifest.verify_artifacts(m, out) == []
    assert m.provenance is not None and (out / m.provenance.listing.file).is_file()
    (out / "initrd.img").write_bytes(b"070701 changed")
    assert manifest.verify_artifacts(m, out) == [
        f"{out / 'initrd.img'}: differs from the manifest (sha256 {m.initrd.sha256})"
    ]


def test_prediction_inputs_leave_out_what_was_not_known():
    """No firmware: no ``firmware_sha256`` key (not a null), as measure.predict records it."""
    m = manifest.read(GOLDEN)
    data = m.to_data()
    del data["measurements"]["inputs"]["firmware_sha256"]
    again = manifest.parse(data, path=GOLDEN)
    assert again.measurements.inputs is not None and again.measurements.inputs.firmware_sha256 is None
    assert "firmware_sha256" not in again.to_data()["measurements"]["inputs"]


def _errors(tmp_path: Path, change) -> str:
    data = json.loads(GOLDEN.read_text())
    change(data)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ImageManifestError) as info:
        manifest.read(path)
    with pytest.raises(ManifestError) as launch_info:  # a launch raises its own error with the same words
        load_manifest(path)
    assert str(launch_info.value) == str(info.value) and info.value.code == "manifest"
    text = str(info.value)
    assert text.startswith(f"image manifest {path}")
    return text


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda d: d.update(colour="blue"), "  colour: Extra inputs are not permitted"),
        (lambda d: d["luks"].update(passphrase="x"), "  luks.passphrase: Extra inputs are not permitted"),
        (lambda d: d["provenance"]["listing"].pop("tree_sha256"), "  provenance.listing.tree_sha256: Field required"),
        (
            lambda d: d["artifacts"].update({"rootfs.img": d["artifacts"]["disk.img"]}),
            "  artifacts.rootfs.img: Extra inputs",
        ),
        (lambda d: d.update(ssh_port="22"), "  ssh_port: Input should be a valid integer"),
        (
            lambda d: d["measurements"]["events"][2].update(digest="00"),
            "  measurements.events.2.digest: String should match",
        ),
        (
            lambda d: d["measurements"]["inputs"].update(efi_stub_cc_measurement="maybe"),
            "  measurements.inputs.efi_stub_cc_measurement: Input should be 'yes', 'no' or 'unknown'",
        ),
        (lambda d: d.update(release_key="AB" * 32), "  release_key: String should match pattern"),
        (
            lambda d: d["verity"].update(data_blocks=-1),
            "  verity.data_blocks: Input should be greater than or equal to 0",
        ),
        (lambda d: d.update(format="tdxvm-image-manifest/3"), "format 'tdxvm-image-manifest/3' is not"),
    ],
)
def test_errors_name_the_file_and_the_field(tmp_path, change, needle):
    assert needle in _errors(tmp_path, change)


def test_every_error_is_listed_at_once(tmp_path):
    def two(d):
        d.pop("cmdline")
        d["luks"]["uuid"] = ""

    text = _errors(tmp_path, two)
    assert text.splitlines()[1:] == [
        "  cmdline: Field required",
        "  luks.uuid: String should match pattern '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'",
    ]


def test_a_manifest_written_by_hand_needs_only_what_a_launch_reads(tmp_path):
    full = json.loads(GOLDEN.read_text())
    data = {k: copy.deepcopy(full[k]) for k in ("name", "cmdline", "artifacts")}
    data["measurements"] = {r: full["measurements"][r] for r in ("mrtd", "rtmr1", "rtmr2")}
    m = manifest.parse(data, path=tmp_path / "manifest.json")
    assert (m.luks, m.release_key, m.provenance, m.verity, m.format) == (None, None, None, None, None)
    assert m.measurements.registers() == {
        "mrtd": full["measurements"]["mrtd"],
        "rtmr0": None,
        "rtmr1": full["measurements"]["rtmr1"],
        "rtmr2": full["measurements"]["rtmr2"],
        "rtmr3": None,
    }
    assert m.guest_ports() == {"agent": 7300, "ssh": 22}


def test_a_manifest_not_read_from_a_file_has_no_path():
    m = ImageManifest.model_validate(json.loads(GOLDEN.read_text()))
    with pytest.raises(ValueError, match="image manifest floor was not read from a file"):
        _ = m.kernel


def test_image_verify_reads_the_manifest_and_rebuilds_the_same(built, tmp_path):
    """``tdxvm image verify`` of the build above (the same fakes): every compared item the same."""
    out, _, _ = built
    report = reproduce(out, cache=tmp_path / "verify-cache")
    assert report.identical and report.manifest == (out / "manifest.json").resolve()
    m = manifest.read(out)
    by_name = {i.name: i for i in report.items}
    assert m.measurements.mrtd is not None and m.verity is not None
    assert by_name["kernel command line"].built == m.cmdline and by_name["MRTD"].built == m.measurements.mrtd
    assert by_name["root filesystem (verity root hash)"].rebuilt == m.verity.root_hash

    data = json.loads((out / "manifest.json").read_text())
    data["measurements"]["rtmr2"] = "0" * 96
    (out / "manifest.json").write_text(json.dumps(data))
    report = reproduce(out, cache=tmp_path / "verify-cache")
    assert [i.name for i in report.items if not i.same] == ["RTMR2"]


_VERIFYING = """
import sys
from pathlib import Path
from tdxvm.image.reproduce import _verify_folder
with _verify_folder(Path(sys.argv[1])) as work:
    (work / "debootstrap" / "etc").mkdir(parents=True)
    (work / "debootstrap" / "etc" / "hostname").write_text("a rebuild under way")
    print(work, flush=True)
    sys.stdin.readline()  # a verify still at work: until the test kills it
"""


def test_image_verify_removes_the_work_folder_a_killed_verify_left(built, tmp_path):
    """A verify killed outright (SIGKILL, power loss) leaves its work folder, a whole
    rebuild's tree, beside the image; the next verify of that image removes it."""
    out, _, _ = built
    with Writer(_VERIFYING, out) as killed:
        killed.kill()
    assert killed.path.parent == out.parent and killed.path.name.startswith(".floor.verify-")
    assert (killed.path / "debootstrap" / "etc" / "hostname").is_file()  # what the kill left
    before = set(os.listdir(out.parent)) - {killed.path.name}
    assert reproduce(out, cache=tmp_path / "verify-cache").identical
    assert set(os.listdir(out.parent)) == before


def test_image_verify_keeps_the_work_folder_of_a_verify_still_running(built, tmp_path):
    out, _, _ = built
    with Writer(_VERIFYING, out) as running:
        assert reproduce(out, cache=tmp_path / "verify-cache").identical
        assert (running.path / "debootstrap" / "etc" / "hostname").is_file()  # kept: its verify holds it
        assert [n for n in os.listdir(out.parent) if ".verify-" in n] == [running.path.name]


def test_image_verify_refuses_a_manifest_without_provenance_or_unreadable(built):
    out, _, _ = built
    data = json.loads((out / "manifest.json").read_text())
    del data["provenance"]
    (out / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ReproduceError, match="records no provenance"):
        reproduce(out)
    (out / "manifest.json").write_text(json.dumps({**data, "luks": {"uuid": "55aaab9b-c4c8-4534-932b-3cec680189d1"}}))
    with pytest.raises(ReproduceError, match=r"is not usable:\n  luks.cipher: Field required"):
        reproduce(out)


@pytest.mark.parametrize("name", ["release/controller", "ssh/controller", "weights/llama", "disk/other", "disk/x"])
def test_a_manifest_can_name_only_its_own_volume_key(tmp_path, name):
    """The launch releases the secret the manifest names to the attested TD: an edited manifest
    naming the controller's release key (or any other secret) is refused when read."""
    doc = json.loads(GOLDEN.read_text())
    doc["luks"]["key_secret"] = name
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ImageManifestError, match=r"key_secret must be disk/55aaab9b-c4c8-4534-932b-3cec680189d1"):
        manifest.read(tmp_path / "manifest.json")


@pytest.mark.parametrize("text", ["[" * 100000, '{"name": ' + "9" * 5000 + "}"])
def test_json_that_python_cannot_hold_is_a_manifest_error(tmp_path, text):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ImageManifestError, match="not usable JSON"):
        manifest.read(tmp_path / "manifest.json")
