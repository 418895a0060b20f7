"""What an apply or a destroy reports: progress events while it runs, then one
:class:`Outcome` per VM and a :class:`Report` for the whole fleet (``-o json`` prints
:meth:`Report.to_dict`; :mod:`tdxvm.fleet.report` renders it as text)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tdxvm.fleet.plan import Plan


@dataclass(frozen=True)
class FleetEvent:
    """Progress: a VM's launch phase (``phase``/``status`` as in bring-up) or its outcome."""

    vm: str
    host: str
    phase: str
    status: str
    seconds: float = 0.0
    detail: str = ""


Progress = Callable[[FleetEvent], None]


def quiet(_event: FleetEvent) -> None:
    """The :data:`Progress` that shows nothing."""


@dataclass
class Outcome:
    """What happened to one VM."""

    vm: str
    host: str
    action: str
    result: str  # created replaced deleted unchanged refused failed skipped halted interrupted
    reasons: tuple[str, ...] = ()  # why the plan chose the action
    errors: list[dict[str, str]] = field(default_factory=list)  # why it did not work: code, message
    verdict: dict[str, Any] | None = None
    endpoint: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    host_lost: str | None = None  # its host's libvirt stopped answering during the work: why
    provision: dict[str, Any] | None = None  # what provisioning its model did (ProvisionResult.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return {
            "vm": self.vm,
            "host": self.host,
            "action": self.action,
            "result": self.result,
            "reasons": list(self.reasons),
            "errors": self.errors,
            "tcb_status": (self.verdict or {}).get("tcb_status"),
            "endpoint": self.endpoint,
            "model_digest": (self.provision or {}).get("model_digest"),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }


SUCCESS = ("created", "replaced", "deleted", "unchanged")


@dataclass
class Report:
    fleet: str
    command: str
    plan: Plan
    outcomes: list[Outcome]
    interrupted: bool = False
    seconds: float = 0.0
    forgotten: dict[str, dict[str, Any]] = field(default_factory=dict)  # host -> {"uri", "vms"} (--forget-host)

    @property
    def status(self) -> str:
        """``ok``, ``refused`` (a VM failed attestation), ``partial`` (something else not
        handled) or ``interrupted``."""
        if self.interrupted:
            return "interrupted"
        if any(o.result == "refused" for o in self.outcomes):
            return "refused"
        if any(o.result not in SUCCESS for o in self.outcomes) or self.unreachable():
            return "partial"
        return "ok"

    def unreachable(self) -> dict[str, str]:
        """Hosts that did not answer (host -> why): at the survey, or lost during the work."""
        lost = {o.host: o.host_lost for o in self.outcomes if o.host_lost}
        return {**lost, **self.plan.unreachable()}

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for o in self.outcomes:
            out[o.result] = out.get(o.result, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "fleet": self.fleet,
            "command": self.command,
            "status": self.status,
            "seconds": round(self.seconds, 3),
            "summary": self.counts(),
            "unreachable_hosts": self.unreachable(),
            "forgotten_hosts": self.forgotten,
            "vms": [o.to_dict() for o in self.outcomes],
        }
