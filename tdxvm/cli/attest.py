"""``tdxvm verify-quote``, ``tdxvm collateral``, ``tdxvm eventlog``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from tdxvm.attest.chain import TrustAnchor
from tdxvm.attest.ccel import parse_ccel_table
from tdxvm.attest.collateral import load_bundle, save_bundle
from tdxvm.attest.eventlog import compare_rtmrs, parse_json_event_log, parse_tcg_event_log, replay
from tdxvm.attest.pcs import INTEL_PCS_URL, CollateralCache, PcsClient, get_collateral
from tdxvm.attest.policy import Policy, load_policy
from tdxvm.attest.quote import parse_quote, read_quote_bytes
from tdxvm.attest.verdict import Verdict, appraise
from tdxvm.cli.output import (
    EXIT_OK,
    EXIT_REFUSED,
    OUTPUT_OPTION,
    CliError,
    emit_json,
    parse_time,
)


def read_file(path: str, what: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"{what} {path}: {exc.strerror or exc}") from None


def _print_verdict(v: Verdict, source: str) -> None:
    d = v.to_dict()
    word = "ACCEPTED" if v.accepted else "REFUSED"
    color = "green" if v.accepted else "red"
    status = d["tcb_status"] or "not evaluated"
    click.echo(click.style(word, fg=color, bold=True) + f"  TCB {status}, quote v{d['quote_version']}, FMSPC {d['fmspc'] or '?'}, at {d['verified_at']}")
    click.echo(f"collateral: {source}")
    if d["advisory_ids"]:
        click.echo(f"advisories: {', '.join(d['advisory_ids'])}")
    for line in d["policy_exceptions"]:
        click.echo(click.style(f"policy exception: {line}", fg="yellow"))
    for r in d["reasons"]:
        click.echo(f"  - [{r['code']}] {r['message']}")
    m = d["measurements"]
    for key in ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "td_attributes", "report_data"):
        click.echo(f"{key:>14}: {m[key]}")


@click.command("verify-quote")
@click.argument("quote", metavar="QUOTE")
@click.option("--collateral", "bundle", metavar="BUNDLE", help="Offline collateral bundle (dcap-qvl QuoteCollateralV3 JSON).")
@click.option("--pccs", metavar="URL", help=f"PCCS or PCS base URL to fetch collateral from [default: {INTEL_PCS_URL}].")
@click.option("--root-ca", metavar="PEM", help="Trust this root CA instead of Intel's SGX Root CA.")
@click.option("--at", "at_text", metavar="ISO8601|UNIX", help="Verification time [default: now].")
@click.option("--policy", "policy_path", metavar="FILE", help="Attestation policy YAML [default: strict].")
@OUTPUT_OPTION
def verify_quote(quote: str, bundle: str | None, pccs: str | None, root_ca: str | None, at_text: str | None, policy_path: str | None, output: str) -> None:
    """Verify a TDX QUOTE (binary or hex file, - for stdin) against Intel's collateral.

    Exit 0 when accepted, 1 when refused, 2 when the input is unusable, 3 when
    collateral cannot be fetched.
    """
    if bundle and pccs:
        raise CliError("give either --collateral or --pccs, not both")
    at = parse_time(at_text)
    q = parse_quote(read_quote_bytes(read_file(quote, "quote")))
    policy = load_policy(policy_path) if policy_path else Policy()
    anchor = TrustAnchor.from_pem(read_file(root_ca, "root CA")) if root_ca else None
    if bundle:
        coll, source = load_bundle(bundle), f"bundle {bundle}"
    else:
        client = PcsClient(base_url=pccs or INTEL_PCS_URL)
        coll, how = get_collateral(q, client=client, cache=CollateralCache(), at=at)
        source = f"{how} from {client.base_url}"
    verdict = appraise(q, coll, at=at, policy=policy, trust_anchor=anchor)
    if output == "json":
        emit_json(verdict.to_dict())
    else:
        _print_verdict(verdict, source)
    sys.exit(EXIT_OK if verdict.accepted else EXIT_REFUSED)


@click.group()
def collateral() -> None:
    """Fetch and bundle Intel collateral for offline verification."""


@collateral.command("fetch")
@click.argument("quote", metavar="QUOTE")
@click.option("-o", "--output", "out", required=True, metavar="BUNDLE", help="Where to write the bundle (JSON).")
@click.option("--pccs", metavar="URL", help=f"PCCS or PCS base URL [default: {INTEL_PCS_URL}].")
def collateral_fetch(quote: str, out: str, pccs: str | None) -> None:
    """Fetch the collateral QUOTE needs and write it as an offline bundle."""
    q = parse_quote(read_quote_bytes(read_file(quote, "quote")))
    client = PcsClient(base_url=pccs or INTEL_PCS_URL)
    save_bundle(client.fetch_for_quote(q), out)
    click.echo(f"wrote {out}", err=True)


def _load_events(data: bytes, source: str) -> tuple[list, bytes | None]:
    """Events from a TCG binary log or a JSON log; a JSON object may carry the quote too."""
    text = data.lstrip()
    if text[:1] in (b"{", b"["):
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CliError(f"event log {source}: not valid JSON: {exc}") from None
        embedded = None
        if isinstance(doc, dict):
            if "event_log" not in doc:
                raise CliError(f"event log {source}: JSON object has no 'event_log' key")
            if isinstance(doc.get("quote"), str):
                embedded = read_quote_bytes(doc["quote"].encode())
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
    Exit 0 when every register matches the quote, 1 when one differs.
    """
    events, embedded = _load_events(read_file(log, "event log"), log)
    table = parse_ccel_table(read_file(ccel_table, "CCEL table")) if ccel_table else None
    rtmrs = replay(events)
    quote_bytes = read_quote_bytes(read_file(quote_path, "quote")) if quote_path else embedded
    comparison = compare_rtmrs(rtmrs, parse_quote(quote_bytes).body.rtmrs) if quote_bytes else []
    ok = all(c.matches for c in comparison)
    if output == "json":
        emit_json(
            {
                "events": len(events),
                "rtmrs": [r.hex() for r in rtmrs],
                "ccel_table": None if table is None else {"log_area_minimum_length": table.log_area_minimum_length, "log_area_start_address": table.log_area_start_address},
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
            line = f"RTMR{i}: {value.hex()}"
            if comparison:
                c = comparison[i]
                line += "  " + (click.style("matches quote", fg="green") if c.matches else click.style(f"DIFFERS from quote {c.quoted.hex()}", fg="red"))
            click.echo(line)
    sys.exit(EXIT_OK if ok else EXIT_REFUSED)
