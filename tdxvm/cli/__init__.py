"""The ``tdxvm`` command. Thin: every command calls one of the stage packages.

Exit codes (stable; scripts depend on them):
0 accepted / success, 1 refused (verification or policy), 2 unusable input or usage,
3 network (collateral could not be fetched), 4 internal error, 5 partial (a fleet command
could not handle some hosts or VMs; see ``cli/fleet.py``).
"""

from __future__ import annotations

import sys

import click

from tdxvm import __version__
from tdxvm.cli.attest import collateral, eventlog, verify_quote
from tdxvm.cli.emulate import emulate
from tdxvm.cli.endpoint import verify_endpoint_cmd
from tdxvm.cli.fleet import NameOrFile, apply_cmd, fleet_destroy_cmd, fleet_status_cmd, plan_cmd
from tdxvm.cli.image import image
from tdxvm.cli.provision import provision_cmd
from tdxvm.cli.vm import attest_cmd, console_cmd, destroy_cmd, launch_cmd, status_cmd, stop_cmd
from tdxvm.cli.weights import weights
from tdxvm.cli.output import run_guarded


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tdxvm")
def cli() -> None:
    """Run private foundation models in Intel TDX Trust Domains on hosts you do not trust."""


cli.add_command(verify_quote)
cli.add_command(verify_endpoint_cmd)
cli.add_command(collateral)
cli.add_command(eventlog)
cli.add_command(emulate)
cli.add_command(image)
cli.add_command(launch_cmd)
cli.add_command(provision_cmd)
cli.add_command(NameOrFile(status_cmd, fleet_status_cmd, short_help="Show tdxvm's VMs on a host, one VM, or a fleet's (-f)."))
cli.add_command(attest_cmd)
cli.add_command(stop_cmd)
cli.add_command(NameOrFile(destroy_cmd, fleet_destroy_cmd, short_help="Destroy VM NAME, or every VM of a fleet (-f)."))
cli.add_command(plan_cmd)
cli.add_command(apply_cmd)
cli.add_command(console_cmd)
cli.add_command(weights)


def main(argv: list[str] | None = None) -> int:
    return run_guarded(cli, argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
