"""The VM spec (``configs/*.yaml``): what to run, where, and which TD to trust.

Loaded through :mod:`tdxvm.yamlfile`, so every problem names the file, line and field::

    name: llama-0
    uri: qemu+ssh://admin@tdx-host/system   # default qemu:///system
    image: ../build/llama2/manifest.json     # relative to this file's folder
    backend: tdx                             # or emulated (TCG, no TDX)
    vcpus: 8
    memory: 32GiB
    scratch: 64GiB                           # the per-VM scratch disk (default 2GiB; formatted once per boot,
                                             # when first used)
    pinning: {vcpus: ["2", "3", ...], numa_node: 0}
    network: {forwards: [{host: 8443, guest: 8443}]}
    firmware: /usr/share/ovmf/OVMF.inteltdx.ms.fd   # default: the manifest's firmware (see below)
    qgs_socket: /var/run/tdx-qgs/qgs.socket
    policy: policy.yaml                      # or an inline mapping of Policy keys
    model: ../build/llama2-7b.enc            # provisioned once the VM is up (tdxvm provision)
    # or: model: {path: ..., name: llama-2-7b, key: llama2-7b, dtype: bfloat16, threads: 8}

Relative paths (``image``, ``policy``, ``model``) are resolved against the YAML file's
folder; ``firmware`` and ``qgs_socket`` are paths on the libvirt host and must be
absolute. ``firmware`` is the TDVF a TD boots; an emulated guest boots no TDVF, and
there it names the firmware the emulated TD stands for (the emulated quote service takes
its MRTD from it). :func:`effective_policy` completes the policy with the manifest's
predicted measurements.
"""

from __future__ import annotations

import ipaddress
import re
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from tdxvm.attest.errors import PolicyFileError
from tdxvm.attest.policy import Policy, load_policy
from tdxvm.attest.quote import LAUNCH_TD_ATTRIBUTES, TD_ATTR_KL, TD_ATTR_PERFMON, TD_ATTR_PKS
from tdxvm.guest.apikeys import MAX_KEYS
from tdxvm.guest.apikeys import NAME_PATTERN as API_KEY_NAME
from tdxvm.guest.engine import MAX_BATCH, MAX_KV_CACHE_MIB
from tdxvm.launch.connection import DEFAULT_URI
from tdxvm.launch.domain import td_policy
from tdxvm.launch.errors import LaunchPolicyError
from tdxvm.launch.manifest import ImageManifest
from tdxvm.launch.uris import uri_problem
from tdxvm.sizes import parse_size
from tdxvm.yamlfile import load_yaml, parse_yaml

FILLED_FROM_MANIFEST = ("mrtd", "rtmr1", "rtmr2")
REQUIRED_MEASUREMENTS = ("mrtd", "rtmr1", "rtmr2")
# Why a manifest predicts an all-zero register, and how to rebuild the image so that it does not.
_UNMEASURED = {
    "rtmr1": (
        "the firmware measured no kernel, so any kernel would pass",
        "rebuild the image with a TDVF that measures the kernel it boots",
    ),
    "rtmr2": (
        "the image's kernel does not measure its command line and initrd (its EFI stub predates Linux 6.9), so "
        "the host could swap them unseen",
        "rebuild the image with a kernel >= 6.9 (e.g. kernel.suite: bookworm-backports in the recipe)",
    ),
}
_TDX_ONLY = ("qgs_socket", "qgs_form", "qgs_vsock_port", "mr_config_id", "mr_owner", "mr_owner_config")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
DEFAULT_API_KEY = "default"
_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_CPUSET = re.compile(r"^\^?\d+(-\d+)?(,\^?\d+(-\d+)?)*$")

_base_dir: ContextVar[Path | None] = ContextVar("tdxvm_vm_spec_base", default=None)


def _resolve(value: Any) -> Path:
    """A local path; relative ones are taken from the VM spec's folder."""
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a path")
    p = Path(value).expanduser()
    base = _base_dir.get()
    if not p.is_absolute():
        p = (base or Path.cwd()) / p
    return Path(p.resolve(strict=False))


def _memory_mib(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):  # from code: MiB
        return value
    text = str(value)
    size = parse_size(text)
    if size % (1 << 20):
        raise ValueError(f"{text} is not a whole number of MiB")
    return size >> 20


def _hex48(value: Any) -> bytes:
    text = str(value).strip().lower().removeprefix("0x")
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"{value!r} is not hex") from None
    if len(raw) != 48:
        raise ValueError(f"expected 48 bytes (96 hex digits, a SHA-384 value), got {len(raw)}")
    return raw


def _host_path(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f"{value!r} must be an absolute path on the libvirt host")
    return value


def _policy(value: Any) -> Any:
    """A path to a policy YAML (loaded here, its own errors kept) or an inline mapping."""
    if isinstance(value, str):
        path = _resolve(value)
        try:
            return load_policy(path)
        except PolicyFileError as exc:
            raise ValueError(str(exc)) from None
    return value


def _model_ref(value: Any) -> Any:
    return {"path": value} if isinstance(value, (str, Path)) else value


Hex48 = Annotated[bytes, BeforeValidator(_hex48)]
LocalPath = Annotated[Path, BeforeValidator(_resolve)]
HostPath = Annotated[str, BeforeValidator(_host_path)]
PortNumber = Annotated[int, Field(ge=1, le=65535)]


class Forward(BaseModel):
    """Host ``address:host`` → guest port ``guest``. ``host`` left out: a free port is chosen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    guest: PortNumber
    host: PortNumber | None = None
    address: str = "127.0.0.1"

    @field_validator("address")
    @classmethod
    def _ipv4(cls, value: str) -> str:
        try:
            ipaddress.IPv4Address(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an IPv4 address (QEMU user networking forwards IPv4)") from None
        return value


class Network(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    forwards: tuple[Forward, ...] = ()

    @field_validator("forwards")
    @classmethod
    def _distinct(cls, forwards: tuple[Forward, ...]) -> tuple[Forward, ...]:
        seen_guest: set[int] = set()
        seen_host: set[tuple[str, int]] = set()
        for f in forwards:
            if f.guest in seen_guest:
                raise ValueError(f"guest port {f.guest} is forwarded twice")
            seen_guest.add(f.guest)
            if f.host is not None:
                if (f.address, f.host) in seen_host:
                    raise ValueError(f"host port {f.address}:{f.host} is used by two forwards")
                seen_host.add((f.address, f.host))
        return forwards


class Pinning(BaseModel):
    """``vcpus``: the host cpuset of each vCPU, in order; ``numa_node``: strict memory binding."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vcpus: tuple[str, ...] = ()
    numa_node: Annotated[int, Field(ge=0)] | None = None

    @field_validator("vcpus")
    @classmethod
    def _cpusets(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for cpus in value:
            if not _CPUSET.fullmatch(cpus):
                raise ValueError(f'{cpus!r} is not a host cpuset (e.g. "2", "2-3", "0-7,^4")')
        return value


class ModelRef(BaseModel):
    """``model:`` an encrypted model folder (``tdxvm weights encrypt``) to provision after the
    launch, and how to serve it; a plain path stands for ``{path: PATH}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: LocalPath
    name: Annotated[str, Field(pattern=_MODEL_NAME.pattern)] | None = None  # default: the folder's name
    key: Annotated[str, Field(pattern=_KEY_NAME.pattern)] | None = (
        None  # secret weights/KEY; default: the folder's name
    )
    dtype: Literal["float32", "bfloat16", "int8"] = "float32"
    threads: Annotated[int, Field(ge=1, le=1024)] | None = None
    max_batch: Annotated[int, Field(ge=1, le=MAX_BATCH)] | None = None  # requests decoding together [16]
    # the running batch's KV cache at its worst [max_batch full contexts, at most half the memory free after loading]
    kv_cache_mib: Annotated[int, Field(ge=1, le=MAX_KV_CACHE_MIB)] | None = None
    # secrets api-keys/NAME whose hashes the service accepts (tdxvm apikey create NAME); unset: [default], made on
    # first use (None rather than the default itself, so that specs written before keep their fleet spec hash)
    api_keys: (
        Annotated[
            tuple[Annotated[str, Field(pattern=API_KEY_NAME.pattern)], ...], Field(min_length=1, max_length=MAX_KEYS)
        ]
        | None
    ) = None

    @field_validator("api_keys")
    @classmethod
    def _distinct(cls, names: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if names is not None and len(set(names)) != len(names):
            raise ValueError("each API key name once")
        return names

    @model_validator(mode="after")
    def _defaults_usable(self) -> ModelRef:
        folder = self.path.name
        if self.name is None and not _MODEL_NAME.fullmatch(folder):
            raise ValueError(
                f"the folder name {folder!r} cannot be the model's name (letters, digits, . _ : / -); set name:"
            )
        if self.key is None and not _KEY_NAME.fullmatch(folder):
            raise ValueError(f"the folder name {folder!r} cannot be the key's name (letters, digits, . _ -); set key:")
        return self

    @property
    def served_name(self) -> str:
        return self.name or self.path.name

    @property
    def key_name(self) -> str:
        return self.key or self.path.name

    @property
    def api_key_names(self) -> tuple[str, ...]:
        return self.api_keys or (DEFAULT_API_KEY,)


class VmSpec(BaseModel):
    """A VM spec. Load with :func:`load_vm_spec`; construct with keywords in code."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    uri: str = DEFAULT_URI
    image: LocalPath
    backend: Literal["tdx", "emulated"] = "tdx"
    vcpus: Annotated[int, Field(ge=1, le=512)] = 2
    memory: Annotated[int, BeforeValidator(_memory_mib), Field(ge=256)] = 2048  # MiB
    scratch: Annotated[int, BeforeValidator(_memory_mib), Field(ge=256)] = 2048  # MiB of the per-VM scratch disk
    pinning: Pinning | None = None
    network: Network = Network()
    firmware: HostPath | None = None
    qgs_socket: HostPath | None = None
    qgs_form: Literal["socket", "vsock"] = "socket"
    qgs_vsock_port: PortNumber = 4050
    mr_config_id: Hex48 | None = None
    mr_owner: Hex48 | None = None
    mr_owner_config: Hex48 | None = None
    policy: Annotated[Policy | None, BeforeValidator(_policy)] = None
    model: Annotated[ModelRef | None, BeforeValidator(_model_ref)] = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError(f"{value!r}: use letters, digits, '.', '_' and '-' (at most 63, first a letter or digit)")
        return value

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        problem = uri_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("pinning")
    @classmethod
    def _pins_match_vcpus(cls, value: Pinning | None, info: ValidationInfo) -> Pinning | None:
        vcpus = info.data.get("vcpus")
        if value is not None and value.vcpus and vcpus is not None and len(value.vcpus) != vcpus:
            raise ValueError(f"vcpus lists {len(value.vcpus)} host cpusets for {vcpus} vCPUs; give one per vCPU")
        return value

    @field_validator(*_TDX_ONLY)
    @classmethod
    def _tdx_only(cls, value: Any, info: ValidationInfo) -> Any:
        if info.data.get("backend") == "emulated":
            raise ValueError(
                "a TDX launch setting; the emulated backend (no TDX) takes none (remove it, or use backend: tdx)"
            )
        return value

    @property
    def memory_mib(self) -> int:
        return self.memory


def load_vm_spec(path: str | Path) -> VmSpec:
    """Load a VM spec YAML; raise :class:`tdxvm.yamlfile.SpecError` (file:line: field: problem)."""
    token = _base_dir.set(Path(path).resolve().parent)
    try:
        return load_yaml(path, VmSpec)
    finally:
        _base_dir.reset(token)


def parse_vm_spec(text: str, *, source: str = "<vm spec>", base_dir: str | Path | None = None) -> VmSpec:
    token = _base_dir.set(Path(base_dir).resolve() if base_dir is not None else None)
    try:
        return parse_yaml(text, VmSpec, source=source)
    finally:
        _base_dir.reset(token)


def firmware_path(spec: VmSpec, manifest: ImageManifest) -> str | None:
    """The TDVF the TD boots (emulated: stands for): the spec's, else the one the manifest's MRTD was predicted for."""
    return spec.firmware or manifest.firmware_path


def filled_from_manifest(spec: VmSpec, manifest: ImageManifest) -> tuple[str, ...]:
    """Policy keys the spec leaves out and the manifest predicts (taken from the manifest)."""
    given = spec.policy.model_fields_set if spec.policy is not None else set()
    return tuple(k for k in FILLED_FROM_MANIFEST if k not in given and manifest.measurements.value(k) is not None)


MASK_ALL = (1 << 64) - 1
# PKS, KL and PERFMON: QEMU turns them on when the host CPU has the feature (and the PMU is
# on), whatever the domain XML asks; the strict default allows them, so a tdx launch pins
# every other bit and leaves these three out of its mask (listed as a policy exception).
HOST_CPU_TD_ATTRIBUTES = TD_ATTR_PKS | TD_ATTR_KL | TD_ATTR_PERFMON


def launched_td_attributes(spec: VmSpec) -> int:
    """The TD attributes the launch asks for: the tdx backend's libvirt ``<launchSecurity><policy>``,
    or what the emulated quote service signs for an emulated TD."""
    return td_policy() if spec.backend == "tdx" else LAUNCH_TD_ATTRIBUTES


def _refuse_unmeasured(spec: VmSpec, manifest: ImageManifest, filled: tuple[str, ...], values: dict[str, Any]) -> None:
    """A manifest that predicts an all-zero RTMR1/RTMR2 describes an image that measures nothing there."""
    if values.get("allow_zero_rtmrs"):
        return
    zero = [k for k in filled if k in _UNMEASURED and not any(bytes.fromhex(values[k]))]
    if zero:
        why = "; ".join(f"an all-zero {k.upper()}: {_UNMEASURED[k][0]}" for k in zero)
        fix = "; ".join(_UNMEASURED[k][1] for k in zero)
        raise LaunchPolicyError(
            f"VM {spec.name}: the image manifest {manifest.path} predicts {why}. Fix: {fix}; or accept that with "
            "allow_zero_rtmrs: true under policy: in the VM spec"
        )


def effective_policy(spec: VmSpec, manifest: ImageManifest, *, rtmr0: str | None = None) -> Policy:
    """The policy a launch appraises with: the spec's keys, plus MRTD/RTMR1/RTMR2 from the
    manifest and ``rtmr0`` (predicted for the domain, :mod:`tdxvm.launch.rtmr0pin`) where the spec gives none.

    For the tdx backend, MR_CONFIG_ID/MR_OWNER/MR_OWNER_CONFIG given to the TD are
    expected in its quote too, unless the policy says otherwise; so are, for both
    backends, the exact TD attributes the launch asks for (:func:`launched_td_attributes`,
    every bit compared unless the policy gives ``td_attributes_mask``). A policy that ends
    up without an expected MRTD, RTMR1 or RTMR2 is refused: it would trust any firmware,
    kernel or command line; so is a manifest that predicts an all-zero RTMR1 or RTMR2
    (unless the policy says ``allow_zero_rtmrs: true``).
    """
    given = spec.policy.model_dump(exclude_unset=True) if spec.policy is not None else {}
    values: dict[str, Any] = dict(given)
    filled = filled_from_manifest(spec, manifest)
    for key in filled:
        values[key] = manifest.measurements.value(key)
    if rtmr0 is not None and "rtmr0" not in values:
        values["rtmr0"] = rtmr0
    if spec.backend == "tdx":
        for key in ("mr_config_id", "mr_owner", "mr_owner_config"):
            launched = getattr(spec, key)
            if launched is not None and key not in values:
                values[key] = launched.hex()
    if "td_attributes" not in values:
        values["td_attributes"] = launched_td_attributes(spec).to_bytes(8, "little").hex()
        if (
            spec.backend == "tdx" and "td_attributes_mask" not in values
        ):  # QEMU sets these from the host CPU, not the XML
            values["td_attributes_mask"] = (MASK_ALL & ~HOST_CPU_TD_ATTRIBUTES).to_bytes(8, "little").hex()
    missing = [k for k in REQUIRED_MEASUREMENTS if values.get(k) is None]
    if missing:
        raise LaunchPolicyError(
            f"VM {spec.name}: the attestation policy has no expected {', '.join(m.upper() for m in missing)}, and "
            f"the image manifest {manifest.path} predicts none (an image built without --firmware predicts no MRTD); "
            "rebuild the image with its firmware, or give the values under policy: in the VM spec"
        )
    _refuse_unmeasured(spec, manifest, filled, values)
    return Policy(**values)
