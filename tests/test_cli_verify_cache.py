"""`tdxvm verify-quote` and its verified-collateral cache (--no-cache), and what the
command imports: nothing of libvirt, paramiko, the HTTP stack, YAML or the builders."""

from __future__ import annotations

import json
import subprocess
import sys

from tdxvm.cli import cli, main

V4_AT = "2025-06-20T00:00:00Z"


def _verify(capsys, testdata, *extra):
    d = testdata / "dcap-qvl-v4"
    code = main(
        [
            "verify-quote",
            str(d / "quote.bin"),
            "--collateral",
            str(d / "collateral.json"),
            "--at",
            V4_AT,
            "-o",
            "json",
            *extra,
        ]
    )
    return code, json.loads(capsys.readouterr().out)


def test_verify_quote_uses_the_cache_unless_told_not_to(capsys, testdata, tmp_path, monkeypatch):
    folder = tmp_path / "verified"
    monkeypatch.setenv("TDXVM_VERIFIED_CACHE", str(folder))
    code, plain = _verify(capsys, testdata, "--no-cache")
    assert code == 0 and not folder.exists()  # --no-cache neither reads nor writes it
    code, first = _verify(capsys, testdata)
    assert (
        code == 0 and len([p for p in folder.iterdir() if p.suffix == ".json"]) == 7
    )  # four items, the whole set, PCK chain, QE report
    code, again = _verify(capsys, testdata)
    assert code == 0 and plain == first == again
    assert plain["collateral"]["source"] == f"bundle {testdata / 'dcap-qvl-v4' / 'collateral.json'}"


def test_verify_quote_imports_nothing_heavy(testdata):
    d = testdata / "dcap-qvl-v4"
    probe = (
        "import sys\nfrom tdxvm.cli import main\n"
        f"rc = main(['verify-quote', {str(d / 'quote.bin')!r}, '--collateral', {str(d / 'collateral.json')!r}, "
        f"'--at', {V4_AT!r}, '-o', 'json', '--no-cache'])\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('libvirt', 'paramiko', 'requests', 'urllib3', 'yaml') or m.startswith("
        "('tdxvm.launch', 'tdxvm.image', 'tdxvm.emulate', 'tdxvm.fleet', 'tdxvm.provision', 'tdxvm.guest')))\n"
        "print('HEAVY', heavy, file=sys.stderr)\nsys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stderr
    assert json.loads(proc.stdout)["verdict"] == "accept"


def test_commands_load_on_lookup(capsys):
    assert "collateral" in cli.commands and "no-such-command" not in cli.commands
    assert cli.commands.get("no-such-command") is None
    assert sorted(cli.commands) == sorted(
        [
            "verify-quote",
            "verify-endpoint",
            "collateral",
            "eventlog",
            "emulate",
            "image",
            "launch",
            "provision",
            "status",
            "attest",
            "stop",
            "destroy",
            "plan",
            "apply",
            "console",
            "weights",
            "apikey",
            "validate",
        ]
    )
    assert main(["collateral", "--help"]) == 0
    out = capsys.readouterr().out
    assert "fetch" in out and "status" in out
    assert main(["status", "--help"]) == 0 and "With -f, for a fleet" in capsys.readouterr().out
    assert main(["no-such-command"]) == 2
