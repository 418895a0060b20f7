"""The build's measurement floor: a kernel whose EFI stub does not measure the command
line and initrd into RTMR2 is refused, as soon as the rootfs step has installed it and
before any slow step, with no output, work folder or disk key left behind.

No debootstrap here: the rootfs step is replaced by one that returns a small tarball
holding a fake bzImage (a PE/COFF image built like ``test_measure.py``'s, with the
protocol GUIDs of a pre-6.9 or a >= 6.9 EFI stub in it)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import click
import pytest

from tdxvm.cli.image import image as image_group
from tdxvm.cli.output import run_guarded
from tdxvm.image import build as build_mod
from tdxvm.image import rootimage
from tdxvm.image.build import build
from tdxvm.image.cache import file_digest
from tdxvm.image.configure import BootFiles
from tdxvm.image.measure import (
    EFI_CC_MEASUREMENT_PROTOCOL_GUID,
    EFI_TCG2_PROTOCOL_GUID,
    require_measuring_kernel,
)
from tdxvm.image.measureerrors import MeasureError, UnmeasuredKernelError
from tdxvm.image.recipe import load_recipe
from tdxvm.image.rootimage import check_kernel, kernel_in_rootfs
from tdxvm.secretstore import SecretStore

from .conftest import build_pe, fake_ext4, write_lock_for

TCG2, CC = EFI_TCG2_PROTOCOL_GUID.bytes_le, EFI_CC_MEASUREMENT_PROTOCOL_GUID.bytes_le
FIX = "use a Linux >= 6.9 kernel, e.g. `kernel: {package: linux-image-cloud-amd64, suite: bookworm-backports}`"


def kernel(stub_guids: bytes) -> bytes:
    return build_pe(sections=[(0x400, stub_guids + b"\x90" * 0x1E0), (0x600, b"\xcc" * 0x400)])


OLD_KERNEL = kernel(TCG2)  # Debian 12's 6.1: the TCG2 GUID only
NEW_KERNEL = kernel(TCG2 + CC)  # Linux >= 6.9
NO_STUB = kernel(b"")  # neither GUID: cannot be told


def rootfs_tar(path: Path, files: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    """An uncompressed tarball laid out as ``rootfs.pack`` writes it (``./``-prefixed names)."""
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo("./" + name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return path


@pytest.mark.parametrize(
    ("image", "why"), [(OLD_KERNEL, "predates CC measurement (Linux < 6.9"), (NO_STUB, "cannot be told to measure")]
)
def test_a_kernel_that_does_not_measure_is_refused(image, why):
    for check in (require_measuring_kernel, check_kernel):
        with pytest.raises(UnmeasuredKernelError) as info:
            check(image, source="kernel /boot/vmlinuz-6.1.0-test")
        err = info.value
        assert isinstance(err, MeasureError) and err.code == "kernel-unmeasured"
        text = str(err)
        assert text.startswith("kernel /boot/vmlinuz-6.1.0-test: its EFI stub ") and why in text
        assert "RTMR2 would stay zero" in text and FIX in text


def test_a_kernel_that_measures_passes():
    assert check_kernel(NEW_KERNEL, source="k") is None


def test_kernel_in_rootfs(tmp_path):
    tar = rootfs_tar(
        tmp_path / "a.tar",
        {
            "etc/hostname": b"x\n",
            "boot/vmlinuz-6.1.0-28-cloud-amd64": OLD_KERNEL,
            "boot/config-6.1.0-28-cloud-amd64": b"CONFIG_X=y\n",
        },
        links={"vmlinuz": "boot/vmlinuz-6.1.0-28-cloud-amd64"},
    )
    assert kernel_in_rootfs(tar) == ("boot/vmlinuz-6.1.0-28-cloud-amd64", OLD_KERNEL)
    two = rootfs_tar(tmp_path / "b.tar", {"boot/vmlinuz-6.1.0-1": OLD_KERNEL, "boot/vmlinuz-6.12.0-1": NEW_KERNEL})
    assert kernel_in_rootfs(two) is None  # the configure step explains that one
    assert kernel_in_rootfs(rootfs_tar(tmp_path / "c.tar", {"etc/hostname": b"x\n"})) is None


def _recipe(tmp_path: Path, *, python: bool = True) -> Path:
    """Debian 12's own kernel, asked for explicitly; with ``python``, a slow pip step to come."""
    path = tmp_path / "r.yaml"
    path.write_text(
        "name: floor\nsuite: bookworm\nkernel:\n  suite: bookworm\n"
        + ("python:\n  requirements: [torch==2.13.0]\n" if python else "")
    )
    write_lock_for(path)
    return path


class Forbidden:
    """Stands in for a step that must not run; records that it was called."""

    def __init__(self, name: str) -> None:
        self.name, self.called = name, False

    def __call__(self, *args, **kwargs):
        self.called = True
        raise AssertionError(f"{self.name} ran after the kernel was refused")


@pytest.fixture
def fake_rootfs(tmp_path, monkeypatch):
    """Replace only the rootfs step (debootstrap + apt): it returns a tarball holding ``kernel``."""
    state = {"kernel": OLD_KERNEL}

    def rootfs_step(loaded, lock, lock_file, cache, work, epoch):
        tar = rootfs_tar(
            work / "rootfs.tar", {"boot/vmlinuz-6.1.0-28-cloud-amd64": state["kernel"], "etc/hostname": b"x\n"}
        )
        return tar, file_digest(tar), "0" * 64, False

    monkeypatch.setattr(rootimage, "_rootfs_step", rootfs_step)
    return state


@pytest.fixture
def later_steps(monkeypatch):
    steps = {name: Forbidden(name) for name in ("python", "configure", "ext4", "encrypt")}
    monkeypatch.setattr(rootimage, "_python_step", steps["python"])
    monkeypatch.setattr(rootimage.configure, "configure", steps["configure"])
    monkeypatch.setattr(rootimage, "make_ext4", steps["ext4"])
    monkeypatch.setattr(build_mod.luks, "encrypt_in_place", steps["encrypt"])
    return steps


def test_build_refuses_right_after_the_rootfs_step(tmp_path, fake_rootfs, later_steps):
    out, secrets = tmp_path / "build" / "floor", tmp_path / "secrets"
    events = []
    with pytest.raises(UnmeasuredKernelError) as info:
        build(
            load_recipe(_recipe(tmp_path)),
            output=out,
            secret_store=SecretStore(directory=secrets),
            cache=build_mod.StepCache(tmp_path / "cache"),
            progress=events.append,
        )
    text = str(info.value)
    assert "kernel /boot/vmlinuz-6.1.0-28-cloud-amd64 (linux-image-cloud-amd64 from bookworm)" in text and FIX in text
    assert [(e.step, e.status) for e in events] == [("rootfs", "start"), ("rootfs", "done")]
    assert not any(step.called for step in later_steps.values())  # pip, configure, ext4, encrypt never ran
    assert list((tmp_path / "build").iterdir()) == []  # no output, no work folder
    assert not secrets.exists()  # no disk key (nor controller keys) stored


def test_build_refuses_a_kernel_whose_stub_cannot_be_told(tmp_path, fake_rootfs, later_steps):
    fake_rootfs["kernel"] = NO_STUB
    with pytest.raises(UnmeasuredKernelError, match="cannot be told to measure"):
        build(
            load_recipe(_recipe(tmp_path)),
            output=tmp_path / "out",
            secret_store=SecretStore(directory=tmp_path / "s"),
            cache=build_mod.StepCache(tmp_path / "cache"),
        )
    assert not any(step.called for step in later_steps.values())


def configure_ships(tmp_path, monkeypatch, kernel: bytes, version: str) -> None:
    """The configure step, replaced: it "ships" ``kernel`` (and a tiny initramfs)."""
    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / "vmlinuz").write_bytes(kernel)
    (boot / "initrd.img").write_bytes(b"070701")
    monkeypatch.setattr(
        rootimage.configure,
        "configure",
        lambda *a, **k: BootFiles(kernel=boot / "vmlinuz", initrd=boot / "initrd.img", version=version),
    )


def test_the_kernel_that_ships_is_checked_again_before_a_disk_key_exists(tmp_path, fake_rootfs, monkeypatch):
    """Should the configured kernel differ from the rootfs one, it is refused before ext4 and encrypt."""
    fake_rootfs["kernel"] = NEW_KERNEL
    configure_ships(tmp_path, monkeypatch, OLD_KERNEL, "6.1.0-x")
    ext4, encrypt = Forbidden("ext4"), Forbidden("encrypt")
    monkeypatch.setattr(rootimage, "make_ext4", ext4)
    monkeypatch.setattr(build_mod.luks, "encrypt_in_place", encrypt)
    secrets = tmp_path / "secrets"
    (tmp_path / "build").mkdir()
    with pytest.raises(UnmeasuredKernelError, match=r"^kernel 6\.1\.0-x \(linux-image-cloud-amd64 from bookworm\): "):
        build(
            load_recipe(_recipe(tmp_path, python=False)),
            output=tmp_path / "build" / "floor",
            secret_store=SecretStore(directory=secrets),
            cache=build_mod.StepCache(tmp_path / "cache"),
        )
    assert not ext4.called and not encrypt.called
    assert list((tmp_path / "build").iterdir()) == []
    assert not (secrets / "disk").exists()


def test_a_failure_after_the_disk_key_is_stored_removes_it(tmp_path, fake_rootfs, monkeypatch):
    """The build's key goes with the build: a failure before the image is published leaves none."""
    fake_rootfs["kernel"] = NEW_KERNEL
    configure_ships(tmp_path, monkeypatch, NEW_KERNEL, "6.12.0-x")
    monkeypatch.setattr(rootimage, "make_ext4", fake_ext4)

    class Header:
        cipher = "aes-xts-plain64"

    def encrypt_in_place(image, **k):
        image.write_bytes(b"LUKS")
        return Header()

    monkeypatch.setattr(build_mod.luks, "encrypt_in_place", encrypt_in_place)

    def broken(path):
        raise OSError("disk full")

    monkeypatch.setattr(build_mod.manifest, "artifact_entry", broken)
    secrets = tmp_path / "secrets"
    recipe = tmp_path / "ok.yaml"
    recipe.write_text("name: floor\n")  # the default kernel suite: bookworm-backports
    write_lock_for(recipe)
    with pytest.raises(OSError, match="disk full"):
        build(
            load_recipe(recipe),
            output=tmp_path / "build" / "floor",
            secret_store=SecretStore(directory=secrets),
            cache=build_mod.StepCache(tmp_path / "cache"),
        )
    assert (secrets / "disk").is_dir() and list((secrets / "disk").iterdir()) == []
    assert list((tmp_path / "build").iterdir()) == []


def test_cli_build_refusal_is_one_error_line(tmp_path, fake_rootfs, later_steps, capsys):
    group = click.Group("tdxvm")
    group.add_command(image_group)
    rc = run_guarded(
        group,
        [
            "image",
            "build",
            str(_recipe(tmp_path)),
            "--out",
            str(tmp_path / "out"),
            "--cache",
            str(tmp_path / "cache"),
            "--secrets",
            str(tmp_path / "secrets"),
        ],
    )
    err = capsys.readouterr().err
    assert rc == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: kernel /boot/vmlinuz-6.1.0-28-cloud-amd64") and FIX in line


def test_real_cached_rootfs_kernel_passes():
    """A rootfs the image_build tests cached (bookworm-backports' kernel): found and accepted."""
    from ..conftest import test_cache_root

    tars = sorted((test_cache_root() / "image").glob("rootfs-*/rootfs.tar"))
    if not tars:
        pytest.skip(f"no cached rootfs under {test_cache_root() / 'image'} (tests/image_build makes one)")
    found = kernel_in_rootfs(tars[0])
    assert found is not None and found[0].startswith("boot/vmlinuz-")
    check_kernel(found[1], source=found[0])
