#!/usr/bin/env python3
"""Load: 200 concurrent connections for 60 s against the service on loopback with TLS.

    .venv/bin/python bench/load.py [--connections 200] [--seconds 60] [--hidden 512] [--layers 8]

Starts the guest's service in a child process, built as ``python -m tdxvm.guest.serve``
builds it (the same app, API key check, gate limits, engine and uvicorn TLS settings,
on a TLS key made by :mod:`tdxvm.guest.tls`) but without the attestation step, which
needs a quote device. Then N client connections (asyncio, each a TLS keep-alive
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
import os
import random
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tdxvm.emulate.tinyllama import SENTENCES, build_tiny_model  # noqa: E402

CHILD = r"""
import sys, threading
import uvicorn
from pathlib import Path
from tdxvm.guest.apikeys import KeyFile
from tdxvm.guest.engine import EngineConfig
from tdxvm.guest.gate import Limits
from tdxvm.guest.serve import load_in_background, parse_args, uvicorn_config
from tdxvm.guest.server import ModelHolder, create_app
from tdxvm.guest.tls import ensure_identity

args = parse_args(sys.argv[1:])
identity = ensure_identity(args.tls_dir, ["127.0.0.1"])
holder = ModelHolder(args.name)
limits = Limits(max_body=args.max_body_bytes, max_requests=args.max_requests)
app = create_app(holder, keys=KeyFile(args.api_keys), limits=limits)
config = EngineConfig(
    model_dir=args.model, name=args.name, threads=args.threads, max_batch=args.max_batch, max_waiting=args.max_waiting
)
load_in_background(holder, config)
uvicorn.Server(uvicorn_config(app, args, identity)).run()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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

    from tdxvm.guest.apikeys import document, generate

    with tempfile.TemporaryDirectory(prefix="tdxvm-bench-") as tmp:
        model = build_tiny_model(
            Path(tmp) / "model",
            hidden=args.hidden,
            layers=args.layers,
            heads=args.hidden // 64,
            intermediate=args.hidden * 8 // 3,
            context=4096,
            vocab=1000,
        )
        key = generate()
        keys = Path(tmp) / "api-keys"
        keys.write_bytes(document({"bench": key}))
        port = free_port()
        cmd = [
            sys.executable,
            *("-c", CHILD, "--model", str(model), "--name", "bench", "--port", str(port)),
            *("--threads", str(args.threads), "--tls-dir", str(Path(tmp) / "tls"), "--api-keys", str(keys)),
            *("--log-level", "error"),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        proc = subprocess.Popen(cmd, cwd=REPO, env=env)
        try:
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            deadline = time.monotonic() + 120
            while True:
                try:
                    with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", timeout=2, context=ctx) as r:
                        if r.status == 200:
                            break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise SystemExit("the service did not come up") from None
                    time.sleep(0.2)
            idle = rss_mib(proc.pid)
            words = " ".join(SENTENCES * 10).split()
            prompts = [" ".join(words[i : i + 40]) for i in range(0, 200, 10)]
            tally, rss = asyncio.run(drive(port, key, prompts, args.connections, args.seconds, proc.pid))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    answered = sum(v for k, v in tally.items() if isinstance(k, int))
    print(
        f"{args.connections} TLS connections for {args.seconds:.0f} s against the service "
        f"(random Llama, hidden {args.hidden}, {args.layers} layers; batch 16, 64 waiting, 128 requests in flight)"
    )
    for k in sorted(tally, key=str):
        print(f"  {k}: {tally[k]}")
    half = [m for t, m in rss if t >= args.seconds / 2]
    print(
        f"requests answered: {answered} ({tally[200] / args.seconds:.1f}/s served); RSS MiB: idle {idle:.0f}, "
        f"max {max(m for _, m in rss):.0f}, second half {min(half):.0f}..{max(half):.0f}"
    )
    bad = sum(v for k, v in tally.items() if (isinstance(k, int) and k >= 500) or str(k).startswith("error"))
    others = sum(v for k, v in tally.items() if isinstance(k, int) and k not in (200, 429))
    ok = bad == 0 and others == 0 and tally["429 with Retry-After"] == tally[429]
    print(f"5xx or connection errors: {bad}; other statuses: {others}: {'OK' if ok else 'MISSED'}")


if __name__ == "__main__":
    main()
