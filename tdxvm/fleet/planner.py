"""Reading what a plan needs: the hosts (every host of the file and every host the state
file still knows the fleet has VMs on), the VM records and the image manifests, handed
to the pure :func:`tdxvm.fleet.plan.make_plan`. ``tdxvm plan`` and ``tdxvm status -f``
stop here; an apply (:mod:`tdxvm.fleet.reconcile`) goes on to carry the plan out.

The fleet's VMs are those of this controller (the secret store's key,
:class:`~tdxvm.launch.ownership.Controller`); reading a plan never makes that key."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from tdxvm.fleet import inventory as inv
from tdxvm.fleet.plan import MOVED_UNDECIDED, Plan, make_plan, model_ref
from tdxvm.fleet.spec import Fleet
from tdxvm.fleet.state import FleetState, default_state_dir, moved_from
from tdxvm.launch.errors import LaunchError, ManifestError
from tdxvm.launch.manifest import ImageManifest, load_manifest
from tdxvm.launch.ownership import Controller
from tdxvm.launch.records import VmRecords
from tdxvm.secretstore import SecretStore, SecretStoreError


@dataclass(frozen=True)
class Images:
    """The fleet's image manifests and encrypted models, read once per plan: each
    manifest's digest (SHA-256 of the file) and contents, and each model's digest (see
    :func:`model_digests`)."""

    shas: dict[str, str | Exception]
    manifests: dict[str, ImageManifest]
    models: dict[str, str | Exception] = field(default_factory=dict)

    @classmethod
    def read(cls, fleet: Fleet, secrets: SecretStore) -> Images:
        shas: dict[str, str | Exception] = {}
        manifests: dict[str, ImageManifest] = {}
        for path in sorted({str(d.spec.image) for d in fleet.desired()}):
            try:
                manifest = load_manifest(path)
                shas[path] = hashlib.sha256(manifest.path.read_bytes()).hexdigest()
                manifests[path] = manifest
            except LaunchError as exc:  # its message names the manifest
                shas[path] = exc
            except OSError as exc:
                shas[path] = ManifestError(f"image manifest {path}: {exc.strerror or exc}")
        return cls(shas, manifests, model_digests(fleet, secrets))


def model_digests(fleet: Fleet, secrets: SecretStore) -> dict[str, str | Exception]:
    """Each model the fleet serves (by :func:`~tdxvm.fleet.plan.model_ref`): the digest
    of its files (``sha256:…``, what the service measures into RTMR3), read from the
    folder's authenticated index with its key, or the error saying why it cannot be. The
    folder's contents, not its place: a model encrypted again in place is the same model,
    and a folder moved elsewhere too."""
    from tdxvm.guest.modeldigest import show
    from tdxvm.guest.weights import WeightsError, model_digest, read_index

    out: dict[str, str | Exception] = {}
    for m in sorted({d.spec.model for d in fleet.desired() if d.spec.model is not None}, key=model_ref):
        try:
            out[model_ref(m)] = show(model_digest(read_index(m.path, secrets.get(f"weights/{m.key_name}"))))
        except (WeightsError, SecretStoreError) as exc:
            out[model_ref(m)] = ManifestError(f"model {m.path} (key weights/{m.key_name}): {exc}")
        except OSError as exc:
            out[model_ref(m)] = ManifestError(f"model {m.path}: {exc.strerror or exc}")
    return out


def survey_hosts(fleet: Fleet, state: FleetState) -> dict[str, str]:
    """The file's hosts and the hosts the state file still knows the fleet has VMs on
    (a host whose URI changed leaves its old URI as a host of its own:
    :meth:`FleetState.relocate_moved`, done here)."""
    state.relocate_moved(fleet.hosts)
    return {**state.hosts, **fleet.hosts}


def settle_moved(views: dict[str, inv.HostView], state: FleetState, file_hosts: set[str]) -> dict[str, inv.HostView]:
    """``views`` less each host out of the file that is the libvirt of a host of the file,
    whose entries go to that host in ``state`` (:meth:`FleetState.fold_host`).

    One libvirt lists the same domains through any URI, two list none in common (domain
    UUIDs are random). So a host out of the file that lists a domain a host of the file
    lists is that host, under another name or URI. For ``X@A``, the old URI of host X
    (:meth:`FleetState.relocate_moved`), A is also X's libvirt when neither lists any
    domain (nothing at A could be told from X's own, so nothing there is deleted), or, A
    not answering, when a domain the state file recorded at A is listed at X. While X
    does not answer, ``X@A`` is held back as unreachable: nothing of it is deleted before
    the two can be told apart."""
    out = dict(views)
    entries = state.vms()
    reachable = {n: v for n, v in views.items() if n in file_hosts and v.reachable}
    for name, view in views.items():
        if name in file_hosts:
            continue
        moved = moved_from(name)
        now = views.get(moved[0]) if moved is not None and moved[0] in file_hosts else None
        if now is not None and not now.reachable:
            if view.reachable:
                out[name] = inv.HostView(
                    name,
                    view.uri,
                    error=f"cannot tell yet whether {view.uri} reaches the libvirt host {moved[0]} has now "
                    f"({now.uri}), which does not answer: {now.error}",
                    error_code=MOVED_UNDECIDED,
                )
            continue
        into = next((n for n, v in sorted(reachable.items()) if view.domains & v.domains), None)
        if into is None and now is not None:
            if view.reachable:
                into = moved[0] if not (view.domains or now.domains) else None
            else:
                recorded = {e["uuid"] for e in entries.values() if e.get("host") == name and e.get("uuid")}
                into = moved[0] if recorded & now.domains else None
        if into is not None:
            del out[name]
            state.fold_host(name, into, views[into].uri)
    return out


def build_plan(
    fleet: Fleet,
    connector: inv.Connector,
    state: FleetState,
    *,
    secrets: SecretStore,
    controller: Controller | None = None,
    parallel: int = 8,
) -> tuple[Plan, Images]:
    """The plan of ``controller`` (by default the one of ``secrets``) and the images it read."""
    views = inv.survey(
        connector,
        fleet.name,
        survey_hosts(fleet, state),
        records=VmRecords.beside(secrets),
        controller=controller or Controller.of(secrets),
        parallel=parallel,
    )
    views = settle_moved(views, state, set(fleet.hosts))
    images = Images.read(fleet, secrets)
    plan = make_plan(
        fleet.name,
        fleet.desired(),
        views,
        file_hosts=set(fleet.hosts),
        image_shas=images.shas,
        model_digests=images.models,
        records=state.vms(),
    )
    return plan, images


def plan(
    fleet: Fleet, *, connector: inv.Connector, state_dir: Path | None = None, secrets: SecretStore | None = None
) -> Plan:
    """What an apply would do now (reads only); VM records are read beside ``secrets``."""
    state = FleetState.load(state_dir or default_state_dir(), fleet.name, read_only=True)
    return build_plan(fleet, connector, state, secrets=secrets or SecretStore())[0]
