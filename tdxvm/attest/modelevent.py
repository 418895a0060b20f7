"""Which model a TD serves: its RTMR3 event log replayed against the quote, and the model event.

A tdxvm inference service extends RTMR3 with a *model event* before it serves
(:mod:`tdxvm.guest.rtmr3`) and returns its RTMR3 log with every quote. The log is in
dstack's JSON form (:func:`tdxvm.attest.eventlog.parse_json_event_log`, which recomputes
each runtime event's digest); a model event is a runtime event (type 0x08000001) named
``tdxvm.model`` whose payload is the canonical JSON ``{"digest": "sha256:<hex>", "dtype",
"name", "quantization"}``.

:func:`check_rtmr3_log` replays the log and compares it with the quote's RTMR3 (a log
that does not replay to it says nothing about what the TD measured, and is refused),
then reads the *latest* model event: the model served now (earlier ones are the
history of a TD that served several). With an expected model digest it refuses a log
without model event, or whose latest model event names another digest. Every refusal
is a :class:`~tdxvm.attest.result.Reason`; no I/O.

When the log replays and names the expected digest, RTMR3 is as good as pinned:
:func:`checked_verdict` turns the quote's verdict into a :class:`CheckedVerdict`, whose
``policy_exceptions`` no longer list RTMR3 as not pinned and whose JSON says, under
``checked_by_event_log``, how RTMR3 was checked instead.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from tdxvm.attest.errors import EventLogError
from tdxvm.attest.eventlog import EV_RUNTIME_EVENT, Event, parse_json_event_log, replay
from tdxvm.attest.result import Reason
from tdxvm.attest.verdict import Verdict

MODEL_EVENT = "tdxvm.model"  # tdxvm.guest.rtmr3.MODEL_EVENT
RTMR3 = 3
_DIGEST_PREFIX = "sha256:"


@dataclass(frozen=True, slots=True)
class ModelEvent:
    """One model event: what the service said it serves, as measured into RTMR3."""

    index: int  # position in the log
    digest: bytes
    name: str
    dtype: str
    quantization: str

    @property
    def digest_text(self) -> str:
        return _DIGEST_PREFIX + self.digest.hex()

    def to_dict(self) -> dict[str, Any]:
        return {
            "event": self.index,
            "digest": self.digest_text,
            "name": self.name,
            "dtype": self.dtype,
            "quantization": self.quantization,
        }


@dataclass(frozen=True, slots=True)
class Rtmr3Check:
    """The outcome of :func:`check_rtmr3_log`; ``reasons`` empty when it passed."""

    present: bool  # the service returned a log
    events: int
    replayed: bytes | None
    quoted: bytes
    model: ModelEvent | None  # the latest model event
    expected: bytes | None  # the model digest the client expects, if any
    history: tuple[ModelEvent, ...] = ()
    reasons: tuple[Reason, ...] = field(default=())

    @property
    def replays(self) -> bool:
        return self.replayed is not None and self.replayed == self.quoted

    @property
    def model_checked(self) -> bool:
        """RTMR3 is accounted for and names the expected model: as good as a pinned RTMR3."""
        return not self.reasons and self.expected is not None and self.model is not None and self.replays

    def verdict_line(self) -> str:
        """How RTMR3 was checked, for the verdict (meaningful when :attr:`model_checked`)."""
        m = self.model
        assert m is not None
        return (
            f"rtmr3 checked through the model event log: its {self.events} event(s) replay to the quoted RTMR3, and "
            f"the latest model event names model {m.name} {m.digest_text} ({m.dtype}, quantization {m.quantization}), "
            "the digest expected"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "present": self.present,
            "events": self.events,
            "replayed": self.replayed.hex() if self.replayed is not None else None,
            "quoted": self.quoted.hex(),
            "replays": self.replays,
            "model": self.model.to_dict() if self.model else None,
            "expected_digest": _DIGEST_PREFIX + self.expected.hex() if self.expected is not None else None,
            "model_checked": self.model_checked,
            "history": [m.to_dict() for m in self.history],
        }


def parse_model_event(event: Event) -> ModelEvent:
    """The model event's payload; :class:`EventLogError` naming the event if it is malformed."""
    where = f"event_log[{event.index}] ({MODEL_EVENT})"
    try:
        doc = json.loads(event.data)
        if not isinstance(doc, dict):
            raise ValueError("the payload is not a JSON object")
        text = doc["digest"]
        if not isinstance(text, str) or not text.startswith(_DIGEST_PREFIX) or len(text) != len(_DIGEST_PREFIX) + 64:
            raise ValueError(f"digest {text!r} is not sha256:<64 hex>")
        digest = bytes.fromhex(text.removeprefix(_DIGEST_PREFIX))
        values = [doc[k] for k in ("name", "dtype", "quantization")]
        if not all(isinstance(v, str) for v in values):
            raise ValueError("name, dtype and quantization must be strings")
    except (ValueError, KeyError, UnicodeDecodeError, RecursionError) as exc:
        raise EventLogError(f"{where}: malformed model event payload: {exc}") from None
    return ModelEvent(event.index, digest, values[0], values[1], values[2])


def model_events(events: Sequence[Event]) -> list[ModelEvent]:
    return [parse_model_event(ev) for ev in events if ev.event_type == EV_RUNTIME_EVENT and ev.name == MODEL_EVENT]


def check_rtmr3_log(
    log: list | str | bytes | None, quoted_rtmr3: bytes, *, expected_digest: bytes | None = None
) -> Rtmr3Check:
    """Replay ``log`` (the service's ``rtmr3_log``; None when it returned none) against the
    quote's RTMR3 and read its latest model event; see the module doc."""
    quoted = bytes(quoted_rtmr3)

    def result(
        *reasons: Reason, events: int = 0, replayed: bytes | None = None, history: Sequence[ModelEvent] = ()
    ) -> Rtmr3Check:
        latest = history[-1] if history else None
        return Rtmr3Check(
            present=log is not None,
            events=events,
            replayed=replayed,
            quoted=quoted,
            model=latest,
            expected=expected_digest,
            history=tuple(history),
            reasons=reasons,
        )

    if log is None:
        if expected_digest is None:
            return result()
        return result(
            Reason(
                "rtmr3-log-missing",
                "the service returned no RTMR3 event log, so nothing says which model it "
                f"serves; expected model digest {_DIGEST_PREFIX}{expected_digest.hex()}",
            )
        )
    try:
        events = parse_json_event_log(log)
        stray = next((ev for ev in events if ev.log_mr_index != RTMR3), None)
        if stray is not None:
            raise EventLogError(
                f"event_log[{stray.index}].imr: {stray.log_mr_index}, but the service's log holds RTMR3 events only"
            )
        replayed = replay(events)[RTMR3]
        history = model_events(events)
    except EventLogError as exc:
        return result(Reason("rtmr3-log-format", f"the service's RTMR3 event log is malformed: {exc}"))
    if replayed != quoted:
        return result(
            Reason(
                "rtmr3-log-mismatch",
                f"the service's RTMR3 event log ({len(events)} events) replays to "
                f"{replayed.hex()}, but the quote's RTMR3 is {quoted.hex()}: the log does not say what the TD "
                "measured",
            ),
            events=len(events),
            replayed=replayed,
            history=history,
        )
    reasons = []
    if expected_digest is not None:
        want = _DIGEST_PREFIX + expected_digest.hex()
        if not history:
            reasons.append(
                Reason(
                    "model-not-measured",
                    f"RTMR3 holds no model event: the service has not measured a model; expected {want}",
                )
            )
        elif history[-1].digest != expected_digest:
            m = history[-1]
            earlier = (
                " (an earlier event names the expected one: the TD has since switched models)"
                if any(h.digest == expected_digest for h in history[:-1])
                else ""
            )
            reasons.append(
                Reason(
                    "model-digest-mismatch",
                    f"the service serves model {m.name} {m.digest_text} ({m.dtype}), not the expected {want}{earlier}",
                )
            )
    return result(*reasons, events=len(events), replayed=replayed, history=history)


@dataclass(frozen=True, slots=True)
class CheckedVerdict(Verdict):
    """A verdict with registers the policy leaves unpinned but an event log checked:
    ``event_log_checks`` holds ``(register key, how it was checked)`` pairs."""

    event_log_checks: tuple[tuple[str, str], ...] = ()

    def exceptions(self) -> list[str]:
        """The verdict's exceptions less the "not pinned" line of each register checked here."""
        checked = tuple(f"{key} not pinned:" for key, _ in self.event_log_checks)
        return [line for line in Verdict.exceptions(self) if not (checked and line.startswith(checked))]

    def to_dict(self) -> dict[str, Any]:
        return {**Verdict.to_dict(self), "checked_by_event_log": [line for _, line in self.event_log_checks]}


def checked_verdict(verdict: Verdict, check: Rtmr3Check, *, reasons: Sequence[Reason] = ()) -> CheckedVerdict:
    """``verdict`` with ``check``'s refusals and ``reasons`` added to its reasons and, when the
    check names the expected model, RTMR3 marked as checked through the model event log."""
    base = {f.name: getattr(verdict, f.name) for f in fields(Verdict)}
    base["reasons"] = (*reasons, *verdict.reasons, *check.reasons)
    checks = (("rtmr3", check.verdict_line()),) if check.model_checked else ()
    return CheckedVerdict(**base, event_log_checks=checks)
