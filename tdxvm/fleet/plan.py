"""The plan: what the file asks for against what exists, and why each VM changes.

Pure: :func:`make_plan` takes the desired VMs (:meth:`tdxvm.fleet.spec.Fleet.desired`),
each host's view (:mod:`tdxvm.fleet.inventory`), the state file's record and the digests
of the image manifests and models, and returns one :class:`Action` per VM:

``create``   asked for and not on its host (new replica, removed outside tdxvm, or an
             earlier apply did not finish it);
``replace``  on its host but not what the file asks for: its spec, image or model
             changed (drift; images and models by their contents, not their place),
             its last attestation failed, it is not running, or it was never brought
             up to the end. Replacing destroys the VM and launches it again through
             the whole attested path;
``delete``   the fleet's VM is no longer asked for (deployment removed, fewer replicas,
             moved to another host, host removed), or an interrupted apply left its
             volumes with no domain;
``keep``     as asked, serving;
``skip``     cannot be handled now: its host is unreachable, a domain that is not the
             fleet's holds the name, or the image manifest or model cannot be read.
             Nothing is done to it; a later apply handles it. A VM with the fleet's label that
             another controller owns (:attr:`HostView.contested`) is a ``skip`` too,
             asked for or not: never replaced or deleted, and always reported.

A VM *serves* when it is running, its last attestation was accepted, and an apply
finished bringing it up (:attr:`ActualVm.serving`); rolling replacement counts those.
"""

from __future__ import annotations

import shlex
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from tdxvm.fleet.inventory import IMAGE_SHA, MODEL_DIGEST, SPEC_HASH, ActualVm, ContestedVm, HostView
from tdxvm.fleet.spec import DesiredVm, spec_document
from tdxvm.fleet.state import moved_from
from tdxvm.launch.spec import ModelRef

Kind = Literal["create", "replace", "delete", "keep", "skip"]
KINDS: tuple[Kind, ...] = ("create", "replace", "delete", "keep", "skip")


@dataclass(frozen=True)
class Action:
    kind: Kind
    vm: str
    host: str
    uri: str
    deployment: str | None
    reasons: tuple[str, ...] = ()
    desired: DesiredVm | None = field(default=None, repr=False)
    actual: ActualVm | None = field(default=None, repr=False)

    @property
    def serving(self) -> bool:
        return self.actual is not None and self.actual.serving

    def to_dict(self) -> dict[str, Any]:
        return {
            "vm": self.vm,
            "action": self.kind,
            "host": self.host,
            "uri": self.uri,
            "deployment": self.deployment,
            "reasons": list(self.reasons),
            "state": self.actual.state if self.actual else None,
        }


@dataclass(frozen=True)
class Plan:
    fleet: str
    actions: tuple[Action, ...]
    hosts: dict[str, HostView]

    @property
    def changes(self) -> tuple[Action, ...]:
        return tuple(a for a in self.actions if a.kind in ("create", "replace", "delete"))

    @property
    def skipped(self) -> tuple[Action, ...]:
        return tuple(a for a in self.actions if a.kind == "skip")

    def counts(self) -> dict[str, int]:
        c = Counter(a.kind for a in self.actions)
        return {k: c.get(k, 0) for k in KINDS}

    def unreachable(self) -> dict[str, str]:
        return {name: v.error or "" for name, v in sorted(self.hosts.items()) if not v.reachable}

    def to_dict(self) -> dict[str, Any]:
        return {
            "fleet": self.fleet,
            "summary": self.counts(),
            "unreachable_hosts": self.unreachable(),
            "actions": [a.to_dict() for a in self.actions],
        }


def _short(digest: str | None) -> str:
    return (digest or "none")[:12]


def changed_keys(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for each spec key that differs (from the state file's record)."""
    if not old:
        return []
    out = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            before, after = _brief(old.get(key)), _brief(new.get(key))
            out.append(f"{key}: {before} -> {after}")
    return out


def _moved(old: dict[str, Any] | None, new: dict[str, Any], *, image: bool, model: bool) -> dict[str, Any] | None:
    """``old`` (the spec an entry was launched with) with the new places of its image
    manifest and model folder where their contents are the same (``image``, ``model``):
    moving a folder changes no VM."""
    if not old:
        return old
    old = dict(old)
    if image and "image" in new:
        old["image"] = new["image"]
    if model and isinstance(old.get("model"), dict) and isinstance(new.get("model"), dict):
        old["model"] = {**old["model"], "path": new["model"].get("path")}
    return old


def _brief(value: Any) -> str:
    text = "unset" if value is None else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _attestation_reasons(vm: ActualVm) -> list[str]:
    att = vm.attestation or {}
    reasons = [f"[{r.get('code')}] {r.get('message')}" for r in att.get("reasons") or [] if isinstance(r, dict)]
    return reasons


def model_ref(model: ModelRef) -> str:
    """The key of a served model in :func:`make_plan`'s ``model_digests``: its folder and key."""
    return f"{model.path} (key weights/{model.key_name})"


def drift(
    d: DesiredVm, a: ActualVm, image_sha: str, record: dict[str, Any] | None, *, model_digest: str | None = None
) -> list[str]:
    """Why the VM ``a`` is not what ``d`` asks for (empty: it is).

    What a VM was launched with (spec, image and model digests) and whether an apply
    brought it up to the end are the controller's to know: they come from its state file
    (``record``), never from the labels on the host, which the host can rewrite to make
    an old VM look current. A VM the state file does not describe on this host is
    replaced. The image and the model are known by their contents: a manifest or model
    folder moved elsewhere with the same digest is no drift, and a model encrypted again
    in place with other contents is (``model_digest``: the desired model's; entries
    written before tdxvm recorded it have none, and count as unchanged)."""
    if record is None or record.get("host") not in (None, a.host):
        where = "no entry" if record is None else f"its entry is for host {record.get('host')}"
        return [f"not what this controller launched here ({where} in the fleet's state file)"]
    reasons = []
    applied = record.get(SPEC_HASH)
    image_same = record.get(IMAGE_SHA) == image_sha
    launched_model = record.get(MODEL_DIGEST)
    model_same = model_digest is not None and launched_model == model_digest
    if applied != d.spec_hash:
        new = spec_document(d.spec)
        keys = changed_keys(_moved(record.get("spec"), new, image=image_same, model=model_same), new)
        if keys or not record.get("spec"):
            detail = "; ".join(keys) if keys else f"spec hash {_short(applied)} -> {_short(d.spec_hash)}"
            reasons.append(f"spec drift: {detail}")
    if not image_same:
        reasons.append(
            f"image drift: manifest {d.spec.image} changed (sha256 {_short(record.get(IMAGE_SHA))} -> "
            f"{_short(image_sha)})"
        )
    if d.spec.model is not None and model_digest is not None and launched_model not in (None, model_digest):
        reasons.append(
            f"model drift: {d.spec.model.path} holds another model (digest "
            f"{_short(launched_model.removeprefix('sha256:'))} -> {_short(model_digest.removeprefix('sha256:'))})"
        )
    if a.verdict == "reject":
        reasons.append("failed attestation: " + ("; ".join(_attestation_reasons(a)) or "refused"))
    elif a.verdict is None or record.get("phase") != "ready":
        reasons.append("never brought up to the end (an earlier apply was interrupted or failed)")
    if a.state != "running" and a.verdict != "reject":
        reasons.append(f"not running ({a.state})")
    return reasons


def _create_reason(record: dict[str, Any] | None, host: str) -> str:
    if record is None:
        return "new replica"
    if record.get("host") not in (None, host):
        return f"replica now placed on this host (was on {record.get('host')})"
    phase = record.get("phase")
    if phase == "refused":
        return (
            "an earlier apply was refused at attestation ("
            + "; ".join(record.get("reasons") or ["no reasons kept"])
            + ")"
        )
    if phase == "ready":
        return "missing from its host (removed outside tdxvm?)"
    return f"an earlier apply did not finish it ({phase or 'unknown'})"


MOVED_UNDECIDED = "moved-host-undecided"  # the error code of a moved host held back (planner.settle_moved)


def _delete_reason(a: ActualVm, wanted: dict[str, DesiredVm], deployments: set[str], host_in_file: bool) -> str:
    moved = moved_from(a.host)
    if moved is not None:
        return f"host {moved[0]} has another URI in the file now: its VMs at {moved[1]} go"
    if not host_in_file:
        return f"host {a.host} is no longer in the file"
    d = wanted.get(a.name)
    if d is not None:
        return f"moved: replica now placed on host {d.host}"
    dep = a.labels.get("deployment", "")
    if dep not in deployments:
        return f"deployment {dep or '?'} is no longer in the file"
    return f"deployment {dep} has fewer replicas now"


def contested_reason(fleet: str, c: ContestedVm) -> str:
    return (
        f"{c.name} on {c.host} carries fleet {fleet}'s label but is {c.owner}; never touched: one controller "
        "owns a fleet, apply it from the one that owns this VM (docs/fleet.md, 'One controller per fleet')"
    )


def make_plan(
    fleet: str,
    desired: list[DesiredVm],
    hosts: dict[str, HostView],
    *,
    file_hosts: set[str],
    image_shas: dict[str, str | Exception],
    records: dict[str, dict[str, Any]],
    model_digests: dict[str, str | Exception] | None = None,
) -> Plan:
    """Compare (see the module doc). ``image_shas`` maps each manifest path to its digest
    or the error reading it (whose message names the manifest), ``model_digests`` each
    served model (:func:`model_ref`) to its digest or the error reading it; ``records``
    is the state file's ``vms``."""
    model_digests = model_digests or {}
    actions: list[Action] = []
    wanted = {d.name: d for d in desired}
    deployments = {d.deployment for d in desired}
    for d in desired:
        view = hosts.get(d.host)
        base: dict[str, Any] = {"vm": d.name, "host": d.host, "uri": d.uri, "deployment": d.deployment, "desired": d}
        if view is None or not view.reachable:
            error = view.error if view is not None else "not surveyed"
            actions.append(Action("skip", reasons=(f"host {d.host} unreachable: {error}",), **base))
            continue
        if d.name in view.contested:
            actions.append(Action("skip", reasons=(contested_reason(fleet, view.contested[d.name]),), **base))
            continue
        if d.name in view.foreign:
            actions.append(
                Action(
                    "skip",
                    reasons=(
                        f"a domain named {d.name} on {d.host} is {view.foreign[d.name]}, "
                        "not this fleet's: never touched; remove or rename it",
                    ),
                    **base,
                )
            )
            continue
        sha = image_shas.get(str(d.spec.image))
        model = None if d.spec.model is None else model_digests.get(model_ref(d.spec.model))
        actual = view.vms.get(d.name)
        if not isinstance(sha, str):
            actions.append(Action("skip", reasons=(str(sha),), actual=actual, **base))  # it names the manifest
            continue
        if d.spec.model is not None and not isinstance(model, str):
            actions.append(Action("skip", reasons=(str(model),), actual=actual, **base))  # it names the folder
            continue
        record = records.get(d.name)
        if actual is None:
            actions.append(Action("create", reasons=(_create_reason(record, d.host),), **base))
            continue
        reasons = drift(d, actual, sha, record, model_digest=model)
        actions.append(Action("replace" if reasons else "keep", reasons=tuple(reasons), actual=actual, **base))
    for name, view in sorted(hosts.items()):
        if not view.reachable:
            moved = moved_from(name)  # its entries are those at a file host's old URI, wanted there or not
            stranded = sorted(
                vm for vm, r in records.items() if r.get("host") == name and (vm not in wanted or moved is not None)
            )
            forget = f" (gone for good? `tdxvm apply -f FLEET.yaml --forget-host {shlex.quote(name)}`)"
            if moved is None:
                reason = f"not asked for any more, but host {name} is unreachable: {view.error}{forget}"
            elif view.error_code == MOVED_UNDECIDED:
                reason = f"left at host {moved[0]}'s old URI for now: {view.error}"
            else:
                reason = f"at host {moved[0]}'s old URI {moved[1]}, which is unreachable: {view.error}{forget}"
            for vm in stranded:
                actions.append(
                    Action(
                        "skip",
                        vm=vm,
                        host=name,
                        uri=view.uri,
                        deployment=records[vm].get("deployment"),
                        reasons=(reason,),
                    )
                )
            continue
        for vm_name, a in sorted(view.vms.items()):
            d = wanted.get(vm_name)
            if d is not None and d.host == name:
                continue
            reason = _delete_reason(a, wanted, deployments, name in file_hosts)
            actions.append(
                Action(
                    "delete",
                    vm=vm_name,
                    host=name,
                    uri=view.uri,
                    deployment=a.labels.get("deployment"),
                    reasons=(reason,),
                    actual=a,
                )
            )
        for vm_name, c in sorted(view.contested.items()):
            d = wanted.get(vm_name)
            if d is None or d.host != name:
                actions.append(
                    Action(
                        "skip",
                        vm=vm_name,
                        host=name,
                        uri=view.uri,
                        deployment=c.deployment or None,
                        reasons=(contested_reason(fleet, c),),
                    )
                )
    seen = {(a.vm, a.host) for a in actions}
    for vm_name, record in sorted(records.items()):
        host = record.get("host", "")
        view = hosts.get(host)
        if (vm_name, host) in seen or view is None or not view.reachable or vm_name in view.vms:
            continue
        if vm_name in view.foreign:  # another domain has the name now: its volumes are its own
            continue
        if vm_name in wanted and wanted[vm_name].host == host:
            continue
        if record.get("phase") in ("creating", "deleting"):  # volumes may be left without a domain
            actions.append(
                Action(
                    "delete",
                    vm=vm_name,
                    host=host,
                    uri=view.uri,
                    deployment=record.get("deployment"),
                    reasons=("left by an interrupted apply with no domain: its volumes are removed",),
                )
            )
    return Plan(fleet=fleet, actions=tuple(actions), hosts=hosts)
