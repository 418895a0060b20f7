#!/usr/bin/env python3
"""The verified root in a booted guest: boot-to-ready time and read throughput through
LUKS + verity beside LUKS alone.

    .venv/bin/python bench/rootfs.py BUILD_FOLDER --secrets DIR [--runs 2] [--mib 512]

BUILD_FOLDER is a built image (``tdxvm image build images/smoke.yaml --secrets DIR``).
Each run launches it emulated on ``qemu:///system`` (TCG here), prints the launch's
phases (define, boot, quote, verify, unlock, ready) and, over SSH with the attested host
key, reads ``--mib`` MiB with ``dd iflag=direct`` from ``/dev/mapper/root`` (dm-verity
on dm-crypt: what the root filesystem reads through) and from ``/dev/mapper/root-crypt``
(dm-crypt alone: the same bytes without verification), caches dropped, turn about; the
ratio is verity's cost on reads. Under TCG both are dominated by emulation; on a TDX host
the ratio is the one to quote. Not part of the test run; needs root and libvirtd.
"""

from __future__ import annotations

import argparse
import base64
import re
import secrets
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tdxvm.launch.connection import open_connection  # noqa: E402
from tdxvm.launch.lifecycle import destroy  # noqa: E402
from tdxvm.launch.manifest import load_manifest  # noqa: E402
from tdxvm.launch.spec import VmSpec  # noqa: E402
from tdxvm.provision import bringup, ssh  # noqa: E402
from tdxvm.provision.trust import for_backend  # noqa: E402
from tdxvm.secretstore import SecretStore  # noqa: E402
from tdxvm.sshkey import controller_key  # noqa: E402

_RATE = re.compile(r"copied, ([0-9.]+) s")


def read_rate(client, device: str, mib: int) -> float:
    """MB/s of one direct read of ``mib`` MiB from ``device`` in the guest, caches dropped."""
    out = ssh.run(
        client,
        f"sync; echo 3 > /proc/sys/vm/drop_caches; dd if={device} of=/dev/null bs=1M count={mib} iflag=direct 2>&1",
    )
    found = _RATE.search(out)
    if found is None:
        raise RuntimeError(f"dd printed no time: {out}")
    return mib * (1 << 20) / float(found.group(1)) / 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("build", type=Path)
    ap.add_argument("--secrets", type=Path, required=True, help="the secret store the image was built with")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--memory", type=int, default=1024, help="MiB of guest memory")
    ap.add_argument(
        "--scratch", type=int, default=256, help="MiB of scratch disk (formatted at boot: ~1 min/GiB under TCG)"
    )
    ap.add_argument("--boot-only", action="store_true", help="time the launch only (e.g. an image without verity)")
    args = ap.parse_args()
    manifest = load_manifest(args.build)
    store = SecretStore(directory=args.secrets)
    conn = open_connection("qemu:///system")
    phases: dict[str, list[float]] = {p: [] for p in bringup.PHASES}
    verity, crypt = [], []
    with tempfile.TemporaryDirectory(prefix="tdxvm-bench-rootfs-") as tmp:
        trust = for_backend("emulated", emulated_dir=Path(tmp))
        for run in range(args.runs):
            name = f"bench-rootfs-{secrets.token_hex(3)}"
            scratch = (
                {"scratch": args.scratch} if "scratch" in VmSpec.model_fields else {}
            )  # tdxvm before scratch disks had none
            spec = VmSpec(
                name=name,
                uri="qemu:///system",
                image=manifest.path,
                backend="emulated",
                vcpus=1,
                memory=args.memory,
                **scratch,
            )
            try:
                result = bringup.bring_up(spec, manifest, conn, trust=trust, secrets=store)
                for phase, seconds in result.timings.items():
                    phases[phase].append(seconds)
                if not args.boot_only:
                    client = ssh.connect(
                        result.ssh, host_key=base64.b64decode(result.ssh_host_key), client_key=controller_key(store)
                    )
                    with client:
                        for _ in range(2):
                            verity.append(read_rate(client, "/dev/mapper/root", args.mib))
                            crypt.append(read_rate(client, "/dev/mapper/root-crypt", args.mib))
            finally:
                destroy(conn, name)
            print(
                f"run {run + 1}: "
                + ", ".join(f"{p} {result.timings[p]:.1f} s" for p in bringup.PHASES)
                + f"; to ready {sum(result.timings.values()):.1f} s"
            )
    total = [sum(values) for values in zip(*phases.values(), strict=True)]
    print(f"\nboot to ready (median of {args.runs}): {statistics.median(total):.1f} s")
    if args.boot_only:
        return 0
    v, c = statistics.median(verity), statistics.median(crypt)
    print(f"read {args.mib} MiB, direct: LUKS + verity {v:.0f} MB/s, LUKS alone {c:.0f} MB/s, ratio {v / c:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
