"""Real TLS servers on 127.0.0.1 for the pinning and endpoint tests.

:class:`HttpsServer` answers every request with what a function returns (a canned
attestation, a redirect...) and records what it received; :class:`TlsProxy` is a man in
the middle: it terminates TLS with its own certificate and forwards the bytes to a real
server over a second TLS connection, counting what the client sent through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tdxvm.guest.tls import TlsIdentity

Answer = tuple[int, dict[str, str], bytes]


def server_context(identity: TlsIdentity) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(identity.cert_path, identity.key_path)
    return ctx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class HttpsServer:
    """A threaded HTTPS server with ``identity``'s key; ``answer(path)`` makes each response."""

    def __init__(self, identity: TlsIdentity, answer: Callable[[str], Answer], *, port: int = 0) -> None:
        self.requests: list[str] = []
        self.connections: list[socket.socket] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                owner.requests.append(self.path)
                status, headers, body = answer(self.path)
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", **headers, "Content-Length": str(len(body))}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            allow_reuse_address = True
            daemon_threads = True

            def get_request(self) -> tuple[socket.socket, object]:
                conn, addr = super().get_request()
                owner.connections.append(conn)
                return conn, addr

        self.httpd = Server(("127.0.0.1", port), Handler)
        self.httpd.socket = server_context(identity).wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop listening and drop every open connection (kept-alive ones included)."""
        self.httpd.shutdown()
        self.httpd.server_close()
        for conn in self.connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self.thread.join(timeout=10)


class TlsProxy:
    """Terminates TLS on 127.0.0.1 with ``identity`` and relays to ``upstream`` (host, port) over TLS."""

    def __init__(self, identity: TlsIdentity, upstream: tuple[str, int]) -> None:
        self.upstream, self.client_bytes, self.connections = upstream, 0, 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        ctx = server_context(identity)
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._relay, "127.0.0.1", 0, ssl=ctx), self.loop
        ).result(10)
        self.url = f"https://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
        up_reader, up_writer = await asyncio.open_connection(*self.upstream, ssl=client)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, count: bool) -> None:
            try:
                while data := await src.read(65536):
                    if count:
                        self.client_bytes += len(data)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer, True), pump(up_reader, writer, False), return_exceptions=True)

    def stop(self) -> None:
        """Close the listener, cancel every relay and wait for them, then close the loop."""

        async def shutdown() -> None:
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()
