"""Apply and destroy: carry out a plan across hosts and VMs in parallel.

Every VM the fleet creates goes through :func:`tdxvm.provision.bringup.bring_up`, the
path of ``tdxvm launch``: define, boot, quote, verify, unlock, ready. Its fleet labels
(:mod:`tdxvm.fleet.inventory`) are in the domain's metadata from the moment it is
defined, so a crash at any point leaves nothing the next apply or a destroy cannot find.

Order within a deployment (deployments and hosts run side by side, at most ``parallel``
VMs at a time):

1. creates, and replacements of replicas that do not serve anyway, all at once;
2. replacements of serving replicas (drift), one at a time, each only while the other
   replicas keep at least N-1 of the deployment's N serving; a failed one halts the
   rollout, so the old replicas go on serving;
3. deletes (fewer replicas, moved replicas: the new one is up first).

Deletes of deployments or hosts no longer in the file run at once.

A VM refused at attestation never gets a secret: :func:`bring_up` powers it off before
anything is released, and it is reported with every reason, left stopped (or destroyed
with ``destroy_refused``). An unreachable host's VMs are skipped and reported; the
others reconcile. On Ctrl-C (or ``cancel``), nothing new starts, VMs being brought up
are powered off and removed (none had been brought up to the end), and the state file
says what happened; the next apply converges.

One controller owns a fleet: every VM an apply creates carries its id (label
``controller``), and a VM with the fleet's label that another controller owns is never
replaced or deleted, only reported as skipped (:mod:`tdxvm.fleet.inventory`).

The plan comes from :mod:`tdxvm.fleet.planner`, :mod:`tdxvm.fleet.executor` carries it out,
and what happened is reported with the types of :mod:`tdxvm.fleet.outcome`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from tdxvm.fleet import inventory as inv
from tdxvm.fleet.executor import DEFAULT_PARALLEL, ApplyOptions, FleetError, Run, trust_cache
from tdxvm.fleet.forget import forget_gone_hosts
from tdxvm.fleet.outcome import Progress, Report, quiet
from tdxvm.fleet.plan import Action, Plan, make_plan
from tdxvm.fleet.planner import Images, build_plan, settle_moved, survey_hosts
from tdxvm.fleet.spec import Fleet
from tdxvm.fleet.state import FleetLock, FleetState, default_state_dir, now
from tdxvm.launch.ownership import Controller
from tdxvm.launch.records import VmRecords
from tdxvm.provision.trust import Trust
from tdxvm.secretstore import SecretStore
from tdxvm.sshkey import controller_id

__all__ = ["DEFAULT_PARALLEL", "ApplyOptions", "FleetError", "apply", "destroy_fleet"]

DEFAULT_OPTIONS = ApplyOptions()


def apply(
    fleet: Fleet,
    *,
    connector: inv.Connector,
    secrets: SecretStore | None = None,
    trust_for: Callable[[str], Trust] | None = None,
    state_dir: Path | None = None,
    options: ApplyOptions = DEFAULT_OPTIONS,
    progress: Progress = quiet,
    cancel: threading.Event | None = None,
    confirm: Callable[[Plan], bool] | None = None,
) -> Report:
    """Make the hosts match ``fleet`` (see the module doc); holds the fleet's lock throughout.

    ``confirm(plan)`` is called with the plan before anything changes (also when it
    changes nothing); False ends the apply with nothing done.
    """
    started = time.monotonic()
    folder = state_dir or default_state_dir()
    secrets = secrets or SecretStore()
    with FleetLock(folder, fleet.name, "apply"):
        state = FleetState.load(folder, fleet.name)
        state.relocate_moved(fleet.hosts)  # a host whose URI changed: its old URI can be forgotten too
        forgotten = forget_gone_hosts(fleet, state, options.forget_hosts, connector)
        controller = Controller(controller_id(secrets))  # the key is made here on a first apply: VMs carry its id
        plan_now, images = build_plan(
            fleet, connector, state, secrets=secrets, controller=controller, parallel=max(options.parallel, 8)
        )
        if confirm is not None and not confirm(plan_now):
            raise FleetError("apply cancelled: nothing was changed", code="cancelled")
        run = Run(
            fleet,
            plan_now,
            state,
            connector=connector,
            secrets=secrets,
            controller=controller,
            trust_for=trust_cache(trust_for),
            images=images,
            options=options,
            progress=progress,
            cancel=cancel or threading.Event(),
        )
        run.report_untouched()
        run.execute()
        run.tidy_state()
        state.save(file=fleet.source, last_apply={"at": now(), "status": "interrupted" if run.interrupted else "done"})
    if run.terminated is not None:  # SIGTERM: the work is unwound and recorded; exit as terminated (143)
        raise run.terminated
    return Report(
        fleet.name,
        "apply",
        plan_now,
        run.ordered_outcomes(),
        interrupted=run.interrupted,
        seconds=time.monotonic() - started,
        forgotten=forgotten,
    )


def destroy_fleet(
    fleet: Fleet,
    *,
    connector: inv.Connector,
    state_dir: Path | None = None,
    parallel: int = DEFAULT_PARALLEL,
    progress: Progress = quiet,
    confirm: Callable[[Plan], bool] | None = None,
    secrets: SecretStore | None = None,
) -> Report:
    """Destroy every VM of the fleet (found by its labels, on the file's hosts and those the
    state file knows), and the volumes interrupted applies left. Other domains, and the
    fleet's VMs of another controller, are never touched (those are reported as skipped).
    The state file goes once nothing of the fleet is left."""
    started = time.monotonic()
    folder = state_dir or default_state_dir()
    secrets = secrets or SecretStore()
    with FleetLock(folder, fleet.name, "destroy"):
        state = FleetState.load(folder, fleet.name)
        controller = Controller.of(secrets)
        views = inv.survey(
            connector,
            fleet.name,
            survey_hosts(fleet, state),
            records=VmRecords.beside(secrets),
            controller=controller,
            parallel=max(parallel, 8),
        )
        views = settle_moved(views, state, set(fleet.hosts))
        empty = Fleet(name=fleet.name, source=fleet.source, hosts={}, templates={}, deployments={})
        plan_now = make_plan(fleet.name, [], views, file_hosts=set(), image_shas={}, records=state.vms())
        plan_now = Plan(plan_now.fleet, tuple(_destroy_reason(a) for a in plan_now.actions), plan_now.hosts)
        if confirm is not None and not confirm(plan_now):
            raise FleetError("destroy cancelled: nothing was changed", code="cancelled")
        run = Run(
            empty,
            plan_now,
            state,
            connector=connector,
            secrets=secrets,
            controller=controller,
            trust_for=trust_cache(None),
            images=Images({}, {}),
            options=ApplyOptions(parallel=parallel),
            progress=progress,
            cancel=threading.Event(),
        )
        run.report_untouched()
        run.execute()
        report = Report(
            fleet.name,
            "destroy",
            plan_now,
            run.ordered_outcomes(),
            interrupted=run.interrupted,
            seconds=time.monotonic() - started,
        )
        if report.status == "ok":
            state.path.unlink(missing_ok=True)
        else:
            run.tidy_state()
    if run.terminated is not None:  # SIGTERM: unwound and recorded, as apply does; exit as terminated (143)
        raise run.terminated
    return report


def _destroy_reason(a: Action) -> Action:
    if a.kind != "delete" or a.actual is None:
        return a
    return Action(
        "delete", vm=a.vm, host=a.host, uri=a.uri, deployment=a.deployment, reasons=("fleet destroy",), actual=a.actual
    )
