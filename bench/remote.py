#!/usr/bin/env python3
"""Remote hosts: an emulated launch on a second libvirt host reached over SSH, next to the
same launch on this machine, and the volume upload over the libvirt connection next to
``scp`` of the same file to that host.

    .venv/bin/python bench/remote.py [--image DIR --secrets DIR] [--runs 3] [--launches 1] [--fleet 2]

The remote host is :class:`tests.nshost.NamespaceHost`: a libvirtd, virtlogd and sshd of
its own in network, mount and PID namespaces on this machine, reached only as
``qemu+ssh://root@10.231.N.2/system`` over a veth pair (so "remote" here costs SSH,
libvirt's RPC and a second libvirtd, not a real network's latency or bandwidth). Needs
root and this machine's libvirtd (qemu:///system) for the local launches.

* upload: ``disk.img`` into the host's tdxvm pool as a launch uploads it
  (:func:`tdxvm.launch.volumes.upload_artifact`: a ``virStream`` over the libvirt
  connection, hashed on the way), then ``scp`` of the same file to the host's pool
  folder (OpenSSH, its default cipher, the same key); each in turn, --runs times;
  MB/s = 10^6 bytes per second, the median.
* launches: seconds per bring-up phase (``LaunchResult.timings``) and of one
  re-attestation, for --launches launches on this machine, then on the remote host: the
  first remote launch uploads the image's volumes (``define`` includes it), later ones
  find them in the pool. Each VM is destroyed after it.
* fleet: one ``tdxvm apply`` of a fleet of --fleet VMs, one deployment placed round-robin
  over this machine and the remote host (``placement: [local, remote]``), its wall time
  next to the sum of as many single launches (the medians above: local for the VMs on
  this machine, remote warm for the others); then the fleet is destroyed. 0 skips it.

Without ``--image``, images/smoke.yaml is built into a temporary folder (default step
cache) with a secret store of its own, and the volumes it put into this machine's pool
are removed at the end. Not part of the test run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import libvirt  # noqa: E402

from tdxvm.fleet import reconcile  # noqa: E402
from tdxvm.fleet.inventory import Connector  # noqa: E402
from tdxvm.fleet.spec import parse_fleet  # noqa: E402
from tdxvm.launch import tunnel  # noqa: E402
from tdxvm.launch.connection import open_connection  # noqa: E402
from tdxvm.launch.lifecycle import destroy  # noqa: E402
from tdxvm.launch.manifest import ImageManifest, load_manifest  # noqa: E402
from tdxvm.launch.records import VmRecords  # noqa: E402
from tdxvm.launch.spec import VmSpec  # noqa: E402
from tdxvm.launch.volumes import POOL_NAME, POOL_PATH, content_name, ensure_pool, upload_artifact  # noqa: E402
from tdxvm.provision import attestation, bringup  # noqa: E402
from tdxvm.provision.trust import Trust, for_backend  # noqa: E402
from tdxvm.secretstore import SecretStore  # noqa: E402
from tests.nshost import NamespaceHost, unavailable_reason  # noqa: E402

LOCAL = "qemu:///system"


def build_smoke(folder: Path, secrets: Path) -> Path:
    from tdxvm.image.build import build
    from tdxvm.image.cache import StepCache
    from tdxvm.image.recipe import load_recipe

    build(
        load_recipe(REPO / "images" / "smoke.yaml"),
        output=folder,
        cache=StepCache(),
        secret_store=SecretStore(directory=secrets),
    )
    return folder


def uploads(host: NamespaceHost, manifest: ImageManifest, runs: int) -> tuple[list[float], list[float]]:
    """MB/s of the libvirt upload and of scp, ``runs`` each, in turn."""
    disk = manifest.disk
    ours, theirs = [], []
    conn = open_connection(host.uri)
    try:
        pool = ensure_pool(conn)
        for i in range(runs):
            with contextlib.suppress(libvirt.libvirtError):
                pool.storageVolLookupByName(content_name("disk", disk.sha256)).delete(0)
            started = time.monotonic()
            vol, uploaded = upload_artifact(conn, pool, disk, "disk")
            ours.append(disk.size / (time.monotonic() - started) / 1e6)
            assert uploaded
            vol.delete(0)
            target = f"{POOL_PATH}/scp-test"
            started = time.monotonic()
            subprocess.run(
                [
                    "scp",
                    "-q",
                    "-F",
                    "none",
                    "-i",
                    str(host.controller_key),
                    "-o",
                    f"UserKnownHostsFile={host.known_hosts}",
                    "-o",
                    "StrictHostKeyChecking=yes",
                    "-o",
                    "IdentitiesOnly=yes",
                    str(disk.path),
                    f"root@{host.address}:{target}",
                ],
                check=True,
            )
            theirs.append(disk.size / (time.monotonic() - started) / 1e6)
            host.run(["rm", "-f", target])
            print(f"  run {i + 1}: libvirt upload {ours[-1]:6.0f} MB/s   scp {theirs[-1]:6.0f} MB/s", flush=True)
    finally:
        conn.close()
    return ours, theirs


def launch(uri: str, name: str, image: Path, trust: Trust, store: SecretStore) -> dict[str, float]:
    """One bring-up, one re-attestation and destroy; the seconds of each phase."""
    spec = VmSpec(
        name=name, uri=uri, image=image / "manifest.json", backend="emulated", vcpus=1, memory=1024, scratch=256
    )
    records = VmRecords.beside(store)
    conn = open_connection(uri)
    try:
        for attempt in (1, 2):
            try:
                result = bringup.bring_up(spec, load_manifest(spec.image), conn, trust=trust, secrets=store)
                break
            except bringup.BringUpError as exc:  # the guest's kernel crashed under TCG (seen with QEMU 7.2)
                destroy(conn, name, records=records)
                if attempt == 2 or "Kernel panic" not in exc.serial_tail:
                    raise
        timings = dict(result.timings)
        started = time.monotonic()
        with attestation.reattest(conn, name, records=records, trust=trust) as again:
            assert again.verdict.accepted
        timings["re-attest"] = time.monotonic() - started
        return timings
    finally:
        with contextlib.suppress(Exception):
            destroy(conn, name, records=records)
        conn.close()
        tunnel.close_all()


def fleet_apply(host: NamespaceHost, image: Path, trust: Trust, store: SecretStore, vms: int, state: Path) -> float:
    """Wall seconds of one apply of ``vms`` VMs over this machine and ``host``; the fleet destroyed after."""
    fleet = parse_fleet(f"""\
apiVersion: tdxvm/v1
kind: Fleet
metadata: {{name: bench{os.getpid()}}}
spec:
  hosts: {{local: "{LOCAL}", remote: "{host.uri}"}}
  templates:
    smoke: {{image: {image / "manifest.json"}, backend: emulated, vcpus: 1, memory: 1GiB, scratch: 256MiB}}
  deployments:
    web: {{template: smoke, replicas: {vms}, placement: [local, remote]}}
""")
    connector = Connector()
    try:
        started = time.monotonic()
        report = reconcile.apply(
            fleet,
            connector=connector,
            secrets=store,
            trust_for=lambda _b: trust,
            state_dir=state,
            options=reconcile.ApplyOptions(parallel=vms),
        )
        seconds = time.monotonic() - started
        for o in report.outcomes:
            print(f"  {o.vm} on {o.host}: {o.result}, " + ", ".join(f"{k} {v:.1f} s" for k, v in o.timings.items()))
        if report.status != "ok":
            raise SystemExit(f"the fleet apply ended {report.status}: {[o.to_dict() for o in report.outcomes]}")
        return seconds
    finally:
        reconcile.destroy_fleet(fleet, connector=connector, state_dir=state, secrets=store)
        connector.close()
        tunnel.close_all()


def remove_local_volumes(manifest: ImageManifest) -> None:
    """The volumes this run's throwaway image put into this machine's tdxvm pool."""
    conn = open_connection(LOCAL)
    try:
        pool = conn.storagePoolLookupByName(POOL_NAME)
        in_use = "".join(d.XMLDesc() for d in conn.listAllDomains())
        for role, artifact in (("kernel", manifest.kernel), ("initrd", manifest.initrd), ("disk", manifest.disk)):
            name = content_name(role, artifact.sha256)
            if name in pool.listVolumes() and name not in in_use:
                pool.storageVolLookupByName(name).delete(0)
    except libvirt.libvirtError:
        pass
    finally:
        conn.close()


def table(columns: dict[str, list[dict[str, float]]]) -> None:
    phases = list(dict.fromkeys(p for runs in columns.values() for r in runs for p in r))
    print(f"{'phase':<12}" + "".join(f"{c:>18}" for c in columns))
    for phase in [*phases, "total"]:
        cells = []
        for runs in columns.values():
            values = [sum(r.values()) if phase == "total" else r[phase] for r in runs if phase in r or phase == "total"]
            cells.append(f"{statistics.median(values):16.1f} s" if values else f"{'-':>18}")
        print(f"{phase:<12}" + "".join(cells))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", type=Path, help="a built image folder [default: build images/smoke.yaml]")
    ap.add_argument("--secrets", type=Path, help="the secret store --image was built with")
    ap.add_argument("--runs", type=int, default=3, help="upload rounds")
    ap.add_argument("--launches", type=int, default=1, help="launches per column")
    ap.add_argument("--fleet", type=int, default=2, help="VMs of the fleet apply over both hosts (0: none)")
    args = ap.parse_args()
    if (args.image is None) != (args.secrets is None):
        ap.error("--image and --secrets go together")
    reason = unavailable_reason()
    if reason:
        sys.exit(f"no namespace host: {reason}")
    with tempfile.TemporaryDirectory(prefix="bench-remote-") as tmp:
        work = Path(tmp)
        image, secrets = args.image, args.secrets
        if image is None:
            print("building images/smoke.yaml (default step cache) ...", flush=True)
            image, secrets = build_smoke(work / "smoke", work / "secrets"), work / "secrets"
        image = image.resolve()
        manifest = load_manifest(image / "manifest.json")
        store = SecretStore(directory=secrets)
        trust = for_backend("emulated", emulated_dir=work / "emulated")
        try:
            with NamespaceHost() as host:
                print(f"remote host {host.name}: {host.uri.split('?')[0]}", flush=True)
                print(f"upload of disk.img ({manifest.disk.size / 1e6:.0f} MB), {args.runs} rounds:", flush=True)
                ours, theirs = uploads(host, manifest, args.runs)
                columns: dict[str, list[dict[str, float]]] = {"local": [], "remote, cold": [], "remote, warm": []}
                for i in range(args.launches):
                    columns["local"].append(launch(LOCAL, f"bench-local-{os.getpid()}-{i}", image, trust, store))
                    print(f"  local launch {i + 1}: {columns['local'][-1]}", flush=True)
                for i in range(args.launches + 1):
                    timings = launch(host.uri, f"bench-remote-{os.getpid()}-{i}", image, trust, store)
                    columns["remote, cold" if i == 0 else "remote, warm"].append(timings)
                    print(f"  remote launch {i + 1}: {timings}", flush=True)
                if args.fleet:
                    print(f"fleet apply of {args.fleet} VMs over this machine and {host.name}:", flush=True)
                    fleet_wall = fleet_apply(host, image, trust, store, args.fleet, work / "state")
        finally:
            if args.image is None:
                remove_local_volumes(manifest)
    print()
    print(
        f"volume upload (disk.img, median of {args.runs}): libvirt stream {statistics.median(ours):.0f} MB/s, "
        f"scp {statistics.median(theirs):.0f} MB/s: {statistics.median(ours) / statistics.median(theirs):.2f}x scp "
        "(target >= 0.8x)"
    )
    print(f"launch phases, median of {args.launches} (remote, cold: the image's volumes uploaded in define):")
    table(columns)
    if args.fleet:

        def bring_up_total(column: str) -> float:
            return statistics.median(sum(v for k, v in r.items() if k != "re-attest") for r in columns[column])

        singles = (args.fleet + 1) // 2 * bring_up_total("local") + args.fleet // 2 * bring_up_total("remote, warm")
        print(
            f"fleet apply, {args.fleet} VMs over 2 hosts: {fleet_wall:.1f} s wall; the sum of {args.fleet} single "
            f"launches (local / remote warm medians): {singles:.1f} s ({fleet_wall / singles:.2f}x)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
