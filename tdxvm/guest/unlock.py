"""Unlock mode: the initramfs's agent. Prints the disk's volume key, and only that.

    python3 -m tdxvm.guest.unlock [--listen 0.0.0.0:7300] [--qgs HOST:PORT]

The initramfs's ``local-top/tdxvm`` script runs this and pipes what it prints into
:mod:`tdxvm.guest.rootdisk`, which maps the root filesystem with it. This serves the
agent protocol (:mod:`tdxvm.guest.agentwire`) with the per-attest X25519 key as the only
bound key, until the controller has attested this TD and released the secret ``disk``
(the volume key) sealed to that key; it then writes the secret to standard output,
exactly its bytes, and exits 0. The secret opens only if the controller's release key
sealed it (``--controller-key``, in the measured initramfs): a key sealed by anyone else
(the host, which can attest this TD too) is refused and does not take the slot, so the
controller's release still works after it. Any other secret is refused. Diagnostics go
to standard error (the console), never the key.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from tdxvm.guest import agentwire as wire
from tdxvm.guest.agent import (
    Agent,
    AgentError,
    AgentServer,
    SecretRefused,
    common_arguments,
    controller_key,
    listen_address,
)

SECRET = "disk"

log = logging.getLogger("tdxvm.guest.unlock")


class DiskSecret:
    """Takes the secret ``disk`` (and nothing else); :attr:`ready` once the controller has its ``ok``."""

    def __init__(self) -> None:
        self.value: bytes | None = None
        self.ready = threading.Event()
        self._lock = threading.Lock()

    def accept(self, name: str, data: bytes) -> None:
        if name != SECRET:
            raise SecretRefused(f"unlock mode takes only the secret {SECRET!r}, not {name!r}")
        if not data:
            raise SecretRefused(f"the secret {SECRET!r} is empty")
        with self._lock:
            if self.value is None:
                self.value = data

    def delivered(self, name: str) -> None:
        if name == SECRET and self.value is not None:
            self.ready.set()


def serve_until_unlocked(
    host: str,
    port: int,
    *,
    controller: bytes,
    qgs: str | None = None,
    root: Path = Path("/"),
    on_listening: Callable[[AgentServer], None] | None = None,
) -> bytes:
    """Serve the agent on ``(host, port)`` until the controller's disk secret has been delivered; return it."""
    disk = DiskSecret()
    agent = Agent(
        on_secret=disk.accept, controller_key=controller, on_delivered=disk.delivered, root=root, default_qgs=qgs
    )
    with AgentServer(agent, host, port) as server:
        log.info(
            "listening on %s; waiting for the controller to attest this TD and release the disk key", server.listening
        )
        if on_listening is not None:
            on_listening(server)
        disk.ready.wait()
    assert disk.value is not None
    return disk.value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python3 -m tdxvm.guest.unlock",
        description="Print the disk's volume key once the "
        "controller has attested this TD and released it (read by tdxvm.guest.rootdisk)",
    )
    p.add_argument("--listen", type=listen_address, default=("0.0.0.0", wire.DEFAULT_PORT), metavar="ADDR:PORT")
    common_arguments(p)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr, format="tdxvm-unlock: %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    host, port = args.listen
    try:
        controller = controller_key(args.controller_key)
    except AgentError as exc:
        log.error("%s; the disk cannot be unlocked without it", exc)
        return 2
    try:
        key = serve_until_unlocked(host, port, controller=controller, qgs=args.qgs, root=args.root)
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", host, port, exc.strerror or exc)
        return 2
    except KeyboardInterrupt:
        return 1
    out = sys.stdout.buffer
    out.write(key)
    out.flush()
    log.info("disk key received (%d bytes); unlocking", len(key))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
