"""``tdxvm image``: guest images and their predicted measurements."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import click

from tdxvm.cli.imageprune import prune_cmd
from tdxvm.cli.output import OUT_FILE, OUT_FOLDER, OUTPUT_OPTION, CliError, emit_json
from tdxvm.cli.progress import Progress
from tdxvm.guest.rootdisk import VERITY_BLOCK, VERITY_HASH, RootDiskError, parse_cmdline
from tdxvm.image.measure import DEFAULT_PROFILE, MEASURING_KERNEL_FIX, PROFILES, REGISTERS, Measurements, predict
from tdxvm.image.measureerrors import MeasureError

if TYPE_CHECKING:
    from tdxvm.launch.rtmr0pin import Rtmr0Pin

# what `image build` prints for a register the image alone does not decide
_UNPREDICTED = {
    "rtmr0": "per VM (memory, vCPUs, devices): `tdxvm image measure --vm SPEC`; "
    "a launch pins it where a profile predicts it",
    "rtmr3": "at run time: the service measures the model it serves there",
}


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"{what} {path}: {exc.strerror or exc}") from None


@click.group()
def image() -> None:
    """Guest images: build them from recipes, predict their TDX measurements, prune a host's unused ones."""


image.add_command(prune_cmd)


@image.command("build")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--out", "out", type=OUT_FOLDER, metavar="DIR", help="Output folder [default: build/<recipe name>].")
@click.option(
    "--firmware",
    type=click.Path(exists=True, dir_okay=False),
    metavar="FILE",
    help="TDVF whose MRTD to predict (overrides the recipe's firmware).",
)
@click.option(
    "--cache",
    "cache_dir",
    type=OUT_FOLDER,
    metavar="DIR",
    help="Step cache [default: $TDXVM_CACHE/image or ~/.cache/tdxvm/image].",
)
@click.option(
    "--secrets",
    "secrets_dir",
    type=OUT_FOLDER,
    metavar="DIR",
    help="Secret store for the volume key [default: ~/.local/share/tdxvm/secrets].",
)
@OUTPUT_OPTION
def build_cmd(
    recipe: str, out: str | None, firmware: str | None, cache_dir: str | None, secrets_dir: str | None, output: str
) -> None:
    """Build RECIPE into an encrypted disk image, kernel, initramfs and manifest.

    The root filesystem is LUKS2-encrypted with a fresh key kept only in the secret
    store; the manifest lists artifact hashes and the measurements a TD booted from them
    will report. Steps are cached by the hash of their inputs. Needs root (debootstrap,
    chroot). Progress goes to the terminal; -o json prints the manifest only. A kernel
    whose EFI stub does not measure the command line and initrd into RTMR2 (Linux < 6.9)
    is refused as soon as the rootfs step has installed it.
    """
    from tdxvm.image.build import StepEvent, build
    from tdxvm.image.cache import StepCache
    from tdxvm.image.recipe import load_recipe
    from tdxvm.secretstore import SecretStore

    loaded = load_recipe(recipe)
    folder = Path(out) if out else Path("build") / loaded.recipe.name
    printer = Progress(output, width=10)

    def progress(event: StepEvent) -> None:
        printer.step(event.step, event.status, event.seconds, event.detail)

    result = build(
        loaded,
        output=folder,
        cache=StepCache(Path(cache_dir)) if cache_dir else None,
        secret_store=SecretStore(directory=Path(secrets_dir) if secrets_dir else None),
        firmware=firmware,
        progress=progress,
    )
    if output == "json":
        emit_json({**result, "output": str(folder.resolve())})
        return
    click.echo(f"built {folder}/ (disk.img, vmlinuz, initrd.img, manifest.json)")
    m = result["measurements"]
    for reg in REGISTERS:
        click.echo(f"  {reg:<6} {m[reg] or _UNPREDICTED.get(reg, 'not predicted')}")
    v = result["verity"]
    click.echo(
        f"  rootfs verity root hash {v['root_hash']} ({v['hash_algorithm']}, {v['data_blocks']} x "
        f"{v['data_block_size']}-byte blocks, tree {v['hash_bytes']} bytes; on the command line, in RTMR2)"
    )
    click.echo(f"  disk key: secret {result['luks']['key_secret']} (in the secret store only)")


@image.command("lock")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option(
    "--out", "out", type=OUT_FILE, metavar="FILE", help="Where to write the lock [default: the recipe with .lock]."
)
@OUTPUT_OPTION
def lock_cmd(recipe: str, out: str | None, output: str) -> None:
    """Take RECIPE's lock: the exact packages its image is built from.

    Resolves, from the archives as they are now, every Debian package of the root
    filesystem (security and stable updates included) with its .deb SHA-256, the wheels
    of the Python step with their SHA-256, and the firmware package, and writes them to
    the lock beside the recipe (commit it). `tdxvm image build` then installs exactly
    the lock. Run it again to take security updates; it lists what changed. Needs root
    (debootstrap, chroot) and the network.
    """
    from tdxvm.image import lockfile, locking
    from tdxvm.image.recipe import load_recipe

    loaded = load_recipe(recipe)
    target = Path(out) if out else lockfile.lock_path(Path(recipe))
    try:
        old = lockfile.load(target) if target.exists() else None
    except lockfile.LockError:
        old = None  # unreadable or an older format: replaced as a whole

    printer = Progress(output)
    lock = locking.take(loaded, progress=lambda line: printer.note("", line))
    lockfile.write(lock, target)
    changed = locking.changes(old, lock)
    firmware = f"{lock.firmware.package} {lock.firmware.version}" if lock.firmware else None
    if output == "json":
        emit_json(
            {
                "wrote": str(target),
                "taken_at": lock.taken_at_text(),
                "packages": len(lock.packages),
                "wheels": len(lock.wheels),
                "firmware": firmware,
                "sources": [s.suite for s in lock.sources],
                "changes": changed,
            }
        )
        return
    click.echo(
        f"locked {target} at {lock.taken_at_text()}: {len(lock.packages)} Debian packages from "
        f"{', '.join(s.suite for s in lock.sources)}; {len(lock.wheels)} wheels"
        + (f"; firmware {firmware}" if firmware else "")
    )
    if old is not None:
        click.echo(
            f"  {len(changed)} changes" + (":" if changed else " (the archives carry the locked versions still)")
        )
        for line in changed:
            click.echo(f"    {line}")


@image.command("verify")
@click.argument("manifest", type=click.Path(), metavar="MANIFEST")
@click.option(
    "--recipe",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="The recipe the image was built from [default: the path in the manifest].",
)
@click.option(
    "--cache",
    "cache_dir",
    type=OUT_FOLDER,
    metavar="DIR",
    help="Step cache for the rebuild [default: a new, empty one, removed after].",
)
@OUTPUT_OPTION
def verify_cmd(manifest: str, recipe: str | None, cache_dir: str | None, output: str) -> None:
    """Rebuild an image from its recipe and lock and compare it bit for bit.

    MANIFEST is a build's manifest.json or its folder. The rebuild starts from a clean
    step cache (debootstrap, apt and pip again, each package checked against the lock)
    and compares the kernel, the initramfs, the root filesystem (verity root hash, and
    every file's listing), the command line and the predicted MRTD, RTMR1 and RTMR2.
    Exit 0: reproduced; exit 1: something differs (the first differing file is named).
    Needs root and the network, like image build.
    """
    from tdxvm.image.build import StepEvent
    from tdxvm.image.reproduce import reproduce

    printer = Progress(output, width=18)

    def progress(event: StepEvent) -> None:
        printer.step(f"rebuild {event.step}", event.status, event.seconds, event.detail)

    report = reproduce(
        Path(manifest),
        recipe=Path(recipe) if recipe else None,
        cache=Path(cache_dir) if cache_dir else None,
        progress=progress,
    )
    if output == "json":
        emit_json(report.to_dict())
    else:
        for item in report.items:
            click.echo(
                f"  {'same' if item.same else 'DIFFERS':<8} {item.name}"
                + ("" if item.same else f": built {item.built}, rebuilt {item.rebuilt}")
            )
        if report.identical:
            click.echo(f"reproduced: {report.manifest} (every compared item is identical)")
        else:
            click.echo(f"not reproduced: {report.first_difference}")
    if not report.identical:
        raise SystemExit(1)


@image.command("measure")
@click.option(
    "--firmware", metavar="FILE", help="TDVF image (e.g. OVMF.inteltdx.ms.fd); without it MRTD is not predicted."
)
@click.option("--kernel", metavar="FILE", help="Kernel (bzImage with the EFI stub) given to -kernel.")
@click.option("--initrd", metavar="FILE", help="Initramfs given to -initrd [default: none].")
@click.option("--cmdline", default="", metavar="TEXT", help="Kernel command line given to -append [default: empty].")
@click.option(
    "--profile",
    type=click.Choice(sorted(PROFILES)),
    default=DEFAULT_PROFILE,
    show_default=True,
    help="QEMU/edk2 generation of the host (see docs/measurements.md).",
)
@click.option(
    "--vm",
    "vm_path",
    metavar="VM.yaml",
    type=click.Path(dir_okay=False),
    help="Instead of files: what the VM a launch of VM.yaml defines will report, RTMR0 included.",
)
@OUTPUT_OPTION
def measure(
    firmware: str | None,
    kernel: str | None,
    initrd: str | None,
    cmdline: str,
    profile: str,
    vm_path: str | None,
    output: str,
) -> None:
    """Print the MRTD and RTMRs a TD booted directly from these files will report.

    Registers that cannot be predicted say so and why. Exit 2 when an input is unusable
    (not a PE/COFF kernel, no TDVF metadata, truncated tables). A kernel whose EFI stub
    does not measure the command line and initrd (Linux < 6.9) is still reported, with a
    warning: `tdxvm image build` and `tdxvm launch` refuse it.

    With --vm, the registers the launch of VM.yaml pins: MRTD, RTMR1 and RTMR2 from its
    image manifest, and RTMR0 with its events, predicted for the domain XML the launch
    writes (its machine: memory, vCPUs, devices) where a profile exists, else why not.
    """
    if vm_path is not None:
        if kernel or initrd or firmware or cmdline:
            raise CliError("--vm takes the files from the VM spec's image; give either --vm or --kernel (and friends)")
        _measure_vm(vm_path, output)
        return
    if kernel is None:
        raise CliError("give --kernel (with --initrd, --cmdline, --firmware) or --vm VM.yaml")
    kernel_bytes = _read(kernel, "kernel") or b""
    try:
        result = predict(
            firmware=_read(firmware, "firmware"),
            kernel=kernel_bytes,
            initrd=_read(initrd, "initrd") or b"",
            cmdline=cmdline,
            profile=profile,
        )
    except MeasureError as exc:
        which = "firmware" if exc.code == "tdvf" else "kernel" if exc.code == "pe" else "input"
        err = CliError(f"{which}: {exc}")
        err.code = exc.code
        raise err from None
    verity = _verity_root(cmdline)
    if output == "json":
        emit_json({**result.to_dict(), "verity": verity})
    else:
        _print_text(result)
        click.echo(
            f"rootfs verity root hash {verity['root_hash']} ({verity['hash_algorithm']}, {verity['data_blocks']} x "
            f"{verity['data_block_size']}-byte blocks)"
            if verity
            else "rootfs not pinned (no tdxvm.verity= on the command line)"
        )
    if result.inputs.get("efi_stub_cc_measurement") != "yes":
        # A report, not a refusal: measure describes any kernel; build and launch refuse this one.
        click.echo(
            f"warning: rtmr2 is {result.notes['rtmr2']}; `tdxvm image build` and `tdxvm launch` refuse this "
            f"kernel: {MEASURING_KERNEL_FIX}",
            err=True,
        )


def _measure_vm(vm_path: str, output: str) -> None:
    from tdxvm.cli.filekinds import refuse_other_kind
    from tdxvm.launch.errors import LaunchError
    from tdxvm.launch.lifecycle import local_firmware, render_domain
    from tdxvm.launch.manifest import load_manifest
    from tdxvm.launch.ports import choose_forwards
    from tdxvm.launch.rtmr0pin import Rtmr0Pin, profile_problem
    from tdxvm.launch.spec import effective_policy, load_vm_spec
    from tdxvm.launch.volumes import planned

    refuse_other_kind(vm_path, "vm")
    vm = load_vm_spec(vm_path)
    manifest = load_manifest(vm.image)
    # the domain a launch writes, with this machine's copies of the boot files (QEMU reads
    # them under qtest; disks and host ports are replaced or dropped and do not matter)
    volumes = dataclasses.replace(
        planned(manifest, vm.name), kernel=str(manifest.kernel.path), initrd=str(manifest.initrd.path)
    )
    xml = render_domain(
        vm,
        manifest,
        volumes=volumes,
        forwards=choose_forwards(vm, manifest, taken=set(), local=True),
        policy=effective_policy(vm, manifest),
    )
    problem = profile_problem(vm.uri, vm.backend)
    try:
        if problem is not None:
            pin = Rtmr0Pin(None, (), problem)
        else:
            pin = _predict_on(vm.uri, xml, backend=vm.backend, firmware=local_firmware(vm, manifest))
    except LaunchError as exc:
        raise CliError(str(exc)) from None
    values = {**manifest.measurements.registers(), "rtmr0": pin.value}
    if output == "json":
        emit_json({"vm": vm.name, "image": str(manifest.path), "measurements": values, "rtmr0": pin.to_dict()})
        return
    for reg in REGISTERS:
        value = values.get(reg)
        why = pin.reason if reg == "rtmr0" else "not predicted"
        click.echo(f"{reg:<6} {value if value is not None else why}")
    if pin.value is not None:
        click.echo(f"rtmr0 {pin.reason}; events in extend order:")
        for e in pin.events:
            click.echo(f"  {e.event_type:#010x} {e.digest}  {e.what}")


def _predict_on(uri: str, xml: str, *, backend: str, firmware: bytes | None) -> Rtmr0Pin:
    """:func:`~tdxvm.launch.rtmr0pin.predict` on ``uri``'s host. A remote host is asked
    only its libvirt and QEMU versions (they select the profile); one that does not answer
    leaves RTMR0 not predicted, with the reason, rather than failing the measurement."""
    from tdxvm.launch import rtmr0pin
    from tdxvm.launch.connection import close, is_local, open_connection
    from tdxvm.launch.errors import ConnectError

    try:
        conn = open_connection(uri)
    except ConnectError as exc:
        if is_local(uri):
            raise
        why = str(exc).split("\n", 1)[0]
        reason = f"not predicted on {uri}: its libvirt and QEMU versions select the profile, and {why}"
        return rtmr0pin.Rtmr0Pin(None, (), reason)
    try:
        return rtmr0pin.predict(conn, xml, backend=backend, firmware=firmware)
    finally:
        close(conn)


def _verity_root(cmdline: str) -> dict[str, object] | None:
    """The root filesystem the command line pins (its ``tdxvm.verity=``), None if it pins none."""
    if "tdxvm.verity=" not in cmdline:
        return None
    try:
        root = parse_cmdline(cmdline)
    except RootDiskError as exc:
        raise CliError(f"--cmdline: {exc}") from None
    return {
        "root_hash": root.root_hash,
        "data_blocks": root.data_blocks,
        "hash_algorithm": VERITY_HASH,
        "data_block_size": VERITY_BLOCK,
        "hash_block_size": VERITY_BLOCK,
        "hash_offset": root.hash_offset,
    }


def _print_text(m: Measurements) -> None:
    for reg in REGISTERS:
        value = m.value(reg)
        click.echo(f"{reg:<6} {value}" if value is not None else f"{reg:<6} {m.notes[reg]}")
