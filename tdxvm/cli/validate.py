"""``tdxvm validate FILE…``: check tdxvm YAML files by their shape, without contacting anything."""

from __future__ import annotations

import sys

import click

from tdxvm.cli.filekinds import UnknownFileKind, guess, loader
from tdxvm.cli.output import EXIT_INPUT, EXIT_OK, OUTPUT_OPTION, emit_json
from tdxvm.errors import TdxvmError
from tdxvm.textsafe import safe_text


@click.command("validate")
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@OUTPUT_OPTION
def validate_cmd(files: tuple[str, ...], output: str) -> None:
    """Check each FILE (a VM spec, fleet, image recipe or attestation policy, told apart by
    its keys) and say which command takes it; problems as file:line: field: problem.

    Exit 0 when every file is valid, 2 when any is not. The files a recipe adds must
    exist; images, models and hosts are not looked at.
    """
    results = []
    for path in files:
        kind = guess(path)
        try:
            if kind is None:
                raise UnknownFileKind(path)
            loader(kind)(path)
            results.append(
                {"file": path, "kind": kind.name, "valid": True, "command": kind.command.replace("FILE", path)}
            )
        except TdxvmError as exc:  # each loader's own typed error (file:line); anything else is a bug
            results.append({"file": path, "kind": kind.name if kind else None, "valid": False, "error": str(exc)})
    if output == "json":
        emit_json({"valid": all(r["valid"] for r in results), "files": results})
    else:
        for r in results:
            if r["valid"]:
                click.echo(f"{r['file']}: valid {r['kind'] if r['kind'] != 'vm' else 'VM spec'}; use `{r['command']}`")
            else:
                click.echo(
                    f"{r['file']}: not valid"
                    + (f" (read as {r['kind']})" if r["kind"] else "")
                    + f":\n{safe_text(r['error'])}",
                    err=True,
                )
    sys.exit(EXIT_OK if all(r["valid"] for r in results) else EXIT_INPUT)
