"""``tdxvm image``: guest images and their predicted measurements."""

from __future__ import annotations

from pathlib import Path

import click

from tdxvm.cli.output import OUTPUT_OPTION, CliError, emit_json
from tdxvm.image.measure import DEFAULT_PROFILE, PROFILES, REGISTERS, MeasureError, Measurements, predict


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"{what} {path}: {exc.strerror or exc}") from None


@click.group()
def image() -> None:
    """Guest images: predicted TDX measurements (and, later, image builds)."""


@image.command("measure")
@click.option(
    "--firmware", metavar="FILE", help="TDVF image (e.g. OVMF.inteltdx.ms.fd); without it MRTD is not predicted."
)
@click.option("--kernel", metavar="FILE", required=True, help="Kernel (bzImage with the EFI stub) given to -kernel.")
@click.option("--initrd", metavar="FILE", help="Initramfs given to -initrd [default: none].")
@click.option("--cmdline", default="", metavar="TEXT", help="Kernel command line given to -append [default: empty].")
@click.option("--profile", type=click.Choice(sorted(PROFILES)), default=DEFAULT_PROFILE, show_default=True,
              help="QEMU/edk2 generation of the host (see docs/measurements.md).")  # fmt: skip
@OUTPUT_OPTION
def measure(firmware: str | None, kernel: str, initrd: str | None, cmdline: str, profile: str, output: str) -> None:
    """Print the MRTD and RTMRs a TD booted directly from these files will report.

    Registers that cannot be predicted say so and why. Exit 2 when an input is unusable
    (not a PE/COFF kernel, no TDVF metadata, truncated tables).
    """
    kernel_bytes = _read(kernel, "kernel") or b""
    try:
        result = predict(firmware=_read(firmware, "firmware"), kernel=kernel_bytes,
                         initrd=_read(initrd, "initrd") or b"", cmdline=cmdline, profile=profile)  # fmt: skip
    except MeasureError as exc:
        which = "firmware" if exc.code == "tdvf" else "kernel" if exc.code == "pe" else "input"
        err = CliError(f"{which}: {exc}")
        err.code = exc.code
        raise err from None
    if output == "json":
        emit_json(result.to_dict())
    else:
        _print_text(result)
    if result.inputs.get("efi_stub_cc_measurement") == "no":
        click.echo(f"warning: rtmr2 is {result.notes['rtmr2']}; use a kernel >= 6.9", err=True)


def _print_text(m: Measurements) -> None:
    for reg in REGISTERS:
        value = m.value(reg)
        click.echo(f"{reg:<6} {value}" if value is not None else f"{reg:<6} {m.notes[reg]}")
