"""``tdxvm emulate``: the emulated TDX platform (private root CA, collateral, quotes).

For tests, CI and trying tdxvm without TDX hardware. Quotes it signs verify only
against its own root CA (``--root-ca DIR/root-ca.pem``), never against Intel's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from tdxvm.cli.output import OUT_FILE, OUT_FOLDER, OUTPUT_OPTION, CliError, emit_json, parse_time, wrote
from tdxvm.emulate import EmulatedPlatform

ROOT_CA_FILE = "root-ca.pem"


def _load(folder: str, at_text: str | None) -> EmulatedPlatform:
    if not (Path(folder) / ROOT_CA_FILE).is_file():
        raise CliError(f"{folder}: no emulated platform here (create one with 'tdxvm emulate init {folder}')")
    try:
        return EmulatedPlatform.load(folder, at=parse_time(at_text))
    except (OSError, ValueError, TypeError) as exc:
        raise CliError(f"{folder}: cannot load the emulated platform: {exc}") from None


def _hex(value: str | None, size: int, option: str) -> bytes | None:
    if value is None:
        return None
    try:
        raw = bytes.fromhex(value.removeprefix("0x"))
    except ValueError:
        raise CliError(f"{option}: {value!r} is not hex") from None
    if len(raw) != size:
        raise CliError(f"{option}: expected {size} bytes ({2 * size} hex digits), got {len(raw)}")
    return raw


@click.group()
def emulate() -> None:
    """The emulated TDX platform: a private root CA that signs quotes and collateral."""


@emulate.command("init")
@click.argument("folder", metavar="DIR", type=OUT_FOLDER)
@OUTPUT_OPTION
def emulate_init(folder: str, output: str) -> None:
    """Create a new emulated platform in DIR (keys mode 0600, folder 0700)."""
    path = Path(folder)
    taken = CliError(f"{folder}: exists and is not empty; choose a new folder")
    if path.exists() and any(path.iterdir()):
        raise taken
    try:
        EmulatedPlatform().create(path)  # one of two inits at once wins; the other finds DIR taken
    except FileExistsError:
        raise taken from None
    except OSError as exc:
        raise CliError(f"{folder}: cannot create the emulated platform: {exc}") from None
    root = path / ROOT_CA_FILE
    if output == "json":
        emit_json({"folder": str(path), "root_ca": str(root)})
    else:
        click.echo(f"emulated platform in {path}; trust anchor: {root}")


@emulate.command("collateral")
@click.argument("folder", metavar="DIR")
@click.option(
    "--out", "out", required=True, type=OUT_FILE, metavar="BUNDLE", help="Where to write the collateral bundle."
)
@click.option(
    "--at",
    "at_text",
    metavar="ISO8601|UNIX",
    help="Issue the collateral around this time [default: now]; the platform's CA certificates, made by "
    "`emulate init` and valid from a year before then, must be valid at it.",
)
@OUTPUT_OPTION
def emulate_collateral(folder: str, out: str, at_text: str | None, output: str) -> None:
    """Write the platform's collateral (dcap-qvl QuoteCollateralV3 JSON), valid around --at."""
    platform = _load(folder, at_text)
    Path(out).write_text(platform.collateral().to_json() + "\n")
    wrote(out, output)


@emulate.command("quote")
@click.argument("folder", metavar="DIR")
@click.option("--out", "out", required=True, type=OUT_FILE, metavar="QUOTE", help="Where to write the quote (binary).")
@click.option("--version", "version", type=click.Choice(["4", "5"]), default="4", show_default=True)
@click.option("--body-type", type=click.Choice(["2", "3", "4"]), help="v5 TD report body type [default: 3].")
@click.option("--mrtd", metavar="HEX")
@click.option("--rtmr0", metavar="HEX")
@click.option("--rtmr1", metavar="HEX")
@click.option("--rtmr2", metavar="HEX")
@click.option("--rtmr3", metavar="HEX")
@click.option("--report-data", metavar="HEX", help="64 bytes; what the TD binds into its quote.")
@click.option("--debug", is_flag=True, help="Set the DEBUG TD attribute (a policy must refuse it).")
@click.option(
    "--tee-tcb-svn",
    metavar="HEX",
    help="16 bytes: the TDX module the TD launched on [default: the platform's UpToDate level].",
)
@click.option(
    "--tee-tcb-svn2",
    metavar="HEX",
    help="16 bytes, TD report 1.5 only: the TDX module running now [default: --tee-tcb-svn].",
)
@click.option(
    "--at",
    "at_text",
    metavar="ISO8601|UNIX",
    help="Issue the PCK certificates around this time [default: now]; the platform's CA certificates, made by "
    "`emulate init` and valid from a year before then, must be valid at it.",
)
@OUTPUT_OPTION
def emulate_quote(
    folder: str,
    out: str,
    version: str,
    body_type: str | None,
    mrtd: str | None,
    rtmr0: str | None,
    rtmr1: str | None,
    rtmr2: str | None,
    rtmr3: str | None,
    report_data: str | None,
    debug: bool,
    tee_tcb_svn: str | None,
    tee_tcb_svn2: str | None,
    at_text: str | None,
    output: str,
) -> None:
    """Sign a TDX quote with the platform's keys for the given TD report fields.

    The quote carries the platform's PCK certificate chain, issued around --at: verify
    it with collateral issued around the same time.
    """
    from tdxvm.attest.quote import TD_ATTR_DEBUG, TD_ATTR_SEPT_VE_DISABLE

    platform = _load(folder, at_text)
    fields: dict[str, Any] = {}
    if (v := _hex(mrtd, 48, "--mrtd")) is not None:
        fields["mr_td"] = v
    rtmrs = [_hex(r, 48, f"--rtmr{i}") for i, r in enumerate((rtmr0, rtmr1, rtmr2, rtmr3))]
    if any(r is not None for r in rtmrs):
        fields["rtmrs"] = tuple(r if r is not None else bytes(48) for r in rtmrs)
    if (v := _hex(report_data, 64, "--report-data")) is not None:
        fields["report_data"] = v
    if debug:
        fields["td_attributes"] = TD_ATTR_SEPT_VE_DISABLE | TD_ATTR_DEBUG
    if (v := _hex(tee_tcb_svn, 16, "--tee-tcb-svn")) is not None:
        fields["tee_tcb_svn"] = v
    if version == "4" and body_type is not None:
        raise CliError("--body-type applies to --version 5 only")
    kind = int(body_type) if body_type else (3 if version == "5" else None)
    if (v := _hex(tee_tcb_svn2, 16, "--tee-tcb-svn2")) is not None:
        if kind in (None, 2):
            raise CliError("--tee-tcb-svn2 needs a TD report 1.5 body: --version 5 with --body-type 3 or 4")
        fields["tee_tcb_svn2"] = v
    quote = platform.sign_quote(version=int(version), body_type=kind, **fields)
    Path(out).write_bytes(quote)
    wrote(out, output, bytes=len(quote))


@emulate.command("tiny-llama")
@click.argument("out", metavar="OUT_DIR", type=OUT_FOLDER)
@click.option("--layers", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--hidden", type=click.IntRange(8, 8192), default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@OUTPUT_OPTION
def emulate_tiny_llama(out: str, layers: int, hidden: int, seed: int, output: str) -> None:
    """Write a tiny random Llama-architecture model (Hugging Face format) into OUT_DIR.

    Random weights and a small byte-level BPE tokenizer with a chat template: a stand-in
    for a real checkpoint where none can be downloaded (needs the guest extra: torch,
    transformers).
    """
    if Path(out).exists() and any(Path(out).iterdir()):
        raise CliError(f"{out}: exists and is not empty")
    try:
        from transformers.utils import logging as hf_logging

        from tdxvm.emulate.tinyllama import build_tiny_model
    except ImportError as exc:
        raise CliError(f"needs torch and transformers (pip install -e '.[guest]'): {exc}") from None
    if hidden % 4:
        raise CliError("--hidden must be a multiple of 4 (4 attention heads)")
    hf_logging.disable_progress_bar()  # one tiny shard: no bar on the terminal
    build_tiny_model(Path(out), layers=layers, hidden=hidden, intermediate=2 * hidden, seed=seed)
    if output == "json":
        emit_json({"wrote": out, "layers": layers, "hidden": hidden, "seed": seed})
    else:
        click.echo(f"wrote a {layers}-layer Llama model (hidden size {hidden}) to {out}", err=True)
