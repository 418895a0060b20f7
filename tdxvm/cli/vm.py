"""``tdxvm launch|status|attest|stop|destroy|console``: VMs on local or remote libvirt.

``--uri`` (or ``$TDXVM_URI``) names the libvirt host; ``launch`` takes it from the VM
spec unless given. Verbs say precisely what they do: ``stop`` shuts the guest down
(powering it off after a timeout) and keeps it defined; ``destroy`` powers it off,
undefines it and deletes its disk overlay and log. Only VMs tdxvm created are touched.
"""

from __future__ import annotations

import sys
from typing import Any

import click
import yaml

from tdxvm.cli.output import EXIT_REFUSED, OUTPUT_OPTION, CliError, emit_json
from tdxvm.cli.progress import Progress
from tdxvm.cli.refusal import print_exceptions, print_refusal, reason_dicts, reason_lines
from tdxvm.textsafe import safe_text

DEFAULT_URI = "qemu:///system"


def check_uri(ctx: click.Context | None, param: click.Parameter | None, value: str | None) -> str | None:
    """``--uri`` / ``$TDXVM_URI``: the same check as a VM spec's ``uri:`` (:func:`tdxvm.launch.uris.uri_problem`)."""
    from tdxvm.launch.uris import uri_problem

    problem = uri_problem(value) if value is not None else None
    if problem is not None:
        source = ctx.get_parameter_source(param.name) if ctx is not None and param is not None and param.name else None
        raise click.BadParameter(
            problem + (" (from $TDXVM_URI)" if source == click.core.ParameterSource.ENVIRONMENT else "")
        )
    return value


def uri_option(default_note: str) -> Any:
    return click.option(
        "--uri",
        "uri",
        envvar="TDXVM_URI",
        metavar="URI",
        callback=check_uri,
        help=f"libvirt URI, e.g. qemu+ssh://user@host/system [default: $TDXVM_URI, {default_note}].",
    )


@click.command("launch")
@click.argument("spec_path", metavar="VM.yaml", type=click.Path(dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Print the domain XML and the effective policy; contact nothing.")
@uri_option("else the spec's uri")
@OUTPUT_OPTION
def launch_cmd(spec_path: str, dry_run: bool, uri: str | None, output: str) -> None:
    """Launch the VM described by VM.yaml: preflight, define, boot, attest, provision.

    With --dry-run, print the libvirt domain XML it would define and the effective
    attestation policy (the spec's keys, with MRTD/RTMR1/RTMR2 from the image manifest),
    without contacting libvirt or changing anything.
    """
    from tdxvm.cli.filekinds import refuse_other_kind
    from tdxvm.launch.spec import load_vm_spec

    refuse_other_kind(spec_path, "vm")
    vm = load_vm_spec(spec_path)
    if uri:
        if (
            uri != vm.uri
            and click.get_current_context().get_parameter_source("uri") == click.core.ParameterSource.ENVIRONMENT
        ):
            click.echo(f"note: $TDXVM_URI={uri} overrides the spec's uri {vm.uri}", err=True)
        vm = vm.model_copy(update={"uri": uri})
    if dry_run:
        _dry_run(vm, output)
        return
    code = _launch(vm, output)
    if code:
        sys.exit(code)


def _launch(spec: Any, output: str) -> int:
    """Bring ``spec`` up (:func:`tdxvm.provision.bringup.bring_up`), printing its phases;
    returns the exit code."""
    from tdxvm.launch.connection import connection
    from tdxvm.launch.manifest import load_manifest
    from tdxvm.provision import handshake
    from tdxvm.provision.bringup import PhaseEvent, bring_up
    from tdxvm.provision.endpoint import EndpointRefused
    from tdxvm.provision.trust import for_backend
    from tdxvm.secretstore import SecretStore

    manifest = load_manifest(spec.image)
    trust = for_backend(spec.backend)
    printer = Progress(output, width=9)

    def progress(event: PhaseEvent) -> None:
        printer.step(event.phase, event.status, event.seconds, event.detail)

    with connection(spec.uri) as conn:
        try:
            result = bring_up(spec, manifest, conn, trust=trust, secrets=SecretStore(), progress=progress)
        except handshake.AttestationRefused as refused:
            _report_refused(
                spec.name,
                "refused",
                f"{spec.name} did not attest; nothing was released and the VM is stopped",
                refused.reasons,
                output,
            )
            return EXIT_REFUSED
        except EndpointRefused as refused:  # the model's service, attested on its TLS key after provisioning
            _report_refused(
                spec.name,
                "service-refused",
                f"the service of {spec.name} did not attest on its TLS key; do not send it prompts",
                refused.reasons,
                output,
            )
            return EXIT_REFUSED
    if output == "json":
        emit_json(result.to_dict())
    else:
        click.echo(
            f"{spec.name} is ready: attested ({result.verdict['tcb_status'] if result.verdict else '?'}), "
            f"disk unlocked, ssh root@{result.ssh[0]} -p {result.ssh[1]}"
            if result.ssh
            else f"{spec.name} is ready"
        )
        if result.provision:
            click.echo(
                f"{spec.name} serves {result.provision['model']} at {result.provision['url']} (TLS key attested); "
                f"try: tdxvm verify-endpoint --vm {spec.name} --complete 'Once upon a time'"
            )
        at_launch = (result.verdict or {}).get("policy_exceptions") or []
        at_provision = (result.provision or {}).get("policy_exceptions") or []
        print_exceptions(dict.fromkeys([*at_launch, *at_provision]))
    return 0


def _report_refused(name: str, state: str, message: str, reasons: Any, output: str) -> None:
    print_refusal(message, reasons, output, document={"name": name, "state": state, "reasons": reason_dicts(reasons)})


def _dry_run(vm: Any, output: str) -> None:
    from tdxvm.launch.connection import is_local
    from tdxvm.launch.lifecycle import firmware_upload, render_domain
    from tdxvm.launch.manifest import load_manifest
    from tdxvm.launch.ports import choose_forwards
    from tdxvm.launch.spec import effective_policy, filled_from_manifest
    from tdxvm.launch.volumes import POOL_PATH, planned

    manifest = load_manifest(vm.image)
    policy = effective_policy(vm, manifest)
    forwards = choose_forwards(vm, manifest, taken=set(), local=is_local(vm.uri))
    volumes = planned(manifest, vm.name, firmware=firmware_upload(vm, manifest, vm.uri))
    xml = render_domain(vm, manifest, volumes=volumes, forwards=forwards, policy=policy)
    filled = list(filled_from_manifest(vm, manifest))
    policy_doc = policy.model_dump(mode="json", exclude_none=True)
    if output == "json":
        emit_json(
            {
                "dry_run": True,
                "name": vm.name,
                "uri": vm.uri,
                "backend": vm.backend,
                "manifest": str(manifest.path),
                "domain_xml": xml,
                "policy": policy_doc,
                "policy_from_manifest": filled,
                "policy_exceptions": policy.loosened(),
                "forwards": [{"address": f.host_address, "host": f.host_port, "guest": f.guest_port} for f in forwards],
            }
        )
        return
    click.echo(
        f"<!-- tdxvm launch --dry-run: VM {vm.name} ({vm.backend}) on {vm.uri}, image {manifest.name} "
        f"({manifest.path}). Nothing was defined or uploaded and libvirt was not contacted: volume paths "
        f"assume the tdxvm pool at {POOL_PATH}, and host ports are picked again at launch. -->"
    )
    click.echo(xml, nl=False)
    note = f" ({', '.join(filled)} from the image manifest)" if filled else ""
    click.echo(f"\n# effective attestation policy{note}:")
    click.echo(yaml.safe_dump(policy_doc, sort_keys=False, default_flow_style=None, width=200), nl=False)
    for line in policy.loosened():
        click.echo(f"# policy exception: {line}")


def _uptime(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _attestation(att: dict[str, Any] | None) -> str:
    if not att:
        return "none yet"
    return f"{att.get('verdict')} ({att.get('recorded_at') or att.get('verified_at') or '?'})"


@click.command("status")
@click.argument("name", required=False)
@uri_option(DEFAULT_URI)
@OUTPUT_OPTION
def status_cmd(name: str | None, uri: str | None, output: str) -> None:
    """Show tdxvm's VMs on the host (or VM NAME in detail): state, ports, attestation."""
    from tdxvm.launch.connection import connection
    from tdxvm.launch.lifecycle import status
    from tdxvm.launch.records import VmRecords
    from tdxvm.secretstore import SecretStore

    with connection(uri or DEFAULT_URI) as conn:
        vms = status(conn, name, records=VmRecords.beside(SecretStore()))
    if output == "json":
        emit_json(vms[0].to_dict() if name else {"uri": uri or DEFAULT_URI, "vms": [v.to_dict() for v in vms]})
        return
    if name:
        v = vms[0]
        rows = [
            ("name", v.name),
            ("uri", v.uri),
            ("state", v.state),
            ("backend", v.backend),
            ("image", v.image or "-"),
            ("uptime", _uptime(v.uptime_s)),
            ("agent", v.agent_endpoint or "-"),
            ("forwards", ", ".join(f"{f.host_address}:{f.host_port} -> {f.guest_port}" for f in v.forwards) or "-"),
            ("serial log", v.serial_log or "-"),
            ("attestation", _attestation(v.attestation)),
            (
                "model",
                f"{v.model['name']} at {v.model['url']}, TLS key {v.model['tls_spki_sha256'][:16]}… (attested "
                f"{v.model['at']})"
                if v.model
                else "-",
            ),
        ]
        if v.model:
            rows.append(
                (
                    "model digest",
                    f"{v.model['digest']} (the service's RTMR3 model event, attested {v.model['at']})"
                    if v.model.get("digest")
                    else "not recorded (provisioned before models were measured)",
                )
            )
        for key, value in rows:  # names, labels and paths come from the host's libvirt
            click.echo(f"{key:<12} {safe_text(value)}")
        for line in reason_lines((v.attestation or {}).get("reasons") or [], indent=" " * 13):
            click.echo(line)
        if v.record != "ok":
            click.echo(f"{'record':<12} UNTRUSTED: {safe_text(v.record_problem or v.record)}")
            return
        click.echo(
            f"{'policy':<12} {'strict defaults, every register pinned' if not v.policy_exceptions else 'EXCEPTIONS:'}"
        )
        for line in v.policy_exceptions:
            click.echo(f"{'':<12} - {line}")
        return
    if not vms:
        click.echo(f"no tdxvm VMs on {uri or DEFAULT_URI}")
        return
    table = [("NAME", "STATE", "BACKEND", "IMAGE", "AGENT", "UPTIME", "ATTESTATION", "POLICY")]
    for v in vms:
        policy = "strict" if not v.policy_exceptions else f"{len(v.policy_exceptions)} exceptions"
        if v.record != "ok":
            policy = "UNTRUSTED: " + ("no record" if v.record == "missing" else "record mismatch")
        table.append(
            (
                v.name,
                v.state,
                v.backend,
                v.image or "-",
                v.agent_endpoint or "-",
                _uptime(v.uptime_s),
                _attestation(v.attestation),
                policy,
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        click.echo("  ".join(safe_text(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@click.command("attest")
@click.argument("name")
@click.option(
    "--policy",
    "policy_path",
    metavar="FILE",
    help="Attest against this policy instead of the launch's (a VM this controller did not launch).",
)
@click.option(
    "--backend",
    type=click.Choice(["tdx", "emulated"]),
    default="tdx",
    show_default=True,
    help="With --policy: whose root the quote must chain to (Intel's, or this controller's emulated platform).",
)
@uri_option(DEFAULT_URI)
@OUTPUT_OPTION
def attest_cmd(name: str, policy_path: str | None, backend: str, uri: str | None, output: str) -> None:
    """Attest running VM NAME again with a fresh nonce, against its launch policy.

    The policy, backend and trust anchor are the controller's own record of how it
    launched NAME, never the domain's metadata (which the host writes); a VM without a
    record, or whose metadata disagrees with it, is refused unless --policy names the
    policy to use. Exit 0 if accepted, 1 if refused (every reason is printed); the
    verdict is kept in the record and shown by `tdxvm status NAME`.
    """
    from tdxvm.cli.filekinds import load_policy_file
    from tdxvm.launch.connection import connection
    from tdxvm.launch.records import VmRecords
    from tdxvm.provision import attestation, handshake
    from tdxvm.secretstore import SecretStore

    policy = load_policy_file(policy_path) if policy_path else None
    with connection(uri or DEFAULT_URI) as conn:
        try:
            guest = attestation.reattest(
                conn, name, records=VmRecords.beside(SecretStore()), policy=policy, backend=backend
            )
        except handshake.AttestationRefused as refused:
            print_refusal(
                f"{name} did not attest against its launch policy",
                refused.reasons,
                output,
                document={"name": name, "verdict": "reject", "reasons": reason_dicts(refused.reasons)},
            )
            sys.exit(EXIT_REFUSED)
    with guest:
        verdict = guest.verdict.to_dict()
    if output == "json":
        emit_json({"name": name, **verdict})
    else:
        click.echo(
            f"{name}: {verdict['verdict']}ed, TCB {verdict['tcb_status']}, provider {guest.provider}, "
            f"keys {', '.join(sorted(guest.keys))}"
        )
        for line in verdict["policy_exceptions"]:
            click.echo(f"  policy exception: {line}")


@click.command("stop")
@click.argument("name")
@click.option(
    "--timeout",
    default=60.0,
    show_default=True,
    metavar="SECONDS",
    help="Wait this long for the guest to shut down before powering it off.",
)
@uri_option(DEFAULT_URI)
@OUTPUT_OPTION
def stop_cmd(name: str, timeout: float, uri: str | None, output: str) -> None:
    """Shut VM NAME down (ACPI), power it off if it does not stop in time; it stays defined."""
    from tdxvm.launch.connection import connection
    from tdxvm.launch.lifecycle import stop
    from tdxvm.launch.ownership import Controller
    from tdxvm.secretstore import SecretStore

    with connection(uri or DEFAULT_URI) as conn:
        result = stop(conn, name, timeout=timeout, controller=Controller.of(SecretStore()))
    if output == "json":
        emit_json({"name": name, "result": result})
    else:
        click.echo(f"{name}: {result}")


@click.command("destroy")
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation (for scripts).")
@uri_option(DEFAULT_URI)
@OUTPUT_OPTION
def destroy_cmd(name: str, yes: bool, uri: str | None, output: str) -> None:
    """Power VM NAME off, undefine it, and delete its disk overlay and serial log.

    The shared image volumes stay. Domains not created by tdxvm are refused.
    """
    from tdxvm.launch.connection import connection
    from tdxvm.launch.lifecycle import destroy, lookup
    from tdxvm.launch.ownership import Controller
    from tdxvm.launch.records import VmRecords
    from tdxvm.secretstore import SecretStore

    target = uri or DEFAULT_URI
    controller = Controller.of(SecretStore())  # another controller's VM is refused (exit 1)
    with connection(target) as conn:
        lookup(conn, name, controller=controller, verb="destroy")  # refuse unknown and foreign domains before asking
        if not yes:
            if not sys.stdin.isatty():
                raise CliError(
                    f"destroy deletes VM {name} and its disk overlay on {target}; pass --yes to confirm "
                    "(there is no terminal to ask on)"
                )
            click.confirm(f"Destroy VM {name} on {target} (power off, undefine, delete its disk overlay)?", abort=True)
        report = destroy(conn, name, records=VmRecords.beside(SecretStore()), controller=controller)
    if output == "json":
        emit_json({"name": name, "was_running": report.was_running, "deleted_volumes": list(report.deleted_volumes)})
        return
    done = ("powered off, " if report.was_running else "") + "undefined"
    if report.deleted_volumes:
        done += "; deleted " + ", ".join(report.deleted_volumes)
    click.echo(safe_text(f"{name}: {done}"))  # volume paths come from the host's libvirt


@click.command("console")
@click.argument("name")
@click.option("--lines", "-n", default=50, show_default=True, type=click.IntRange(min=0), help="How many lines.")
@uri_option(DEFAULT_URI)
@OUTPUT_OPTION
def console_cmd(name: str, lines: int, uri: str | None, output: str) -> None:
    """Print the last lines of VM NAME's serial console log (escape sequences removed)."""
    from tdxvm.launch.connection import connection
    from tdxvm.launch.console import serial_log_tail

    with connection(uri or DEFAULT_URI) as conn:
        text = serial_log_tail(conn, name, lines=lines)
    if output == "json":
        emit_json({"name": name, "lines": text.splitlines()})
    else:
        click.echo(text, nl=False)
