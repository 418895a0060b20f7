"""Shared by the handshake tests: an emulated platform, the artifacts an emulated TD boots,
the real guest agent (in a thread or as ``python -m``), and line-level men in the middle.

The kernel is a small PE/COFF image whose EFI stub carries the CC measurement protocol
GUID (so RTMR2 is predicted, as for Debian's >= 6.9 kernels), the firmware a minimal TDVF
with one measured section; both are built by ``tests/image/conftest.py``'s builders,
which ``tests/image/test_measure.py`` and ``test_tdvf.py`` check against independent
computations. Platforms are made once per session (``functools.cache``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tdxvm.attest.chain import TrustAnchor
from tdxvm.attest.policy import Policy
from tdxvm.emulate import EmulatedPlatform
from tdxvm.emulate.qgs import LaunchArtifacts
from tdxvm.guest.agent import Agent, AgentServer, SecretsDir
from tdxvm.guest.envelope import raw_public
from tdxvm.image.measure import EFI_CC_MEASUREMENT_PROTOCOL_GUID, EFI_TCG2_PROTOCOL_GUID, predict

from .image.conftest import build_pe, build_tdvf

REPO = Path(__file__).resolve().parents[1]
AT = datetime(2025, 7, 1, 12, 0, 0, tzinfo=timezone.utc)  # nothing here reads the clock
CMDLINE = "console=ttyS0 root=/dev/mapper/root ro"
INITRD = b"070701" + bytes(range(256)) * 16


# The controller's release key in these tests (tdxvm.releasekey makes a random one per store).
CONTROLLER = X25519PrivateKey.from_private_bytes(bytes.fromhex("11" * 32))
CONTROLLER_PUBLIC = raw_public(CONTROLLER)


def controller_key_file(folder: Path) -> Path:
    """The file an image carries at /etc/tdxvm/controller-release.pub, for a spawned agent."""
    path = folder / "controller-release.pub"
    path.write_text(CONTROLLER_PUBLIC.hex() + "\n")
    return path


@functools.cache
def platform() -> EmulatedPlatform:
    return EmulatedPlatform(at=AT, seed="tests/handshake")


@functools.cache
def forger() -> EmulatedPlatform:
    """Another platform: same formats, another root CA (a forger's)."""
    return EmulatedPlatform(at=AT, seed="tests/handshake/forger")


def anchor() -> TrustAnchor:
    return TrustAnchor.from_der(platform().root_ca_der)


@functools.cache
def kernel() -> bytes:
    guids = EFI_TCG2_PROTOCOL_GUID.bytes_le + EFI_CC_MEASUREMENT_PROTOCOL_GUID.bytes_le
    return build_pe(sections=[(0x400, guids + b"\x90" * 0x1E0), (0x600, b"\xcc" * 0x400)])


@functools.cache
def firmware() -> bytes:
    return build_tdvf([(0, 0x1000, 0x100000, 0x1000, 0, 1)], fill=b"TDVF" * 1024)  # one BFV page, MR.EXTEND


def artifacts(**changes: object) -> LaunchArtifacts:
    base = LaunchArtifacts(kernel=kernel(), initrd=INITRD, cmdline=CMDLINE, firmware=firmware())
    return dataclasses.replace(base, **changes)


def policy_for(launch: LaunchArtifacts, **changes: object) -> Policy:
    """The policy the build manifest gives: MRTD, RTMR1, RTMR2 predicted from the build's files."""
    m = predict(firmware=launch.firmware, kernel=launch.kernel, initrd=launch.initrd, cmdline=launch.cmdline)
    return Policy(**{"mrtd": m.mrtd, "rtmr1": m.rtmr1, "rtmr2": m.rtmr2, **changes})


@contextlib.contextmanager
def agent_thread(secrets_dir: Path, root: Path, **kwargs: object) -> Iterator[AgentServer]:
    """The real agent on 127.0.0.1 in a thread; ``root`` is an empty folder, so quotes come
    from the emulated service the controller names."""
    kwargs.setdefault("controller_key", CONTROLLER_PUBLIC)
    agent = Agent(on_secret=SecretsDir(secrets_dir), root=root, **kwargs)  # type: ignore[arg-type]
    with AgentServer(agent, "127.0.0.1", 0) as server:
        yield server


class Spawned:
    """``python -m MODULE ARGS`` with its standard error collected; ``port`` from its
    "listening on ADDR:PORT" line."""

    def __init__(self, module: str, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.stderr_lines: list[str] = []
        self.port: int | None = None
        listening = threading.Event()

        def collect() -> None:
            assert self.proc.stderr is not None
            for raw in self.proc.stderr:
                line = raw.decode(errors="replace")
                self.stderr_lines.append(line)
                if self.port is None and (m := re.search(r"listening on \S+:(\d+)", line)):
                    self.port = int(m.group(1))
                    listening.set()
            listening.set()

        self._reader = threading.Thread(target=collect, daemon=True)
        self._reader.start()
        if not listening.wait(30) or self.port is None:
            self.stop()
            raise AssertionError(f"{module} did not start listening:\n{self.stderr}")

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def wait(self, timeout: float = 30) -> tuple[int, bytes]:
        assert self.proc.stdout is not None
        out = self.proc.stdout.read()
        rc = self.proc.wait(timeout)
        self._reader.join(5)
        return rc, out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self._reader.join(5)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


class LineProxy:
    """A man in the middle on 127.0.0.1: relays lines to ``upstream``, passing each answer
    line through ``rewrite(answer_line) -> line``, and records what the client sent."""

    def __init__(self, upstream: tuple[str, int], rewrite: Callable[[bytes], bytes] = lambda line: line) -> None:
        self.upstream, self.rewrite = upstream, rewrite
        self.sent: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.address = ("127.0.0.1", self.port)
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        with (
            client,
            socket.create_connection(self.upstream) as up,
            client.makefile("rb") as cin,
            up.makefile("rb") as uin,
        ):
            for line in cin:
                self.sent.append(line)
                up.sendall(line)
                answer = uin.readline()
                if not answer:
                    return
                client.sendall(self.rewrite(answer))

    def close(self) -> None:
        self.listener.close()


@contextlib.contextmanager
def silent_server() -> Iterator[tuple[str, int]]:
    """Accepts connections and never answers (a guest that hangs)."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield ("127.0.0.1", listener.getsockname()[1])
    finally:
        stop.set()
        listener.close()
        for conn in accepted:
            conn.close()
