"""The controller's side of model identity: a service's RTMR3 log replayed against the
quote, its latest model event against the expected digest, and the verdict that says so.

Logs are made by the guest's own code (:mod:`tdxvm.guest.rtmr3`), and the dstack log of
``dstack-eventlog`` (a real CVM's) shows the parser takes a third party's runtime events
as well; quotes are signed by the emulated platform with the RTMR3 each log replays to.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from tdxvm.attest.eventlog import parse_json_event_log
from tdxvm.attest.modelevent import CheckedVerdict, check_rtmr3_log, checked_verdict, parse_model_event
from tdxvm.attest.verdict import appraise
from tdxvm.guest.rtmr3 import MODEL_EVENT, make_event, model_payload, replay

from ..attested_guest import AT, anchor, artifacts, platform, policy_for

A, B = hashlib.sha256(b"model A").digest(), hashlib.sha256(b"model B").digest()


def model(digest: bytes, dtype: str = "float32") -> dict:
    return make_event(MODEL_EVENT, model_payload(digest, name="tiny-llama", dtype=dtype))


def test_a_log_that_replays_and_names_the_expected_model_checks_rtmr3():
    log = [model(A)]
    check = check_rtmr3_log(log, replay(log), expected_digest=A)
    assert check.reasons == () and check.replays and check.model_checked
    assert check.model is not None and (
        check.model.digest,
        check.model.name,
        check.model.dtype,
        check.model.quantization,
    ) == (A, "tiny-llama", "float32", "none")
    assert (
        check.to_dict()["model"]["digest"] == "sha256:" + A.hex()
        and check.to_dict()["expected_digest"] == "sha256:" + A.hex()
    )
    unexpected = check_rtmr3_log(log, replay(log))  # no digest expected: reported, not checked
    assert unexpected.reasons == () and unexpected.model == check.model and not unexpected.model_checked


def test_history_and_the_latest_model_event():
    log = [model(A), make_event("app-id", b"\x01\x02"), model(B), model(B, "bfloat16")]
    check = check_rtmr3_log(log, replay(log), expected_digest=B)
    assert check.model_checked and [m.digest for m in check.history] == [A, B, B] and check.model.dtype == "bfloat16"
    refused = check_rtmr3_log(log, replay(log), expected_digest=A)
    assert [r.code for r in refused.reasons] == [
        "model-digest-mismatch"
    ] and "an earlier event names the expected one" in refused.reasons[0].message


@pytest.mark.parametrize(
    "log, quoted, expected, code",
    [
        (None, bytes(48), A, "rtmr3-log-missing"),
        ([], bytes(48), A, "model-not-measured"),
        ([model(A)], bytes(48), A, "rtmr3-log-mismatch"),  # a log the quote's RTMR3 does not match
        ([model(A)], replay([model(B)]), B, "rtmr3-log-mismatch"),  # claims A, RTMR3 measured B
        ([model(B)], replay([model(B)]), A, "model-digest-mismatch"),
        ([{**model(A), "imr": 2}], bytes(48), A, "rtmr3-log-format"),
        (
            [{**model(A), "digest": "00" * 48}],
            bytes(48),
            None,
            "rtmr3-log-format",
        ),  # a digest that is not its payload's
        (
            [make_event(MODEL_EVENT, b'{"digest": "md5:00"}')],
            replay([make_event(MODEL_EVENT, b'{"digest": "md5:00"}')]),
            None,
            "rtmr3-log-format",
        ),
        ("not json", bytes(48), None, "rtmr3-log-format"),
    ],
)
def test_refusals(log, quoted, expected, code):
    check = check_rtmr3_log(log, quoted, expected_digest=expected)
    assert [r.code for r in check.reasons] == [code] and not check.model_checked


def test_no_log_and_nothing_expected_is_no_check():
    check = check_rtmr3_log(None, bytes(48))
    assert check.reasons == () and not check.present and check.model is None and not check.model_checked


def test_a_third_partys_runtime_events_parse_and_replay(testdata):
    """dstack's log of a real CVM (its digests left empty, as dstack ships them): its RTMR3
    runtime events replay to the RTMR3 of its real quote; no model event among them."""
    from tdxvm.attest.quote import parse_quote

    doc = json.loads((testdata / "dstack-eventlog/getquote.json").read_text())
    rtmr3_events = [e for e in json.loads(doc["event_log"]) if e["imr"] == 3]
    quoted = parse_quote(bytes.fromhex(doc["quote"])).body.rtmrs[3]
    check = check_rtmr3_log(rtmr3_events, quoted)
    assert check.replays and check.events == len(parse_json_event_log(rtmr3_events)) == 9
    assert check.history == () and check.reasons == () and check.model is None
    with_model = check_rtmr3_log(rtmr3_events, quoted, expected_digest=A)
    assert [r.code for r in with_model.reasons] == ["model-not-measured"]


def test_malformed_model_payload_names_the_event():
    from tdxvm.attest.errors import EventLogError

    [event] = parse_json_event_log([make_event(MODEL_EVENT, b'{"digest": "sha256:' + b"00" * 32 + b'", "name": 1}')])
    with pytest.raises(EventLogError, match=r"event_log\[0\] \(tdxvm.model\): malformed model event payload"):
        parse_model_event(event)


def test_the_verdict_says_rtmr3_is_checked_instead_of_not_pinned():
    from tdxvm.emulate.qgs import QuoteService

    service = QuoteService(platform(), artifacts())
    log = [model(A)]
    service.extend_rtmr(3, bytes.fromhex(log[0]["digest"]))
    quote = service.sign(bytes(64))
    verdict = appraise(quote, platform().collateral(), at=AT, policy=policy_for(artifacts()), trust_anchor=anchor())
    assert "rtmr3 not pinned" in " ".join(verdict.to_dict()["policy_exceptions"])

    checked = checked_verdict(verdict, check_rtmr3_log(log, service.rtmr(3), expected_digest=A))
    d = checked.to_dict()
    assert isinstance(checked, CheckedVerdict) and checked.accepted
    assert [line.split(" not pinned")[0] for line in d["policy_exceptions"]] == ["rtmr0"]
    assert d["checked_by_event_log"][0].startswith("rtmr3 checked through the model event log: its 1 event(s) replay")
    assert {k: v for k, v in d.items() if k not in ("policy_exceptions", "checked_by_event_log")} == {
        k: v for k, v in verdict.to_dict().items() if k != "policy_exceptions"
    }  # nothing else changes

    refused = checked_verdict(verdict, check_rtmr3_log(log, service.rtmr(3), expected_digest=B))
    assert not refused.accepted and [r.code for r in refused.reasons] == ["model-digest-mismatch"]
    assert refused.to_dict()["checked_by_event_log"] == [] and "rtmr3 not pinned" in " ".join(
        refused.to_dict()["policy_exceptions"]
    )
