"""The guest's service run on this host for a benchmark, as ``python -m tdxvm.guest.serve``
builds it (the same app, API key check, gate limits, engine and uvicorn TLS settings, on
a TLS key made by :mod:`tdxvm.guest.tls`) but without the attestation step, which needs
a quote device. Used by bench/load.py and bench/tee_overhead.py ("bare metal")."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import sys
import uvicorn
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
    model_dir=args.model, name=args.name, dtype=args.dtype, threads=args.threads, max_batch=args.max_batch,
    kv_cache_mib=args.kv_cache_mib, max_waiting=args.max_waiting,
)
load_in_background(holder, config)
uvicorn.Server(uvicorn_config(app, args, identity)).run()
"""


@dataclass
class HostService:
    """A running service: its process, port, the API key it takes and its TLS key's SPKI SHA-256."""

    proc: subprocess.Popen
    port: int
    api_key: str
    pin: bytes

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(model: Path, folder: Path, *, name: str, threads: int, dtype: str = "float32") -> HostService:
    """Start the service on ``model`` (keys and TLS files in ``folder``) and wait until it has loaded it."""
    from tdxvm.guest.apikeys import document, generate
    from tdxvm.guest.tls import load_identity

    key = generate()
    keys = folder / "api-keys"
    keys.write_bytes(document({"bench": key}))
    port = free_port()
    cmd = [
        sys.executable,
        *("-c", CHILD, "--model", str(model), "--name", name, "--port", str(port), "--dtype", dtype),
        *("--threads", str(threads), "--tls-dir", str(folder / "tls"), "--api-keys", str(keys)),
        *("--log-level", "error"),
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # its key is read from its folder below
    deadline = time.monotonic() + 300
    while True:
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", timeout=2, context=ctx) as r:
                if r.status == 200:
                    break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise SystemExit("the service did not come up") from None
            time.sleep(0.2)
    identity = load_identity(folder / "tls")
    assert identity is not None
    return HostService(proc, port, key, hashlib.sha256(identity.spki).digest())
