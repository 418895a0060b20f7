#!/usr/bin/env python3
"""Quote verification speed: tdxvm vs dcap-qvl on the same quote and collateral.

    .venv/bin/python bench/verify_quotes.py [--seconds 3] [--runs 9] [--quote Q --collateral C --at T]

The measurements take turns (slice by slice, run by run), so that load from other work
on the machine weighs on tdxvm and dcap-qvl alike; the figures still move with it.

In-process rates (quotes per second, ratio to dcap-qvl; dcap-qvl has no cache, every
call is cold):

- cold, warm disk cache: a fresh QuoteVerifier per quote (as a new process has) whose
  verified-collateral cache (tdxvm.attest.verifiedcache) already holds this
  collateral, this platform's PCK chain and QE report: only the quote's own signature
  is checked (and, as always, every time and revocation check);
- fully cold (no cache): a fresh QuoteVerifier per quote, no disk cache (--no-cache);
- warm (held verifier): one QuoteVerifier for every quote, collateral and chains
  checked by an earlier call; the time checks and the quote signature run each time.

Whole processes (median wall time of --runs runs): ``tdxvm verify-quote`` (imports
included, warm disk cache; and with --no-cache) beside ``python -c`` running dcap-qvl
on the same files, plus the import of the CLI alone and of a bare interpreter; and
which heavy modules verify-quote imported (there should be none; without --policy, not
even pydantic).

All verdicts must agree before anything is timed. Not part of the test run; the
figures move with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from importlib import metadata
from pathlib import Path

import dcap_qvl

from tdxvm.attest.collateral import load_bundle
from tdxvm.attest.verifiedcache import VerifiedCache
from tdxvm.attest.verify import QuoteVerifier

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "testdata" / "tdx" / "dcap-qvl-v4"
HEAVY = (
    "libvirt",
    "paramiko",
    "requests",
    "urllib3",
    "yaml",
    "pydantic",
    "tdxvm.launch",
    "tdxvm.image",
    "tdxvm.emulate",
    "tdxvm.fleet",
    "tdxvm.provision",
    "tdxvm.guest",
    "tdxvm.attest.eventlog",
)


SLICES = 15


def rates(fns: dict[str, Callable[[], object]], seconds: float) -> dict[str, float]:
    """Median calls per second of each function over :data:`SLICES` slices of
    ``seconds / SLICES``, the functions taking turns slice by slice, so that a burst of
    load on the machine hits all of them alike."""
    seen: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(SLICES):
        for name, fn in fns.items():
            n, start = 0, time.perf_counter()
            deadline = start + seconds / SLICES
            while True:
                fn()
                n += 1
                now = time.perf_counter()
                if now >= deadline:
                    break
            seen[name].append(n / (now - start))
    return {name: statistics.median(values) for name, values in seen.items()}


def walls(commands: dict[str, list[str]], runs: int, env: dict[str, str]) -> dict[str, float]:
    """Median wall seconds of each command over ``runs`` runs (after one unmeasured run
    each), the commands taking turns run by run."""
    seen: dict[str, list[float]] = {name: [] for name in commands}
    for i in range(runs + 1):
        for name, argv in commands.items():
            start = time.perf_counter()
            subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
            if i:
                seen[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seen.items()}


def main() -> int:
    folder = Path(tempfile.mkdtemp(prefix="tdxvm-bench-verified-"))
    try:
        return _bench(folder / "verified")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _bench(disk: Path) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quote", type=Path, default=DATA / "quote.bin")
    ap.add_argument("--collateral", type=Path, default=DATA / "collateral.json")
    ap.add_argument("--at", default="2025-06-20T00:00:00Z", help="verification time (inside the collateral's window)")
    ap.add_argument("--seconds", type=float, default=3.0, help="time per in-process measurement (slices interleaved)")
    ap.add_argument("--runs", type=int, default=9, help="runs per whole-process measurement")
    args = ap.parse_args()

    quote = args.quote.read_bytes()
    at = datetime.fromisoformat(args.at.replace("Z", "+00:00"))
    now = int(at.timestamp())
    ours = load_bundle(args.collateral)
    theirs = dcap_qvl.QuoteCollateralV3.from_json(args.collateral.read_text())

    ref = dcap_qvl.verify(quote, theirs, now)
    results = [
        QuoteVerifier().verify(quote, ours, at=at),  # no cache
        QuoteVerifier(verified_cache=VerifiedCache(directory=disk)).verify(quote, ours, at=at),  # fills it
        QuoteVerifier(verified_cache=VerifiedCache(directory=disk)).verify(quote, ours, at=at),
    ]  # uses it
    if any(r != results[0] for r in results) or results[0].reasons or results[0].tcb.status != ref.status:
        print(
            f"verdicts differ: tdxvm {[(r.tcb and r.tcb.status, r.reasons) for r in results]}, dcap-qvl {ref.status}",
            file=sys.stderr,
        )
        return 1

    warm_verifier = QuoteVerifier()
    warm_verifier.verify(quote, ours, at=at)
    figures = rates(
        {
            "tdxvm cold, warm disk cache": lambda: QuoteVerifier(verified_cache=VerifiedCache(directory=disk)).verify(
                quote, ours, at=at
            ),
            "tdxvm fully cold (no cache)": lambda: QuoteVerifier().verify(quote, ours, at=at),
            "tdxvm warm (held verifier)": lambda: warm_verifier.verify(quote, ours, at=at),
            "dcap-qvl": lambda: dcap_qvl.verify(quote, theirs, now),
        },
        args.seconds * 4,
    )
    peer = figures["dcap-qvl"]
    print(
        f"quote: {args.quote} ({len(quote)} bytes), TCB {ref.status}, dcap-qvl {metadata.version('dcap-qvl')}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"
    )
    print(f"{'in-process':<30} {'quotes/s':>9} {'ms/quote':>9} {'vs dcap-qvl':>12}  target")
    targets = {
        "tdxvm cold, warm disk cache": ">= 1.00x",
        "tdxvm fully cold (no cache)": ">= 0.80x",
        "tdxvm warm (held verifier)": ">= 4.00x",
    }
    for name, value in figures.items():
        print(f"{name:<30} {value:>9.0f} {1000 / value:>9.3f} {value / peer:>11.2f}x  {targets.get(name, '')}")

    py, tdxvm = sys.executable, str(Path(sys.executable).parent / "tdxvm")
    env = {**os.environ, "TDXVM_VERIFIED_CACHE": str(disk), "NO_COLOR": "1"}
    verify = [
        tdxvm,
        "verify-quote",
        str(args.quote),
        "--collateral",
        str(args.collateral),
        "--at",
        args.at,
        "-o",
        "json",
    ]
    dcap = (
        f"import dcap_qvl, pathlib; q = pathlib.Path({str(args.quote)!r}).read_bytes(); "
        f"c = dcap_qvl.QuoteCollateralV3.from_json(pathlib.Path({str(args.collateral)!r}).read_text()); "
        f"print(dcap_qvl.verify(q, c, {now}).status)"
    )
    processes = walls(
        {
            "tdxvm verify-quote (warm disk cache)": verify,
            "tdxvm verify-quote --no-cache": [*verify, "--no-cache"],
            "python -c dcap-qvl": [py, "-c", dcap],
            "python -c 'import tdxvm.cli' (import only)": [py, "-c", "import tdxvm.cli"],
            "python -c 'import tdxvm.cli.attest' (import only)": [py, "-c", "import tdxvm.cli.attest"],
            "python -c pass (interpreter start)": [py, "-c", "pass"],
        },
        args.runs,
        env,
    )
    print(f"\n{'whole process (median of ' + str(args.runs) + ')':<50} {'ms':>7}")
    for name, seconds in processes.items():
        target = "  target <= 250 ms" if name.startswith("tdxvm verify-quote (") else ""
        print(f"{name:<50} {seconds * 1000:>7.1f}{target}")
    probe = (
        "import sys\nfrom tdxvm.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print(__import__('json').dumps(sorted(m for m in sys.modules "
        "if m.split('.')[0] in {'libvirt', 'paramiko', 'requests', "
        f"'urllib3', 'yaml', 'pydantic'}} or m.startswith({HEAVY!r}))))"
    )
    out = subprocess.run([py, "-c", probe, *verify[1:]], env=env, capture_output=True, text=True, check=False).stdout
    heavy = json.loads(out.strip().splitlines()[-1]) if out.strip() else ["<probe failed>"]
    print(f"heavy modules imported by verify-quote: {', '.join(heavy) if heavy else 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
