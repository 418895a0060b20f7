"""Strict YAML: duplicate keys, explicit nulls and merge keys are errors with file:line.

PyYAML keeps the last of two equal keys and reads ``key:`` as null; in a file that
decides what is trusted, both loosen it without anyone seeing (a second
``allow_debug: true`` wins; ``mrtd: null`` pins nothing). Every tdxvm YAML goes through
:func:`tdxvm.yamlfile.parse_yaml`, so these tests use a small model of their own; the
per-kind tests (policy, VM spec, fleet, recipe) sit beside each loader's tests.
"""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel, ConfigDict

from tdxvm.attest.policy import parse_policy
from tdxvm.launch.spec import VmSpec
from tdxvm.yamlfile import NULL_ITEM, NULL_VALUE, SpecError, load_yaml, parse_yaml
from tests.clirun import run

V4_AT = "2025-06-20T00:00:00Z"


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")

    a: str = "x"
    b: str = "y"


class Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "n"
    flag: bool = False
    items: list[str] = []
    inner: Inner = Inner()
    table: dict[str, Inner] = {}


def problems(text: str) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_yaml(text, Doc, source="f.yaml")
    return str(info.value).splitlines()


def test_duplicate_key_names_both_lines_and_the_field_path():
    text = "name: a\ntable:\n  chat:\n    a: '1'\n  web: {}\n  chat:\n    b: '2'\n"
    assert problems(text) == ["f.yaml:6: table.chat: duplicate key (first at line 3)"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("flag: false\nflag: true\n", "f.yaml:2: flag: duplicate key (first at line 1)"),
        ("inner:\n  a: '1'\n  b: '2'\n  a: '3'\n", "f.yaml:4: inner.a: duplicate key (first at line 2)"),
        ("inner: {a: '1', a: '2'}\n", "f.yaml:1: inner.a: duplicate key (first at line 1)"),
        ("name: a\n'name': b\n", "f.yaml:2: name: duplicate key (first at line 1)"),  # quoting makes no other key
        (
            "table:\n  '1': {}\n  1: {}\n",
            "f.yaml:3: table.1: duplicate key (first at line 2)",
        ),  # numbers stay text: both load as '1'
    ],
)
def test_duplicate_keys_at_any_depth(text, expected):
    assert problems(text) == [expected]


def test_booleans_stay_text_until_a_field_reads_them(tmp_path):
    """YAML 1.1's yes/no/on/off are not booleans unless the field is one; a count is never a boolean."""
    p = tmp_path / "vm.yaml"
    p.write_text("name: no\nimage: m.json\nvcpus: true\n")
    with pytest.raises(SpecError) as err:
        load_yaml(p, VmSpec)
    assert str(err.value).splitlines() == [
        f"{p}:3: vcpus: Input should be a valid integer, unable to parse string as an integer"
    ]
    assert parse_policy("allow_debug: yes\n").allow_debug is True


def test_a_third_occurrence_points_at_the_first():
    assert problems("flag: false\nflag: true\nflag: false\n") == [
        "f.yaml:2: flag: duplicate key (first at line 1)",
        "f.yaml:3: flag: duplicate key (first at line 1)",
    ]


@pytest.mark.parametrize("value", ["null", "~", "", "Null", "NULL", "!!null ''"])
def test_explicit_null_value_is_refused(value):
    assert problems(f"name: a\nflag: {value}\n") == [f"f.yaml:2: flag: {NULL_VALUE}"]
    assert NULL_VALUE == "null is not allowed; remove the key to allow any value"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("inner:\n  a:\n  b: '2'\n", f"f.yaml:2: inner.a: {NULL_VALUE}"),
        ("inner: {a: , b: '2'}\n", f"f.yaml:1: inner.a: {NULL_VALUE}"),
        ("inner: {a}\n", f"f.yaml:1: inner.a: {NULL_VALUE}"),
        ("inner:\n  ? a\n", f"f.yaml:2: inner.a: {NULL_VALUE}"),
        ("table:\n  chat:\n", f"f.yaml:2: table.chat: {NULL_VALUE}"),
        ("items: [a, ~]\n", f"f.yaml:1: items.1: {NULL_ITEM}"),
        ("items:\n  - a\n  -\n  - null\n", f"f.yaml:3: items.1: {NULL_ITEM}"),
    ],
)
def test_nulls_in_nested_mappings_and_lists(text, expected):
    lines = problems(text)
    assert lines[0] == expected, lines


def test_quoted_null_is_a_string():
    assert parse_yaml("name: 'null'\nitems: ['~', \"\"]\n", Doc, source="f.yaml").items == ["~", ""]


@pytest.mark.parametrize("text", ["", "# nothing\n", "~\n", "null\n", "---\n", "--- ~\n"])
def test_an_empty_or_null_document_is_an_empty_mapping(text):
    assert parse_yaml(text, Doc, source="f.yaml") == Doc()


def test_merge_keys_are_refused():
    text = "base: &b {a: '1'}\ninner:\n  <<: *b\n  b: '2'\n"
    assert problems(text) == ["f.yaml:3: inner: merge keys (<<) are not allowed; write the keys out"]


def test_every_problem_at_once_sorted_by_line_before_the_schema():
    text = "items:\n  - a\n  - ~\ninner:\n  a:\n  zzz: 1\nflag: true\nflag: false\nunknown: 1\n"
    assert problems(text) == [
        f"f.yaml:3: items.1: {NULL_ITEM}",
        f"f.yaml:5: inner.a: {NULL_VALUE}",
        "f.yaml:8: flag: duplicate key (first at line 7)",
    ]  # inner.zzz and unknown (schema errors) come once these are fixed
    with pytest.raises(SpecError) as info:
        parse_yaml("flag: true\nflag: false\n", Doc, source="f.yaml")
    assert info.value.problems == [(2, "flag", "duplicate key (first at line 1)")]


def test_aliases_are_checked_once_and_recursion_ends():
    # the null sits under the anchor; the alias shares that node, so one problem, at the anchor
    assert problems("inner: &i {a: ~}\ntable:\n  x: *i\n") == [f"f.yaml:1: inner.a: {NULL_VALUE}"]
    # a null value reached through an alias is still a null value where it is used
    assert problems("name: &n ~\ninner:\n  a: *n\n") == [
        f"f.yaml:1: name: {NULL_VALUE}",
        f"f.yaml:3: inner.a: {NULL_VALUE}",
    ]
    lines = problems("items: &x [*x]\n")  # recursive: no strict problem, the schema refuses it
    assert lines and all(line.startswith("f.yaml:1: items.0") for line in lines), lines
    # "billion laughs" on the node tree (4**16 paths to the last list): each shared node is walked once
    text = "a: &a [x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefghijklmnop", "bcdefghijklmnopq", strict=True)
    )
    with pytest.raises(SpecError) as info:
        parse_yaml(text + "flag: true\nflag: false\n", Doc, source="f.yaml")
    assert str(info.value) == "f.yaml:19: flag: duplicate key (first at line 18)"


def test_strict_problems_still_go_through_load_yaml(tmp_path):
    f = tmp_path / "doc.yaml"
    f.write_text("flag: false\nflag: true\n")
    with pytest.raises(SpecError, match=rf"^{f}:2: flag: duplicate key \(first at line 1\)$"):
        load_yaml(f, Doc)


def test_syntax_errors_are_unchanged():
    assert problems("a: [")[0].startswith("f.yaml:1: not valid YAML")
    assert problems("- a\n") == ["f.yaml:1: expected a mapping of keys to values at the top level"]


# -- through the CLI: exit 2 with file:line --------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        ("accepted_tcb_statuses: [UpToDate]\nmrtd: null\n", 2, f"mrtd: {NULL_VALUE}"),
        ("allow_debug: false\nrtmr3: ~\n", 2, f"rtmr3: {NULL_VALUE}"),
        ("allow_debug: false\nmrtd: [~]\n", 2, f"mrtd.0: {NULL_ITEM}"),
        (
            "allow_debug: false\nrequire_sept_ve_disable: true\nallow_debug: true\n",
            3,
            "allow_debug: duplicate key (first at line 1)",
        ),
    ],
)
def test_verify_quote_policy_null_or_duplicate_exits_2(capsys, testdata, tmp_path, text, line, needle):
    d = testdata / "dcap-qvl-v4"
    policy = tmp_path / "policy.yaml"
    policy.write_text(text)
    argv = ["verify-quote", d / "quote.bin", "--collateral", d / "collateral.json", "--at", V4_AT, "--policy", policy]
    code, out, err = run(capsys, *argv)
    assert code == 2, out + err
    assert f"{policy}:{line}: {needle}" in err and "Traceback" not in err, err
    code, out, _ = run(capsys, *argv, "-o", "json")
    assert code == 2 and f"{policy}:{line}: {needle}" in json.loads(out)["error"]["message"]


FLEET = """\
apiVersion: tdxvm/v1
kind: Fleet
metadata:
  name: llama
spec:
  hosts:
    a: qemu:///system
    b: qemu+ssh://admin@tdx-b/system
  templates:
    small: {image: m.json, backend: emulated, vcpus: 1, memory: 1GiB}
  deployments:
    chat: {template: small, replicas: 1, placement: [a]}
    web: {template: small, replicas: 2, placement: [a, b]}
"""


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("    web:", "    chat:"), "fleet.yaml:13: spec.deployments.chat: duplicate key (first at line 12)"),
        (("    b: qemu+ssh", "    a: qemu+ssh"), "fleet.yaml:8: spec.hosts.a: duplicate key (first at line 7)"),
        (
            ("replicas: 1, placement", "replicas: ~, placement"),
            f"fleet.yaml:12: spec.deployments.chat.replicas: {NULL_VALUE}",
        ),
    ],
)
def test_fleet_plan_refuses_duplicates_and_nulls_exit_2(capsys, tmp_path, monkeypatch, change, expected):
    monkeypatch.setenv("TDXVM_STATE_DIR", str(tmp_path / "state"))
    path = tmp_path / "fleet.yaml"
    path.write_text(FLEET.replace(*change))
    code, out, err = run(capsys, "plan", "-f", path)
    assert code == 2, out + err
    assert f"{tmp_path}/{expected}" in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "name: a\nimage: m.json\npolicy:\n  allow_debug: false\n  allow_debug: true\n",
            "vm.yaml:5: policy.allow_debug: duplicate key (first at line 4)",
        ),
        ("name: a\nimage: m.json\npolicy:\n  mrtd:\n", f"vm.yaml:4: policy.mrtd: {NULL_VALUE}"),
    ],
)
def test_launch_refuses_a_vm_spec_with_duplicates_or_nulls_exit_2(capsys, tmp_path, text, expected):
    path = tmp_path / "vm.yaml"
    path.write_text(text)
    code, out, err = run(capsys, "launch", path, "--dry-run")
    assert code == 2, out + err
    assert f"{tmp_path}/{expected}" in err and "Traceback" not in err, err


def test_image_build_refuses_a_recipe_with_a_null_exit_2(capsys, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "name: r\nsuite: bookworm\ncmdline: console=ttyS0\nkernel:\n  package: linux-image-cloud-amd64\n  suite: ~\n"
    )
    code, out, err = run(capsys, "image", "build", path, "--out", tmp_path / "out")
    assert code == 2, out + err
    assert f"{path}:6: kernel.suite: {NULL_VALUE}" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
