"""Reading what a plan needs: the hosts (every host of the file and every host the state
file still knows the fleet has VMs on), the VM records and the image manifests, handed
to the pure :func:`tdxvm.fleet.plan.make_plan`. ``tdxvm plan`` and ``tdxvm status -f``
stop here; an apply (:mod:`tdxvm.fleet.reconcile`) goes on to carry the plan out.

The fleet's VMs are those of this controller (the secret store's key,
:class:`~tdxvm.launch.ownership.Controller`); reading a plan never makes that key."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from tdxvm.fleet import inventory as inv
from tdxvm.fleet.plan import Plan, make_plan
from tdxvm.fleet.spec import Fleet
from tdxvm.fleet.state import FleetState, default_state_dir
from tdxvm.launch.errors import LaunchError, ManifestError
from tdxvm.launch.manifest import ImageManifest, load_manifest
from tdxvm.launch.ownership import Controller
from tdxvm.launch.records import VmRecords
from tdxvm.secretstore import SecretStore


@dataclass(frozen=True)
class Images:
    """The fleet's image manifests, read once per plan: digest (SHA-256 of the file) and contents."""

    shas: dict[str, str | Exception]
    manifests: dict[str, ImageManifest]

    @classmethod
    def read(cls, fleet: Fleet) -> Images:
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
        return cls(shas, manifests)


def survey_hosts(fleet: Fleet, state: FleetState) -> dict[str, str]:
    """The file's hosts and the hosts the state file still knows the fleet has VMs on."""
    return {**state.hosts, **fleet.hosts}


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
    images = Images.read(fleet)
    plan = make_plan(
        fleet.name, fleet.desired(), views, file_hosts=set(fleet.hosts), image_shas=images.shas, records=state.vms()
    )
    return plan, images


def plan(
    fleet: Fleet, *, connector: inv.Connector, state_dir: Path | None = None, secrets: SecretStore | None = None
) -> Plan:
    """What an apply would do now (reads only); VM records are read beside ``secrets``."""
    state = FleetState.load(state_dir or default_state_dir(), fleet.name)
    return build_plan(fleet, connector, state, secrets=secrets or SecretStore())[0]
