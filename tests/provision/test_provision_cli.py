"""``tdxvm provision`` refuses bad input before it contacts a guest (the whole flow runs
end to end in tests/e2e/test_fleet.py, with tests/e2e/served.py's checks)."""

from __future__ import annotations

from tests.clirun import run


def test_unknown_vm(capsys, tmp_path):
    code, _, err = run(capsys, "provision", "no-such-vm", "--model", tmp_path, "--uri", "test:///default")
    assert code == 2 and "no-such-vm" in err and "Traceback" not in err


def test_bad_names_are_refused_with_the_option_that_carries_them(capsys, tmp_path):
    code, _, err = run(
        capsys, "provision", "vm", "--model", tmp_path, "--model-name", "two words", "--uri", "test:///default"
    )
    assert code == 2 and "--model-name" in err
    code, _, err = run(capsys, "provision", "vm", "--model", tmp_path / "a b", "--uri", "test:///default")
    assert code == 2 and "set name:" in err


def test_json_errors_are_one_object(capsys, tmp_path):
    import json

    code, out, _ = run(capsys, "provision", "no-such-vm", "--model", tmp_path, "--uri", "test:///default", "-o", "json")
    assert code == 2 and json.loads(out)["error"]["message"]
