"""The guest tests' one way to run the inference service's app: uvicorn in a thread on a
socket of 127.0.0.1, configured as ``python -m tdxvm.guest.serve`` configures it
(:func:`tdxvm.guest.serve.uvicorn_config`: TLS versions and ciphers, connection cap)."""

from __future__ import annotations

import argparse
import socket
import threading
import time
from typing import Any

import uvicorn

from tdxvm.guest.serve import uvicorn_config
from tdxvm.guest.tls import TlsIdentity


class Served:
    """``app`` served over HTTPS with ``identity`` (plain HTTP without), on ``port`` (0: a free one)."""

    def __init__(
        self, app: Any, identity: TlsIdentity | None = None, *, port: int = 0, max_requests: int = 128
    ) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        self.port = sock.getsockname()[1]
        self.url = f"{'https' if identity else 'http'}://127.0.0.1:{self.port}"
        args = argparse.Namespace(host="127.0.0.1", port=self.port, log_level="warning", max_requests=max_requests)
        self.server = uvicorn.Server(uvicorn_config(app, args, identity))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
