"""The ``tdxvm`` command. Thin: every command calls one of the stage packages.

Exit codes (stable; scripts depend on them; :mod:`tdxvm.errors` defines them and each
error's class decides its own): 0 accepted / success, 1 refused (a verification, policy
or pin said no), 2 unusable input or usage, 3 network or host unreachable (libvirt, SSH,
PCS, guest timeouts), 4 internal error (a bug), 5 partial (a fleet command could not
handle some hosts or VMs; see ``cli/fleet.py``), 130 interrupted, 143 terminated.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from tdxvm import __version__
from tdxvm.cli.lazy import LazyCommands
from tdxvm.cli.output import run_guarded
from tdxvm.coredumps import forbid_core_dumps
from tdxvm.textsafe import safe_text

PACKAGE = Path(__file__).resolve().parents[1]

# Each command's module is imported when the command is looked up (tdxvm.cli.lazy), so
# that `tdxvm verify-quote` imports neither libvirt, paramiko nor the builders.
COMMANDS = {
    "verify-quote": "tdxvm.cli.attest:verify_quote",
    "verify-endpoint": "tdxvm.cli.endpoint:verify_endpoint_cmd",
    "collateral": "tdxvm.cli.attest:collateral",
    "eventlog": "tdxvm.cli.attest:eventlog",
    "emulate": "tdxvm.cli.emulate:emulate",
    "image": "tdxvm.cli.image:image",
    "launch": "tdxvm.cli.vm:launch_cmd",
    "provision": "tdxvm.cli.provision:provision_cmd",
    "status": "tdxvm.cli:_status_cmd",
    "attest": "tdxvm.cli.vm:attest_cmd",
    "stop": "tdxvm.cli.vm:stop_cmd",
    "destroy": "tdxvm.cli:_destroy_cmd",
    "plan": "tdxvm.cli.fleet:plan_cmd",
    "apply": "tdxvm.cli.fleet:apply_cmd",
    "console": "tdxvm.cli.vm:console_cmd",
    "weights": "tdxvm.cli.weights:weights",
    "apikey": "tdxvm.cli.apikey:apikey",
    "validate": "tdxvm.cli.validate:validate_cmd",
}


def _status_cmd() -> click.Command:
    from tdxvm.cli.fleet import NameOrFile, fleet_status_cmd
    from tdxvm.cli.vm import status_cmd

    return NameOrFile(status_cmd, fleet_status_cmd, short_help="Show tdxvm's VMs on a host, one VM, or a fleet's (-f).")


def _destroy_cmd() -> click.Command:
    from tdxvm.cli.fleet import NameOrFile, fleet_destroy_cmd
    from tdxvm.cli.vm import destroy_cmd

    return NameOrFile(destroy_cmd, fleet_destroy_cmd, short_help="Destroy VM NAME, or every VM of a fleet (-f).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tdxvm")
def cli() -> None:
    """Run private foundation models in Intel TDX Trust Domains on hosts you do not trust."""


cli.commands = LazyCommands(COMMANDS)


def _warnings_shown(fallback: Callable[..., None]) -> Callable[..., None]:
    """tdxvm's own warnings (e.g. a host key accepted unchecked under ``no_verify=1``) as
    one ``warning:`` line on standard error; anyone else's through ``fallback``."""

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, *rest: Any) -> None:
        if Path(filename).resolve().is_relative_to(PACKAGE):
            click.echo(f"warning: {safe_text(str(message))}", err=True)
        else:
            fallback(message, category, filename, lineno, *rest)

    return show


def main(argv: list[str] | None = None) -> int:
    forbid_core_dumps()
    with warnings.catch_warnings():
        warnings.showwarning = _warnings_shown(warnings.showwarning)
        try:
            return run_guarded(cli, argv if argv is not None else sys.argv[1:])
        finally:
            tunnels = sys.modules.get("tdxvm.launch.tunnel")  # imported only by commands that reach guests
            if tunnels is not None:
                tunnels.close_all()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
