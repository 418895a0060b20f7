"""``tdxvm validate``: any tdxvm YAML file checked by its shape, with the command that
takes it; and a file given to the wrong command says which command takes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.clirun import run

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("path", "kind", "command"),
    [
        ("configs/fleet-example.yaml", "fleet", "tdxvm apply -f configs/fleet-example.yaml"),
        ("configs/smoke.yaml", "vm", "tdxvm launch configs/smoke.yaml"),
        ("images/llama2.yaml", "recipe", "tdxvm image build images/llama2.yaml"),
    ],
)
def test_the_shipped_files_are_valid_and_their_command_named(capsys, monkeypatch, path, kind, command):
    monkeypatch.chdir(REPO)
    code, out, _ = run(capsys, "validate", path, "-o", "json")
    doc = json.loads(out)
    assert (
        code == 0 and doc["valid"] and doc["files"] == [{"file": path, "kind": kind, "valid": True, "command": command}]
    )


def test_each_file_is_judged_and_any_invalid_one_is_exit_2(capsys, tmp_path):
    files = {
        "policy.yaml": "accepted_tcb_statuses: [UpToDate]\nmrtd: ab\n",  # a policy, by mrtd: wrong length
        "vm.yaml": "name: x\nvcpus: 2\nmemroy: 1GiB\n",  # a VM spec with a typo and no image
        "other.yaml": "foo: 1\n",
        "empty.yaml": "",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    code, out, err = run(capsys, "validate", *(tmp_path / n for n in files))
    assert code == 2
    assert f"{tmp_path}/policy.yaml:2: mrtd: expected 48 bytes" in err
    assert f"{tmp_path}/vm.yaml: not valid (read as vm)" in err and f"{tmp_path}/vm.yaml:3: memroy: unknown key" in err
    assert f"{tmp_path}/other.yaml: its keys (foo) do not tell which of tdxvm's files it is" in err
    assert f"{tmp_path}/empty.yaml: valid policy" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["launch", "configs/fleet-example.yaml"],
            "is a fleet, not a VM spec: use `tdxvm apply -f configs/fleet-example.yaml`",
        ),
        (
            ["launch", "--dry-run", "images/smoke.yaml"],
            "is an image recipe, not a VM spec: use `tdxvm image build images/smoke.yaml`",
        ),
        (["apply", "-f", "configs/smoke.yaml"], "is a VM spec, not a fleet: use `tdxvm launch configs/smoke.yaml`"),
        (
            ["image", "measure", "--vm", "configs/fleet-example.yaml"],
            "is a fleet, not a VM spec: use `tdxvm apply -f configs/fleet-example.yaml`",
        ),
        (
            ["verify-quote", "q.bin", "--policy", "configs/smoke.yaml"],
            "is a VM spec, not an attestation policy: use `tdxvm launch configs/smoke.yaml`",
        ),
        (
            ["verify-endpoint", "https://127.0.0.1:1", "--policy", "configs/smoke.yaml"],
            "is a VM spec, not an attestation policy",
        ),
    ],
)
def test_a_file_given_to_the_wrong_command_names_the_right_one(capsys, monkeypatch, argv, message):
    monkeypatch.chdir(REPO)
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err
