"""``tdxvm image prune``: free the pool space of images no VM on a host uses any more,
and what interrupted launches and killed uploads left."""

from __future__ import annotations

import sys

import click

from tdxvm.cli.output import OUTPUT_OPTION, CliError, emit_json
from tdxvm.cli.vm import DEFAULT_URI, uri_option
from tdxvm.textsafe import safe_text


@click.command("prune")
@click.option("--dry-run", is_flag=True, help="List what would be deleted; delete nothing.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation (for scripts).")
@uri_option(DEFAULT_URI)
@OUTPUT_OPTION
def prune_cmd(dry_run: bool, yes: bool, uri: str | None, output: str) -> None:
    """Delete the image volumes no VM on the host uses, and what interrupted launches left.

    A launch uploads an image's kernel, initramfs and disk into the host's tdxvm pool
    once, and keeps them when its VMs are destroyed, so a relaunch uploads nothing;
    each rebuilt image adds its own (a disk is 1 to 3 GiB). This deletes the image
    volumes that no domain on the host uses (defined, running or shut off), the
    overlays, serial logs and scratch disks of VMs that no longer exist, and the
    partial files (.NAME.partial-PID-XXXXXXXX) of uploads that were killed. A partial
    file an upload is still writing is never deleted: on the host itself its lock
    shows that; pruning from another machine, only one untouched for 24 hours goes.
    Run it while no launch to this host is under way: a launch's volumes are unused
    until it defines its VM.
    """
    from tdxvm.launch.connection import connection
    from tdxvm.launch.volumes import delete_unused, unused_volumes

    target = uri or DEFAULT_URI
    with connection(target) as conn:
        found = unused_volumes(conn)
        if dry_run or not found:
            _report(found, target, output, deleted=False)
            return
        if not yes:
            if not sys.stdin.isatty():
                raise CliError(
                    f"prune deletes {len(found)} unused volume(s) ({_mib(found)}) on {target}; "
                    "pass --yes to confirm, or --dry-run to list them (there is no terminal to ask on)"
                )
            _print(found, "would delete")
            click.confirm(f"Delete these {len(found)} volume(s) on {target}?", abort=True)
        deleted = delete_unused(conn, found)
    _report(deleted, target, output, deleted=True)


def _report(volumes: list, target: str, output: str, *, deleted: bool) -> None:
    if output == "json":
        emit_json(
            {
                "uri": target,
                "deleted": deleted,
                "volumes": [
                    {"name": v.name, "path": v.path, "kind": v.kind, "allocation": v.allocation} for v in volumes
                ],
                "bytes": sum(v.allocation for v in volumes),
            }
        )
        return
    if not volumes:
        click.echo(f"{target}: no unused volumes in the tdxvm pool")
        return
    _print(volumes, "deleted" if deleted else "would delete")
    click.echo(f"{target}: {'freed' if deleted else 'would free'} {_mib(volumes)}")


def _print(volumes: list, verb: str) -> None:
    for v in volumes:
        why = {
            "image": "image no VM uses",
            "leftover": "left by a VM that no longer exists",
            "partial": "partial file of an upload that was killed",
        }[v.kind]
        # volume names and paths are the host's libvirt's to write
        click.echo(safe_text(f"{verb} {v.path}  {v.allocation / 2**20:,.0f} MiB  ({why})"))


def _mib(volumes: list) -> str:
    return f"{sum(v.allocation for v in volumes) / 2**20:,.0f} MiB"
