"""A poisoned rootfs cannot reach the build host: tarballs crafted to write through
symlinks, and trees whose folders are symlinks to host paths, are unpacked, configured
and cleaned with every host file left as it was (content, existence, mtime).

Real files, the real GNU tar; the host's "victims" live in ``tmp_path`` beside the tree."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from tdxvm.image import configure, rootfs, treepath
from tdxvm.image.cache import CacheError, file_digest
from tdxvm.image.ext4 import ImageStepError
from tdxvm.image.treepath import TreePathError

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl controller"


class Host:
    """Files of the "build host" outside the tree, with what they must still be afterwards."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        for rel in (
            "passwd",
            "hostname",
            "machine-id",
            "ssh/ssh_host_rsa_key",
            "log/syslog",
            "boot/vmlinuz-9.9-host",
            "modules/6.1.0-1/kernel/drivers/gpu/x.ko",
        ):
            path = folder / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"host {rel}\n")
            os.utime(path, (946684800, 946684800))
        self.before = self.snapshot()

    def snapshot(self) -> dict[str, tuple[int, bytes | None, int]]:
        out = {}
        for dirpath, dirnames, filenames in os.walk(self.folder):
            for name in (*dirnames, *filenames):
                path = Path(dirpath) / name
                st = path.lstat()
                out[str(path.relative_to(self.folder))] = (
                    st.st_mode,
                    path.read_bytes() if path.is_file() else None,
                    st.st_mtime_ns,
                )
        return out

    def untouched(self) -> bool:
        return self.snapshot() == self.before


@pytest.fixture
def host(tmp_path) -> Host:
    return Host(tmp_path / "host")


def inside(root: Path, host_path: Path) -> Path:
    """Where the guest's view of the absolute ``host_path`` lies under ``root``."""
    return root / str(host_path).lstrip("/")


# -- treepath.resolve -------------------------------------------------------------------


def test_resolve_follows_links_as_a_chroot_would(tmp_path, host):
    root = tmp_path / "root"
    (root / "usr/lib/modules").mkdir(parents=True)
    (root / "lib").symlink_to("usr/lib")  # Debian 12 is usr-merged
    (root / "etc").symlink_to(host.folder)  # absolute: the guest's own path
    (root / "up").symlink_to("../../../..")
    (root / "loop").symlink_to("loop")
    (root / "usr/lib/back").symlink_to("/lib/modules")
    assert treepath.resolve(root, "/lib/modules/6.1") == root / "usr/lib/modules/6.1"
    assert treepath.resolve(root, "etc/passwd") == inside(root, host.folder) / "passwd"
    assert treepath.resolve(root, "up/x") == root / "x"  # `..` stops at the root
    assert treepath.resolve(root, "usr/../../../up/lib") == root / "usr/lib"
    assert treepath.resolve(root, "/../../lib/back") == root / "usr/lib/modules"
    assert treepath.resolve(root, "lib", follow_last=False) == root / "lib"
    with pytest.raises(TreePathError, match="more than 40 symlinks"):
        treepath.resolve(root, "loop/x")
    assert host.untouched()


# -- unpack: crafted tarballs through the real GNU tar -----------------------------------


def make_tar(path: Path, members: list[tuple[str, str, object]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, kind, arg in members:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if kind == "file":
                assert isinstance(arg, bytes)
                info.size = len(arg)
                tar.addfile(info, io.BytesIO(arg))
                continue
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, str(arg)
            elif kind == "hard":
                info.type, info.linkname = tarfile.LNKTYPE, str(arg)
            tar.addfile(info)
    return path


def poisoned(victim: Path) -> dict[str, list[tuple[str, str, object]]]:
    """Archives that would write ``victim/passwd`` on the host if tar followed them."""
    return {
        "absolute symlink": [("./etc", "sym", victim), ("./etc/passwd", "file", b"pwned\n")],
        "relative symlink out": [
            ("./a", "sym", "../../../../../../../.." + str(victim)),
            ("./a/passwd", "file", b"pwned\n"),
        ],
        "symlink to ..": [("./a", "sym", ".."), ("./a/host/passwd", "file", b"pwned\n")],
        "chain of symlinks": [("./l1", "sym", "l2"), ("./l2", "sym", victim), ("./l1/passwd", "file", b"pwned\n")],
        "folder replaced by a symlink": [
            ("./etc", "dir", None),
            ("./etc", "sym", victim),
            ("./etc/passwd", "file", b"pwned\n"),
        ],
        "usr-merge link to a bad link": [
            ("./usr", "dir", None),
            ("./usr/lib", "sym", victim),
            ("./lib", "sym", "usr/lib"),
            ("./lib/passwd", "file", b"pwned\n"),
        ],
        "hard link through a symlink": [("./e", "sym", victim), ("./h", "hard", "./e/passwd")],
        "dotdot name": [("./../host/passwd", "file", b"pwned\n")],
        "hard link to a host file": [("./h", "hard", str(victim / "passwd")), ("./h", "file", b"pwned\n")],
        "hard link with ..": [("./h", "hard", "../host/passwd")],
    }


@pytest.mark.parametrize("attack", list(poisoned(Path("/x"))))
def test_unpack_refuses_writes_through_links(tmp_path, host, attack):
    tarball = make_tar(tmp_path / "poison.tar", poisoned(host.folder)[attack])
    tree = tmp_path / "work" / "rootfs"
    with pytest.raises(ImageStepError, match="tar"):
        rootfs.unpack(tarball, tree)
    assert host.untouched()
    assert not tree.exists()  # the partly unpacked tree is gone


def test_tar_options_from_the_environment_do_not_reach_tar(tmp_path, host, monkeypatch):
    """``TAR_OPTIONS=-P`` would make GNU tar write through the absolute symlink."""
    monkeypatch.setenv("TAR_OPTIONS", "-P")
    tarball = make_tar(tmp_path / "poison.tar", poisoned(host.folder)["absolute symlink"])
    with pytest.raises(ImageStepError):
        rootfs.unpack(tarball, tmp_path / "rootfs")
    assert host.untouched()


def test_unpack_keeps_absolute_names_and_links_inside(tmp_path, host):
    tarball = make_tar(
        tmp_path / "ok.tar",
        [
            (str(host.folder / "passwd"), "file", b"guest\n"),
            ("./usr/lib/x", "dir", None),
            ("./lib", "sym", "usr/lib"),
            ("./lib/x/y", "file", b"merged\n"),
            ("./etc", "sym", host.folder),
        ],
    )
    tree = tmp_path / "rootfs"
    rootfs.unpack(tarball, tree, sha256=file_digest(tarball).sha256)
    assert inside(tree, host.folder / "passwd").read_bytes() == b"guest\n"  # "/" stripped: the guest's own file
    assert (tree / "usr/lib/x/y").read_bytes() == b"merged\n" and os.readlink(tree / "lib") == "usr/lib"
    assert os.readlink(tree / "etc") == str(host.folder)  # made last; only the guest follows it
    assert host.untouched()


def test_unpack_checks_the_digest_while_reading(tmp_path):
    tarball = make_tar(tmp_path / "ok.tar", [("./etc/hostname", "file", b"guest\n")])
    tree = tmp_path / "rootfs"
    wrong = "0" * 64
    with pytest.raises(CacheError) as info:
        rootfs.unpack(tarball, tree, sha256=wrong)
    text = str(info.value)
    assert f"expected {wrong}" in text and file_digest(tarball).sha256 in text and f"rm -rf {tmp_path}" in text
    assert not tree.exists()


def test_unpack_wants_an_empty_folder(tmp_path):
    tarball = make_tar(tmp_path / "ok.tar", [("./etc/hostname", "file", b"guest\n")])
    (tmp_path / "rootfs").mkdir()
    (tmp_path / "rootfs" / "old").write_text("x")
    with pytest.raises(ImageStepError, match="not empty"):
        rootfs.unpack(tarball, tmp_path / "rootfs")
    assert (tmp_path / "rootfs" / "old").read_text() == "x"


# -- configure and clean on trees whose folders point at the host ------------------------


def debian_tree(root: Path) -> Path:
    """The few folders of a usr-merged Debian 12 rootfs these steps touch."""
    for folder in ("usr/lib/modules/6.1.0-1/kernel/drivers/gpu", "usr/bin", "boot", "var/lib/dbus", "root"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "lib").symlink_to("usr/lib")
    (root / "bin").symlink_to("usr/bin")
    (root / "boot/vmlinuz-6.1.0-1-cloud-amd64").write_bytes(b"MZ")
    (root / "var/lib/dbus/machine-id").symlink_to("/etc/machine-id")
    return root


def test_configure_writes_land_in_the_tree_when_folders_point_at_the_host(tmp_path, host):
    root = debian_tree(tmp_path / "root")
    (root / "etc").symlink_to(host.folder)  # /etc -> the host's folder, absolute
    (root / "root/.ssh").symlink_to(host.folder / "ssh")
    configure.apply_overlay(root, agent_port=7300)
    configure.set_hostname(root, "guest")
    configure.authorize(root, KEY)
    configure.trust_controller(root, "ab" * 32)
    assert host.untouched()
    guest_etc = inside(root, host.folder)  # the guest's /etc is that path under the root
    assert (guest_etc / "hostname").read_text() == "guest\n"
    assert (guest_etc / "systemd/system/tdxvm-agent.service").is_file()
    assert (guest_etc / "ssh/authorized_keys").read_text() == KEY + "\n"
    assert os.readlink(root / "lib") == "usr/lib" and (root / "usr/lib/tdxvm/python/tdxvm/__init__.py").is_file()
    rootfs.clean(root)  # the guest's /etc lies under its /tmp here: clean empties both
    assert host.untouched()


def test_a_symlink_hard_link_or_fifo_where_a_file_goes_is_replaced(tmp_path, host):
    root = debian_tree(tmp_path / "root")
    (root / "etc").mkdir()
    (root / "etc/hostname").symlink_to(host.folder / "hostname")
    os.link(host.folder / "passwd", root / "etc/hosts")  # the same inode as a host file
    os.mkfifo(root / "etc/machine-id")  # opening it to write would block the build
    configure.set_hostname(root, "guest")
    rootfs.clean(root)
    assert host.untouched()
    for name in ("hostname", "hosts", "machine-id"):
        assert stat.S_ISREG((root / "etc" / name).lstat().st_mode), name
    assert (root / "etc/hostname").read_text() == "guest\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
def test_a_device_node_is_never_written_nor_shipped_as_the_kernel(tmp_path):
    root = debian_tree(tmp_path / "root")
    (root / "etc").mkdir()
    os.mknod(root / "etc/hostname", 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null
    configure.set_hostname(root, "guest")
    assert (root / "etc/hostname").read_text() == "guest\n"
    os.mknod(root / "boot/initrd.img-6.1.0-1-cloud-amd64", 0o600 | stat.S_IFBLK, os.makedev(7, 0))
    with pytest.raises(TreePathError, match="not a regular file"):
        treepath.regular_file(root, "/boot/initrd.img-6.1.0-1-cloud-amd64")


def test_clean_never_follows_a_folder_out_of_the_tree(tmp_path, host):
    root = debian_tree(tmp_path / "root")
    (root / "etc").mkdir()
    (root / "etc/ssh").symlink_to(host.folder / "ssh")
    (root / "var/log").symlink_to(host.folder / "log")
    (root / "tmp").symlink_to("../../../host")
    (root / "var/tmp").symlink_to(host.folder)
    (root / "etc/machine-id").symlink_to(host.folder / "machine-id")
    rootfs.clean(root)
    assert host.untouched()
    assert (root / "etc/machine-id").read_bytes() == b"" and not (root / "etc/machine-id").is_symlink()


def test_clean_removes_what_must_not_ship(tmp_path):
    root = debian_tree(tmp_path / "root")
    for rel in (
        "etc/ssh/ssh_host_ed25519_key",
        "etc/ssh/sshd_config",
        "etc/passwd-",
        "etc/passwd",
        "var/log/apt/term.log",
        "var/lib/apt/lists/deb.debian.org_Release",
        "var/cache/apt/pkgcache.bin",
        "tmp/x/y",
        "root/.cache/pip/z",
        "debootstrap/debootstrap.log",
        "etc/machine-id",
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    (root / "var/log/journal").symlink_to("/var/log/apt")
    rootfs.clean(root)
    assert sorted(p.name for p in (root / "etc/ssh").iterdir()) == ["sshd_config"]
    assert not (root / "etc/passwd-").exists() and (root / "etc/passwd").exists()
    assert (root / "var/log/apt").is_dir() and list((root / "var/log/apt").iterdir()) == []
    assert not (root / "var/log/journal").is_symlink()
    for gone in (
        "var/lib/apt/lists/deb.debian.org_Release",
        "var/cache/apt/pkgcache.bin",
        "tmp/x",
        "root/.cache",
        "debootstrap",
        "var/lib/dbus/machine-id",
    ):
        assert not os.path.lexists(root / gone), gone
    assert (root / "etc/machine-id").read_bytes() == b""


def test_modules_and_kernel_are_looked_up_in_the_tree(tmp_path, host):
    root = debian_tree(tmp_path / "root")
    configure.omit_modules(root, ("drivers/gpu",))  # through lib -> usr/lib
    assert not (root / "usr/lib/modules/6.1.0-1/kernel/drivers/gpu").exists()
    (root / "usr/lib/modules/6.1.0-1/kernel/sound").symlink_to(host.folder / "modules/6.1.0-1/kernel/drivers")
    configure.omit_modules(root, ("sound",))  # removes the link, not the host folder
    assert not os.path.lexists(root / "usr/lib/modules/6.1.0-1/kernel/sound")
    with pytest.raises(ImageStepError, match="outside the module tree"):
        configure.omit_modules(root, ("../../../etc",))
    assert configure.kernel_version(root) == "6.1.0-1-cloud-amd64"
    other = debian_tree(tmp_path / "other")
    for p in (other / "boot").iterdir():
        p.unlink()
    (other / "boot").rmdir()
    (other / "boot").symlink_to(host.folder / "boot")  # the host's kernels are not the guest's
    with pytest.raises(ImageStepError, match="found none"):
        configure.kernel_version(other)
    assert host.untouched()


def test_clamp_mtimes_does_not_follow_links(tmp_path, host):
    root = debian_tree(tmp_path / "root")
    (root / "etc").symlink_to(host.folder)
    (root / "usr/bin/sh").write_text("x")
    rootfs.clamp_mtimes(root, 1_000_000_000)
    assert host.untouched()
    assert (root / "usr/bin/sh").stat().st_mtime == 1_000_000_000


@pytest.mark.parametrize("name", ["proc", "dev"])
def test_the_chroot_refuses_a_mount_point_that_is_a_symlink(tmp_path, host, name):
    root = debian_tree(tmp_path / "root")
    for folder in ("dev", "proc", "sys", "run"):
        (root / folder).mkdir()
    (root / name).rmdir()
    (root / name).symlink_to(host.folder)
    with pytest.raises(ImageStepError, match=f"{name} is not a folder"):
        rootfs.in_root(root, "true", step="test")
    assert host.untouched()
