"""``tdxvm status -f``: each VM of the fleet as it is now, and text renderings of plans and reports.

Per VM: host, state, the last attestation's verdict and TCB status, the digest of the
measurements its quote reported, its endpoint, when it was last attested, and whether it
is as the file asks (``in sync``) or what an apply would do. The attestation comes from
the controller's VM record, the measurements digest and endpoint from the fleet's state
file: never from the labels in the domain's metadata, which the host can rewrite. VMs
on a host that does not answer show what the state file last recorded, marked as such. A VM with the fleet's
label that another controller owns is listed with its state and ``other controller``:
an apply never touches it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tdxvm.fleet import inventory as inv
from tdxvm.fleet.outcome import SUCCESS, Report
from tdxvm.fleet.plan import Action, Plan
from tdxvm.fleet.planner import build_plan
from tdxvm.fleet.spec import Fleet
from tdxvm.fleet.state import FleetState, default_state_dir
from tdxvm.secretstore import SecretStore


@dataclass(frozen=True)
class VmRow:
    vm: str
    deployment: str | None
    host: str
    state: str
    verdict: str | None
    tcb_status: str | None
    measurements_digest: str | None
    endpoint: str | None
    last_attested: str | None
    sync: str  # "in sync", or the plan's action (create, replace, delete), "unknown", or "other controller"
    reasons: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["reasons"] = list(self.reasons)
        return d


@dataclass(frozen=True)
class FleetStatus:
    fleet: str
    rows: tuple[VmRow, ...]
    unreachable: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {"fleet": self.fleet, "unreachable_hosts": self.unreachable, "vms": [r.to_dict() for r in self.rows]}


OTHER_CONTROLLER = "other controller"


def _contested_row(a: Action, c: inv.ContestedVm) -> VmRow:
    return VmRow(
        vm=a.vm,
        deployment=a.deployment,
        host=a.host,
        state=c.state,
        verdict=None,
        tcb_status=None,
        measurements_digest=None,
        endpoint=None,
        last_attested=None,
        sync=OTHER_CONTROLLER,
        reasons=a.reasons,
    )


def _row(a: Action, record: dict[str, Any] | None, view: inv.HostView | None) -> VmRow:
    if a.kind == "skip" and view is not None and a.vm in view.contested:
        return _contested_row(a, view.contested[a.vm])
    sync = {"keep": "in sync", "skip": "unknown"}.get(a.kind, a.kind)
    r = record or {}
    if a.actual is not None:  # the attestation from the controller's VM record, the rest from the state file
        att = a.actual.attestation or {}
        return VmRow(
            vm=a.vm,
            deployment=a.deployment,
            host=a.host,
            state=a.actual.state,
            verdict=att.get("verdict"),
            tcb_status=att.get("tcb_status"),
            measurements_digest=r.get("measurements_digest") or None,
            endpoint=r.get("endpoint") or None,
            last_attested=att.get("recorded_at") or att.get("verified_at"),
            sync=sync,
            reasons=a.reasons,
        )
    view_state = "unknown" if a.kind == "skip" and "unreachable" in " ".join(a.reasons) else "missing"
    verdict = {"ready": "accept", "refused": "reject"}.get(r.get("phase", ""))
    return VmRow(
        vm=a.vm,
        deployment=a.deployment,
        host=a.host,
        state=view_state + (" (last recorded)" if view_state == "unknown" and r else ""),
        verdict=verdict if view_state == "unknown" else None,
        tcb_status=r.get("tcb_status") if view_state == "unknown" else None,
        measurements_digest=r.get("measurements_digest") if view_state == "unknown" else None,
        endpoint=r.get("endpoint") if view_state == "unknown" else None,
        last_attested=r.get("last_attested") if view_state == "unknown" else None,
        sync=sync,
        reasons=a.reasons,
    )


def fleet_status(
    fleet: Fleet, *, connector: inv.Connector, state_dir: Path | None = None, secrets: SecretStore | None = None
) -> FleetStatus:
    """Each VM of the fleet as the hosts and the controller's records (beside ``secrets``) have it."""
    state = FleetState.load(state_dir or default_state_dir(), fleet.name, read_only=True)
    plan, _ = build_plan(fleet, connector, state, secrets=secrets or SecretStore())
    records = state.vms()
    rows = tuple(
        _row(a, records.get(a.vm), plan.hosts.get(a.host))
        for a in plan.actions
        if not (a.kind == "delete" and a.actual is None)
    )
    return FleetStatus(fleet.name, rows, plan.unreachable())


# -- text -----------------------------------------------------------------------------------


def table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def status_lines(st: FleetStatus) -> list[str]:
    if not st.rows:
        return [f"fleet {st.fleet}: no VMs asked for or found"]
    rows = [("VM", "HOST", "STATE", "ATTESTATION", "TCB", "MEASUREMENTS", "ENDPOINT", "LAST ATTESTED", "SYNC")]
    for r in st.rows:
        rows.append(
            (
                r.vm,
                r.host,
                r.state,
                r.verdict or "-",
                r.tcb_status or "-",
                (r.measurements_digest or "-")[:16],
                r.endpoint or "-",
                r.last_attested or "-",
                r.sync,
            )
        )
    out = table(rows)
    for host, error in st.unreachable.items():
        out.append(f"host {host} unreachable: {error.splitlines()[0]}")
    return out


_MARK = {"create": "+", "replace": "~", "delete": "-", "skip": "!", "keep": " "}


def plan_lines(plan: Plan, *, all_vms: bool = False) -> list[str]:
    c = plan.counts()
    head = (
        f"fleet {plan.fleet}: {c['create']} to create, {c['replace']} to replace, {c['delete']} to delete, "
        f"{c['keep']} unchanged" + (f", {c['skip']} cannot be handled now" if c["skip"] else "")
    )
    out = [head]
    shown = [a for a in plan.actions if all_vms or a.kind != "keep"]
    if shown:
        rows = [(_MARK[a.kind], a.vm, f"on {a.host}", a.kind, a.reasons[0] if a.reasons else "") for a in shown]
        lines = table(rows)
        for line, a in zip(lines, shown, strict=True):
            out.append("  " + line)
            out += [f"      {r}" for r in a.reasons[1:]]
    if not plan.changes and not plan.skipped:
        out.append("  nothing to do: the hosts match the file")
    for host, error in plan.unreachable().items():
        out.append(f"host {host} unreachable: {error.splitlines()[0]}")
    return out


def report_lines(report: Report) -> list[str]:
    counts = ", ".join(f"{n} {k}" for k, n in sorted(report.counts().items())) or "nothing"
    out = [f"fleet {report.fleet}: {report.command} {report.status} in {report.seconds:.1f} s: {counts}"]
    changed = [o for o in report.outcomes if o.result != "unchanged"]
    if changed:
        rows = [(o.vm, o.host, o.action, o.result, o.endpoint or "") for o in changed]
        for line, o in zip(table([("VM", "HOST", "ACTION", "RESULT", "ENDPOINT"), *rows])[1:], changed, strict=True):
            out.append("  " + line)
            if o.result != "created" and o.result != "replaced" and o.result != "deleted":
                out += [f"      - [{e['code']}] {e['message']}".replace("\n", "\n        ") for e in o.errors]
    for host, error in report.unreachable().items():
        out.append(f"host {host} unreachable: {error.splitlines()[0]}")
    for host, gone in report.forgotten.items():
        out.append(
            f"forgot host {host} ({gone['uri']}) and its VMs {', '.join(gone['vms']) or '(none)'}: "
            f"if it comes back, they run there untracked (`tdxvm destroy NAME --uri {gone['uri']}` removes one)"
        )
    if report.status == "interrupted":
        out.append("interrupted: VMs being brought up were removed; run the apply again to finish (it converges)")
    theirs = [o for o in report.outcomes if any(e["code"] == "other-controller" for e in o.errors)]
    if theirs:
        out.append(
            f"VMs with fleet {report.fleet}'s label that another controller owns were left untouched: one "
            "controller owns a fleet (docs/fleet.md, 'One controller per fleet')"
        )
    if report.status == "partial" and (
        report.unreachable() or any(o.result not in SUCCESS and o not in theirs for o in report.outcomes)
    ):
        out.append(
            "not everything was handled; run the apply again once the hosts answer (it finishes the job)"
            if report.command == "apply"
            else "not everything was removed; run destroy again once the hosts answer"
        )
    return out
