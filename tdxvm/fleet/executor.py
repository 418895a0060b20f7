"""The executor of one apply or destroy: the units of a plan, the workers that carry them
out, and the bookkeeping (outcomes, state, rolling replacement), as
:mod:`tdxvm.fleet.reconcile` describes. Each unit creates, replaces or deletes one VM;
a VM is created through :func:`tdxvm.provision.bringup.bring_up`, the path of
``tdxvm launch``, labelled with this controller's id; a VM is destroyed only after its
labels are read again and still say it is this fleet's and this controller's.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import libvirt

from tdxvm.errors import TdxvmError
from tdxvm.fleet import inventory as inv
from tdxvm.fleet.outcome import FleetEvent, Outcome, Progress
from tdxvm.fleet.plan import Action, Plan, model_ref
from tdxvm.fleet.planner import Images
from tdxvm.fleet.spec import Fleet, spec_document
from tdxvm.fleet.state import FleetState, moved_from, now
from tdxvm.launch.connection import is_test_driver, libvirt_message, lost_to_keepalive
from tdxvm.launch.errors import LaunchError, LibvirtUnreachable, NoSuchVmError
from tdxvm.launch.lifecycle import destroy, lookup, set_labels
from tdxvm.launch.metadata import CONTROLLER
from tdxvm.launch.ownership import Controller
from tdxvm.launch.records import VmRecords
from tdxvm.launch.volumes import sweep_vm_volumes
from tdxvm.provision import bringup, handshake
from tdxvm.provision.trust import Trust, for_backend
from tdxvm.secretstore import SecretStore

DEFAULT_PARALLEL = 10  # as terraform's -parallelism
VOLATILE_MEASUREMENTS = ("report_data",)  # differs per attestation (nonce)


class FleetError(TdxvmError):
    """A fleet operation refused; ``code`` is stable."""

    code = "fleet"


class ApplyInterrupted(FleetError):
    code = "interrupted"


@dataclass(frozen=True)
class ApplyOptions:
    parallel: int = DEFAULT_PARALLEL
    destroy_refused: bool = False
    boot_timeout: float = bringup.BOOT_TIMEOUT
    ready_timeout: float = bringup.READY_TIMEOUT
    poll: float = 1.0  # the guest agent's readiness checks
    forget_hosts: tuple[str, ...] = ()  # hosts gone for good, out of the file (tdxvm.fleet.forget)


def measurements_digest(verdict: dict[str, Any] | None) -> str | None:
    """SHA-256 of the quote's measurement registers (canonical JSON, REPORTDATA left out)."""
    m = (verdict or {}).get("measurements")
    if not isinstance(m, dict):
        return None
    kept = {k: v for k, v in m.items() if k not in VOLATILE_MEASUREMENTS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class _Unit:
    def __init__(
        self,
        action: Action,
        *,
        after: list[_Unit],
        rolling: bool = False,
        replaced_by: _Unit | None = None,
        held: str | None = None,
    ) -> None:
        self.action, self.after, self.rolling = action, after, rolling
        self.replaced_by = replaced_by  # a moved replica's delete: the create of its new copy, which must be up
        self.held = held  # a moved replica's delete whose new copy is not brought up at all: why
        self.done = False


class Run:
    """One apply or destroy: the units, the workers, the bookkeeping."""

    def __init__(
        self,
        fleet: Fleet,
        plan: Plan,
        state: FleetState,
        *,
        connector: inv.Connector,
        secrets: SecretStore,
        controller: Controller,
        trust_for: Callable[[str], Trust],
        images: Images,
        options: ApplyOptions,
        progress: Progress,
        cancel: threading.Event,
    ) -> None:
        self.fleet, self.plan, self.state = fleet, plan, state
        self.connector, self.secrets, self.controller, self.trust_for = connector, secrets, controller, trust_for
        self.images, self.options, self.progress, self.cancel = images, options, progress, cancel
        self.outcomes: dict[tuple[str, str], Outcome] = {}
        self.interrupted = False
        self.terminated: SystemExit | None = None  # SIGTERM (run_guarded's SystemExit(143)) during execute
        self._guard = threading.Lock()
        self._define_locks: dict[str, threading.Lock] = {}
        self._inflight: dict[str, str] = {}  # VMs being brought up: name -> URI
        self._serving: dict[str, set[str]] = {}
        for a in plan.actions:
            if a.desired is not None and a.serving and a.kind in ("keep", "replace"):
                self._serving.setdefault(a.desired.deployment, set()).add(a.vm)

    # -- bookkeeping -------------------------------------------------------------------------

    def record(self, outcome: Outcome) -> None:
        with self._guard:
            self.outcomes[(outcome.vm, outcome.host)] = outcome
        self.progress(
            FleetEvent(
                outcome.vm,
                outcome.host,
                "result",
                outcome.result,
                detail="; ".join(e["message"].splitlines()[0] for e in outcome.errors),
            )
        )

    def _define_lock(self, uri: str) -> threading.Lock:
        with self._guard:
            return self._define_locks.setdefault(uri, threading.Lock())

    def _serving_now(self, deployment: str) -> set[str]:
        with self._guard:
            return set(self._serving.get(deployment, set()))

    def _mark(self, deployment: str, vm: str, serving: bool) -> None:
        with self._guard:
            group = self._serving.setdefault(deployment, set())
            (group.add if serving else group.discard)(vm)

    # -- scheduling --------------------------------------------------------------------------

    def units(self) -> list[_Unit]:
        """Creates and repairs at once; per deployment a chain of rolling replacements; its deletes last."""
        out: list[_Unit] = []
        by_dep: dict[str, list[Action]] = {}
        for a in self.plan.actions:
            if a.kind in ("create", "replace", "delete"):
                by_dep.setdefault(a.deployment or "", []).append(a)
        live = set(self.fleet.deployments)
        wanted = {a.vm: a for a in self.plan.actions if a.desired is not None}  # each wanted VM's own action
        for dep, actions in sorted(by_dep.items()):
            first = [
                _Unit(a, after=[]) for a in actions if a.kind == "create" or (a.kind == "replace" and not a.serving)
            ]
            chain: list[_Unit] = []
            for a in (a for a in actions if a.kind == "replace" and a.serving):
                chain.append(_Unit(a, after=[*(chain[-1:] or first)], rolling=True))
            gate = chain[-1:] or first
            new_copy = {u.action.vm: u for u in first + chain}
            deletes = []
            for a in (a for a in actions if a.kind == "delete"):
                # a host left out of the file is emptied at once; the old URI of a host of the
                # file (X@A) is a moved replica's old place: its new copy comes up first
                moved = moved_from(a.host)
                gated = dep in live and (
                    a.host in self.fleet.hosts or (moved is not None and moved[0] in self.fleet.hosts)
                )
                new = wanted.get(a.vm)
                held = None
                if gated and a.vm not in new_copy and new is not None and new.kind == "skip":
                    held = (
                        f"{a.vm} was not deleted from {a.host}: its new copy on {new.host} is skipped "
                        f"({new.reasons[0] if new.reasons else 'no reason given'}); the old replica is left where it is"
                    )
                deletes.append(
                    _Unit(
                        a,
                        after=list(gate) if gated else [],
                        replaced_by=new_copy.get(a.vm) if gated else None,
                        held=held,
                    )
                )
            out += first + chain + deletes
        return out

    def _may_roll(self, unit: _Unit) -> str | None:
        """Why the rolling replacement ``unit`` must not start now (None: it may)."""
        a = unit.action
        dep = self.fleet.deployments.get(a.deployment or "")
        if dep is None:
            return None
        serving = self._serving_now(a.deployment or "")
        wanted = dep.count
        left = len(serving - {a.vm})
        if left < wanted - 1:
            return (
                f"rollout of deployment {a.deployment} halted: {len(serving)} of {wanted} replicas serve, so replacing "
                f"{a.vm} now would leave {left} (fewer than N-1 = {wanted - 1}); fix the failing replicas first"
            )
        return None

    def _may_delete(self, unit: _Unit) -> str | None:
        """Why the delete ``unit`` of a moved replica must not run now (None: it may): its new
        copy on the other host did not come up, or is not brought up at all, and the old one still serves."""
        if unit.held is not None:
            return unit.held
        new = unit.replaced_by
        if new is None:
            return None
        with self._guard:
            outcome = self.outcomes.get((new.action.vm, new.action.host))
        result = outcome.result if outcome is not None else "not run"
        if result in ("created", "replaced"):
            return None
        return (
            f"{unit.action.vm} was not deleted from {unit.action.host}: its new copy on {new.action.host} did not "
            f"come up ({result}); the old replica keeps serving"
        )

    def execute(self) -> None:
        units = self.units()
        pending = list(units)
        running: dict[Future[None], _Unit] = {}
        with ThreadPoolExecutor(max_workers=max(1, self.options.parallel), thread_name_prefix="tdxvm-fleet") as pool:
            while pending or running:
                try:
                    if self.cancel.is_set() and not self.interrupted:
                        self.interrupt()
                    if self.interrupted:
                        for u in pending:
                            self._not_started(u)
                        pending = []
                    for u in [u for u in pending if all(p.done for p in u.after)]:
                        pending.remove(u)
                        why = self._may_roll(u) if u.rolling else self._may_delete(u)
                        if why is not None:
                            a = u.action
                            self.record(
                                Outcome(
                                    a.vm,
                                    a.host,
                                    a.kind,
                                    "halted",
                                    a.reasons,
                                    errors=[
                                        {"code": "rollout-halted" if u.rolling else "new-copy-not-up", "message": why}
                                    ],
                                )
                            )
                            u.done = True
                            continue
                        running[pool.submit(self.run_unit, u.action)] = u
                    if not running:
                        if pending and not any(all(p.done for p in u.after) for u in pending):
                            raise FleetError("internal: units wait on each other")  # pragma: no cover
                        continue
                    done, _ = wait(list(running), timeout=0.2, return_when=FIRST_COMPLETED)
                    for f in done:
                        u = running.pop(f)
                        u.done = True
                        if f.exception() is not None:  # not an Exception (those are reported by the worker)
                            a = u.action
                            self.record(
                                Outcome(
                                    a.vm,
                                    a.host,
                                    a.kind,
                                    "failed",
                                    a.reasons,
                                    errors=[
                                        {
                                            "code": "internal",
                                            "message": f"{type(f.exception()).__name__}: {f.exception()}",
                                        }
                                    ],
                                )
                            )
                except (KeyboardInterrupt, SystemExit) as exc:  # Ctrl-C, or SIGTERM: stop as Ctrl-C does
                    if isinstance(exc, SystemExit):
                        self.terminated = exc
                    self.interrupt()

    def _not_started(self, u: _Unit) -> None:
        a = u.action
        self.record(
            Outcome(
                a.vm,
                a.host,
                a.kind,
                "interrupted",
                a.reasons,
                errors=[{"code": "interrupted", "message": "not started: the apply was interrupted"}],
            )
        )
        u.done = True

    def interrupt(self) -> None:
        """Stop: nothing new starts; VMs being brought up are powered off (their workers remove them)."""
        self.interrupted = True
        self.cancel.set()
        with self._guard:
            inflight = list(self._inflight.items())
        for vm, uri in inflight:
            with suppress(LaunchError, libvirt.libvirtError):
                dom = self.connector.get(uri).lookupByName(vm)
                if dom.isActive():
                    dom.destroy()

    # -- one VM ------------------------------------------------------------------------------

    def run_unit(self, a: Action) -> None:
        started = time.monotonic()
        conn: libvirt.virConnect | None = None
        try:
            if self.cancel.is_set():
                raise ApplyInterrupted("not started: the apply was interrupted")
            conn = self.connector.get(a.uri)
            if a.kind == "delete":
                self._delete(conn, a)
                self.record(
                    Outcome(a.vm, a.host, a.kind, "deleted", a.reasons, timings={"delete": time.monotonic() - started})
                )
                return
            if a.kind == "replace":
                self._mark(a.deployment or "", a.vm, False)
                self.destroy_owned(conn, a.vm, a.host, planned=a)
            self._launch(conn, a)
        except ApplyInterrupted as exc:
            self.record(
                Outcome(
                    a.vm, a.host, a.kind, "interrupted", a.reasons, errors=[{"code": exc.code, "message": str(exc)}]
                )
            )
        except Exception as failure:  # noqa: BLE001 - one VM's failure is reported; the others go on
            exc = lost_to_keepalive(conn, failure)  # its host stopped answering: say so
            code = getattr(exc, "code", None)
            self.record(
                Outcome(
                    a.vm,
                    a.host,
                    a.kind,
                    "failed",
                    a.reasons,
                    errors=[{"code": code if isinstance(code, str) else type(exc).__name__, "message": str(exc)}],
                    host_lost=str(exc) if isinstance(exc, LibvirtUnreachable) else None,
                )
            )
            if a.kind != "delete":
                self.state.update_vm(
                    a.vm, phase="failed", error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                )

    def destroy_owned(self, conn: libvirt.virConnect, name: str, host: str, *, planned: Action | None = None) -> bool:
        """Destroy ``name`` if it is this fleet's VM and this controller's (both checked again
        now); False when it is not there. For the delete ``planned``, only the very domain
        its plan saw (by UUID), and none when it saw no domain: a domain named so since is
        another one (the same libvirt reached through another URI, or a VM made meanwhile)."""
        try:
            dom, meta = lookup(conn, name)
        except NoSuchVmError:
            return False
        if planned is not None:
            seen = planned.actual.uuid if planned.actual is not None else None
            if seen is None or (seen and dom.UUIDString() != seen):
                raise FleetError(
                    f"domain {name} on {host} ({dom.UUIDString()}) is not the one the plan saw there "
                    f"({seen or 'none'}): neither it nor its volumes are touched",
                    code="not-the-planned-vm",
                )
        if meta.labels.get(inv.FLEET) != self.fleet.name:
            raise FleetError(
                f"domain {name} on {host} is no longer fleet {self.fleet.name}'s VM; it is not touched",
                code="not-fleet-vm",
            )
        records = VmRecords.beside(self.secrets)
        whose = self.controller.claim(meta, has_record=lambda: inv.has_record(records, dom.UUIDString()))
        if whose is not None:
            raise FleetError(f"VM {name} on {host} is {whose} now; it is not touched", code="other-controller")
        entry = self.state.vm(name)
        if entry is None or entry.get("host") in (host, None):  # after a move it is the new copy's entry
            self.state.update_vm(name, phase="deleting")
        destroy(conn, name, records=records)
        return True

    def _delete(self, conn: libvirt.virConnect, a: Action) -> None:
        if not self.destroy_owned(conn, a.vm, a.host, planned=a):
            sweep_vm_volumes(conn, a.vm)
        record = self.state.vm(a.vm)
        if record is not None and record.get("host") in (a.host, None):
            self.state.drop_vm(a.vm)

    def _launch(self, conn: libvirt.virConnect, a: Action) -> None:
        d = a.desired
        assert d is not None
        manifest = self.images.manifests[str(d.spec.image)]
        image_sha = self.images.shas[str(d.spec.image)]
        assert isinstance(image_sha, str)  # the plan skips VMs whose manifest cannot be read
        assert self.controller.id is not None  # an apply makes the key before it plans
        labels = {
            CONTROLLER: self.controller.id,
            inv.FLEET: self.fleet.name,
            inv.DEPLOYMENT: d.deployment,
            inv.REPLICA: str(d.index),
            inv.TEMPLATE: d.template,
            inv.HOST: d.host,
            inv.SPEC_HASH: d.spec_hash,
            inv.IMAGE_SHA: image_sha,
        }
        self.state.remember_host(d.host, d.uri)
        self.state.replace_vm(
            d.name,
            {
                "phase": "creating",
                "host": d.host,
                "uri": d.uri,
                "deployment": d.deployment,
                "replica": d.index,
                "template": d.template,
                inv.SPEC_HASH: d.spec_hash,
                inv.IMAGE_SHA: image_sha,
                inv.MODEL_DIGEST: None if d.spec.model is None else self.images.models.get(model_ref(d.spec.model)),
                "spec": spec_document(d.spec),
                "started_at": now(),
            },
        )
        with self._guard:
            self._inflight[d.name] = d.uri

        def progress(event: bringup.PhaseEvent) -> None:
            self.progress(FleetEvent(d.name, d.host, event.phase, event.status, event.seconds, event.detail))
            if self.cancel.is_set():
                raise ApplyInterrupted(f"interrupted during {event.phase}")

        try:
            result = bringup.bring_up(
                d.spec,
                manifest,
                conn,
                trust=self.trust_for(d.spec.backend),
                secrets=self.secrets,
                progress=progress,
                boot_timeout=self.options.boot_timeout,
                ready_timeout=self.options.ready_timeout,
                labels=labels,
                define_lock=self._define_lock(d.uri),
                login_check=not is_test_driver(d.uri),
                poll=self.options.poll,
            )
        except handshake.AttestationRefused as refused:
            self._refused(conn, a, refused)
            return
        except BaseException as exc:
            if self.cancel.is_set():  # never brought up to the end: remove it
                with suppress(Exception):
                    self.destroy_owned(conn, d.name, d.host)
                self.state.update_vm(d.name, phase="interrupted", error="the apply was interrupted")
                what = (
                    str(exc)
                    if isinstance(exc, ApplyInterrupted)
                    else f"interrupted ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                )
                raise ApplyInterrupted(f"{what}; the VM was removed") from None
            raise
        finally:
            with self._guard:
                self._inflight.pop(d.name, None)
        verdict = result.verdict or {}
        endpoint = result.service or result.ssh
        where = f"{endpoint[0]}:{endpoint[1]}" if endpoint else ""
        digest = measurements_digest(verdict) or ""
        ready_at = now()
        try:
            dom = conn.lookupByName(d.name)
            set_labels(dom, {inv.READY_AT: ready_at, inv.MEASUREMENTS: digest, inv.ENDPOINT: where})
            uuid = dom.UUIDString()
        except libvirt.libvirtError as exc:
            raise FleetError(
                f"VM {d.name} on {d.host} is up, but its labels cannot be written: {libvirt_message(exc)}"
            ) from None
        self.state.update_vm(
            d.name,
            phase="ready",
            uuid=uuid,  # the domain's: tells a host's new URI from another libvirt (FleetState.relocate_moved)
            ready_at=ready_at,
            last_attested=verdict.get("verified_at"),
            tcb_status=verdict.get("tcb_status"),
            measurements_digest=digest,
            endpoint=where,
            reasons=[],
            error=None,
            **({inv.MODEL_DIGEST: result.provision.get("model_digest")} if result.provision else {}),  # what it serves
        )
        self._mark(d.deployment, d.name, True)
        self.record(
            Outcome(
                a.vm,
                a.host,
                a.kind,
                "created" if a.kind == "create" else "replaced",
                a.reasons,
                verdict=verdict,
                endpoint=where,
                timings=dict(result.timings),
                provision=result.provision,
            )
        )

    def _refused(self, conn: libvirt.virConnect, a: Action, refused: handshake.AttestationRefused) -> None:
        reasons = [{"code": r.code, "message": r.message} for r in refused.reasons]
        destroyed = False
        if self.options.destroy_refused:
            with suppress(LaunchError, FleetError):
                destroyed = self.destroy_owned(conn, a.vm, a.host)
        self.state.update_vm(
            a.vm,
            phase="refused",
            reasons=[f"[{r['code']}] {r['message']}" for r in reasons],
            error=None,
            destroyed=destroyed,
        )
        note = "destroyed (--destroy-refused)" if destroyed else "left stopped"
        self.record(
            Outcome(
                a.vm,
                a.host,
                a.kind,
                "refused",
                a.reasons,
                errors=[
                    *reasons,
                    {
                        "code": "vm-" + ("destroyed" if destroyed else "stopped"),
                        "message": f"nothing was released; the VM is {note}",
                    },
                ],
                verdict=refused.verdict.to_dict() if refused.verdict else None,
            )
        )

    # -- the rest ----------------------------------------------------------------------------

    def report_untouched(self) -> None:
        for a in self.plan.actions:
            if a.kind == "keep":
                endpoint = (self.state.vm(a.vm) or {}).get("endpoint") or None  # the state file's, not a label
                self.outcomes[(a.vm, a.host)] = Outcome(
                    a.vm,
                    a.host,
                    "keep",
                    "unchanged",
                    a.reasons,
                    endpoint=endpoint,
                    verdict=a.actual.attestation if a.actual else None,
                )
            elif a.kind == "skip":
                view = self.plan.hosts.get(a.host)
                code = "other-controller" if view is not None and a.vm in view.contested else "skipped"
                self.outcomes[(a.vm, a.host)] = Outcome(
                    a.vm,
                    a.host,
                    "skip",
                    "skipped",
                    a.reasons,
                    errors=[{"code": code, "message": r} for r in a.reasons],
                )

    def tidy_state(self) -> None:
        """Forget records of VMs that are neither asked for nor on their (reachable) host, and
        hosts that are out of the file and hold nothing of the fleet; give kept VMs' entries
        their domain's UUID where they lack it."""
        wanted = {d.name for d in self.fleet.desired()}
        views = self.plan.hosts
        for a in self.plan.actions:  # a kept VM whose entry an older tdxvm wrote: its domain's UUID
            entry = self.state.vm(a.vm) if a.kind == "keep" else None
            if entry and not entry.get("uuid") and a.actual is not None and a.actual.uuid:
                self.state.update_vm(a.vm, uuid=a.actual.uuid)
        for name, record in self.state.vms().items():
            host = record.get("host")
            view = views.get(host) if isinstance(host, str) else None
            if name in wanted or view is None or not view.reachable:
                continue
            outcome = self.outcomes.get((name, host))
            if name not in view.vms or (outcome is not None and outcome.result == "deleted"):
                self.state.drop_vm(name)
        records = self.state.vms()
        for host, view in views.items():
            if host in self.fleet.hosts or not view.reachable or any(r.get("host") == host for r in records.values()):
                continue
            outcomes = [self.outcomes.get((vm, host)) for vm in view.vms]
            if all(o is not None and o.result == "deleted" for o in outcomes):
                self.state.forget_host(host)
                moved = moved_from(host)
                if moved is not None and moved[0] in self.fleet.hosts:  # the old URI is emptied: the file's is its
                    self.state.remember_host(moved[0], self.fleet.hosts[moved[0]])

    def ordered_outcomes(self) -> list[Outcome]:
        order = {(a.vm, a.host): i for i, a in enumerate(self.plan.actions)}
        return sorted(self.outcomes.values(), key=lambda o: order.get((o.vm, o.host), len(order)))


def trust_cache(trust_for: Callable[[str], Trust] | None) -> Callable[[str], Trust]:
    made: dict[str, Trust] = {}
    lock = threading.Lock()
    make = trust_for or for_backend

    def get(backend: str) -> Trust:
        with lock:
            if backend not in made:
                made[backend] = make(backend)
            return made[backend]

    return get
