#!/usr/bin/env python3
"""Image build: seconds per step for a recipe, cold (empty cache) and cached, and the
verity and encryption steps' MB/s.

    .venv/bin/python bench/image_build.py [images/smoke.yaml] [--cached-only] [--runs 1]

Cold: a fresh step cache in a temporary folder, so debootstrap and apt run (needs the
Debian mirror). Cached: the same cache again, so only configure, ext4, encrypt and
measure run: what a rebuild after a change to the recipe's files or command line costs.
Targets: cached build <= 3 min; verity hashing >= 500 MB/s (the ext4 image over the
verity step's time, which includes the measurement prediction); encryption >= 200 MB/s
(MB = 1e6 bytes; the payload, ext4 and tree, over the encrypt step's time: the payload
is encrypted where the ext4 step wrote it, at the LUKS2 payload offset of the disk file).
Needs root. Not part of the test run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tdxvm.image.build import STEPS, StepEvent, build  # noqa: E402
from tdxvm.image.cache import StepCache  # noqa: E402
from tdxvm.image.recipe import load_recipe  # noqa: E402
from tdxvm.secretstore import SecretStore  # noqa: E402


def run(recipe, cache: StepCache, work: Path, label: str) -> dict[str, float]:
    events: list[StepEvent] = []
    out = work / label
    result = build(
        recipe, output=out, cache=cache, secret_store=SecretStore(directory=work / "secrets"), progress=events.append
    )
    shutil.rmtree(out)
    times = {e.step: e.seconds for e in events if e.status != "start"}
    statuses = {e.step: e.status for e in events if e.status != "start"}
    total = sum(times.values())
    print(f"\n{label}: {total:.1f} s  (cache hits: {', '.join(result['cache']['hit']) or 'none'})")
    for step in STEPS:
        print(f"  {step:<10} {statuses.get(step, '-'):<8} {times.get(step, 0.0):7.1f} s")
    size, tree = recipe.recipe.disk_size, result["verity"]["hash_bytes"]
    print(f"  verity:     {size / times['verity'] / 1e6:.0f} MB/s for {size >> 20} MiB (target >= 500)")
    print(
        f"  encryption: {(size + tree) / times['encrypt'] / 1e6:.0f} MB/s for {(size + tree) >> 20} MiB (target >= 200)"
    )
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe", nargs="?", default="images/smoke.yaml")
    ap.add_argument("--cached-only", action="store_true", help="use the default cache; skip the cold run")
    ap.add_argument("--runs", type=int, default=1, help="cached runs")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (debootstrap, chroot)", file=sys.stderr)
        return 2
    recipe = load_recipe(args.recipe)
    print(
        f"recipe {args.recipe}: {recipe.recipe.name}, {recipe.recipe.disk_size >> 20} MiB disk, {os.cpu_count()} CPUs"
    )
    with tempfile.TemporaryDirectory(prefix="tdxvm-bench-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        cache = StepCache() if args.cached_only else StepCache(work / "cache")
        if not args.cached_only:
            run(recipe, cache, work, "cold")
        best = min(
            (run(recipe, cache, work, f"cached #{i + 1}") for i in range(args.runs)), key=lambda t: sum(t.values())
        )
        print(f"\ncached build: {sum(best.values()):.1f} s (target <= 180 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
