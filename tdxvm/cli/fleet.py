"""``tdxvm plan|apply -f``, ``tdxvm status|destroy -f``: fleets from a YAML file.

``plan`` says what ``apply`` would create, replace and delete, and why; it changes
nothing. ``apply`` makes the hosts match the file, every VM attested before it gets a
secret; it shows the plan and asks unless ``--yes``. ``destroy -f`` powers off,
undefines and deletes the disks of every VM the fleet owns — never another domain.
``status -f`` shows each VM of the fleet.

``status`` and ``destroy`` also take a VM name (``tdxvm status NAME``, one VM, see
``cli/vm.py``); :class:`NameOrFile` sends each call to the right command.

Exit codes, beside the common ones (0 done, 1 refused, 2 input or usage): 1 when a VM
was refused at attestation; 5 when some hosts or VMs could not be handled (partial; the
report says which and why; a later apply finishes the job); 130 when interrupted.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
import yaml

from tdxvm.cli.output import CliError, emit_json
from tdxvm.cli.progress import Progress
from tdxvm.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL, EXIT_REFUSED
from tdxvm.textsafe import safe_text

FILE_OPTION = click.option(
    "-f", "--file", "path", required=True, metavar="FLEET.yaml", type=click.Path(dir_okay=False), help="The fleet file."
)
STATE_OPTION = click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DIR",
    help="Where the fleet's state file and lock are [default: $TDXVM_STATE_DIR, else $XDG_STATE_HOME/tdxvm/fleets].",
)


def _output_option(*choices: str) -> Any:
    people = [c for c in choices if c not in ("json", "yaml")]
    return click.option(
        "-o",
        "--output",
        "output",
        type=click.Choice(list(choices)),
        default=choices[0],
        show_default=True,
        help=f"For people ({' or '.join(people)}) or scripts (json, yaml: one document on stdout).",
    )


def _emit(doc: dict[str, Any], output: str) -> None:
    if output == "json":
        emit_json(doc)
    else:
        click.echo(yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=200), nl=False)


def _echo_lines(lines: list[str], *, err: bool = False) -> None:
    for line in lines:
        click.echo(safe_text(line), err=err)  # names, hosts and details as the hosts report them


def exit_code(status: str) -> int:
    """The exit status of an apply or destroy whose report says ``status``."""
    return {"ok": EXIT_OK, "refused": EXIT_REFUSED, "partial": EXIT_PARTIAL, "interrupted": EXIT_INTERRUPTED}[status]


def _exit_for(status: str) -> None:
    code = exit_code(status)
    if code:
        sys.exit(code)


def _load(path: str) -> Any:
    from tdxvm.cli.filekinds import refuse_other_kind
    from tdxvm.fleet.spec import load_fleet

    refuse_other_kind(path, "fleet")
    return load_fleet(path)


@click.command("plan")
@FILE_OPTION
@STATE_OPTION
@_output_option("text", "json", "yaml")
def plan_cmd(path: str, state_dir: Path | None, output: str) -> None:
    """Show what `tdxvm apply -f FLEET.yaml` would create, replace and delete, and why.

    Reads the hosts and changes nothing. Exit 5 when some VMs cannot be planned (their
    host does not answer, or a domain that is not the fleet's holds the name).
    """
    from tdxvm.fleet import planner, report
    from tdxvm.fleet.inventory import shared_connector

    fleet = _load(path)
    p = planner.plan(fleet, connector=shared_connector(), state_dir=state_dir)
    if output == "text":
        _echo_lines(report.plan_lines(p))
    else:
        _emit(p.to_dict(), output)
    if p.unreachable() or p.skipped:
        sys.exit(EXIT_PARTIAL)


@click.command("apply")
@FILE_OPTION
@click.option("--yes", "-y", is_flag=True, help="Do not ask before changing anything (for scripts).")
@click.option(
    "--parallel",
    default=None,
    type=click.IntRange(min=1, max=256),
    metavar="N",
    help="Bring up at most N VMs at a time, across all hosts [default: 10].",
)
@click.option(
    "--destroy-refused", is_flag=True, help="Destroy VMs refused at attestation instead of leaving them stopped."
)
@click.option(
    "--forget-host",
    "forget_hosts",
    multiple=True,
    metavar="NAME",
    help="Host NAME, out of the file, is gone for good: stop looking for its VMs (it must not answer). Repeatable.",
)
@STATE_OPTION
@_output_option("text", "json", "yaml")
def apply_cmd(
    path: str,
    yes: bool,
    parallel: int | None,
    destroy_refused: bool,
    forget_hosts: tuple[str, ...],
    state_dir: Path | None,
    output: str,
) -> None:
    """Make the hosts match FLEET.yaml: create, replace and delete the fleet's VMs.

    Each VM goes through the same launch as `tdxvm launch`: define, boot, attest, and
    only then the disk key. A VM refused at attestation gets nothing and is reported with
    every reason (left stopped, or destroyed with --destroy-refused). Replicas of a
    deployment are replaced one at a time so that at least N-1 keep serving. Exit 0 when
    everything is as the file asks, 1 when a VM was refused, 5 when some hosts or VMs
    could not be handled (a later apply finishes the job), 130 when interrupted. A host
    taken out of the file that will never answer again keeps the apply at 5 until it is
    forgotten with --forget-host.
    """
    from tdxvm.fleet import reconcile, report
    from tdxvm.fleet.inventory import shared_connector
    from tdxvm.fleet.outcome import FleetEvent

    fleet = _load(path)
    text = output == "text"

    def confirm(p: Any) -> bool:
        if text or not yes:
            _echo_lines(report.plan_lines(p), err=not text)
        if yes or not p.changes:
            return True
        if not sys.stdin.isatty():
            raise CliError(
                f"apply would change {len(p.changes)} VMs of fleet {fleet.name}; pass --yes to confirm "
                "(there is no terminal to ask on)"
            )
        return click.confirm("Apply these changes?", default=False, err=True)

    printer = Progress(output, width=0)

    def progress(event: FleetEvent) -> None:
        if event.phase == "result":  # each VM's outcome as it comes; the launch phases stay quiet
            printer.done(f"{event.vm} on {event.host}:", event.status, detail=event.detail)

    options = reconcile.ApplyOptions(
        parallel=parallel or reconcile.DEFAULT_PARALLEL, destroy_refused=destroy_refused, forget_hosts=forget_hosts
    )
    result = reconcile.apply(
        fleet, connector=shared_connector(), state_dir=state_dir, options=options, progress=progress, confirm=confirm
    )
    if text:
        _echo_lines(report.report_lines(result))
    else:
        _emit(result.to_dict(), output)
    _exit_for(result.status)


@click.command("status")
@FILE_OPTION
@STATE_OPTION
@_output_option("text", "table", "json", "yaml")  # text and table: the same table, as `status` without -f
def fleet_status_cmd(path: str, state_dir: Path | None, output: str) -> None:
    """Show each VM of FLEET.yaml: host, state, attestation verdict, TCB status,
    measurements digest, endpoint, last attested time, and whether it is in sync."""
    from tdxvm.fleet import report
    from tdxvm.fleet.inventory import shared_connector

    fleet = _load(path)
    st = report.fleet_status(fleet, connector=shared_connector(), state_dir=state_dir)
    if output in ("text", "table"):
        _echo_lines(report.status_lines(st))
    else:
        _emit(st.to_dict(), output)
    if st.unreachable:
        sys.exit(EXIT_PARTIAL)


@click.command("destroy")
@FILE_OPTION
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation (for scripts).")
@click.option(
    "--parallel",
    default=None,
    type=click.IntRange(min=1, max=256),
    metavar="N",
    help="Destroy at most N VMs at a time [default: 10].",
)
@STATE_OPTION
@_output_option("text", "json", "yaml")
def fleet_destroy_cmd(path: str, yes: bool, parallel: int | None, state_dir: Path | None, output: str) -> None:
    """Power off, undefine and delete the disk overlay and log of every VM fleet
    FLEET.yaml owns (found by its labels), on every host it has VMs on. Other domains are
    never touched; the shared image volumes stay. Exit 5 if some hosts do not answer."""
    from tdxvm.fleet import reconcile, report
    from tdxvm.fleet.inventory import shared_connector

    fleet = _load(path)

    def confirm(p: Any) -> bool:
        if not yes:
            _echo_lines(report.plan_lines(p), err=True)
        if yes or not p.changes:
            return True
        if not sys.stdin.isatty():
            raise CliError(
                f"destroy deletes {len(p.changes)} VMs of fleet {fleet.name} and their disk overlays; pass "
                "--yes to confirm (there is no terminal to ask on)"
            )
        return click.confirm(f"Destroy these {len(p.changes)} VMs?", default=False, err=True)

    result = reconcile.destroy_fleet(
        fleet,
        connector=shared_connector(),
        state_dir=state_dir,
        parallel=parallel or reconcile.DEFAULT_PARALLEL,
        confirm=confirm,
    )
    if output == "text":
        _echo_lines(report.report_lines(result))
    else:
        _emit(result.to_dict(), output)
    _exit_for(result.status)


# -- one verb, two commands -------------------------------------------------------------------


def _names_a_file(args: list[str]) -> bool:
    for arg in args:
        if arg == "--":
            return False
        if arg in ("-f", "--file") or arg.startswith("--file=") or (arg.startswith("-f") and not arg.startswith("--")):
            return True
    return False


class NameOrFile(click.Command):
    """``tdxvm VERB [NAME]`` runs ``by_name``; ``tdxvm VERB -f FLEET.yaml`` runs ``by_file``."""

    def __init__(self, by_name: click.Command, by_file: click.Command, *, short_help: str) -> None:
        super().__init__(by_name.name, help=by_name.help, short_help=short_help)
        self.by_name, self.by_file = by_name, by_file

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        if _names_a_file(args):
            return self.by_file.make_context(info_name, args, parent=parent, **extra)
        if any(a in ("-h", "--help") for a in args):
            ctx = click.Context(self.by_name, info_name=info_name, parent=parent)
            fctx = click.Context(self.by_file, info_name=info_name, parent=parent)
            click.echo(self.by_name.get_help(ctx))
            click.echo("\nWith -f, for a fleet:\n")
            click.echo(self.by_file.get_help(fctx))
            ctx.exit()
        return self.by_name.make_context(info_name, args, parent=parent, **extra)
