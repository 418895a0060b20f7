"""Make a Debian rootfs folder into a tdxvm guest: agent, unlock step, first-boot keys.

What every image gets (the tree under ``tdxvm/image/overlay/``):

* the initramfs's ``local-top/tdxvm`` script opens the root filesystem: it brings the
  network up and runs ``python3 -m tdxvm.guest.unlock``, which prints the volume key once
  the controller has attested this TD and released it (wrapped to a key bound into the
  quote), into ``python3 -m tdxvm.guest.rootdisk``, which maps ``/dev/vda`` with fixed
  dm-crypt parameters (never its LUKS2 header) and dm-verity with the root hash from the
  measured command line (:mod:`tdxvm.guest.rootdisk`); any failure powers the TD off.
  ``local-bottom/tdxvm`` puts a tmpfs overlay over the read-only root. An initramfs hook
  carries Python, ``cryptography``, the tdxvm guest modules, cryptsetup, veritysetup and
  dmsetup into the initramfs.
* systemd units: ``tdxvm-ssh-keygen`` makes the SSH host keys at first boot, inside the
  TD (none exist in the image); ``tdxvm-agent`` answers re-attestation and receives
  secrets; systemd-networkd with DHCP. ``tdxvm-scratch`` formats and mounts the scratch
  disk; it is not part of the boot (the wipe would slow it) but started by its first
  user (:func:`tdxvm.guest.scratch.require`).
* ``model-server`` profile (``tdxvm/image/overlay-model-server/``): the ``tdxvm-serve``
  unit, which runs the inference service once ``tdxvm provision`` has installed a model
  and written its arguments; provision starts it, the boot does not (a booted TD's
  scratch disk holds no model).
* sshd: keys only. ``root`` has no password (Debian's locked ``*``); the controller's
  public key goes into ``/root/.ssh/authorized_keys``.
* the controller's release public key (``/etc/tdxvm/controller-release.pub``, also in the
  initramfs): the unlock step and the agent open only secrets that key sealed, so a host
  that attests the guest itself cannot hand it a passphrase or model key of its own.

Then the recipe's own files, the initramfs (``mkinitramfs`` with ``SOURCE_DATE_EPOCH``),
and a clean-up of everything that must not ship or would differ between builds.

Every file, folder, link and removal goes through :mod:`tdxvm.image.treepath`: the
tree's symlinks mean what they mean in the guest and never lead out of the tree.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import tdxvm
from tdxvm.image import rootfs, treepath
from tdxvm.image.ext4 import ImageStepError
from tdxvm.image.recipe import LoadedRecipe
from tdxvm.releasekey import GUEST_PATH as GUEST_RELEASE_KEY

OVERLAY = Path(__file__).with_name("overlay")
PROFILE_OVERLAYS = {"model-server": Path(__file__).with_name("overlay-model-server")}
BOOT_UNITS = ("tdxvm-ssh-keygen.service", "tdxvm-agent.service")  # what the boot starts (multi-user.target)
GUEST_PYTHON = "/usr/lib/tdxvm/python"
_PACKAGE_ROOT = Path(tdxvm.__file__).parent
# What of tdxvm ships into the guest: the guest package, the REPORTDATA binding, the
# errors' base and the atomic-write helper (all standard library only).
GUEST_MODULES = ("__init__.py", "errors.py", "fileio.py", "attest/__init__.py", "attest/binding.py", "guest/*.py")
_EXECUTABLE = {
    "etc/initramfs-tools/hooks/tdxvm",
    "etc/initramfs-tools/scripts/local-top/tdxvm",
    "etc/initramfs-tools/scripts/local-bottom/tdxvm",
}


@dataclass(frozen=True, slots=True)
class BootFiles:
    kernel: Path
    initrd: Path
    version: str


def guest_module_files() -> list[tuple[Path, str]]:
    """(source, path under the guest's Python folder) for each shipped tdxvm module."""
    out = []
    for pattern in GUEST_MODULES:
        for src in sorted(_PACKAGE_ROOT.glob(pattern)):
            out.append((src, "tdxvm/" + src.relative_to(_PACKAGE_ROOT).as_posix()))
    return out


def _copy_tree(root: Path, tree: Path, values: dict[bytes, int | None]) -> None:
    for src in sorted(p for p in tree.rglob("*") if p.is_file()):
        rel = src.relative_to(tree).as_posix()
        data = src.read_bytes()
        for placeholder, value in values.items():
            if placeholder in data:
                if value is None:
                    raise ImageStepError(
                        "overlay", [], f"{src} needs {placeholder.decode()}, which the recipe does not set"
                    )
                data = data.replace(placeholder, str(value).encode())
        treepath.write_file(root, rel, data, mode=0o755 if rel in _EXECUTABLE else 0o644)


def apply_overlay(root: Path, *, agent_port: int, profile: str = "smoke", service_port: int | None = None) -> None:
    values = {b"@AGENT_PORT@": agent_port, b"@SERVICE_PORT@": service_port}
    _copy_tree(root, OVERLAY, values)
    extra_tree = PROFILE_OVERLAYS.get(profile)
    if extra_tree is not None:
        _copy_tree(root, extra_tree, values)
    for src, rel in guest_module_files():
        treepath.write_file(root, f"{GUEST_PYTHON}/{rel}", src.read_bytes(), mode=0o644)
    wants = "/etc/systemd/system/multi-user.target.wants"
    for unit in BOOT_UNITS:
        treepath.symlink(root, f"{wants}/{unit}", f"/etc/systemd/system/{unit}")
    treepath.symlink(root, f"{wants}/systemd-networkd.service", "/lib/systemd/system/systemd-networkd.service")


def add_recipe_files(root: Path, loaded: LoadedRecipe) -> None:
    for entry in loaded.recipe.files:
        treepath.write_file(root, entry.dest, loaded.file_source(entry).read_bytes(), mode=int(entry.mode, 8))


def trust_controller(root: Path, release_public: str) -> None:
    """Build the controller's release public key into the image (``tdxvm.releasekey.GUEST_PATH``;
    the initramfs hook copies it into the initramfs): the unlock step and the agent accept
    a secret only if that key sealed it."""
    if len(release_public) != 64 or any(c not in "0123456789abcdef" for c in release_public):
        raise ImageStepError("configure", [], "the controller's release key must be 64 lowercase hex digits")
    treepath.write_file(root, GUEST_RELEASE_KEY, release_public.encode() + b"\n", mode=0o644)


def authorize(root: Path, public_key_line: str) -> None:
    """Let the controller's key log in as root (the only way in: no passwords)."""
    treepath.make_dirs(root, "/root/.ssh", mode=0o700).chmod(0o700)
    treepath.write_file(root, "/root/.ssh/authorized_keys", public_key_line.strip().encode() + b"\n", mode=0o600)


def set_hostname(root: Path, name: str) -> None:
    treepath.write_file(root, "/etc/hostname", f"{name}\n".encode())
    hosts = f"127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    treepath.write_file(root, "/etc/hosts", hosts.encode())


def omit_modules(root: Path, folders: tuple[str, ...]) -> None:
    for version_dir in treepath.matches(root, "/lib/modules", "*"):
        version = version_dir.name
        for folder in folders:
            target = treepath.resolve(root, f"/lib/modules/{version}/kernel/{folder}", follow_last=False)
            if ".." in Path(folder).parts or not target.is_relative_to(
                treepath.resolve(root, f"/lib/modules/{version}")
            ):
                raise ImageStepError("omit modules", [], f"kernel.omit_modules: {folder!r} is outside the module tree")
            treepath.remove_entry(target)


def kernel_version(root: Path) -> str:
    versions = sorted(p.name.removeprefix("vmlinuz-") for p in treepath.matches(root, "/boot", "vmlinuz-*"))
    if len(versions) != 1:
        raise ImageStepError(
            "find kernel",
            [],
            f"expected one kernel in /boot of the rootfs, found {versions or 'none'}"
            " (is kernel.package a linux-image package?)",
        )
    return versions[0]


def make_initramfs(root: Path, *, epoch: int) -> BootFiles:
    """Run ``mkinitramfs`` in the rootfs (reproducible with ``SOURCE_DATE_EPOCH``)."""
    version = kernel_version(root)
    if not re.fullmatch(r"[0-9A-Za-z.+_-]+", version):
        raise ImageStepError("mkinitramfs", [], f"unexpected kernel version {version!r}")
    initrd = f"/boot/initrd.img-{version}"
    depmod = f"depmod -a {version}\n"  # modules may have been omitted: refresh the index first
    rootfs.in_root(
        root, depmod + f"mkinitramfs -o {initrd} {version}", step="mkinitramfs", env=(f"SOURCE_DATE_EPOCH={epoch}",)
    )
    kernel = treepath.regular_file(root, f"/boot/vmlinuz-{version}")  # a device node there would read the host's
    return BootFiles(kernel=kernel, initrd=treepath.regular_file(root, initrd), version=version)


def configure(root: Path, loaded: LoadedRecipe, *, authorized_key: str, release_public: str, epoch: int) -> BootFiles:
    """Everything after the cached package steps; deterministic for the same inputs."""
    recipe = loaded.recipe
    omit_modules(root, recipe.kernel.omit_modules)
    apply_overlay(root, agent_port=recipe.agent_port, profile=recipe.profile, service_port=recipe.service_port)
    rootfs.compile_python(root, [GUEST_PYTHON], step="compile")  # the initramfs hook copies these .pyc files too
    add_recipe_files(root, loaded)
    authorize(root, authorized_key)
    trust_controller(root, release_public)
    set_hostname(root, recipe.name)
    rootfs.clean(root)
    boot = make_initramfs(root, epoch=epoch)
    rootfs.clean(root)  # mkinitramfs and depmod may have written logs
    rootfs.clamp_mtimes(root, epoch)
    os.sync()
    return boot
