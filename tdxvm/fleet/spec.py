"""The fleet file: hosts, reusable VM templates, and deployments of them.

Kubernetes-style, loaded through :mod:`tdxvm.yamlfile` so every problem names the file,
the line and the field path, and unknown keys are errors::

    apiVersion: tdxvm/v1
    kind: Fleet
    metadata:
      name: llama                       # VM names: <fleet>-<deployment>-<index>
    spec:
      hosts:                            # name -> libvirt URI
        tdx-a: qemu+ssh://admin@tdx-a/system
        tdx-b: qemu+ssh://admin@tdx-b/system
      templates:                        # a VM spec without name and uri (see tdxvm.launch.spec)
        llama-7b:
          image: ../build/llama2/manifest.json
          backend: tdx
          vcpus: 8
          memory: 32GiB
          policy: policy.yaml
      deployments:
        chat:
          template: llama-7b
          replicas: 3
          placement: [tdx-a, tdx-b]     # round-robin by index; or {tdx-a: 2, tdx-b: 1}
          overrides:                    # per host, any template key
            tdx-b: {pinning: {vcpus: ["8", "9", "10", "11", "12", "13", "14", "15"]}}

Relative paths (``image``, ``model``, a ``policy`` file) are taken from the fleet
file's folder. Replica ``i`` of deployment ``d`` is the VM ``<fleet>-<d>-<i>``; with a
placement list it runs on ``placement[i % len(placement)]``, with a mapping the
replicas fill the hosts in the order written. :meth:`Fleet.desired` gives every VM the
file asks for, each a complete :class:`~tdxvm.launch.spec.VmSpec` and its
:func:`spec_hash`, which the fleet's VMs carry in their metadata to detect drift.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model, field_validator, model_validator
from pydantic.fields import FieldInfo

from tdxvm.launch.spec import VmSpec
from tdxvm.launch.uris import uri_problem
from tdxvm.yamlfile import load_yaml, parse_yaml

API_VERSION = "tdxvm/v1"
KIND = "Fleet"
MAX_REPLICAS = 1000
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_PATH_KEYS = ("image", "model")
_NOT_IN_TEMPLATE = ("name", "uri")
VM_NAME_MAX = 63


@dataclass(frozen=True)
class _Context:
    """What nested validators need from the levels above (pydantic validates top-down)."""

    folder: Path | None = None
    fleet: str | None = None
    hosts: frozenset[str] | None = None
    templates: dict[str, Any] | None = None


_context: ContextVar[_Context | None] = ContextVar("tdxvm_fleet_context", default=None)


def _ctx() -> _Context:
    return _context.get() or _Context()


def _with(**changes: Any) -> Any:
    return _context.set(_Context(**{**_ctx().__dict__, **changes}))


def _resolve_paths(data: Any) -> Any:
    """Relative ``image``/``model``/``policy`` paths, taken from the fleet file's folder."""
    folder = _ctx().folder
    if not isinstance(data, dict) or folder is None:
        return data
    out = dict(data)
    for key in (*_PATH_KEYS, "policy"):
        value = out.get(key)
        if isinstance(value, str) and value.strip() and not Path(value).expanduser().is_absolute():
            out[key] = str(folder / Path(value).expanduser())
    model = out.get("model")
    if (
        isinstance(model, dict)
        and isinstance(model.get("path"), str)
        and not Path(model["path"]).expanduser().is_absolute()
    ):
        out["model"] = {**model, "path": str(folder / Path(model["path"]).expanduser())}
    return out


def _dns_label(value: str, what: str) -> str:
    if not _DNS_LABEL.fullmatch(value) or len(value) > 40:
        raise ValueError(
            f"{value!r}: a {what} name is lowercase letters, digits and '-' (not at either end), at most 40 characters"
        )
    return value


class Template(VmSpec):
    """A VM spec without ``name`` (the fleet names its VMs) and ``uri`` (from ``spec.hosts``)."""

    name: str = ""
    uri: str = ""

    @model_validator(mode="before")
    @classmethod
    def _paths(cls, data: Any) -> Any:
        return _resolve_paths(data)

    # Same method names as VmSpec's validators: these replace them (given values only).
    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        raise ValueError("a template has no name: VMs are named <fleet>-<deployment>-<index>")

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        raise ValueError("a template has no uri: a deployment's placement names hosts from spec.hosts")


def _optional(info: FieldInfo) -> tuple[Any, Any]:
    kind = info.annotation | None  # type: ignore[operator]
    return (Annotated[kind, *info.metadata] if info.metadata else kind, None)  # type: ignore[valid-type]


_OverrideBase = create_model(  # every template key, optional; the merge is checked as a whole Template
    "_OverrideBase",
    __config__=ConfigDict(extra="forbid", frozen=True),
    **{k: _optional(f) for k, f in VmSpec.model_fields.items() if k not in _NOT_IN_TEMPLATE},  # type: ignore[arg-type]
)


class Override(_OverrideBase):  # type: ignore[misc, valid-type]
    """Template keys changed for the replicas on one host."""

    @model_validator(mode="before")
    @classmethod
    def _paths(cls, data: Any) -> Any:
        return _resolve_paths(data)


def model_input(model: BaseModel) -> dict[str, Any]:
    """The keys given to ``model``, as values its schema accepts again (SHA-384s as hex)."""
    return {
        k: (v.hex() if isinstance(v, bytes) else v) for k, v in ((k, getattr(model, k)) for k in model.model_fields_set)
    }


def _placement(value: Any) -> tuple[str, ...] | dict[str, int]:
    """A list of host names (round-robin) or a mapping of host name to replica count."""
    shape = "a list of host names ([a, b]: round-robin) or a mapping of host name to replica count ({a: 2, b: 1})"
    if isinstance(value, (list, tuple)):
        if not all(isinstance(host, str) for host in value):
            raise ValueError(f"expected {shape}")
        return tuple(value)
    if isinstance(value, dict):
        counts = {}
        for host, n in value.items():
            text = str(n) if isinstance(n, (str, int)) and not isinstance(n, bool) else ""
            if not re.fullmatch(r"[0-9]{1,4}", text) or int(text) > MAX_REPLICAS:
                raise ValueError(f"{host}: {n!r} is not a replica count (a whole number from 0 to {MAX_REPLICAS})")
            counts[str(host)] = int(text)
        return counts
    raise ValueError(f"expected {shape}")


class Deployment(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    template: str
    replicas: Annotated[int, Field(ge=0, le=MAX_REPLICAS)] | None = None
    placement: Annotated[tuple[str, ...] | dict[str, int], BeforeValidator(_placement)]
    overrides: dict[str, Override] = {}

    @field_validator("template")
    @classmethod
    def _known_template(cls, value: str) -> str:
        templates = _ctx().templates
        if templates is not None and value not in templates:
            known = ", ".join(sorted(templates)) or "none"
            raise ValueError(f"no template {value!r} under spec.templates (defined: {known})")
        return value

    @field_validator("placement")
    @classmethod
    def _known_hosts(cls, value: tuple[str, ...] | dict[str, int]) -> tuple[str, ...] | dict[str, int]:
        if not value:
            raise ValueError("expected at least one host from spec.hosts")
        names = list(value)
        if len(set(names)) != len(names):
            raise ValueError("a host is listed twice")
        hosts = _ctx().hosts
        if hosts is not None:
            unknown = [h for h in names if h not in hosts]
            if unknown:
                raise ValueError(
                    f"unknown host {', '.join(unknown)} (spec.hosts defines: {', '.join(sorted(hosts)) or 'none'})"
                )
        return value

    @field_validator("overrides")
    @classmethod
    def _overrides(cls, value: dict[str, Override], info: Any) -> dict[str, Override]:
        placement = info.data.get("placement")
        template = (_ctx().templates or {}).get(info.data.get("template", ""))
        for host, override in value.items():
            if placement is not None and host not in placement:
                raise ValueError(f"host {host!r} is not in this deployment's placement ({', '.join(placement)})")
            if template is not None:
                merged = {**model_input(template), **model_input(override)}
                try:
                    Template.model_validate(merged)
                except ValueError as exc:  # pydantic's ValidationError is a ValueError
                    problems = "; ".join(
                        f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
                        for e in exc.errors()
                    )  # type: ignore[attr-defined]
                    raise ValueError(f"{host}: the template with this override is not a valid VM: {problems}") from None
        return value

    @model_validator(mode="after")
    def _replicas(self) -> Deployment:
        if isinstance(self.placement, dict):
            total = sum(self.placement.values())
            if total > MAX_REPLICAS:
                raise ValueError(f"the placement puts {total} replicas on hosts; at most {MAX_REPLICAS}")
            if self.replicas is not None and self.replicas != total:
                raise ValueError(
                    f"replicas is {self.replicas} but the placement puts {total} on hosts; make them agree "
                    "(or leave replicas out)"
                )
        elif self.replicas is None:
            raise ValueError("replicas is missing (how many VMs of the template)")
        return self

    @property
    def count(self) -> int:
        return sum(self.placement.values()) if isinstance(self.placement, dict) else int(self.replicas or 0)

    def host_of(self, index: int) -> str:
        """The host of replica ``index``."""
        if isinstance(self.placement, dict):
            for host, n in self.placement.items():
                if index < n:
                    return host
                index -= n
            raise IndexError(index)
        return self.placement[index % len(self.placement)]


class Metadata(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _dns_label(value, "fleet")


class FleetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    hosts: dict[str, str]
    templates: dict[str, Template] = {}
    deployments: dict[str, Deployment] = {}

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError(
                "expected at least one host: name -> libvirt URI (qemu:///system, qemu+ssh://user@host/system)"
            )
        seen: dict[str, str] = {}
        for name, uri in value.items():
            _dns_label(name, "host")
            problem = uri_problem(uri)
            if problem is not None:
                raise ValueError(f"host {name}: {problem}")
            if uri in seen:  # each host owns what it holds: one libvirt under two names would delete its own VMs
                raise ValueError(f"hosts {seen[uri]} and {name} are the same libvirt ({uri}): name it once")
            seen[uri] = name
        return value

    @field_validator("templates", mode="wrap")
    @classmethod
    def _templates(cls, value: Any, handler: Any) -> dict[str, Template]:
        value = {} if value is None else value  # "templates:" with nothing under it
        for name in value if isinstance(value, dict) else ():
            _dns_label(str(name), "template")
        return handler(value)

    @field_validator("deployments", mode="wrap")
    @classmethod
    def _deployments(cls, value: Any, handler: Any, info: Any) -> dict[str, Deployment]:
        value = {} if value is None else value  # "deployments:" with nothing under it: the fleet has no VMs
        fleet = _ctx().fleet or ""
        for name in value if isinstance(value, dict) else ():
            _dns_label(str(name), "deployment")
            longest = f"{fleet}-{name}-{MAX_REPLICAS - 1}"
            if len(longest) > VM_NAME_MAX:
                raise ValueError(
                    f"deployment {name}: VM names like {longest} would be longer than {VM_NAME_MAX} "
                    "characters; shorten the fleet or deployment name"
                )
        hosts = info.data.get("hosts")
        token = _with(hosts=frozenset(hosts) if hosts is not None else None, templates=info.data.get("templates"))
        try:
            return handler(value)
        finally:
            _context.reset(token)


class FleetFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    apiVersion: Literal["tdxvm/v1"]  # noqa: N815 - the YAML key
    kind: Literal["Fleet"]
    metadata: Metadata
    spec: FleetSpec

    @field_validator("spec", mode="wrap")
    @classmethod
    def _spec(cls, value: Any, handler: Any, info: Any) -> FleetSpec:
        meta = info.data.get("metadata")
        token = _with(fleet=meta.name if meta is not None else None)
        try:
            return handler(value)
        finally:
            _context.reset(token)


# -- what the file asks for ------------------------------------------------------------


def vm_name(fleet: str, deployment: str, index: int) -> str:
    return f"{fleet}-{deployment}-{index}"


def spec_document(spec: VmSpec) -> dict[str, Any]:
    """The parts of a VM spec that define the VM (not its name or host), as canonical JSON values."""
    doc: dict[str, Any] = {}
    for key in VmSpec.model_fields:
        if key in _NOT_IN_TEMPLATE:
            continue
        value = getattr(spec, key)
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json", exclude_none=True)
        elif isinstance(value, bytes):
            value = value.hex()
        elif isinstance(value, Path):
            value = str(value)
        doc[key] = value
    return doc


def spec_hash(spec: VmSpec) -> str:
    """SHA-256 of :func:`spec_document` (sorted keys, compact): changes when the VM would differ."""
    text = json.dumps(spec_document(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class DesiredVm:
    """One VM the fleet file asks for."""

    name: str
    deployment: str
    index: int
    template: str
    host: str
    uri: str
    spec: VmSpec
    spec_hash: str


@dataclass(frozen=True)
class Fleet:
    """A loaded fleet file."""

    name: str
    source: str
    hosts: dict[str, str]
    templates: dict[str, Template]
    deployments: dict[str, Deployment]
    _vms: list[DesiredVm] = field(default_factory=list, repr=False, compare=False)

    @classmethod
    def from_file(cls, doc: FleetFile, source: str) -> Fleet:
        return cls(
            name=doc.metadata.name,
            source=source,
            hosts=dict(doc.spec.hosts),
            templates=dict(doc.spec.templates),
            deployments=dict(doc.spec.deployments),
        )

    def desired(self) -> list[DesiredVm]:
        """Every VM the file asks for, by deployment then index."""
        if not self._vms:
            self._vms.extend(self._expand())
        return list(self._vms)

    def _expand(self) -> Iterator[DesiredVm]:
        for dname, dep in self.deployments.items():
            template = self.templates[dep.template]
            base = model_input(template)
            merged = {host: {**base, **model_input(o)} for host, o in dep.overrides.items()}
            for i in range(dep.count):
                host = dep.host_of(i)
                name = vm_name(self.name, dname, i)
                values = merged.get(host, base)
                spec = VmSpec.model_validate({**values, "name": name, "uri": self.hosts[host]})
                yield DesiredVm(
                    name=name,
                    deployment=dname,
                    index=i,
                    template=dep.template,
                    host=host,
                    uri=self.hosts[host],
                    spec=spec,
                    spec_hash=spec_hash(spec),
                )


def _load(call: Any, folder: Path | None) -> FleetFile:
    token = _context.set(_Context(folder=folder))
    try:
        return call()
    finally:
        _context.reset(token)


def load_fleet(path: str | Path) -> Fleet:
    """Load a fleet file; raise :class:`tdxvm.yamlfile.SpecError` (file:line: field: problem)."""
    p = Path(path)
    doc = _load(lambda: load_yaml(p, FleetFile), p.resolve().parent)
    return Fleet.from_file(doc, str(p))


def parse_fleet(text: str, *, source: str = "<fleet>", base_dir: str | Path | None = None) -> Fleet:
    folder = Path(base_dir).resolve() if base_dir is not None else Path.cwd()
    doc = _load(lambda: parse_yaml(text, FleetFile, source=source), folder)
    return Fleet.from_file(doc, source)
