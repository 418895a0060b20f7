#!/usr/bin/env python3
"""Encrypted-weights format: encrypt/decrypt throughput per core and peak memory.

    .venv/bin/python bench/weights_format.py [--size-gib 4] [--dir /var/tmp]

Writes a random file of --size-gib GiB (default 4), then encrypts and decrypts it in
separate child processes, each measured for wall time, CPU time (user + system) and
peak RSS. GiB/s per core = bytes / CPU seconds. The peer is the cipher alone: AES-256-GCM
from the same library on the same chunks in memory, and SHA-256 of the same bytes.
Targets: >= 2 GiB/s per core, peak RSS < 256 MiB. Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from tdxvm.guest.weights import encrypt_model, decrypt_model
op, src, dst, key = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), bytes.fromhex(sys.argv[4])
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
(encrypt_model if op == "encrypt" else decrypt_model)(src, dst, key)
r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
user, system = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
print(json.dumps({"wall": t1 - t0, "cpu": user + system, "user": user, "sys": system, "rss_mib": r1.ru_maxrss / 1024}))
"""


def child(op: str, src: Path, dst: Path, key: bytes) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, op, str(src), str(dst), key.hex()], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout)


def in_memory(chunk: bytes, total: int) -> tuple[float, float]:
    """The format's own cost (GiB/s per core), no file system: encrypt includes the
    SHA-256 pass over the plaintext, as encrypt_model does; decrypt authenticates."""
    import hashlib
    import io

    from tdxvm.guest.weights import decrypt_chunks, encrypt_stream

    class Source:
        def __init__(self) -> None:
            self.left = total

        def read(self, n: int) -> bytes:
            k = min(n, self.left)
            self.left -= k
            return chunk if k == len(chunk) else chunk[:k]

    class Sink:
        def write(self, b: bytes) -> None:
            pass

    key = os.urandom(32)
    t = time.process_time()
    h = hashlib.sha256()
    for _ in range(total // len(chunk)):
        h.update(chunk)
    encrypt_stream(Source(), Sink(), key=key, path="f", size=total, sha256=h.digest(), chunk_size=len(chunk))
    enc = total / (time.process_time() - t) / 2**30
    sealed = io.BytesIO()
    part = min(total, 512 << 20)
    src = Source()
    src.left = part
    encrypt_stream(src, sealed, key=key, path="f", size=part, sha256=bytes(32), chunk_size=len(chunk))
    sealed.seek(0)
    t = time.process_time()
    _, chunks = decrypt_chunks(sealed, key=key, path="f", where="memory")
    for _ in chunks:
        pass
    dec = part / (time.process_time() - t) / 2**30
    return enc, dec


def cipher_only(chunk: bytes, total: int) -> tuple[float, float]:
    import hashlib

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead = AESGCM(os.urandom(32))
    n = total // len(chunk)
    t = time.process_time()
    for i in range(n):
        aead.encrypt(i.to_bytes(12, "big"), chunk, b"\0" * 32)
    gcm = n * len(chunk) / (time.process_time() - t)
    t = time.process_time()
    h = hashlib.sha256()
    for _ in range(n):
        h.update(chunk)
    sha = n * len(chunk) / (time.process_time() - t)
    return gcm, sha


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gib", type=float, default=4.0)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    args = ap.parse_args()
    size = int(args.size_gib * 2**30)
    work = Path(tempfile.mkdtemp(prefix="tdxvm-bench-", dir=args.dir))
    try:
        model = work / "model"
        model.mkdir()
        block = os.urandom(1 << 20)
        with (model / "model.safetensors").open("wb") as f:
            for _ in range(size // len(block)):
                f.write(block)
        key = os.urandom(32)
        enc = child("encrypt", model, work / "enc", key)
        dec = child("decrypt", work / "enc", work / "out", key)
        gcm, sha = cipher_only(block, min(size, 1 << 30))
        mem_enc, mem_dec = in_memory(block, size)
        gib = size / 2**30
        print(f"file: {gib:.2f} GiB in {work} (chunk 1 MiB)")
        print(f"{'':<34} {'GiB/s/core':>10} {'user s':>7} {'sys s':>7} {'wall s':>7} {'peak RSS MiB':>13}")
        for name, r in (("encrypt, file to file", enc), ("decrypt, file to file", dec)):
            print(
                f"{name:<34} {gib / r['cpu']:>10.2f} {r['user']:>7.2f} {r['sys']:>7.2f} "
                f"{r['wall']:>7.2f} {r['rss_mib']:>13.0f}"
            )
        print(f"{'encrypt, in memory (with SHA-256)':<34} {mem_enc:>10.2f}")
        print(f"{'decrypt, in memory':<34} {mem_dec:>10.2f}")
        print(f"{'peer: AES-256-GCM alone':<34} {gcm / 2**30:>10.2f}")
        print(f"{'peer: SHA-256 alone':<34} {sha / 2**30:>10.2f}")
        print("targets: >= 2 GiB/s per core, peak RSS < 256 MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
