#!/usr/bin/env python3
"""Load: 200 concurrent connections for 60 s against the service on loopback with TLS.

    .venv/bin/python bench/load.py [--connections 200] [--seconds 60] [--hidden 512] [--layers 8]

Starts the guest's service in a child process as ``python -m tdxvm.guest.serve`` builds
it, without the attestation step (bench/tlsservice.py). Then N client connections (asyncio, each a TLS keep-alive
connection with a valid API key) send completions (greedy, 8 to 64 tokens) back to back
for the given time. Counted: answers by status, connection errors, and the service's
RSS (sampled every second). Targets: no 5xx and no connection error, every request
answered (200) or refused with 429 (with ``Retry-After``), RSS bounded (its growth over
the second half of the run stays small). Not part of the test run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import ssl
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import benchmodel  # noqa: E402
import tlsservice  # noqa: E402

from tdxvm.emulate.tinyllama import SENTENCES  # noqa: E402


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


async def client(port: int, ctx: ssl.SSLContext, key: str, prompts: list[str], until: float, tally: Counter) -> None:
    reader = writer = None
    rng = random.Random()
    while time.monotonic() < until:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
            body = json.dumps(
                {"model": "bench", "prompt": rng.choice(prompts), "max_tokens": rng.randint(8, 64), "temperature": 0}
            ).encode()
            writer.write(
                b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                + f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            status = int((await reader.readline()).split()[1])
            headers = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            await reader.readexactly(int(headers.get("content-length", "0")))
            tally[status] += 1
            if status == 429:
                tally["429 with Retry-After"] += "retry-after" in headers
                await asyncio.sleep(float(headers.get("retry-after", "1")))
            if headers.get("connection") == "close":
                writer.close()
                reader = writer = None
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
            tally[f"error: {type(exc).__name__}"] += 1
            if writer is not None:
                writer.close()
            reader = writer = None
            await asyncio.sleep(0.1)
    if writer is not None:
        writer.close()


async def drive(port: int, key: str, prompts: list[str], n: int, seconds: float, pid: int) -> tuple[Counter, list]:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # the bench measures load, not the pin
    tally: Counter = Counter()
    rss: list[tuple[float, float]] = []
    t0 = time.monotonic()
    until = t0 + seconds

    async def sample() -> None:
        while time.monotonic() < until:
            rss.append((time.monotonic() - t0, rss_mib(pid)))
            await asyncio.sleep(1)

    await asyncio.gather(sample(), *(client(port, ctx, key, prompts, until, tally) for _ in range(n)))
    return tally, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="tdxvm-bench-") as tmp:
        model = benchmodel.build(Path(tmp) / "model", hidden=args.hidden, layers=args.layers)
        service = tlsservice.start(model, Path(tmp), name="bench", threads=args.threads)
        try:
            idle = rss_mib(service.proc.pid)
            words = " ".join(SENTENCES * 10).split()
            prompts = [" ".join(words[i : i + 40]) for i in range(0, 200, 10)]
            tally, rss = asyncio.run(
                drive(service.port, service.api_key, prompts, args.connections, args.seconds, service.proc.pid)
            )
        finally:
            service.stop()
    answered = sum(v for k, v in tally.items() if isinstance(k, int))
    print(
        f"{args.connections} TLS connections for {args.seconds:.0f} s against the service "
        f"(random Llama, hidden {args.hidden}, {args.layers} layers; batch 16, 64 waiting, 128 requests in flight)"
    )
    for k in sorted(tally, key=str):
        print(f"  {k}: {tally[k]}")
    half = [m for t, m in rss if t >= args.seconds / 2]
    tenths = [max((m for t, m in rss if t <= args.seconds * i / 10), default=idle) for i in range(1, 11)]
    print(
        f"requests answered: {answered} ({tally[200] / args.seconds:.1f}/s served); RSS MiB: idle {idle:.0f}, "
        f"max {max(m for _, m in rss):.0f}, second half {min(half):.0f}..{max(half):.0f}"
    )
    print(f"RSS MiB, highest by each tenth of the run: {' '.join(f'{m:.0f}' for m in tenths)}")
    bad = sum(v for k, v in tally.items() if (isinstance(k, int) and k >= 500) or str(k).startswith("error"))
    others = sum(v for k, v in tally.items() if isinstance(k, int) and k not in (200, 429))
    ok = bad == 0 and others == 0 and tally["429 with Retry-After"] == tally[429]
    print(f"5xx or connection errors: {bad}; other statuses: {others}: {'OK' if ok else 'MISSED'}")


if __name__ == "__main__":
    main()
