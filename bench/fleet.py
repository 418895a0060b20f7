#!/usr/bin/env python3
"""Fleet apply at scale on libvirt's test driver: N VMs, then a no-op re-apply.

    .venv/bin/python bench/fleet.py [--vms 100] [--hosts 4] [--parallel 10] [--runs 1]

Builds the attestable test image of ``tests/fleet/guests.py``, writes --hosts test-driver
host files (one URI each), and applies a fleet of --vms emulated VMs spread over them.
Every VM takes the whole path of ``tdxvm launch``: define (volumes, ports, metadata),
start, wait for the unlock step, quote from the emulated quote service, verification of
the quote (signatures, PCK chain, collateral, TCB, policy with the image's predicted
MRTD/RTMR1/RTMR2), the disk passphrase sealed to the attested key, the system agent
re-attested binding its SSH host key; the SSH login step is skipped because no guest
(and no sshd) runs on the test driver. The guest side of each VM is the real guest agent
on 127.0.0.1 (``TestDriverGuests``). The agent readiness checks poll at the default
interval (1 s), as against a real host.

Printed: the wall time of the first apply (targets: <= 30 s for 100 VMs) and of the
re-apply that finds nothing to do (<= 2 s), each including the survey of every host and
the plan, and the phase times of one VM. Not part of the test run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tdxvm.fleet import reconcile  # noqa: E402
from tdxvm.fleet.inventory import Connector  # noqa: E402
from tdxvm.fleet.spec import parse_fleet  # noqa: E402
from tdxvm.provision.trust import for_backend  # noqa: E402
from tdxvm.secretstore import SecretStore  # noqa: E402
from tests.fleet.guests import TestDriverGuests, make_attestable_image, put_test_secrets, write_host  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vms", type=int, default=100)
    p.add_argument("--hosts", type=int, default=4)
    p.add_argument("--parallel", type=int, default=reconcile.DEFAULT_PARALLEL)
    p.add_argument("--runs", type=int, default=1, help="fresh fleets, one after the other (median and best shown)")
    args = p.parse_args()

    applies, noops = [], []
    sample: dict[str, float] = {}
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="tdxvm-bench-fleet-") as tmp_dir:
            tmp = Path(tmp_dir)
            image = make_attestable_image(tmp / "image")
            hosts = {f"h{i}": write_host(tmp / f"h{i}.xml", [image]) for i in range(args.hosts)}
            store = SecretStore(directory=tmp / "secrets")
            put_test_secrets(store)
            trust = for_backend("emulated", emulated_dir=tmp / "emulated")
            host_lines = "".join(f"    {h}: {u}\n" for h, u in hosts.items())
            fleet = parse_fleet(
                "apiVersion: tdxvm/v1\nkind: Fleet\nmetadata: {name: bench}\nspec:\n  hosts:\n"
                + host_lines
                + f"  templates:\n    t: {{image: {image}, backend: emulated, vcpus: 1, memory: 256MiB}}\n"
                + f"  deployments:\n    web: {{template: t, replicas: {args.vms}, placement: [{', '.join(hosts)}]}}\n"
            )
            connector = Connector()
            options = reconcile.ApplyOptions(parallel=args.parallel)
            with TestDriverGuests(connector, hosts.values(), tmp / "guests"):
                started = time.monotonic()
                first = reconcile.apply(
                    fleet,
                    connector=connector,
                    secrets=store,
                    trust_for=lambda _b, t=trust: t,
                    state_dir=tmp / "state",
                    options=options,
                )
                applies.append(time.monotonic() - started)
                started = time.monotonic()
                again = reconcile.apply(
                    fleet,
                    connector=connector,
                    secrets=store,
                    trust_for=lambda _b, t=trust: t,
                    state_dir=tmp / "state",
                    options=options,
                )
                noops.append(time.monotonic() - started)
            connector.close()
            if first.counts() != {"created": args.vms} or again.counts() != {"unchanged": args.vms}:
                print(f"run {run}: unexpected outcome: first {first.counts()}, again {again.counts()}", file=sys.stderr)
                for o in first.outcomes:
                    if o.result != "created":
                        print(f"  {o.vm}: {o.result} {o.errors}", file=sys.stderr)
                return 1
            sample = first.outcomes[0].timings

    def fmt(xs: list[float]) -> str:
        return f"{statistics.median(xs):7.2f} s  (best {min(xs):.2f} s)"

    print(
        f"fleet apply on libvirt's test driver: {args.vms} VMs on {args.hosts} hosts, --parallel {args.parallel}, "
        f"{args.runs} run(s), {os.cpu_count()} CPUs"
    )
    print(f"  apply, all created      {fmt(applies)}   target <= 30 s   {'ok' if min(applies) <= 30 else 'MISSED'}")
    print(f"  re-apply, nothing to do {fmt(noops)}   target <=  2 s   {'ok' if min(noops) <= 2 else 'MISSED'}")
    print("  one VM's phases: " + ", ".join(f"{k} {v:.3f} s" for k, v in sample.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
