"""Image recipes: the YAML in ``images/`` that says what goes into a guest image.

A recipe names the Debian suite and mirror, the packages, the kernel (a package and the
suite it comes from), files to add, the profile (``smoke``: the guest agent only;
``model-server``: plus the Python inference stack), the kernel command line, the disk
size and the TDVF firmware whose MRTD the manifest predicts. Unknown keys are errors;
every error names the file, line and field (:mod:`tdxvm.yamlfile`).

The kernel must be Linux 6.9 or later: older EFI stubs measure nothing in a TD, so the
command line and initrd would not be in RTMR2 (``tdxvm image build`` refuses such a
kernel, and ``tdxvm launch`` an image built with one). ``kernel.suite`` therefore
defaults not to the recipe's suite but to the suite that carries such a kernel for it
(:data:`KERNEL_SUITES`: ``bookworm`` → ``bookworm-backports``; ``trixie``, ``forky``,
``testing``, ``unstable``/``sid`` → the suite itself); a recipe whose suite is not
listed there must name ``kernel.suite``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator

from tdxvm.errors import TdxvmError
from tdxvm.sizes import parse_size
from tdxvm.yamlfile import SpecError, load_yaml

# What every image needs, whatever the recipe adds: systemd, the SSH server, Python with
# `cryptography` for the guest agent, cryptsetup and initramfs-tools for the unlock step.
BASE_PACKAGES = (
    "systemd-sysv",
    "udev",
    "kmod",
    "iproute2",
    "openssh-server",
    "python3",
    "python3-cryptography",
    "cryptsetup-bin",
    "cryptsetup-initramfs",
    "initramfs-tools",
    "busybox",
    "ca-certificates",
)
_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_SUITE = re.compile(r"^[a-z][a-z0-9-]*$")
# The default kernel.suite for a recipe's suite: where the Debian kernel is Linux >= 6.9,
# whose EFI stub measures the command line and initrd into RTMR2 (Debian 12's own 6.1
# does not; bookworm-backports carries 6.12). Moving aliases (stable, oldstable) are left
# out: what they carry changes under the recipe.
KERNEL_SUITES = {
    "bookworm": "bookworm-backports",
    "trixie": "trixie",
    "forky": "forky",
    "testing": "testing",
    "unstable": "unstable",
    "sid": "sid",
}


# The suites that carry a stable release's security fixes and stable updates: every image
# of that release gets them (``tdxvm image lock`` takes their versions).
UPDATE_SUITES = {
    "bookworm": ("bookworm-updates", "bookworm-security"),
    "trixie": ("trixie-updates", "trixie-security"),
}


class RecipeError(TdxvmError):
    code = "recipe"


def _packages(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError("expected a list of Debian package names")
    for name in value:
        if not isinstance(name, str) or not _PACKAGE.fullmatch(name):
            raise ValueError(f"{name!r} is not a Debian package name")
    return tuple(value)


def _suite(value: object) -> str:
    if not isinstance(value, str) or not _SUITE.fullmatch(value):
        raise ValueError(f"{value!r} is not a Debian suite name (bookworm, bookworm-backports, …)")
    return value


Suite = Annotated[str, BeforeValidator(_suite)]


class Kernel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    package: str = "linux-image-cloud-amd64"
    # Left out: KERNEL_SUITES[recipe suite] (Linux >= 6.9), filled in when the recipe loads.
    suite: Suite | None = None
    # Module folders (under /lib/modules/VERSION/kernel) left out of the image: a VM needs
    # no sound, GPU or wireless drivers, and a smaller disk builds and encrypts faster.
    omit_modules: tuple[str, ...] = ()


def _requirement(value: object) -> str:
    """A pip requirement (``name``, ``name==1.2``, ``name[extra]>=1``), never a pip option."""
    if not isinstance(value, str) or not re.fullmatch(
        r"[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9._,-]+\])?"
        r"([<>=!~]=?[A-Za-z0-9.*+!_-]+(,[<>=!~]=?[A-Za-z0-9.*+!_-]+)*)?",
        value.replace(" ", ""),
    ):
        raise ValueError(f"{value!r} is not a requirement like torch==2.13.0 (pip options are not taken here)")
    return value


def _mirror(value: object) -> str:
    """A Debian mirror: a plain http(s) URL (apt's options in brackets are not taken here)."""
    if not isinstance(value, str) or not re.fullmatch(
        r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~%/+-]*)?", value
    ):
        raise ValueError(f"{value!r} is not a plain http(s) URL of a Debian mirror")
    return value


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    src: str  # relative to the recipe's folder, and inside it
    dest: str
    mode: str = "0644"

    @field_validator("src")
    @classmethod
    def _inside_the_recipe_folder(cls, v: str) -> str:
        # the build runs as root: a recipe must not copy the build host's files (its secret
        # store, keys) into an image its author can read
        if not v or Path(v).is_absolute() or ".." in Path(v).parts:
            raise ValueError(f"{v!r} must be a path inside the recipe's folder (relative, without '..')")
        return v

    @field_validator("dest")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not v.startswith("/") or ".." in Path(v).parts:
            raise ValueError(f"{v!r} must be an absolute path inside the guest, without '..'")
        return v

    @field_validator("mode")
    @classmethod
    def _mode(cls, v: str) -> str:
        if not re.fullmatch(r"0?[0-7]{3,4}", v):
            raise ValueError(f"{v!r} is not an octal file mode like 0644")
        return v


class Python(BaseModel):
    """Python packages installed into the guest with the host's pip (``--target``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requirements: tuple[Annotated[str, BeforeValidator(_requirement)], ...] = ()
    index_url: str | None = None
    find_links: tuple[str, ...] = ()


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]
    suite: Suite = "bookworm"
    mirror: Annotated[str, BeforeValidator(_mirror)] = "http://deb.debian.org/debian"
    # Where the release's -security suite is (UPDATE_SUITES); the others come from mirror.
    security_mirror: Annotated[str, BeforeValidator(_mirror)] = "http://deb.debian.org/debian-security"
    profile: Literal["smoke", "model-server"] = "smoke"
    kernel: Annotated[Kernel, Field(default_factory=Kernel, validate_default=True)]
    packages: Annotated[tuple[str, ...], BeforeValidator(_packages)] = ()
    files: tuple[FileEntry, ...] = ()
    python: Python = Python()
    cmdline: str = "console=ttyS0 root=/dev/mapper/root ro ip=dhcp panic=-1"
    disk_size: Annotated[int, BeforeValidator(parse_size)] = 1 << 30
    # The TDVF whose MRTD the manifest predicts: a path, or "debian:PACKAGE/PATH" for a
    # file from a Debian unstable package fetched as data (never installed).
    firmware: str | None = None
    agent_port: Annotated[int, Field(ge=1, le=65535)] = 7300
    service_port: Annotated[int, Field(ge=1, le=65535)] | None = None
    epoch: Annotated[int, Field(ge=0)] | None = None  # SOURCE_DATE_EPOCH; default: when the lock was taken

    @field_validator("kernel")
    @classmethod
    def _kernel_suite(cls, v: Kernel, info: ValidationInfo) -> Kernel:
        suite = info.data.get("suite")
        if v.suite is not None or suite is None:  # given, or the recipe's suite is itself invalid
            return v
        if suite not in KERNEL_SUITES:
            raise ValueError(
                f"no default kernel suite for suite {suite!r} (known: {', '.join(KERNEL_SUITES)}): set "
                "kernel.suite to a suite whose kernel is Linux >= 6.9 (older EFI stubs leave the command "
                "line and initrd out of RTMR2)"
            )
        return v.model_copy(update={"suite": KERNEL_SUITES[suite]})

    @property
    def kernel_suite(self) -> str:
        """The suite the kernel package comes from (filled in at load, see KERNEL_SUITES)."""
        return self.kernel.suite or self.suite

    def apt_sources(self) -> list[tuple[str, str]]:
        """(archive URI, suite) for every suite the root filesystem's packages come from:
        the release, its updates and security suites, and the kernel's suite."""
        suites = [self.suite, *UPDATE_SUITES.get(self.suite, ()), self.kernel_suite]
        out: list[tuple[str, str]] = []
        for suite in suites:
            entry = (self.security_mirror if suite.endswith("-security") else self.mirror, suite)
            if entry not in out:
                out.append(entry)
        return out

    def lock_inputs(self) -> dict[str, object]:
        """What a lock is taken for: the recipe's package inputs (not its disk size,
        files or command line, which the lock does not pin)."""
        return {
            "suite": self.suite,
            "sources": [f"{uri} {suite}" for uri, suite in self.apt_sources()],
            "packages": sorted(set(BASE_PACKAGES) | set(self.packages)),
            "kernel": self.kernel.package,
            "python": list(self.python.requirements),
            "firmware": self.firmware,
        }

    @field_validator("cmdline")
    @classmethod
    def _cmdline(cls, v: str) -> str:
        if "root=" not in v:
            raise ValueError("the command line must name the root device (root=/dev/mapper/root)")
        if not re.search(r"(^|\s)panic=-?\d+(\s|$)", v):
            raise ValueError(
                "the command line must set panic= (e.g. panic=-1): without it a failed boot drops to an "
                "initramfs shell on the host's console, from which the host could ask the TD for quotes"
            )
        if re.search(r"(^|\s)tdxvm\.verity=", v):
            raise ValueError(
                "the command line may not set tdxvm.verity=: the build appends it (the root filesystem's "
                "verity root hash)"
            )
        if len(v.encode()) > 1900:
            raise ValueError(
                "the command line is longer than 1900 bytes (the build appends the verity root hash; the "
                "kernel takes 2048)"
            )
        return v

    @field_validator("disk_size")
    @classmethod
    def _disk(cls, v: int) -> int:
        if v < 64 << 20 or v % 4096:
            raise ValueError("the disk must be at least 64MiB and a multiple of 4KiB")
        return v

    def model_post_init(self, _context: object) -> None:
        if self.profile == "model-server" and self.service_port is None:
            object.__setattr__(self, "service_port", 8443)


class LoadedRecipe(BaseModel):
    """A recipe and where it came from (relative file paths resolve against ``folder``)."""

    model_config = ConfigDict(frozen=True)

    recipe: Recipe
    path: Path
    sha256: str

    @property
    def folder(self) -> Path:
        return self.path.parent

    def file_source(self, entry: FileEntry) -> Path:
        return (self.folder / entry.src).resolve()


def load_recipe(path: str | Path) -> LoadedRecipe:
    """Load and check a recipe; the files it adds must exist."""
    p = Path(path)
    try:
        recipe = load_yaml(p, Recipe)
    except SpecError as exc:
        raise RecipeError(f"image recipe is not valid:\n{exc}") from None
    loaded = LoadedRecipe(recipe=recipe, path=p.resolve(), sha256=hashlib.sha256(p.read_bytes()).hexdigest())
    for i, entry in enumerate(recipe.files):
        source = loaded.file_source(entry)
        if source.is_dir():
            raise RecipeError(f"{p}: files.{i}.src: {entry.src} is a folder; list each file to copy")
        if not source.is_file():
            raise RecipeError(f"{p}: files.{i}.src: {entry.src} does not exist (relative to {loaded.folder})")
    return loaded


def canonical(obj: object) -> bytes:
    """Stable bytes for hashing step inputs."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
