"""``tdxvm verify-endpoint``: attest an inference endpoint and show the TLS key to pin."""

from __future__ import annotations

import sys
from typing import Any

import click

from tdxvm.attest.chain import TrustAnchor
from tdxvm.attest.collateral import Collateral, CollateralOrigin, load_bundle
from tdxvm.attest.pcs import INTEL_PCS_URL, CollateralCache, PcsClient, get_collateral
from tdxvm.attest.policy import Policy
from tdxvm.attest.quote import Quote
from tdxvm.cli.attest import _print_verdict, read_file
from tdxvm.cli.filekinds import load_policy_file
from tdxvm.cli.output import (
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    OUTPUT_OPTION,
    CliError,
    check_pccs,
    emit_json,
    parse_time,
)
from tdxvm.cli.refusal import print_refusal, reason_dicts
from tdxvm.cli.vm import check_uri
from tdxvm.provision.endpoint import EndpointError, EndpointRefused, EndpointUnreachable, verify_endpoint
from tdxvm.textsafe import safe_text


@click.command("verify-endpoint")
@click.argument("url", metavar="URL", required=False)
@click.option(
    "--vm",
    "vm_name",
    metavar="NAME",
    help="The service of tdxvm VM NAME: its URL, launch policy and backend's trust anchor.",
)
@click.option(
    "--uri",
    "uri",
    envvar="TDXVM_URI",
    metavar="URI",
    callback=check_uri,
    help="libvirt URI of --vm's host [default: $TDXVM_URI, qemu:///system].",
)
@click.option(
    "--policy", "policy_path", metavar="FILE", help="Attestation policy YAML; must name mrtd, rtmr1 and rtmr2."
)
@click.option(
    "--collateral", "bundle", metavar="BUNDLE", help="Offline collateral bundle (dcap-qvl QuoteCollateralV3 JSON)."
)
@click.option(
    "--pccs",
    metavar="URL",
    callback=check_pccs,
    help=f"PCCS or PCS base URL to fetch collateral from [default: {INTEL_PCS_URL}].",
)
@click.option("--root-ca", metavar="PEM", help="Trust this root CA instead of Intel's SGX Root CA.")
@click.option("--at", "at_text", metavar="ISO8601|UNIX", help="Verification time [default: now].")
@click.option(
    "--model-digest",
    "digest_text",
    metavar="HEX",
    help="The model it must serve: its model digest (sha256:HEX or HEX, "
    "as `tdxvm weights encrypt` prints it) [default with --vm: the digest recorded when tdxvm provisioned it].",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=30.0,
    show_default=True,
    help="Seconds the attestation exchange may take in all (connect, TLS, the answer).",
)
@click.option(
    "--complete",
    "prompt",
    metavar="PROMPT",
    help="Once accepted, ask for a completion of PROMPT on the pinned connection.",
)
@click.option(
    "--chat", "chat", metavar="MESSAGE", help="Once accepted, send MESSAGE as a chat and stream the answer (pinned)."
)
@click.option(
    "--max-tokens", type=click.IntRange(1, 4096), default=32, show_default=True, help="For --complete and --chat."
)
@click.option(
    "--api-key",
    "api_key_name",
    metavar="NAME",
    help="For --complete and --chat: send API key api-keys/NAME from the secret store [default: $TDXVM_API_KEY, "
    "else with --vm the first key tdxvm provisioned it with].",
)
@OUTPUT_OPTION
def verify_endpoint_cmd(
    url: str | None,
    vm_name: str | None,
    uri: str | None,
    policy_path: str | None,
    bundle: str | None,
    pccs: str | None,
    root_ca: str | None,
    at_text: str | None,
    digest_text: str | None,
    timeout: float,
    prompt: str | None,
    chat: str | None,
    max_tokens: int,
    api_key_name: str | None,
    output: str,
) -> None:
    """Attest the inference endpoint at URL (https://HOST:PORT) and print the TLS key to pin.

    Sends a fresh nonce to URL/v1/attestation on the TLS connection it checks, and
    accepts only a genuine quote that passes the policy and whose REPORTDATA binds the
    nonce and the key that connection presented. With --vm NAME instead of URL, the
    endpoint, the policy and the trust anchor are those tdxvm launched NAME with, from
    the controller's own record of it (a VM without one is refused). The service's
    RTMR3 event log must replay to the quote's RTMR3; with --model-digest (or --vm, for
    a VM tdxvm provisioned) its latest model event must name that model digest, so a
    service serving another model is refused before any prompt is sent. Then
    --complete / --chat talk to the API only on the attested key, with an API key
    (--api-key) sent only once the endpoint is accepted. Exit 0 when accepted,
    1 when refused, 2 when the input is unusable, 3 when the endpoint or collateral
    cannot be reached.
    """
    if bundle and pccs:
        raise CliError("give either --collateral or --pccs, not both")
    if (url is None) == (vm_name is None):
        raise CliError("give the endpoint's URL or --vm NAME (one of them)")
    at = parse_time(at_text)
    digest = _digest(digest_text) if digest_text else None
    policy = load_policy_file(policy_path) if policy_path else Policy()
    anchor = TrustAnchor.from_pem(read_file(root_ca, "root CA")) if root_ca else None
    sources: list[str] = []
    collateral: Collateral | Any
    trust = None
    published: str | None = None  # --vm: the URL clients use, when the check went through the host's SSH
    key_names: list[str] = []  # --vm: the API keys it was provisioned with
    if vm_name is not None:
        url, published, vm_policy, trust, recorded, key_names = _vm_endpoint(vm_name, uri)
        policy = policy if policy_path else vm_policy
        anchor = anchor or trust.trust_anchor
        digest = digest or recorded
    assert url is not None
    api_key = _api_key(api_key_name, key_names) if (prompt or chat) else None
    if trust is not None and trust.backend == "emulated" and not (bundle or pccs):
        collateral = trust.collateral
        sources.append("the emulated platform's")
    elif bundle:
        collateral = load_bundle(bundle)
        sources.append(f"bundle {bundle}")
    else:
        client = PcsClient(base_url=pccs or INTEL_PCS_URL)

        def collateral(quote: Quote) -> tuple[Collateral, CollateralOrigin]:
            coll, origin = get_collateral(quote, client=client, cache=CollateralCache(), at=at)
            sources.append(origin.describe())
            return coll, origin

    try:
        endpoint = verify_endpoint(
            url, collateral=collateral, policy=policy, trust_anchor=anchor, at=at, timeout=timeout, model_digest=digest
        )
    except EndpointRefused as exc:
        _report_refused(exc, sources, output, published)
        sys.exit(EXIT_REFUSED)
    except EndpointUnreachable as exc:
        _error(exc, output)
        sys.exit(EXIT_UNREACHABLE)
    except EndpointError as exc:  # a URL we cannot use
        raise CliError(str(exc)) from None
    if output == "json":
        answer = _talk(endpoint, prompt, chat, max_tokens, output, api_key) if (prompt or chat) else {}
        emit_json(
            {
                **endpoint.to_dict(),
                **_through(endpoint.url, published),
                "reasons": [],
                "collateral": sources[0] if sources else None,
                **answer,
            }
        )
    else:
        _print_verdict(endpoint.verdict, sources[0] if sources else "-")
        for line in endpoint.verdict.to_dict()["checked_by_event_log"]:
            click.echo(click.style(f"checked: {line}", fg="green"))
        _print_endpoint(_shown(endpoint.url, published), endpoint.tls_spki_sha256, endpoint.provider, pinned=True)
        _print_model(endpoint)
        log = endpoint.event_log_check()
        if log is not None:
            match = log.get("rtmrs_match")
            click.echo(
                f"     event log: {log['bytes']} bytes, "
                + (
                    f"{log['events']} events, replay matches RTMR "
                    + ",".join(str(i) for i, ok in enumerate(match) if ok)
                    if match is not None
                    else safe_text(log["error"])
                )
            )
        if prompt or chat:
            _talk(endpoint, prompt, chat, max_tokens, output, api_key)
    sys.exit(EXIT_OK)


def _digest(text: str) -> bytes:
    from tdxvm.guest.modeldigest import parse_digest

    try:
        return parse_digest(text)
    except ValueError as exc:
        raise CliError(f"--model-digest: {exc}") from None


def _api_key(name: str | None, recorded: list[str]) -> str | None:
    from tdxvm.guest.apikeys import ApiKeysError
    from tdxvm.provision.apikeys import client_key
    from tdxvm.secretstore import SecretStore, SecretStoreError

    try:
        return client_key(SecretStore(), name, recorded)
    except (ApiKeysError, SecretStoreError) as exc:
        raise CliError(f"--api-key: {exc}") from None


def _vm_endpoint(name: str, uri: str | None) -> tuple[str, str | None, Policy, Any, bytes | None, list[str]]:
    """The URL to check, the published URL when that is another (a tunnel through the
    host's SSH to its loopback), policy, trust, provisioned model digest and API key
    names of VM ``name``, from the controller's record of it (never the domain's
    metadata, which its host writes)."""
    from tdxvm.launch.connection import connection
    from tdxvm.launch.records import VmRecords
    from tdxvm.provision.attestation import trusted_vm
    from tdxvm.provision.model import checked_service_url, recorded_digest, service_url
    from tdxvm.secretstore import SecretStore

    with connection(uri or "qemu:///system") as conn:
        record, trust = trusted_vm(conn, name, VmRecords.beside(SecretStore()))
    checked, published = checked_service_url(record), service_url(record)
    keys = list((record.model or {}).get("api_keys") or [])
    return checked, (published if published != checked else None), record.policy, trust, recorded_digest(record), keys


def _through(checked: str, published: str | None) -> dict[str, str]:
    """For -o json: the published URL as ``url``, and where it was checked, when they differ."""
    return {"url": published, "checked_at": checked} if published else {}


def _shown(checked: str, published: str | None) -> str:
    return f"{published} (checked through the host's SSH, at {checked})" if published else checked


def _print_model(endpoint: Any) -> None:
    """The served model as RTMR3's replayed log names it, and whether it was checked."""
    check = endpoint.rtmr3
    if check is None or not check.present:
        click.echo("         model: not measured (the service returned no RTMR3 event log)")
        return
    m = endpoint.model
    if m is None:
        click.echo(f"         model: none measured (RTMR3 log of {check.events} events replays to the quote)")
        return
    how = "the expected digest" if check.model_checked else "not checked: give --model-digest"
    click.echo(
        f"         model: {safe_text(m.name)} {m.digest_text} ({safe_text(m.dtype)}), "
        f"the latest of {len(check.history)} model event(s) in an RTMR3 log that replays to the quote; {how}"
    )


def _talk(
    endpoint: Any, prompt: str | None, chat: str | None, max_tokens: int, output: str, api_key: str | None
) -> dict[str, Any]:
    """--complete / --chat on the pinned session; printed as it streams for people."""
    from tdxvm.provision.client import ApiClient

    out: dict[str, Any] = {}
    with ApiClient(endpoint, api_key=api_key) as client:
        if prompt is not None:
            doc = client.complete(prompt, max_tokens=max_tokens)
            out["completion"] = doc["choices"][0]["text"]
            out["usage"] = doc.get("usage")
            if output == "text":
                click.echo(
                    f"    completion: ({safe_text(doc.get('model'))}, pinned) {prompt}"
                    + click.style(safe_text(out["completion"]), bold=True)
                )
        if chat is not None:
            if output == "text":
                click.echo("          chat: (streamed, pinned) ", nl=False)
            pieces = []
            for piece in client.chat_stream([{"role": "user", "content": chat}], max_tokens=max_tokens):
                pieces.append(piece)
                if output == "text":
                    click.echo(safe_text(piece), nl=False)
            if output == "text":
                click.echo()
            out["chat"] = "".join(pieces)
    return out


def _print_endpoint(url: str, spki_sha256: str | None, provider: str | None, *, pinned: bool) -> None:
    click.echo(f"      endpoint: {url}")
    click.echo(
        f"       TLS key: SPKI SHA-256 {spki_sha256 or '?'}"
        + (" (pin this)" if pinned else " (presented, not trusted)")
    )
    click.echo(f"quote provider: {safe_text(provider or '?')}")


def _report_refused(exc: EndpointRefused, sources: list[str], output: str, published: str | None = None) -> None:
    """The refusal; in text a verified quote's whole verdict (its reasons included), and
    the key the endpoint presented."""
    if output == "text" and exc.verdict is not None:
        _print_verdict(exc.verdict, sources[0] if sources else "-")
    else:
        document = {
            "url": exc.url,
            **_through(exc.url, published),
            "verdict": "reject",
            "tls_spki_sha256": exc.tls_spki_sha256,
            "provider": exc.provider,
            "reasons": reason_dicts(exc.reasons),
            "attestation": exc.verdict.to_dict() if exc.verdict else None,
            "collateral": sources[0] if sources else None,
        }
        print_refusal("the endpoint gave no quote to verify", exc.reasons, output, document=document)
    if output == "text":
        _print_endpoint(_shown(exc.url, published), exc.tls_spki_sha256, exc.provider, pinned=False)


def _error(exc: EndpointError, output: str) -> None:
    if output == "json":
        emit_json({"error": {"code": exc.code, "message": str(exc)}})
    else:
        click.echo(f"error: {safe_text(exc)}", err=True)
