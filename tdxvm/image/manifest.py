"""The image manifest: what an image is and what a genuine TD booted from it reports.

``manifest.json`` beside the artifacts, one typed model (:class:`ImageManifest`) that
``tdxvm image build`` writes and a launch reads: the SHA-256 and size of every artifact,
the kernel command line (with the verity root hash), the dm-verity tree (root hash,
algorithm, block sizes, data and hash sizes), the LUKS2 volume's UUID and the
secret-store name of its key (the name only, never the key), the release public key the
guest trusts, the predicted TDX measurements with a note per register saying whether
and how it was predicted, and the build's provenance. A launch reads its default
attestation policy from here, so a fresh image needs no hand-copied hashes.

Unknown keys are errors at every level. A build writes every field; a launch needs
only ``name``, ``cmdline``, ``artifacts`` and ``measurements``, so the fields that record
how the image was made may be absent from a manifest written by hand. Errors name the
manifest file and the field path (``artifacts.vmlinuz.sha256: ...``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    StringConstraints,
    ValidationError,
    model_serializer,
    model_validator,
)

from tdxvm.errors import TdxvmError
from tdxvm.image.measure import REGISTERS, StubVerdict

FILE = "manifest.json"
FORMAT = "tdxvm-image-manifest/2"  # 2: verified root (dm-verity), volume key released
OLD_FORMAT = "tdxvm-image-manifest/1"  # unverified root, LUKS2 header read by the initramfs
ARTIFACTS = ("disk.img", "vmlinuz", "initrd.img")
UPLOAD_PORT = 7301  # the guest's weights receiver (tdxvm.guest.receiver) during `tdxvm provision`

Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Sha384 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{96}$")]
Port = Annotated[int, Field(ge=1, le=65535)]
Text = Annotated[str, StringConstraints(min_length=1)]
Count = Annotated[int, Field(ge=0)]


class ImageManifestError(TdxvmError):
    """A manifest file that is missing, not JSON, or not a manifest this tdxvm reads."""

    code = "manifest"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ArtifactEntry(_Section):
    sha256: Sha256
    size: Count


class Artifacts(_Section):
    """The three artifacts beside the manifest, under their file names."""

    disk: ArtifactEntry = Field(alias="disk.img")
    vmlinuz: ArtifactEntry
    initrd: ArtifactEntry = Field(alias="initrd.img")

    def entry(self, name: str) -> ArtifactEntry:
        """The entry of the artifact file ``name`` (one of :data:`ARTIFACTS`)."""
        return {"disk.img": self.disk, "vmlinuz": self.vmlinuz, "initrd.img": self.initrd}[name]


class RecipeRecord(_Section):
    path: str
    sha256: Sha256


class Verity(_Section):
    """The dm-verity tree appended to the ext4 image (:meth:`tdxvm.image.verity.VerityTree.to_dict`)."""

    root_hash: Sha256
    hash_algorithm: str
    data_block_size: Count
    hash_block_size: Count
    data_blocks: Count
    data_bytes: Count
    hash_offset: Count
    hash_bytes: Count
    salt: str | None
    cmdline: str


class Luks(_Section):
    uuid: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")]
    cipher: Text
    key_secret: Text  # the secret-store name of the volume key, never the key: always disk/<uuid>

    @model_validator(mode="after")
    def _disk_key_of_this_volume(self) -> Luks:
        # The launch releases the secret named here to the attested TD: a manifest naming any
        # other secret (the controller's release or SSH key, a model key) would have it sent.
        if self.key_secret != f"disk/{self.uuid}":
            raise ValueError(f"key_secret must be disk/{self.uuid} (the volume key of this LUKS volume)")
        return self


class Firmware(_Section):
    path: str
    sha256: Sha256


class Event(_Section):
    """One event the firmware or the EFI stub logs and extends (:class:`tdxvm.image.measure.ExpectedEvent`)."""

    rtmr: str = Field(alias="register")  # ``register`` in the file (a name pydantic's models keep for themselves)
    event_type: Count
    digest: Sha384
    what: str


class PredictionInputs(_Section):
    """Digests of what the measurements were predicted from; a field not known is absent."""

    kernel_sha256: Sha256 | None = None
    initrd_sha256: str | None = None  # "" without an initrd
    firmware_sha256: Sha256 | None = None
    kernel_authenticode_sha384: Sha384 | None = None
    load_options_sha384: str | None = None  # "" without load options
    efi_stub_cc_measurement: StubVerdict | None = None

    @model_serializer(mode="wrap")
    def _known(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class Measurements(_Section):
    """Predicted MRTD and RTMR0..3 (hex; None: not predicted), as
    :meth:`tdxvm.image.measure.Measurements.to_dict` gives them."""

    profile: str | None = None
    mrtd: Sha384 | None = None
    rtmr0: Sha384 | None = None
    rtmr1: Sha384 | None = None
    rtmr2: Sha384 | None = None
    rtmr3: Sha384 | None = None
    predicted: dict[str, bool] = Field(default_factory=dict)
    notes: dict[str, str] = Field(default_factory=dict)
    inputs: PredictionInputs | None = None
    events: list[Event] = Field(default_factory=list)

    def value(self, register: str) -> str | None:
        if register not in REGISTERS:
            raise KeyError(register)
        return getattr(self, register)

    def registers(self) -> dict[str, str | None]:
        """mrtd, rtmr0..3 -> hex or None (not predicted)."""
        return {r: self.value(r) for r in REGISTERS}


class LockRecord(_Section):
    path: str
    sha256: Sha256
    taken_at: str


class ToolRecord(_Section):
    version: str
    guest_code_sha256: Sha256


class Package(_Section):
    name: Text
    version: Text
    sha256: Sha256


class ListingRecord(_Section):
    file: Text
    sha256: Sha256
    lines: Count
    tree_sha256: Sha256


class Provenance(_Section):
    """What the image was built from (:mod:`tdxvm.image.provenance`)."""

    recipe_sha256: Sha256
    lock: LockRecord
    tdxvm: ToolRecord
    authorized_key: str
    debootstrap: str
    kernel_package: Package | None
    firmware_package: Package | None
    verity_root_hash: Sha256
    listing: ListingRecord


class CacheRecord(_Section):
    hit: list[str]  # the steps the step cache served


@dataclass(frozen=True, slots=True)
class Artifact:
    """An artifact file beside a manifest that was read from disk."""

    name: str  # disk.img, vmlinuz, initrd.img
    path: Path
    sha256: str
    size: int


class ImageManifest(_Section):
    """``manifest.json``. :func:`read` gives one that knows its file (``path``)."""

    format: str | None = None
    name: Text
    profile: str | None = None
    recipe: RecipeRecord | None = None
    built_at: int | None = None
    epoch: int | None = None
    kernel_version: str | None = None
    cmdline: str
    artifacts: Artifacts
    rootfs_uuid: str | None = None
    verity: Verity | None = None
    luks: Luks | None = None
    release_key: Sha256 | None = None  # the X25519 public key the guest accepts released secrets from
    firmware: Firmware | None = None
    measurements: Measurements
    guest_agent_port: Port = 7300
    ssh_port: Port = 22
    service_port: Port | None = None
    provenance: Provenance | None = None
    cache: CacheRecord | None = None

    _path: Path | None = PrivateAttr(default=None)

    def to_data(self) -> dict[str, Any]:
        """The JSON-ready form, keys as in the file."""
        return self.model_dump(mode="json", by_alias=True)

    def to_json(self) -> str:
        return json.dumps(self.to_data(), indent=2, sort_keys=True) + "\n"

    @property
    def path(self) -> Path:
        """The manifest file this was read from."""
        if self._path is None:
            raise ValueError(f"image manifest {self.name} was not read from a file")
        return self._path

    @property
    def folder(self) -> Path:
        return self.path.parent

    def _artifact(self, name: str) -> Artifact:
        entry = self.artifacts.entry(name)
        return Artifact(name=name, path=self.folder / name, sha256=entry.sha256, size=entry.size)

    @property
    def kernel(self) -> Artifact:
        return self._artifact("vmlinuz")

    @property
    def initrd(self) -> Artifact:
        return self._artifact("initrd.img")

    @property
    def disk(self) -> Artifact:
        return self._artifact("disk.img")

    @property
    def firmware_path(self) -> str | None:
        """The TDVF the MRTD was predicted for."""
        return self.firmware.path if self.firmware else None

    @property
    def firmware_sha256(self) -> str | None:
        return self.firmware.sha256 if self.firmware else None

    def guest_ports(self) -> dict[str, int]:
        """The guest ports a launch forwards by default: agent, ssh, and for a model server
        its service and the weights receiver (``tdxvm provision``'s bulk streams)."""
        ports = {"agent": self.guest_agent_port, "ssh": self.ssh_port}
        if self.service_port is not None:
            ports["service"] = self.service_port
            ports["upload"] = UPLOAD_PORT
        return ports


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


def artifact_entry(path: Path) -> ArtifactEntry:
    return ArtifactEntry(sha256=file_sha256(path), size=path.stat().st_size)


def artifacts_in(folder: Path) -> Artifacts:
    """The entries of the artifacts in ``folder``, hashed."""
    return Artifacts.model_validate({name: artifact_entry(folder / name) for name in ARTIFACTS})


def verify_artifacts(manifest: ImageManifest, folder: Path) -> list[str]:
    """Artifacts in ``folder`` whose size or SHA-256 differ from the manifest (empty: all match)."""
    bad = []
    for name in ARTIFACTS:
        path = folder / name
        want = manifest.artifacts.entry(name)
        if not path.is_file():
            bad.append(f"{path}: missing")
        elif path.stat().st_size != want.size or file_sha256(path) != want.sha256:
            bad.append(f"{path}: differs from the manifest (sha256 {want.sha256})")
    return bad


def read(path: str | Path) -> ImageManifest:
    """Read ``manifest.json`` (or a build folder holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / FILE
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ImageManifestError(
            f"image manifest {p} does not exist (build the image first: tdxvm image build "
            f"images/<recipe>.yaml writes build/<name>/{FILE})"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ImageManifestError(f"image manifest {p}: cannot read: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ImageManifestError(f"image manifest {p}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    except (ValueError, RecursionError) as exc:  # an integer too long, absurd nesting
        raise ImageManifestError(f"image manifest {p}: not usable JSON: {exc}") from None
    return parse(data, path=p)


def parse(data: Any, *, path: Path) -> ImageManifest:
    """``data`` (a manifest file's JSON, read from ``path``) as a manifest."""
    if not isinstance(data, dict):
        raise ImageManifestError(f"image manifest {path}: expected a JSON object")
    if data.get("format") == OLD_FORMAT:
        raise ImageManifestError(
            f"image manifest {path}: built by an older tdxvm, whose root filesystem is not verified "
            "and whose initramfs reads the LUKS2 header from the disk; rebuild it with tdxvm image "
            "build"
        )
    if data.get("format") not in (None, FORMAT):
        raise ImageManifestError(
            f"image manifest {path}: format {data.get('format')!r} is not {FORMAT!r} (built by another tdxvm version?)"
        )
    try:
        manifest = ImageManifest.model_validate(data)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(x) for x in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors()]
        raise ImageManifestError(f"image manifest {path} is not usable:\n" + "\n".join(lines)) from None
    manifest._path = path.resolve()
    return manifest
