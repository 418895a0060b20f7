"""Exit statuses through ``tdxvm.cli.main``: 2 unusable input, 3 unreachable (libvirt,
SSH, PCS, a guest that does not answer), 4 a bug. Exit 1 (refused): tests/test_cli.py
and tests/cli/test_refusal.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import click

from tdxvm.cli.output import OUTPUT_OPTION, run_guarded
from tdxvm.errors import Refused, TdxvmError, Unreachable
from tests.clirun import run


def test_libvirt_that_does_not_answer_is_exit_3(capsys):
    """No daemon behind the socket, and an SSH transport to a port nobody listens on."""
    code, out, err = run(capsys, "status", "--uri", "qemu:///system?socket=/nonexistent/libvirt-sock", "-o", "json")
    assert code == 3 and json.loads(out)["error"]["code"] == "libvirtd-not-running"
    code, out, err = run(capsys, "status", "--uri", "qemu+ssh://nobody@127.0.0.1:1/system", "-o", "json")
    assert code == 3 and json.loads(out)["error"]["code"] == "libvirt-ssh", err


def test_a_libvirt_uri_that_cannot_be_used_is_exit_2(capsys):
    code, _, err = run(capsys, "status", "--uri", "test:///nonexistent/host.xml")
    assert code == 2 and "no such file" in err


def test_a_pcs_that_refuses_connections_is_exit_3(capsys, testdata, tmp_path, monkeypatch):
    """No answer from the PCS and no cached copy: unreachable, for verify-quote and collateral fetch alike."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    quote = testdata / "dcap-qvl-v4" / "quote.bin"
    code, out, _ = run(capsys, "verify-quote", quote, "--pccs", "https://127.0.0.1:1", "-o", "json")
    doc = json.loads(out)
    assert code == 3 and doc["verdict"] == "error" and doc["error"]["code"] == "collateral-fetch"
    assert "Connection refused" in doc["error"]["message"]
    code, _, err = run(
        capsys, "collateral", "fetch", quote, "--out", tmp_path / "bundle.json", "--pccs", "https://127.0.0.1:1"
    )
    assert code == 3 and err.startswith("error: ") and "Traceback" not in err
    assert not (tmp_path / "bundle.json").exists()


def test_an_exception_not_ours_is_exit_4_internal_error(capsys, tmp_path, monkeypatch):
    import tdxvm.cli.validate as cli_validate

    def boom(path):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli_validate, "guess", boom)
    (tmp_path / "x.yaml").write_text("a: 1\n")
    code, _, err = run(capsys, "validate", tmp_path / "x.yaml")
    assert code == 4 and "internal error" in err and "RuntimeError: boom" in err
    code, out, err = run(capsys, "validate", tmp_path / "x.yaml", "-o", "json")  # scripts read stdout
    assert code == 4 and "RuntimeError: boom" in err
    assert json.loads(out) == {"error": {"code": "internal", "message": "internal error: RuntimeError: boom"}}


class _LooksTyped(Exception):
    """What the CLI once guessed was ours: a tdxvm module and a string ``code``."""

    __module__ = "tdxvm.somewhere"
    code = "looks-typed"


class _Gone(Unreachable):
    code = "gone"


class _No(Refused):
    code = "no"


def test_the_class_decides_never_the_attributes(capsys):
    raised = {
        "gone": _Gone("nobody home"),
        "no": _No("not this one"),
        "input": TdxvmError("bad file", code="bad-file"),
        "typed": _LooksTyped("a bug"),
    }

    @click.group()
    def cli() -> None:
        pass

    @cli.command("raise")
    @click.argument("name")
    @OUTPUT_OPTION
    def raise_cmd(name: str, output: str) -> None:
        raise raised[name]

    assert run_guarded(cli, ["raise", "gone"]) == 3 and capsys.readouterr().err == "error: nobody home\n"
    assert run_guarded(cli, ["raise", "no", "-o", "json"]) == 1
    assert json.loads(capsys.readouterr().out) == {"error": {"code": "no", "message": "not this one"}}
    assert run_guarded(cli, ["raise", "input"]) == 2 and capsys.readouterr().err == "error: bad file\n"
    assert run_guarded(cli, ["raise", "typed"]) == 4 and "internal error" in capsys.readouterr().err


def test_a_reader_that_leaves_early_is_not_a_refusal(testdata):
    """``tdxvm verify-quote … | head -c0``: an accepted quote whose output nobody reads is
    exit 141 (a broken pipe, as a shell reports for a tool SIGPIPE killed), never 1 (refused)."""
    d = testdata / "dcap-qvl-v4"
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [sys.executable, "-c", "import sys; from tdxvm.cli import main; sys.exit(main())", "verify-quote"]
            + [d / "quote.bin", "--collateral", d / "collateral.json", "--at", "2025-06-20T00:00:00Z"],
            stdout=write,
            stderr=subprocess.PIPE,
            timeout=120,
        )
    finally:
        os.close(write)
    assert done.returncode == 141, done.stderr


def test_ctrl_c_at_a_confirmation_is_an_interrupt_and_no_is_a_refusal_to_go_on(capsys, monkeypatch):
    """click turns Ctrl-C at a prompt into Abort, like an answer "no": the first exits 130
    as every interrupt does, the second 2 ("aborted")."""

    @click.group()
    def cli() -> None:
        pass

    @cli.command("ask")
    def ask_cmd() -> None:
        click.confirm("Go on?", abort=True)

    def ctrl_c(_prompt: str) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(click.termui, "visible_prompt_func", ctrl_c)
    assert run_guarded(cli, ["ask"]) == 130 and capsys.readouterr().err.endswith("interrupted\n")
    monkeypatch.setattr(click.termui, "visible_prompt_func", lambda _prompt: "n")
    assert run_guarded(cli, ["ask"]) == 2 and capsys.readouterr().err.endswith("aborted\n")
