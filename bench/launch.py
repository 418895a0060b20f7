#!/usr/bin/env python3
"""Launch: each phase's seconds for N launches of one image as an emulated TD, and the
define phase's spread, next to plain libvirt defining the same domain XML.

    .venv/bin/python bench/launch.py [--image build/smoke] [--runs 3] [--uri qemu:///system]
                                     [--model ENC_DIR --key NAME]

Each run is ``tdxvm launch SPEC -o json`` (preflight, define, boot, quote, verify,
unlock, ready and, with ``--model``, provision) followed by ``tdxvm destroy``. The image's
volumes are in the pool after the first run, so the define phase from the second run on
is what an everyday launch costs (target <= 5 s). The peer: ``virsh define`` +
``virsh undefine`` of the domain XML ``tdxvm launch --dry-run`` prints, N times: what
libvirt itself needs to define this domain. Without ``--image``, images/smoke.yaml is
built into a temporary folder with the default step cache. Needs root and a running
libvirtd. Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TDXVM = str(Path(sys.executable).parent / "tdxvm")


def tdxvm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([TDXVM, *args], capture_output=True, text=True, cwd=REPO)
    if check and proc.returncode != 0:
        sys.exit(f"tdxvm {' '.join(args)}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


def spec(folder: Path, name: str, image: Path, uri: str, model: tuple[str, str] | None) -> Path:
    path = folder / f"{name}.yaml"
    lines = [
        f"name: {name}",
        f"uri: {uri}",
        f"image: {image / 'manifest.json'}",
        "backend: emulated",
        f"vcpus: {2 if model else 1}",
        f"memory: {'2GiB' if model else '1GiB'}",
        "scratch: 256MiB",
    ]
    if model:
        lines.append(f"model: {{path: {model[0]}, name: {Path(model[0]).name}, key: {model[1]}}}")
    path.write_text("\n".join(lines) + "\n")
    return path


def launches(args: argparse.Namespace, image: Path, work: Path) -> list[dict[str, float]]:
    runs = []
    model = (args.model, args.key) if args.model else None
    for i in range(args.runs):
        name = f"bench-launch-{os.getpid()}-{i}"
        path = spec(work, name, image, args.uri, model)
        started = time.monotonic()
        try:
            proc = tdxvm("launch", str(path), "-o", "json")
            doc = json.loads(proc.stdout)
        finally:
            tdxvm("destroy", name, "--yes", "--uri", args.uri, check=False)
        timings = {k: float(v) for k, v in (doc.get("timings") or {}).items()}
        timings["total"] = time.monotonic() - started
        runs.append(timings)
        shown = "  ".join(f"{p} {s:.1f}" for p, s in timings.items() if p != "total")
        print(f"  run {i + 1}: {shown}  (wall {timings['total']:.1f} s)", flush=True)
    return runs


def virsh_defines(args: argparse.Namespace, image: Path, work: Path) -> list[float]:
    """The peer: libvirt defining the same domain XML, without tdxvm around it."""
    name = f"bench-define-{os.getpid()}"
    xml = tdxvm("launch", str(spec(work, name, image, args.uri, None)), "--dry-run", "-o", "json")
    domain = json.loads(xml.stdout)["domain_xml"]
    (work / "domain.xml").write_text(domain)
    seconds = []
    for _ in range(args.runs):
        started = time.monotonic()
        subprocess.run(["virsh", "-c", args.uri, "define", str(work / "domain.xml")], check=True, capture_output=True)
        seconds.append(time.monotonic() - started)
        subprocess.run(["virsh", "-c", args.uri, "undefine", name], check=True, capture_output=True)
    return seconds


def summary(label: str, values: list[float], target: str = "") -> None:
    spread = max(values) - min(values)
    print(
        f"{label:<24} median {statistics.median(values):7.2f}  min {min(values):7.2f}  max {max(values):7.2f}"
        f"  spread {spread:6.2f} s{target}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", type=Path, help="a built image folder [default: build images/smoke.yaml]")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--uri", default="qemu:///system")
    ap.add_argument("--model", help="an encrypted model folder (tdxvm weights encrypt) to provision")
    ap.add_argument("--key", help="its key's name in the secret store")
    args = ap.parse_args()
    if args.model and not args.key:
        ap.error("--model needs --key")
    with tempfile.TemporaryDirectory(prefix="bench-launch-") as tmp:
        work = Path(tmp)
        image = args.image
        if image is None:
            image = work / "smoke"
            print("building images/smoke.yaml (default step cache) ...", flush=True)
            tdxvm("image", "build", "images/smoke.yaml", "--out", str(image), "-o", "json")
        image = image.resolve()
        print(f"image {image}, {args.runs} launches on {args.uri}; seconds per phase:", flush=True)
        runs = launches(args, image, work)
        peer = virsh_defines(args, image, work)
    print()
    phases = list(dict.fromkeys(p for r in runs for p in r))  # bring-up's order, "total" last
    for phase in phases:
        values = [r[phase] for r in runs if phase in r]
        if values:
            summary(phase, values, "  target <= 5 s from the second run" if phase == "define" else "")
    warm = [r["define"] for r in runs[1:] if "define" in r]
    if warm:
        summary("define, volumes pooled", warm, "  target <= 5 s")
    summary("peer: virsh define", peer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
