"""The guest side of a weights upload: receive an encrypted model folder, resumably.

    python3 -m tdxvm.guest.receiver --dest DIR --listen HOST:PORT --expect UPLOAD_ID

The controller starts this through its SSH session to the attested guest and writes
the manifest and a session MAC key to its stdin (see :mod:`tdxvm.guest.transferwire`).
It takes the upload's lock, re-checks what an earlier attempt left on disk
(:mod:`tdxvm.guest.staging`), listens, and prints one JSON line::

    {"ok": true, "ready": true, "upload": ID, "port": P, "pid": N, "token": HEX,
     "complete": false, "have": BYTES, "total": BYTES,
     "resume": {NAME: OFFSET}, "missing": {NAME: [[START, END], ...]}}

``resume`` is each file's first byte not yet held and verified (a block boundary);
``missing`` lists every such range (parallel streams can leave more than one). It then
accepts bulk streams, refusing any connection without the token and any block whose
tag fails (that connection gets ``{"ok": false, "code": "refused", ...}`` and is
closed; verified blocks stay). Control lines on stdin:

* ``{"op": "commit"}``: when every block is in, stop listening, fsync, move the upload
  into ``DIR/<upload id>``, print ``{"ok": true, "committed": PATH, ...}`` and exit 0;
  otherwise print ``{"ok": false, "code": "incomplete", ...missing}`` and go on serving.
* ``{"op": "abort"}``, or stdin closing (the SSH session ended), or no traffic for
  ``--idle-timeout`` seconds: stop and exit 3, keeping the partial upload for a resume.

Errors print ``{"ok": false, "code": ..., "error": ...}``; exit status 1 (refused or
failed), 2 (bad input), 3 (stopped before commit). Standard library, ``cryptography``
and :mod:`tdxvm.guest` only: this runs in the guest.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import queue
import resource
import secrets
import socket
import sys
import threading
import time
from pathlib import Path
from typing import BinaryIO

from tdxvm.guest import scratch
from tdxvm.guest.staging import Staging, StagingError
from tdxvm.guest.transferwire import (
    END_OF_STREAM,
    HELLO_SIZE,
    MAC_KEY_SIZE,
    MAC_SIZE,
    MAGIC,
    MAX_LINE,
    SEGMENT,
    TOKEN_SIZE,
    BlockMac,
    Manifest,
    WireError,
    parse_listen,
)

MAX_CONNECTIONS = 16  # each holds one block buffer (at most 64 MiB)
# Anyone who reaches the port may connect (the host's forward): what its connections make
# the receiver say is bounded, so they cannot fill the SSH channel's stderr (which the
# controller reads only at the end) nor the commit reply.
MAX_NOTES = 64
MAX_REFUSALS = 16
HELLO_TIMEOUT = 10.0
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED = 0, 1, 2, 3


def recv_exact(conn: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``conn``; :class:`EOFError` if the peer closes first."""
    got, n = 0, len(view)
    while got < n:
        k = conn.recv_into(view[got:], n - got, socket.MSG_WAITALL)
        if k == 0:
            raise EOFError(f"stream closed after {got} of {n} bytes")
        got += k


class Receiver:
    """Accepts bulk streams for one :class:`Staging`; see the module doc."""

    def __init__(self, staging: Staging, mac_key: bytes, *, idle_timeout: float, log: BinaryIO | None = None) -> None:
        self.staging, self.mac = staging, BlockMac(mac_key)
        self.token = secrets.token_bytes(TOKEN_SIZE)
        self.idle_timeout = idle_timeout
        self.last_activity = time.monotonic()
        self.received = 0
        self.refusals: list[str] = []  # the first MAX_REFUSALS reasons; ``refused`` counts them all
        self.refused = 0
        self._notes = 0
        self._log = log
        self._listener: socket.socket | None = None
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._accepter: threading.Thread | None = None

    def listen(self, address: tuple[str, int]) -> int:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(16)
        sock.settimeout(0.25)
        self._listener = sock
        self._accepter = threading.Thread(target=self._accept_loop, name="accept", daemon=True)
        self._accepter.start()
        return int(sock.getsockname()[1])

    def note(self, message: str) -> None:
        with self._lock:
            self._notes += 1
            count = self._notes
        if self._log is None or count > MAX_NOTES:
            return
        if count == MAX_NOTES:
            message = f"{message} (further notes left out)"
        self._log.write(f"tdxvm receiver: {message}\n".encode())
        self._log.flush()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stopping.is_set():
                    return
                self.note(f"accept failed: {exc}")  # EMFILE and the like: try again shortly
                time.sleep(0.2)
                continue
            with self._lock:
                if self._stopping.is_set() or len(self._conns) >= MAX_CONNECTIONS:
                    conn.close()
                    continue
                t = threading.Thread(target=self._serve, args=(conn, peer), name=f"stream-{peer}", daemon=True)
                self._conns[conn] = t
            t.start()

    def _serve(self, conn: socket.socket, peer: object) -> None:
        try:
            conn.settimeout(HELLO_TIMEOUT)
            hello = bytearray(HELLO_SIZE)
            try:
                recv_exact(conn, memoryview(hello))
            except (EOFError, OSError):
                return
            if hello[: len(MAGIC)] != MAGIC or not secrets.compare_digest(bytes(hello[len(MAGIC) :]), self.token):
                self.note(f"connection from {peer} without this session's token: closed")
                return
            conn.settimeout(self.idle_timeout)
            try:
                blocks = self._receive(conn)
                self._reply(conn, {"ok": True, "blocks": blocks})
            except (WireError, StagingError) as exc:
                with self._lock:
                    self.refused += 1
                    if len(self.refusals) < MAX_REFUSALS:
                        self.refusals.append(str(exc))
                self.note(f"stream from {peer}: {exc}")
                self._reply(conn, {"ok": False, "code": exc.code, "error": str(exc)})
            except (EOFError, OSError) as exc:
                if not self._stopping.is_set():
                    self.note(f"stream from {peer} broke: {exc}")
        finally:
            with self._lock:
                self._conns.pop(conn, None)
            conn.close()

    @staticmethod
    def _reply(conn: socket.socket, doc: dict) -> None:
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps(doc).encode() + b"\n")

    def _receive(self, conn: socket.socket) -> int:
        m = self.staging.manifest
        tag = memoryview(bytearray(MAC_SIZE))
        block_buf = mmap.mmap(-1, m.block_size)  # page-aligned, reused: lets the staging write it with O_DIRECT
        block_view = memoryview(block_buf)
        header = memoryview(bytearray(SEGMENT.size))
        blocks = 0
        while True:
            recv_exact(conn, header)
            file_index, count, first = SEGMENT.unpack(header)
            if file_index == END_OF_STREAM:
                return blocks
            if file_index >= len(m.files):
                raise WireError(f"segment names file {file_index}, the manifest has {len(m.files)}", code="protocol")
            f = m.files[file_index]
            if count == 0 or first + count > f.blocks(m.block_size):
                raise WireError(
                    f"{f.name}: segment of blocks {first}..{first + count} "
                    f"is outside the file's {f.blocks(m.block_size)} blocks",
                    code="protocol",
                )
            for b in range(first, first + count):
                n = m.block_len(file_index, b)
                data = block_view[:n]
                recv_exact(conn, tag)
                recv_exact(conn, data)
                if not self.mac.verify(file_index, b, data, tag):
                    off = b * m.block_size
                    raise WireError(
                        f"{f.name}: block {b} (bytes {off}..{off + n}) fails its tag: altered in transit, "
                        "or not sent by this session's controller; refused, not written",
                        code="refused",
                    )
                try:
                    self.staging.write_block(file_index, b, data, aligned=True)
                except OSError as exc:
                    raise StagingError(
                        f"{f.name}: writing block {b} under {self.staging.root}: {exc.strerror or exc}",
                        code="write-failed",
                    ) from None
                blocks += 1
                self.received += n
                self.last_activity = time.monotonic()

    def stop(self) -> None:
        """Stop accepting, cut every open stream and wait for its writer to finish."""
        self._stopping.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept() (close alone does not)
        if self._accepter is not None:
            self._accepter.join()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            conns = list(self._conns.items())
        for conn, _ in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for _, t in conns:
            t.join()


def _emit(doc: dict) -> None:
    sys.stdout.write(json.dumps(doc, separators=(",", ":")) + "\n")
    sys.stdout.flush()


class _Lines:
    """Lines from a file descriptor, read with ``os.read``: a thread blocked here holds no
    interpreter-level lock, so the process can exit while it waits (a ``BufferedReader``
    would abort the interpreter at shutdown)."""

    def __init__(self, fd: int) -> None:
        self.fd, self.buf = fd, bytearray()

    def readline(self) -> bytes:
        """One line with its newline; what is left at end of input (possibly b"") otherwise."""
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[: i + 1])
                del self.buf[: i + 1]
                return line
            if len(self.buf) > MAX_LINE:
                raise WireError(f"stdin: a control line is longer than {MAX_LINE} bytes", code="usage")
            chunk = os.read(self.fd, 1 << 20)
            if not chunk:
                line, self.buf = bytes(self.buf), bytearray()
                return line
            self.buf += chunk

    def expect(self, what: str) -> bytes:
        line = self.readline()
        if not line.endswith(b"\n"):
            raise WireError(f"stdin: {what} line missing or cut short", code="usage")
        return line[:-1]


def _stdin_lines(lines_in: _Lines) -> queue.Queue:
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        while True:
            try:
                line = lines_in.readline()
            except (WireError, OSError):
                line = b""
            if not line:
                lines.put(None)
                return
            lines.put(line)

    threading.Thread(target=pump, name="stdin", daemon=True).start()
    return lines


def _check_space(staging: Staging) -> None:
    st = os.statvfs(staging.dest)
    need = staging.manifest.total_bytes - staging.have_bytes()
    if not staging.already_complete and st.f_bavail * st.f_frsize < need + (64 << 20):
        raise StagingError(
            f"{staging.dest}: {st.f_bavail * st.f_frsize} bytes free, "
            f"the upload needs {need} more (and 64 MiB to spare)",
            code="no-space",
        )


def serve(staging: Staging, mac_key: bytes, listen: tuple[str, int], control: _Lines, *, idle_timeout: float) -> int:
    """Run one receiving session on an open :class:`Staging`; returns the exit status."""
    _check_space(staging)
    receiver = Receiver(staging, mac_key, idle_timeout=idle_timeout, log=sys.stderr.buffer)
    port = receiver.listen(listen)
    _emit(
        {
            "ok": True,
            "ready": True,
            "upload": staging.upload_id,
            "port": port,
            "pid": os.getpid(),
            "token": receiver.token.hex(),
            **staging.resume_report(),
        }
    )
    lines = _stdin_lines(control)
    try:
        while True:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                if time.monotonic() - receiver.last_activity > idle_timeout:
                    _emit(
                        {
                            "ok": False,
                            "code": "idle",
                            "error": f"no traffic for {idle_timeout:.0f} s; partial upload kept for a resume",
                        }
                    )
                    return EXIT_STOPPED
                continue
            receiver.last_activity = time.monotonic()
            if line is None:
                receiver.note("stdin closed (the controller went away); partial upload kept for a resume")
                return EXIT_STOPPED
            try:
                op = json.loads(line).get("op")
            except (ValueError, AttributeError):
                op = None
            if op == "commit":
                if not staging.is_complete():
                    report = staging.resume_report()
                    _emit(
                        {
                            "ok": False,
                            "code": "incomplete",
                            "error": (
                                f"{report['total'] - report['have']} bytes still missing; nothing moved into place"
                            ),
                            **report,
                        }
                    )
                    continue
                receiver.stop()
                path = staging.commit()
                _emit(
                    {
                        "ok": True,
                        "committed": str(path),
                        "received": receiver.received,
                        "refusals": receiver.refusals,
                        "refused": receiver.refused,
                    }
                )
                return EXIT_OK
            if op == "abort":
                _emit(
                    {
                        "ok": False,
                        "code": "aborted",
                        "error": "aborted by the controller; partial upload kept for a resume",
                    }
                )
                return EXIT_STOPPED
            _emit({"ok": False, "code": "usage", "error": f"unknown control line {line[:80]!r}"})
    finally:
        receiver.stop()


def _allow_files(n: int) -> None:
    """Raise the soft open-file limit to ``n`` where the hard limit allows (a model of many files)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < n:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (n if hard == resource.RLIM_INFINITY else min(n, hard), hard))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m tdxvm.guest.receiver", description="Receive an encrypted model folder (see the module doc)."
    )
    parser.add_argument(
        "--dest", required=True, type=Path, help="receiving folder; the upload ends in DEST/<upload id>"
    )
    parser.add_argument(
        "--listen", default="0.0.0.0:0", help="HOST:PORT for bulk streams [default: 0.0.0.0:0, any free port]"
    )
    parser.add_argument("--expect", required=True, help="the upload id: SHA-256 (hex) of the manifest given on stdin")
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=300.0,
        help="exit (keeping the partial upload) after this long without traffic",
    )
    parser.add_argument(
        "--lock-timeout",
        type=float,
        default=30.0,
        help="wait this long for another receiver of the same upload to exit",
    )
    args = parser.parse_args(argv)
    stdin = _Lines(sys.stdin.fileno())
    try:
        listen = parse_listen(args.listen)
        manifest = Manifest.from_bytes(stdin.expect("manifest"), expect=args.expect)
        try:
            mac_key = bytes.fromhex(json.loads(stdin.expect("session key"))["mac_key"])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise WireError('stdin: second line is not {"mac_key": "<64 hex>"}', code="usage") from None
        if len(mac_key) != MAC_KEY_SIZE:
            raise WireError(f"stdin: mac_key is {len(mac_key)} bytes, expected {MAC_KEY_SIZE}", code="usage")
        _allow_files(3 * len(manifest.files) + 4 * MAX_CONNECTIONS + 64)  # data, direct and tags per file; streams
        if args.dest.resolve().is_relative_to(scratch.MOUNT):  # the scratch disk: formatted at boot, beside the agent
            scratch.require()
        staging = Staging.open(args.dest, manifest, lock_timeout=args.lock_timeout)
    except scratch.ScratchError as exc:
        _emit({"ok": False, "code": "scratch", "error": str(exc)})
        return EXIT_FAILED
    except (WireError, StagingError, OSError) as exc:
        _emit({"ok": False, "code": getattr(exc, "code", "os-error"), "error": str(exc)})
        return EXIT_USAGE if getattr(exc, "code", "") in ("usage", "manifest", "manifest-mismatch") else EXIT_FAILED
    try:
        return serve(staging, mac_key, listen, stdin, idle_timeout=args.idle_timeout)
    except (WireError, StagingError, OSError) as exc:
        _emit({"ok": False, "code": getattr(exc, "code", "os-error"), "error": str(exc)})
        return EXIT_FAILED
    finally:
        staging.close()


if __name__ == "__main__":
    sys.exit(main())
