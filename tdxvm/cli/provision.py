"""``tdxvm provision NAME --model ENC_DIR``: encrypted weights, key and service into an attested VM."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from tdxvm.cli.output import EXIT_REFUSED, OUTPUT_OPTION, CliError, emit_json
from tdxvm.cli.progress import Progress
from tdxvm.cli.refusal import print_exceptions, print_refusal, reason_dicts
from tdxvm.cli.vm import DEFAULT_URI, uri_option
from tdxvm.guest.engine import DTYPES, MAX_BATCH, MAX_KV_CACHE_MIB


def _progress(output: str) -> Callable[[str, dict[str, Any]], None]:
    """:func:`tdxvm.provision.model.provision`'s events through the CLI's progress printer."""
    printer = Progress(output, width=8)

    def progress(phase: str, details: dict[str, Any]) -> None:
        if phase == "upload":
            printer.meter("upload", details["held"], details["total"], details["seconds"])
        elif phase == "retry":
            printer.note("upload", f"interrupted ({details['error']}); resuming (try {details['attempt'] + 1})")
        elif phase == "scratch":
            printer.note("scratch", "waiting for the guest to format its scratch disk (done once per boot)")
        elif phase == "api-keys":
            made = ", ".join(details["made"])
            printer.note("api-keys", f"made API key {made} in {details['store']} (`tdxvm apikey show {made}`)")
        elif phase == "install" and details.get("skipped"):
            printer.note("install", "this model is already installed in the guest; skipping the upload")
        elif phase == "service":
            printer.note(
                "service",
                f"starting; waiting for {details['url']} to attest and load the model"
                if details.get("restart")
                else f"running with these settings; attesting {details['url']}",
            )
        else:
            printer.note(phase, "")  # attest, install: the phase begins

    return progress


@click.command("provision")
@click.argument("name")
@click.option(
    "--model", "enc_dir", required=True, metavar="ENC_DIR", help="Encrypted model folder (tdxvm weights encrypt)."
)
@click.option("--model-name", metavar="NAME", help="The `model` clients ask for [default: ENC_DIR's name].")
@click.option(
    "--key-name", metavar="NAME", help="Model key in the secret store, weights/NAME [default: ENC_DIR's name]."
)
@click.option(
    "--dtype", type=click.Choice(DTYPES), default="float32", show_default=True, help="Weights dtype in the guest."
)
@click.option("--threads", type=click.IntRange(min=1), help="torch threads in the guest [default: torch's choice].")
@click.option(
    "--max-batch", type=click.IntRange(1, MAX_BATCH), help="Requests the service decodes together [default: 16]."
)
@click.option(
    "--kv-cache-mib",
    type=click.IntRange(1, MAX_KV_CACHE_MIB),
    help="KV cache for the running batch at its worst [default: --max-batch full contexts, at most half the "
    "memory free after loading].",
)
@click.option(
    "--api-key",
    "api_keys",
    multiple=True,
    metavar="NAME",
    help="An API key the service accepts, api-keys/NAME in the secret store (repeat; the set replaces the "
    "service's) [default: default, made on first use].",
)
@click.option(
    "--via",
    type=click.Choice(["tcp", "ssh"]),
    help="Bulk streams on plain TCP through the VM's forward, or inside "
    "the SSH session [default: tcp when the VM forwards the receiver port].",
)
@click.option("--streams", type=click.IntRange(1, 16), default=2, show_default=True, help="Parallel bulk streams.")
@click.option(
    "--timeout",
    "service_timeout",
    type=click.FloatRange(min=1),
    default=900.0,
    show_default=True,
    help="Seconds to wait for the service to load the model.",
)
@uri_option(DEFAULT_URI)
@OUTPUT_OPTION
def provision_cmd(
    name: str,
    enc_dir: str,
    model_name: str | None,
    key_name: str | None,
    dtype: str,
    threads: int | None,
    max_batch: int | None,
    kv_cache_mib: int | None,
    api_keys: tuple[str, ...],
    via: str | None,
    streams: int,
    service_timeout: float,
    uri: str | None,
    output: str,
) -> None:
    """Give running VM NAME the model in ENC_DIR and start its inference service.

    Attests NAME again, releases the API key set (hashes) and the model key sealed to
    its attested key, uploads the encrypted weights (resumable: run it again after an interruption), has the guest
    decrypt and verify them all or nothing, starts the service and attests it on its TLS
    key. Exit 0 when serving, 1 when an attestation was refused, 2 on bad input or a
    failed step, 3 when the guest or its service does not answer.
    """
    from pydantic import ValidationError

    from tdxvm.launch.connection import connection
    from tdxvm.launch.spec import ModelRef
    from tdxvm.provision import handshake
    from tdxvm.provision.endpoint import EndpointRefused
    from tdxvm.provision.model import provision

    try:
        fields = {
            "path": enc_dir,
            "name": model_name,
            "key": key_name,
            "dtype": dtype,
            "threads": threads,
            "max_batch": max_batch,
            "kv_cache_mib": kv_cache_mib,
        }
        spec = ModelRef.model_validate(fields | ({"api_keys": api_keys} if api_keys else {}))
    except ValidationError as exc:
        options = {"path": "--model", "name": "--model-name", "key": "--key-name", "api_keys": "--api-key"}
        where = [options.get(str(e["loc"][0]), str(e["loc"][0])) if e["loc"] else "--model" for e in exc.errors()]
        raise CliError(
            "; ".join(
                f"{w}: {e['msg'].removeprefix('Value error, ')}" for w, e in zip(where, exc.errors(), strict=True)
            )
        ) from None
    with connection(uri or DEFAULT_URI) as conn:
        try:
            result = provision(
                conn, name, spec, progress=_progress(output), via=via, streams=streams, service_timeout=service_timeout
            )
        except (handshake.AttestationRefused, EndpointRefused) as refused:
            what = "the service's endpoint" if isinstance(refused, EndpointRefused) else name
            print_refusal(
                f"{what} did not attest; the model key was not released to it",
                refused.reasons,
                output,
                document={"name": name, "state": "refused", "reasons": reason_dicts(refused.reasons)},
            )
            sys.exit(EXIT_REFUSED)
    if output == "json":
        emit_json(result.to_dict())
        return
    up = result.upload
    if up:
        click.echo(
            f"uploaded {up['sent_bytes'] / 2**20:,.1f} MiB via {up['via']} ×{up['streams']} in {up['seconds']:.1f} s "
            f"({up['bytes_per_second'] / 2**20:,.0f} MiB/s)"
            + (f", {up['resumed_bytes'] / 2**20:,.1f} MiB resumed" if up["resumed_bytes"] else "")
        )
    inst = result.install or {}
    if "files" in inst:
        click.echo(
            f"installed {inst['files']} files ({inst['bytes'] / 2**20:,.1f} MiB) "
            f"decrypted and verified in {inst['seconds']:.1f} s"
        )
    ep = result.endpoint or {}
    click.echo(
        f"{name} serves {result.model} at {result.url}, "
        f"TLS key SPKI SHA-256 {ep.get('tls_spki_sha256', '?')} (attested)"
    )
    click.echo(
        f"model digest {result.model_digest}: the service measured it into RTMR3 (checked, and recorded for --vm)"
    )
    click.echo(f"API keys it accepts: {', '.join(result.api_keys)} (`tdxvm apikey show NAME` prints one)")
    print_exceptions(result.policy_exceptions)
    click.echo(f"try: tdxvm verify-endpoint --vm {name} --complete 'Once upon a time'")
