#!/usr/bin/env python3
"""Quote verification throughput: tdxvm vs dcap-qvl on the same quote and collateral.

    .venv/bin/python bench/verify_quotes.py [--seconds 3] [--quote Q --collateral C --at T]

cold: nothing checked before (tdxvm: a fresh QuoteVerifier per quote; dcap-qvl has no
cache, every call is cold). warm: collateral and certificate chains already checked by
an earlier call on the same QuoteVerifier, so only the time checks and the per-quote
signatures run. Both verifiers must agree on the verdict before anything is timed.
Prints quotes per second and the ratio to dcap-qvl. Not part of the test run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import datetime
from importlib import metadata
from pathlib import Path

import dcap_qvl

from tdxvm.attest.collateral import load_bundle
from tdxvm.attest.verify import QuoteVerifier

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "testdata" / "tdx" / "dcap-qvl-v4"


def rate(fn, seconds: float) -> float:
    """Median calls per second over five slices of ``seconds / 5``."""
    rates = []
    for _ in range(5):
        n, start = 0, time.perf_counter()
        deadline = start + seconds / 5
        while True:
            fn()
            n += 1
            now = time.perf_counter()
            if now >= deadline:
                break
        rates.append(n / (now - start))
    return statistics.median(rates)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quote", type=Path, default=DATA / "quote.bin")
    ap.add_argument("--collateral", type=Path, default=DATA / "collateral.json")
    ap.add_argument("--at", default="2025-06-20T00:00:00Z", help="verification time (inside the collateral's window)")
    ap.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    args = ap.parse_args()

    quote = args.quote.read_bytes()
    at = datetime.fromisoformat(args.at.replace("Z", "+00:00"))
    now = int(at.timestamp())
    ours = load_bundle(args.collateral)
    theirs = dcap_qvl.QuoteCollateralV3.from_json(args.collateral.read_text())

    result = QuoteVerifier().verify(quote, ours, at=at)
    ref = dcap_qvl.verify(quote, theirs, now)
    if result.reasons or result.tcb.status != ref.status:
        print(f"verdicts differ: tdxvm {result.tcb and result.tcb.status} {result.reasons}, dcap-qvl {ref.status}", file=sys.stderr)
        return 1

    warm_verifier = QuoteVerifier()
    warm_verifier.verify(quote, ours, at=at)
    figures = {
        "tdxvm cold": rate(lambda: QuoteVerifier().verify(quote, ours, at=at), args.seconds),
        "tdxvm warm": rate(lambda: warm_verifier.verify(quote, ours, at=at), args.seconds),
        "dcap-qvl": rate(lambda: dcap_qvl.verify(quote, theirs, now), args.seconds),
    }
    peer = figures["dcap-qvl"]
    print(f"quote: {args.quote} ({len(quote)} bytes), TCB {ref.status}, dcap-qvl {metadata.version('dcap-qvl')}")
    print(f"{'verifier':<12} {'quotes/s':>10} {'ms/quote':>9} {'vs dcap-qvl':>12}")
    for name, value in figures.items():
        print(f"{name:<12} {value:>10.0f} {1000 / value:>9.3f} {value / peer:>11.2f}x")
    print("targets: warm >= 2.00x, cold >= 0.80x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
