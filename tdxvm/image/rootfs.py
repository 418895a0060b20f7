"""The guest's root filesystem as a folder: debootstrap, apt and pip, with no mounts left behind.

Commands that must run inside the rootfs (apt, mkinitramfs) run through
``unshare --mount`` then ``chroot``: ``/dev``, ``/proc``, ``/sys`` and ``/run`` are
mounted in a private mount namespace that disappears with the command, so a failed or
interrupted step leaves no mount on the build host. No loop device, no device-mapper.

Cached steps store the folder as an uncompressed tarball with numeric owners (see
:mod:`tdxvm.image.cache`); unpacking one gives the same tree, mtimes included.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tdxvm.image import treepath
from tdxvm.image.cache import CHUNK, mismatch
from tdxvm.image.ext4 import ImageStepError, run_step, tool
from tdxvm.image.lockfile import Wheel

# The chroot's /dev is a tmpfs of its own with the few nodes package scripts use, never
# the host's /dev: scripts chown and chmod device nodes by the guest's group ids
# (systemd-tmpfiles' static-nodes rule gave the host's /dev/kvm to the guest's "kvm" gid,
# another group on the host, and libvirt then hung probing QEMU). /sys is read-only.
_CHROOT = (
    'set -e; r="$1"; shift; d="$r/dev"; '
    'mount -t tmpfs -o mode=0755,nosuid,noexec tdxvm-dev "$d"; '
    'mknod -m 666 "$d/null" c 1 3; mknod -m 666 "$d/zero" c 1 5; mknod -m 666 "$d/full" c 1 7; '
    'mknod -m 666 "$d/random" c 1 8; mknod -m 666 "$d/urandom" c 1 9; mknod -m 666 "$d/tty" c 5 0; '
    'mkdir -m 755 "$d/pts"; mkdir -m 1777 "$d/shm"; '
    'mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$d/pts"; ln -s pts/ptmx "$d/ptmx"; '
    'ln -s /proc/self/fd "$d/fd"; ln -s /proc/self/fd/0 "$d/stdin"; ln -s /proc/self/fd/1 "$d/stdout"; '
    'ln -s /proc/self/fd/2 "$d/stderr"; '
    'mount -t proc proc "$r/proc"; mount -t sysfs -o ro sysfs "$r/sys"; '
    'mount -t tmpfs tmpfs "$r/run"; exec chroot "$r" /usr/bin/env -i "$@"'
)
_ENV = ("PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C", "DEBIAN_FRONTEND=noninteractive", "HOME=/root")
_MOUNT_POINTS = ("dev", "proc", "sys", "run")
# What clean() removes: (guest folder, name pattern); var/log is emptied apart.
_REMOVE = (
    ("var/lib/apt/lists", "*"),
    ("var/cache/apt", "*.bin"),
    ("var/cache/debconf", "*-old"),
    ("etc/ssh", "ssh_host_*"),
    ("var/lib/dbus", "machine-id"),
    ("etc", "*-"),
    ("var/lib/dpkg", "*-old"),
    ("root", ".cache"),
    ("tmp", "*"),
    ("var/tmp", "*"),
    ("", "debootstrap"),
)


def in_root(root: Path, script: str, *, step: str, env: Sequence[str] = ()) -> str:
    """Run ``script`` with /bin/sh inside ``root``; mounts live only as long as the command.
    The mount points must be real folders: ``mount`` follows a symlink."""
    for name in _MOUNT_POINTS:
        try:
            is_folder = stat.S_ISDIR(os.lstat(root / name).st_mode)
        except FileNotFoundError:
            is_folder = False
        if not is_folder:
            raise ImageStepError(step, [], f"{root / name} is not a folder: the chroot mounts /{name} there")
    unshare = tool("unshare", step=step, package="util-linux")
    command = [
        unshare,
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        _CHROOT,
        "tdxvm-chroot",
        str(root),
        *_ENV,
        *env,
        "/bin/sh",
        "-c",
        "set -e\n" + script,
    ]
    return run_step(step, command)


ARCHIVE_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")


def debootstrap(root: Path, *, suite: str, mirror: str, keyring: Path = ARCHIVE_KEYRING) -> None:
    """A minimal Debian (``--variant=minbase``) in ``root``, its Release file's signature
    checked against ``keyring`` (Debian's archive keys) and never skipped. Further
    packages come from :mod:`tdxvm.image.debpins`: debootstrap's own resolver does not
    handle virtual packages. The ``.deb`` files stay in ``var/cache/apt/archives``, where
    the build checks each against the lock."""
    exe = tool("debootstrap", step="debootstrap", package="debootstrap")
    if not keyring.is_file():
        raise ImageStepError(
            "debootstrap",
            [],
            f"the Debian archive keyring {keyring} is missing (apt-get install debian-archive-keyring)",
        )
    run_step(
        "debootstrap",
        [
            exe,
            "--variant=minbase",
            "--components=main",
            f"--keyring={keyring}",
            "--force-check-gpg",
            suite,
            str(root),
            mirror,
        ],
    )


def pip_install(root: Path, *, wheels: Sequence[Wheel], index_url: str | None, find_links: Sequence[str]) -> Path:
    """Install exactly the locked ``wheels`` into the guest's
    ``/usr/local/lib/pythonX.Y/dist-packages`` with this host's pip: each must have its
    locked SHA-256 (``--require-hashes``), and only wheels are taken, so no package's
    setup code runs on the build host. The guest's Python must be this one's version
    (Debian 12 both). The scripts pip writes name this host's Python:
    :func:`tdxvm.image.normalize.normalize` gives them the guest's. The modules are then
    byte-compiled by the guest's Python (:func:`compile_python`), not by pip."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    if not treepath.resolve(root, f"usr/lib/{version}").is_dir():
        raise ImageStepError("pip install", [], f"the guest has no {version} (the host's pip installs for {version})")
    target = treepath.make_dirs(root, f"usr/local/lib/{version}/dist-packages")
    with tempfile.TemporaryDirectory(prefix="tdxvm-pip-") as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text("".join(f"{w.requirement}\n" for w in wheels))
        command = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-compile",
            "--no-deps",
            "--require-hashes",
            "--only-binary=:all:",
            "--target",
            str(target),
            "-r",
            str(requirements),
        ]
        if index_url:
            command += ["--index-url", index_url]
        for link in find_links:
            command += ["--find-links", link]
        run_step("pip install", command)
    compile_python(root, [f"/usr/local/lib/{version}/dist-packages"], step="pip install")
    return target


# How compile_python writes .pyc files; part of the python step's cache key.
BYTECODE = "unchecked-hash, PYTHONHASHSEED=0, one worker"
# Byte-compiles the folders given as arguments; the guest's python3 runs it.
COMPILE_SCRIPT = """\
import compileall, py_compile, sys
for folder in sys.argv[1:]:
    compileall.compile_dir(folder, quiet=2, workers=1, invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
"""


def compile_python(root: Path, folders: Sequence[str], *, step: str) -> None:
    """Byte-compile the Python modules under ``folders`` (guest paths) with the guest's own
    Python, so that no boot compiles them again: the root filesystem is read-only (verity)
    and what Python would write goes to TD memory, on every boot (under TCG, compiling
    torch's and transformers' modules at each service start takes minutes). The ``.pyc``
    files are unchecked-hash ones (PEP 552): they hold no mtime, so two builds give the same
    bytes (one worker, a fixed hash seed), and their sources cannot change under a verified
    root. A file that does not compile (code for a newer Python that nothing imports here)
    is left without one. Python runs isolated and without ``site``: a wheel's ``.pth`` file
    (which ``site`` executes) never runs here."""
    present = [f for f in folders if treepath.resolve(root, f).is_dir()]
    if present:
        # -I -S: no site, so no .pth file of an installed wheel runs (as root, on the build host)
        script = f"python3 -I -S - {' '.join(map(shlex.quote, present))} <<'EOF'\n{COMPILE_SCRIPT}EOF\n"
        in_root(root, script, step=step, env=("PYTHONHASHSEED=0",))


def clean(root: Path) -> None:
    """Remove what must not ship or would differ between builds: apt lists and caches,
    logs, the machine id (systemd makes one at first boot), SSH host keys (made inside
    the TD at first boot, never at build time). Paths are the guest's
    (:mod:`tdxvm.image.treepath`): a symlinked folder leads to the guest's files, never the host's."""
    for folder, pattern in _REMOVE:
        for host in treepath.matches(root, folder, pattern):
            treepath.remove_entry(host)
    _empty_logs(treepath.resolve(root, "var/log"))
    treepath.write_file(root, "etc/machine-id", b"")


def _empty_logs(folder: Path) -> None:
    """Remove every file and symlink under ``folder``; keep the folders (packages expect them)."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            _empty_logs(Path(entry.path))
        else:
            os.unlink(entry.path)


def clamp_mtimes(root: Path, epoch: int) -> None:
    """Set every mtime later than ``epoch`` to ``epoch`` (SOURCE_DATE_EPOCH rules)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames, ""):
            p = os.path.join(dirpath, name) if name else dirpath
            st = os.lstat(p)
            if st.st_mtime > epoch:
                os.utime(p, (epoch, epoch), follow_symlinks=False)


def _tar_env() -> dict[str, str]:
    """This environment without ``TAR_OPTIONS``: GNU tar adds its words to every command,
    and ``-P`` there would unpack absolute names and write through absolute symlinks."""
    return {k: v for k, v in os.environ.items() if k != "TAR_OPTIONS"}


def pack(root: Path, tarball: Path) -> None:
    exe = tool("tar", step="tar", package="tar")
    command = [exe, "--numeric-owner", "--xattrs", "--acls", "-cf", str(tarball), "-C", str(root), "."]
    run_step("tar", command, env=_tar_env())


def unpack(tarball: Path, root: Path, *, sha256: str | None = None) -> None:
    """Unpack ``tarball`` into ``root`` (made if missing; it must be empty).

    The file is read once: through SHA-256 and into ``tar -x`` on a pipe, so with
    ``sha256`` (from the cache entry, :meth:`~tdxvm.image.cache.StepCache.digest`) the
    check costs no extra read; a mismatch raises :class:`~tdxvm.image.cache.CacheError`.
    GNU tar (1.34, Debian 12) keeps every member inside ``root``: it strips a leading ``/``
    from names and link targets, refuses names with ``..``, and makes a symlink that is
    absolute or holds ``..`` only once all members are out (a placeholder file stands in
    until then), so no member is written through one; ``TAR_OPTIONS`` is not passed on.
    On any failure the partly unpacked tree is removed."""
    exe = tool("tar", step="tar", package="tar")
    root.mkdir(parents=True, exist_ok=True)
    if os.listdir(root):
        raise ImageStepError("tar", [], f"{root} is not empty: a rootfs is unpacked into an empty folder")
    command = [exe, "--numeric-owner", "--xattrs", "--acls", "-xpf", "-", "-C", str(root)]
    try:
        actual, returncode, stderr = _pipe_into(tarball, command)
        if sha256 is not None and actual != sha256:
            raise mismatch(tarball, sha256, actual)
        if returncode != 0:
            raise ImageStepError("tar", [*command, f"< {tarball}"], stderr)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


def _pipe_into(path: Path, command: Sequence[str]) -> tuple[str, int, str]:
    """Feed ``path`` to ``command`` on stdin, hashing it on the way: its SHA-256 (of the
    whole file, even if the command stopped reading), the exit status and stderr."""
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with tempfile.TemporaryFile() as err, open(path, "rb", buffering=0) as f:
        pipe, quiet = subprocess.PIPE, subprocess.DEVNULL
        proc = subprocess.Popen(list(command), stdin=pipe, stdout=quiet, stderr=err, env=_tar_env())
        assert proc.stdin is not None
        try:
            feeding = True
            while n := f.readinto(buffer):
                digest.update(view[:n])
                if feeding:
                    try:
                        proc.stdin.write(view[:n])
                    except BrokenPipeError:
                        feeding = False  # it stopped reading: hash the rest for the error
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
            returncode = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err.seek(0)
        return digest.hexdigest(), returncode, err.read().decode(errors="replace")
