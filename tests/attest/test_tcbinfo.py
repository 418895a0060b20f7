"""TCB info and QE identity: the one-pass reading of regular documents accepts nothing
the field-by-field reading refuses and builds the same values (that reading then names
what is wrong), on Intel's documents, the emulator's, and mutations of them."""

from __future__ import annotations

import copy
import json
import random

import pytest

from tdxvm.attest import tcbinfo
from tdxvm.attest.errors import CollateralError
from tdxvm.emulate.platform import EmulatedPlatform

from ..conftest import TESTDATA, utc

VALUES = [
    None,
    True,
    False,
    0,
    1,
    -1,
    255,
    256,
    3.5,
    "",
    "x",
    "00",
    "ZZ",
    "0 0",
    "00" * 8,
    "00" * 48,
    "FF" * 16,
    "2025-06-19T10:16:03Z",
    "2025-06-19T10:16:03",
    "2025-06-19",
    "UpToDate",
    "Revoked",
    "OutOfDate",
    "Unknown",
    [],
    {},
    [1],
    ["a"],
    [None],
    {"svn": 1},
    {"isvsvn": 3},
    [{"svn": 1}] * 16,
    [{"svn": 1}] * 15,
    [{"svn": True}] * 16,
    [{"svn": 256}] * 16,
    [{"svn": -1}] * 16,
    [{"svn": 1.0}] * 16,
    [{}] * 16,
]


def _documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(TESTDATA.glob("*/collateral.json")):
        bundle = json.loads(path.read_text())
        docs += [("tcb_info", json.loads(bundle["tcb_info"])), ("qe_identity", json.loads(bundle["qe_identity"]))]
    c = EmulatedPlatform(at=utc("2025-06-20T00:00:00Z"), seed="tcbinfo").collateral()
    return docs + [("tcb_info", json.loads(c.tcb_info)), ("qe_identity", json.loads(c.qe_identity))]


def _paths(value, at=()):
    yield at
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield from _paths(child, (*at, key))


def _mutate(doc: dict, rnd: random.Random) -> dict:
    doc = copy.deepcopy(doc)
    paths = list(_paths(doc))[1:]
    for _ in range(rnd.randint(1, 3)):
        *parent_path, key = rnd.choice(paths)
        parent = doc
        try:
            for step in parent_path:
                parent = parent[step]
            if isinstance(parent, dict) and rnd.random() < 0.3:
                del parent[key]
            elif isinstance(parent, list) and rnd.random() < 0.1:
                parent.append(copy.deepcopy(parent[key]))  # one more level, component, identity
            else:
                parent[key] = copy.deepcopy(rnd.choice(VALUES))
        except (KeyError, IndexError, TypeError):
            pass
    return doc


def _checked(kind: str, doc: dict):
    read = tcbinfo._checked_tcb_info if kind == "tcb_info" else tcbinfo._checked_qe_identity
    try:
        return read(tcbinfo._Obj(doc, kind))
    except CollateralError as exc:
        return exc


@pytest.mark.parametrize(("kind", "doc"), _documents())
def test_one_pass_agrees_with_field_by_field(kind, doc):
    regular = tcbinfo._regular_tcb_info if kind == "tcb_info" else tcbinfo._regular_qe_identity
    assert regular(doc, {}) == _checked(kind, doc) is not None  # the real documents take the one pass
    rnd = random.Random(kind + json.dumps(doc)[:64])
    refused = 0
    for _ in range(1500):
        mutated = _mutate(doc, rnd)
        checked = _checked(kind, mutated)
        fast = regular(mutated, {})
        if isinstance(checked, CollateralError):
            refused += 1
            assert fast is None, (mutated, checked)
        else:
            assert fast is None or fast == checked, mutated
    assert refused > 300


@pytest.mark.parametrize("kind", ["tcb_info", "qe_identity"])
def test_parse_names_what_is_wrong(kind):
    doc = next(d for k, d in _documents() if k == kind)
    broken = copy.deepcopy(doc)
    broken["tcbLevels"][0]["tcbStatus"] = "Unknown"
    parse = tcbinfo.parse_tcb_info if kind == "tcb_info" else tcbinfo.parse_qe_identity
    with pytest.raises(CollateralError, match=rf"^{kind}\.tcbLevels\[0\]\.tcbStatus: unknown status 'Unknown'$"):
        parse(json.dumps(broken))
