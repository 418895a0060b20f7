#!/usr/bin/env python3
"""LUKS2 payload encryption: MB/s of tdxvm's user-space aes-xts-plain64, and its peers.

    .venv/bin/python bench/luks_encrypt.py [--size-mib 512] [--runs 3]

Prints, for a payload of --size-mib (random bytes in a temporary file):

* ``per-sector XTS``           — the peer: one ``cryptography`` XTS call per 512-byte
                                 sector (timed on 1/8 of the payload, in memory);
* ``bulk XTS``                 — ``XtsPlain64.encrypt`` on the same sample;
* ``encrypt_image, python``     — the whole step: luksFormat, reading the payload,
                                 encrypting with XtsPlain64, writing the image, fsync;
* ``encrypt_image, cryptsetup`` — the same step, cryptsetup's offline reencryption (C)
                                 doing the encryption: the same bytes.

Also prints how much faster two busy processes run than one: a process pool over chunks
can only help where that is near 2x. Target: encrypt_image >= 200 MB/s. Best of --runs;
MB = 1e6 bytes. Not part of the test run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes  # noqa: E402

from tdxvm.image.luks import encrypt_image  # noqa: E402
from tdxvm.image.secrets import generate_volume_key  # noqa: E402
from tdxvm.image.xts import XtsPlain64  # noqa: E402


def best(runs: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def per_sector(key: bytes, data: bytes) -> bytes:
    aes, out = algorithms.AES(key), bytearray()
    for i in range(len(data) // 512):
        out += Cipher(aes, modes.XTS(i.to_bytes(16, "little"))).encryptor().update(data[512 * i : 512 * (i + 1)])
    return bytes(out)


def _spin(_: int) -> float:
    start, x = time.perf_counter(), 0
    for i in range(5_000_000):
        x += i
    return time.perf_counter() - start


def parallel_speedup() -> float:
    """Throughput of two CPU-bound processes relative to one (2.0 = two real cores)."""
    ctx = multiprocessing.get_context()
    with ctx.Pool(2) as pool:
        pool.map(_spin, range(2))  # warm up
        one = best(2, lambda: pool.map(_spin, range(1)))
        two = best(2, lambda: pool.map(_spin, range(2)))
    return 2 * one / two


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    size = args.size_mib << 20
    key = generate_volume_key()
    print(f"payload {args.size_mib} MiB, {os.cpu_count()} CPUs, two busy processes run {parallel_speedup():.2f}x one")
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="tdxvm-bench-luks-") as tmp:
        payload = Path(tmp) / "payload"
        with open(payload, "wb") as f:
            for _ in range(0, size, 4 << 20):
                f.write(os.urandom(4 << 20))
        sample = payload.read_bytes()[: size // 8]
        rows.append(("per-sector XTS (cryptography, peer)", len(sample) / best(1, lambda: per_sector(key, sample))))
        xts = XtsPlain64(key)
        rows.append(("bulk XTS (XtsPlain64, same sample)", len(sample) / best(args.runs, lambda: xts.encrypt(sample))))
        image = Path(tmp) / "disk.img"
        for engine in ("python", "cryptsetup"):

            def run(e: str = engine) -> None:
                encrypt_image(
                    payload=payload,
                    output=image,
                    volume_key=key,
                    passphrase=b"bench",
                    uuid="5e0c2f8a-91b4-4d3e-8c7a-6b5a4f3e2d1c",
                    engine=e,
                )

            rows.append((f"encrypt_image, {engine}", size / best(args.runs, run)))
    width = max(len(name) for name, _ in rows)
    for name, rate in rows:
        print(f"{name:<{width}}  {rate / 1e6:8.1f} MB/s")
    print("target: encrypt_image >= 200 MB/s")


if __name__ == "__main__":
    main()
