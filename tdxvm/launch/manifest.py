"""The image manifest as a launch reads it: artifacts, command line, predicted measurements.

``tdxvm image build`` writes ``manifest.json`` beside ``disk.img``, ``vmlinuz`` and
``initrd.img``. A launch needs the artifacts' SHA-256 and sizes (the volumes on the
libvirt host are named by them, and uploads are checked against them), the kernel
command line, the predicted MRTD/RTMRs (the default attestation policy), the TDVF the
MRTD was predicted for, and the guest's ports. Fields a launch does not use are kept in
``raw`` untouched. Errors name the manifest file and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from tdxvm.launch.errors import ManifestError

FORMAT = "tdxvm-image-manifest/2"  # 2: verified root (dm-verity), volume key released
ARTIFACTS = ("disk.img", "vmlinuz", "initrd.img")
REGISTERS = ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3")

Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Sha384 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{96}$")]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Artifact(BaseModel):
    model_config = ConfigDict(extra="allow")
    sha256: Sha256
    size: Annotated[int, Field(ge=0)]


class _Firmware(BaseModel):
    model_config = ConfigDict(extra="allow")
    path: str
    sha256: Sha256


class _Measurements(BaseModel):
    model_config = ConfigDict(extra="allow")
    mrtd: Sha384 | None = None
    rtmr0: Sha384 | None = None
    rtmr1: Sha384 | None = None
    rtmr2: Sha384 | None = None
    rtmr3: Sha384 | None = None


class _Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")
    format: str | None = None
    name: Annotated[str, StringConstraints(min_length=1)]
    cmdline: str
    artifacts: dict[str, _Artifact]
    measurements: _Measurements
    firmware: _Firmware | None = None
    profile: str | None = None
    guest_agent_port: Port = 7300
    ssh_port: Port = 22
    service_port: Port | None = None


UPLOAD_PORT = 7301  # the guest's weights receiver (tdxvm.guest.receiver) during `tdxvm provision`


@dataclass(frozen=True, slots=True)
class Artifact:
    name: str  # disk.img, vmlinuz, initrd.img
    path: Path  # beside the manifest
    sha256: str
    size: int


@dataclass(frozen=True)
class ImageManifest:
    """A loaded manifest. ``measurements`` maps mrtd/rtmr0..3 to hex or None (not predicted)."""

    path: Path
    name: str
    cmdline: str
    kernel: Artifact
    initrd: Artifact
    disk: Artifact
    measurements: dict[str, str | None]
    firmware_path: str | None
    firmware_sha256: str | None
    profile: str | None
    guest_agent_port: int
    ssh_port: int
    service_port: int | None
    raw: dict[str, Any]

    @property
    def folder(self) -> Path:
        return self.path.parent

    def guest_ports(self) -> dict[str, int]:
        """The guest ports a launch forwards by default: agent, ssh, and for a model server
        its service and the weights receiver (``tdxvm provision``'s bulk streams)."""
        ports = {"agent": self.guest_agent_port, "ssh": self.ssh_port}
        if self.service_port is not None:
            ports["service"] = self.service_port
            ports["upload"] = UPLOAD_PORT
        return ports


def load_manifest(path: str | Path) -> ImageManifest:
    """Read ``manifest.json`` (or a build folder holding one) and check what a launch needs."""
    p = Path(path)
    if p.is_dir():
        p = p / "manifest.json"
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"image manifest {p} does not exist (build the image first: tdxvm image build "
                            "images/<recipe>.yaml writes build/<name>/manifest.json)") from None  # fmt: skip
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"image manifest {p}: cannot read: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"image manifest {p}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    return parse_manifest(data, path=p)


def parse_manifest(data: Any, *, path: Path) -> ImageManifest:
    if not isinstance(data, dict):
        raise ManifestError(f"image manifest {path}: expected a JSON object")
    if data.get("format") == "tdxvm-image-manifest/1":
        raise ManifestError(f"image manifest {path}: built by an older tdxvm, whose root filesystem is not verified and "
                            "whose initramfs reads the LUKS2 header from the disk; rebuild it with tdxvm image build")  # fmt: skip
    if data.get("format") not in (None, FORMAT):
        raise ManifestError(f"image manifest {path}: format {data.get('format')!r} is not {FORMAT!r} "
                            "(built by another tdxvm version?)")  # fmt: skip
    try:
        m = _Manifest.model_validate(data)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ManifestError(f"image manifest {path} is not usable:\n" + "\n".join(lines)) from None
    missing = [name for name in ARTIFACTS if name not in m.artifacts]
    if missing:
        raise ManifestError(f"image manifest {path}: artifacts {', '.join(missing)} missing")

    def artifact(name: str) -> Artifact:
        a = m.artifacts[name]
        return Artifact(name=name, path=path.parent / name, sha256=a.sha256, size=a.size)

    return ImageManifest(
        path=path.resolve(),
        name=m.name,
        cmdline=m.cmdline,
        kernel=artifact("vmlinuz"),
        initrd=artifact("initrd.img"),
        disk=artifact("disk.img"),
        measurements={r: getattr(m.measurements, r) for r in REGISTERS},
        firmware_path=m.firmware.path if m.firmware else None,
        firmware_sha256=m.firmware.sha256 if m.firmware else None,
        profile=m.profile,
        guest_agent_port=m.guest_agent_port,
        ssh_port=m.ssh_port,
        service_port=m.service_port,
        raw=data,
    )
