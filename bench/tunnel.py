#!/usr/bin/env python3
"""Guest-port tunnel throughput on loopback: tdxvm's SSH relay vs a direct connection and
OpenSSH's own ``ssh -L``, in one run.

    .venv/bin/python bench/tunnel.py [--size 512M] [--runs 3]

Starts a private sshd on 127.0.0.1 (:class:`tests.provision.sshd.LocalSshd`: temporary
keys and config; the system's sshd is left alone) and two TCP servers standing for a
guest's forward on the host: a sink (reads everything, answers the count) and a source
(sends --size bytes). Then moves --size bytes each way through each path, one after the
other:

* ``direct``   — a plain loopback connection to the server (what a local host gets);
* ``tdxvm``    — :func:`tdxvm.launch.tunnel.reach` for ``qemu+ssh://…``: a local listener
  relayed through a ``direct-tcpip`` channel of the host's shared paramiko session;
* ``ssh -L``   — OpenSSH's local forward through the same sshd (its default cipher).

MB/s = 10^6 bytes of payload per second, median of --runs (each path takes its turn
in every round). Not part of the test run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tdxvm.launch import tunnel  # noqa: E402
from tests.provision.sshd import LocalSshd, unavailable  # noqa: E402

CHUNK = 1 << 20


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    return int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)


def serve(handle) -> int:  # noqa: ANN001
    server = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        while True:
            conn, _ = server.accept()
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return server.getsockname()[1]


def sink(conn: socket.socket) -> None:
    with conn:
        n = 0
        while data := conn.recv(CHUNK):
            n += len(data)
        conn.sendall(str(n).encode())


def source_of(size: int):  # noqa: ANN201
    block = os.urandom(CHUNK)

    def source(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # a readiness probe hangs up at once
            left = size
            while left:
                part = block[: min(left, CHUNK)]
                conn.sendall(part)
                left -= len(part)

    return source


def upload(address: tuple[str, int], size: int) -> float:
    block = os.urandom(CHUNK)
    started = time.perf_counter()
    with socket.create_connection(address) as s:
        left = size
        while left:
            part = block[: min(left, CHUNK)]
            s.sendall(part)
            left -= len(part)
        s.shutdown(socket.SHUT_WR)
        assert int(s.recv(64)) == size
    return time.perf_counter() - started


def download(address: tuple[str, int], size: int) -> float:
    started = time.perf_counter()
    with socket.create_connection(address) as s:
        n = 0
        while data := s.recv(CHUNK):
            n += len(data)
    assert n == size
    return time.perf_counter() - started


def ssh_forward(sshd: LocalSshd, remote_port: int) -> tuple[subprocess.Popen, tuple[str, int]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        local = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            "ssh",
            "-N",
            *sshd.ssh_options(),
            "-o",
            "ExitOnForwardFailure=yes",
            "-p",
            str(sshd.port),
            "-L",
            f"127.0.0.1:{local}:127.0.0.1:{remote_port}",
            f"{sshd.user}@127.0.0.1",
        ],
        stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", local), timeout=0.5).close()
            return proc, ("127.0.0.1", local)
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("ssh -L did not start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="512M")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    size = parse_size(args.size)
    if why := unavailable():
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    sink_port, source_port = serve(sink), serve(source_of(size))
    with LocalSshd() as sshd:
        query = f"keyfile={quote(str(sshd.client_key))}&known_hosts={quote(str(sshd.known_hosts))}"
        uri = f"qemu+ssh://{sshd.user}@127.0.0.1:{sshd.port}/system?{query}"
        paths: dict[str, dict[str, tuple[str, int]]] = {
            "direct": {"up": ("127.0.0.1", sink_port), "down": ("127.0.0.1", source_port)},
            "tdxvm": {
                "up": tunnel.reach(uri, "127.0.0.1", sink_port),
                "down": tunnel.reach(uri, "127.0.0.1", source_port),
            },
        }
        forwards = []
        if shutil.which("ssh"):
            for direction, port in (("up", sink_port), ("down", source_port)):
                proc, address = ssh_forward(sshd, port)
                forwards.append(proc)
                paths.setdefault("ssh -L", {})[direction] = address
        times: dict[tuple[str, str], list[float]] = {}
        try:
            for _ in range(args.runs):
                for name, where in paths.items():
                    times.setdefault((name, "up"), []).append(upload(where["up"], size))
                    times.setdefault((name, "down"), []).append(download(where["down"], size))
        finally:
            for proc in forwards:
                proc.terminate()
                proc.wait(10)
            tunnel.close_all()
    print(f"{size / 1e6:.0f} MB each way, median of {args.runs} (MB/s; ratio = tdxvm / other path)")
    print(f"{'path':<8} {'to host':>10} {'from host':>10}")
    mbps = {k: size / 1e6 / statistics.median(v) for k, v in times.items()}
    for name in paths:
        print(f"{name:<8} {mbps[(name, 'up')]:>10.0f} {mbps[(name, 'down')]:>10.0f}")
    for name in paths:
        if name != "tdxvm":
            up, down = (mbps[("tdxvm", d)] / mbps[(name, d)] for d in ("up", "down"))
            print(f"tdxvm / {name}: {up:.2f}x to host, {down:.2f}x from host")
    return 0


if __name__ == "__main__":
    sys.exit(main())
