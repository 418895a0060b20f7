"""``tdxvm verify-quote``, ``tdxvm collateral``, ``tdxvm eventlog``."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import NoReturn

import click

from tdxvm.attest.chain import TrustAnchor
from tdxvm.attest.collateral import INTEL_PCS_URL, CollateralOrigin, load_bundle, save_bundle
from tdxvm.attest.duration import format_duration
from tdxvm.attest.errors import QuoteFormatError
from tdxvm.attest.policyrules import StrictPolicy
from tdxvm.attest.quote import Quote
from tdxvm.attest.quotefile import load_quote
from tdxvm.attest.tcb import TD_RELAUNCH_STATUSES
from tdxvm.attest.verdict import QuoteRefusal, Verdict, appraise
from tdxvm.attest.verifiedcache import VerifiedCache
from tdxvm.attest.verify import QuoteVerifier
from tdxvm.cli.output import (
    EXIT_OK,
    EXIT_REFUSED,
    OUT_FILE,
    OUTPUT_OPTION,
    CliError,
    check_pccs,
    emit_json,
    json_verdict,
    parse_time,
    wrote,
)
from tdxvm.cli.refusal import print_exceptions, print_refusal, reason_lines
from tdxvm.textsafe import safe_text


def read_file(path: str, what: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"{what} {path}: {exc.strerror or exc}") from None


def read_quote(path: str) -> Quote:
    """The QUOTE a command works with (not one it judges, as verify-quote does): a file
    that is not a TDX quote is unusable input, exit 2 with the first message of
    :func:`~tdxvm.attest.quotefile.load_quote` (an empty file, base64 or PEM text, JSON…)."""
    return load_quote(read_file(path, "quote"))


def _print_verdict(v: Verdict, source: str | None = None) -> None:
    """The verdict for people; ``source``: where its collateral came from [default: its origin]."""
    d = v.to_dict()
    word = "ACCEPTED" if v.accepted else "REFUSED"
    color = "green" if v.accepted else "red"
    status = d["tcb_status"] or "not evaluated"
    click.echo(
        click.style(word, fg=color, bold=True)
        + f"  TCB {status}, quote v{d['quote_version']}, FMSPC {d['fmspc'] or '?'}, at {d['verified_at']}"
    )
    if source is None:
        source = v.origin.describe() if v.origin else "none (not looked up: the quote's PCK chain names no platform)"
    click.echo(f"collateral: {source}" + _freshness(d["collateral"], v.result.at))
    if d["advisory_ids"]:
        click.echo(f"advisories: {', '.join(d['advisory_ids'])}")
    if d["tcb_status"] in TD_RELAUNCH_STATUSES:
        click.echo(click.style(_relaunch_advice(d["tcb_status"], d["tcb"]), fg="yellow"))
    print_exceptions(d["policy_exceptions"])
    for line in reason_lines(d["reasons"]):
        click.echo(line)
    m = d["measurements"]
    for key in ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "td_attributes", "report_data"):
        click.echo(f"{key:>14}: {m[key]}")


def _freshness(c: dict, at: datetime) -> str:
    """ "; TCB evaluation data number 17, issued … (3d4h before the verification time), next update …"."""
    if c["issue_date"] is None:
        return "; not verified, so its date and TCB evaluation data number are not shown"
    age = at - datetime.fromisoformat(c["issue_date"].replace("Z", "+00:00"))
    when = f"{format_duration(age)} before" if age.total_seconds() >= 0 else f"{format_duration(-age)} after"
    return (
        f"; TCB evaluation data number {c['tcb_evaluation_data_number']}, issued {c['issue_date']} ({when} the "
        f"verification time), next update {c['next_update']}"
    )


def _relaunch_advice(status: str, tcb: dict) -> str:
    configure = (
        ", and configure the platform as its advisories ask" if status == "TDRelaunchAdvisedConfigurationNeeded" else ""
    )
    return (
        f"TD relaunch advised: the TD launched on a TDX module whose TCB is {tcb['launch_status']}; "
        f"the module running now (TEE_TCB_SVN2) is {tcb['current_status']}: "
        f"relaunch the TD to pick up the updated TDX module{configure}"
    )


def _answer(v: Verdict | QuoteRefusal, output: str) -> NoReturn:
    if isinstance(v, QuoteRefusal):
        print_refusal("not a TDX quote tdxvm can read", v.to_dict()["reasons"], output, document=v.to_dict())
    elif output == "json":
        emit_json(v.to_dict())
    else:
        _print_verdict(v)
    sys.exit(EXIT_OK if v.accepted else EXIT_REFUSED)


@json_verdict
@click.command("verify-quote")
@click.argument("quote", metavar="QUOTE")
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
@click.option("--policy", "policy_path", metavar="FILE", help="Attestation policy YAML [default: strict].")
@click.option(
    "--no-cache",
    is_flag=True,
    help="Check every collateral and PCK signature again; neither read nor write "
    "the verified-collateral cache (~/.cache/tdxvm/verified).",
)
@OUTPUT_OPTION
def verify_quote(
    quote: str,
    bundle: str | None,
    pccs: str | None,
    root_ca: str | None,
    at_text: str | None,
    policy_path: str | None,
    no_cache: bool,
    output: str,
) -> None:
    """Verify a TDX QUOTE (binary or hex file, - for stdin) against Intel's collateral.

    Exit 0 when accepted; 1 when refused, a QUOTE that is not a TDX quote tdxvm reads
    included (reason quote-format); 2 when the verifier's own input is unusable (a file
    it cannot read, collateral, policy, root CA, arguments); 3 when collateral cannot be
    fetched. With -o json the object always has a verdict: accept, reject or error.
    """
    if bundle and pccs:
        raise CliError("give either --collateral or --pccs, not both")
    at = parse_time(at_text)
    if policy_path:
        from tdxvm.cli.filekinds import load_policy_file

        policy = load_policy_file(policy_path)
    else:
        policy = StrictPolicy()  # Policy()'s values, without pydantic
    anchor = TrustAnchor.from_pem(read_file(root_ca, "root CA")) if root_ca else None
    data = read_file(quote, "quote")
    coll = load_bundle(bundle) if bundle else None  # the verifier's inputs first: exit 2 before any verdict
    try:
        q = load_quote(data)
    except QuoteFormatError as exc:
        _answer(QuoteRefusal(error=exc, policy=policy, at=at), output)
    if coll is None:
        from tdxvm.attest.pcs import CollateralCache, PcsClient, get_collateral  # the HTTP stack, only when needed

        client = PcsClient(base_url=pccs or INTEL_PCS_URL)
        coll = partial(get_collateral, client=client, cache=CollateralCache(), at=at)
    verifier = QuoteVerifier(trust_anchor=anchor, verified_cache=None if no_cache else VerifiedCache())
    origin = CollateralOrigin("bundle", bundle) if bundle else None
    _answer(appraise(q, coll, at=at, policy=policy, verifier=verifier, origin=origin), output)


@click.group()
def collateral() -> None:
    """Fetch and bundle Intel collateral for offline verification; show the cached copies."""


@collateral.command("fetch")
@click.argument("quote", metavar="QUOTE")
@click.option("--out", "out", required=True, type=OUT_FILE, metavar="BUNDLE", help="Where to write the bundle (JSON).")
@click.option("--pccs", metavar="URL", callback=check_pccs, help=f"PCCS or PCS base URL [default: {INTEL_PCS_URL}].")
@OUTPUT_OPTION
def collateral_fetch(quote: str, out: str, pccs: str | None, output: str) -> None:
    """Fetch the collateral QUOTE needs and write it as an offline bundle."""
    from tdxvm.attest.pcs import PcsClient

    q = read_quote(quote)
    client = PcsClient(base_url=pccs or INTEL_PCS_URL)
    save_bundle(client.fetch_for_quote(q), out)
    wrote(out, output)


def _iso(when: datetime) -> str:
    return when.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


@collateral.command("status")
@click.option(
    "--pccs",
    metavar="URL",
    callback=check_pccs,
    help="Only the collateral cached for this PCCS or PCS [default: every service's].",
)
@OUTPUT_OPTION
def collateral_status(pccs: str | None, output: str) -> None:
    """Show the cached collateral per FMSPC: TCB evaluation data number, issue date, next update.

    The cache is what verify-quote falls back on when the PCS/PCCS cannot be reached;
    these values are read from it, not verified (verify-quote verifies). STATE is the
    cached copy's state now: usable, expired or not yet valid.
    """
    from tdxvm.attest.pcs import CollateralCache, service_url

    cache, now = CollateralCache(), datetime.now(timezone.utc)
    named = {cache.service_id(u): u for u in (INTEL_PCS_URL, service_url(pccs) if pccs else None) if u}
    rows = []
    for e in cache.entries():
        if pccs and e.service_id != cache.service_id(service_url(pccs)):
            continue
        s = e.summary
        state = (
            "unreadable"
            if s is None
            else "usable"
            if s.window.contains(now)
            else "expired"
            if now >= s.window.not_after
            else "not yet valid"
        )
        rows.append(
            {
                "fmspc": e.fmspc,
                "ca": e.ca,
                "service": named.get(e.service_id),
                "service_id": e.service_id,
                "path": str(e.path),
                "tcb_evaluation_data_number": s.tcb_evaluation_data_number if s else None,
                "issue_date": _iso(s.issue_date) if s else None,
                "next_update": _iso(s.window.not_after) if s else None,
                "next_update_of": s.window.expires_first if s else None,
                "state": state,
                "error": e.error,
            }
        )
    if output == "json":
        emit_json({"directory": str(cache.directory), "at": _iso(now), "entries": rows})
        return
    click.echo(f"cached collateral in {cache.directory} (read, not verified)")
    if not rows:
        click.echo("  none" + (f" for {service_url(pccs)}" if pccs else ""))
    for r in rows:
        service = r["service"] or f"service {r['service_id']}"
        if r["error"]:
            click.echo(f"{r['fmspc']}  {r['ca']:<9}  {service}: unreadable: {safe_text(r['error'])}")
            continue
        click.echo(
            f"{r['fmspc']}  {r['ca']:<9}  {service}: TCB evaluation data number {r['tcb_evaluation_data_number']}, "
            f"issued {r['issue_date']}, next update {r['next_update']} ({r['next_update_of']}): {r['state']}"
        )


def _load_events(data: bytes, source: str) -> tuple[list, bytes | None]:
    """Events from a TCG binary log or a JSON log; a JSON object may carry the quote too
    (its text, as a quote file holds it)."""
    from tdxvm.attest.eventlog import parse_json_event_log, parse_tcg_event_log  # only the eventlog commands need it

    text = data.lstrip()
    if text[:1] in (b"{", b"["):
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CliError(f"event log {source}: not valid JSON: {exc}") from None
        except RecursionError:
            raise CliError(f"event log {source}: JSON nested too deeply") from None
        embedded = None
        if isinstance(doc, dict):
            if "event_log" not in doc:
                raise CliError(f"event log {source}: JSON object has no 'event_log' key")
            if "quote" in doc:  # present: it must be a quote, never silently nothing to compare with
                if not isinstance(doc["quote"], str) or not doc["quote"].strip():
                    raise CliError(
                        f"event log {source}: 'quote' is not a quote's text (hex or base64, as a quote file holds it)"
                    )
                embedded = doc["quote"].encode()
            doc = doc["event_log"]
        return parse_json_event_log(doc), embedded
    return parse_tcg_event_log(data), None


@click.group()
def eventlog() -> None:
    """Inspect and replay TDX event logs (CCEL / TCG2, or JSON runtime logs)."""


@eventlog.command("replay")
@click.argument("log", metavar="LOG")
@click.option("--quote", "quote_path", metavar="QUOTE", help="Compare the replayed RTMRs with this quote's.")
@click.option("--ccel-table", metavar="FILE", help="CCEL ACPI table to check alongside the log.")
@OUTPUT_OPTION
def eventlog_replay(log: str, quote_path: str | None, ccel_table: str | None, output: str) -> None:
    """Replay LOG into RTMR0..3 and, with a quote, name every register that differs.

    LOG is a binary CCEL/TCG2 crypto-agile log or JSON (a list of events with imr,
    event_type, digest, event, event_payload; or an object with event_log and quote).
    Exit 0 when every register matches the quote, 1 when one differs. Without a quote
    it prints the replayed registers, says nothing was compared, and exits 0. The quote
    is compared, not verified: `tdxvm verify-quote` does that.
    """
    from tdxvm.attest.ccel import parse_ccel_table
    from tdxvm.attest.eventlog import compare_rtmrs, replay

    events, embedded = _load_events(read_file(log, "event log"), log)
    table = parse_ccel_table(read_file(ccel_table, "CCEL table")) if ccel_table else None
    rtmrs = replay(events)
    quote = read_quote(quote_path) if quote_path else load_quote(embedded) if embedded else None
    comparison = compare_rtmrs(rtmrs, quote.body.rtmrs) if quote else []
    ok = all(c.matches for c in comparison)
    if output == "json":
        emit_json(
            {
                "events": len(events),
                "rtmrs": [r.hex() for r in rtmrs],
                "ccel_table": None
                if table is None
                else {
                    "log_area_minimum_length": table.log_area_minimum_length,
                    "log_area_start_address": table.log_area_start_address,
                },
                "comparison": [
                    {"rtmr": c.index, "replayed": c.replayed.hex(), "quoted": c.quoted.hex(), "matches": c.matches}
                    for c in comparison
                ],
                "matches": ok if comparison else None,
            }
        )
    else:
        click.echo(f"{len(events)} events replayed")
        for i, value in enumerate(rtmrs):
            line = f"RTMR{i}: {value.hex()}"  # hex only: nothing to escape, and the colour codes must stay codes
            if comparison:
                c = comparison[i]
                line += "  " + (
                    click.style("matches quote", fg="green")
                    if c.matches
                    else click.style(f"DIFFERS from quote {c.quoted.hex()}", fg="red")
                )
            click.echo(line)
        if not comparison:
            click.echo("no quote: nothing compared (give --quote QUOTE)")
    sys.exit(EXIT_OK if ok else EXIT_REFUSED)
