"""The guest agent: attestation quotes that bind fresh keys, and secrets sealed to them.

    python3 -m tdxvm.guest.agent [--port 7300] [--secrets-dir /run/tdxvm/secrets]
                                 [--ssh-host-key PATH] [--tls-key PATH]

speaks :mod:`tdxvm.guest.agentwire` with the controller (:mod:`tdxvm.provision.handshake`).
Every ``attest`` makes a new X25519 key, binds it with the nonce and the guest's other
public keys (the SSH host key of ``--ssh-host-key``; the inference service's TLS key from
``--tls-key``, when that file exists) into REPORTDATA, and asks the guest's quote provider
(:func:`tdxvm.guest.tdquote.detect`) for a quote; the attest's ``qgs`` address is used only
where the guest has neither configfs-tsm nor ``/dev/tdx_guest`` (an emulated guest, whose
quotes a verifier refuses unless it trusts the emulated root). A ``secret`` opens only with the private
key of the latest attest on the same connection, and only if the controller's release key
sealed it (HPKE Auth mode; its public half is ``--controller-key``, built into the measured
image): anyone can attest this guest and seal to its key, but only the controller that
built the image can make it accept a secret. A refused secret is logged (its name, never
its bytes) and changes nothing. An accepted one lands in ``--secrets-dir/<name>`` (mode
0600, written atomically; the folder is a tmpfs under ``/run``). Secrets are never logged.
Connections are independent: the key of one is never used on another.

:class:`Agent` holds the protocol; :class:`AgentServer` serves it over TCP, one thread per
connection (the quote providers block), with a bounded line size, an idle timeout and a
cap on open connections. :mod:`tdxvm.guest.unlock` runs the same agent in the initramfs.

Standard library, ``cryptography`` and the REPORTDATA binding only: this runs in the guest.
"""

from __future__ import annotations

import argparse
import logging
import socket
import socketserver
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tdxvm.attest.binding import NONCE_SIZE, BindingError, report_data
from tdxvm.errors import Refused, TdxvmError
from tdxvm.fileio import write_atomic
from tdxvm.guest import agentwire as wire
from tdxvm.guest.envelope import EnvelopeError, open_sealed
from tdxvm.guest.tdquote import QuoteError, detect

DEFAULT_SECRETS_DIR = Path("/run/tdxvm/secrets")
DEFAULT_TLS_KEY = Path("/run/tdxvm/tls/cert.pem")  # tdxvm.guest.tls.DEFAULT_DIR / CERT_FILE
DEFAULT_CONTROLLER_KEY = Path("/etc/tdxvm/controller-release.pub")  # tdxvm.releasekey.GUEST_PATH
CCEL_DATA = "sys/firmware/acpi/tables/data/CCEL"  # under the agent's root
IDLE_TIMEOUT = 300.0
MAX_CONNECTIONS = 32

log = logging.getLogger("tdxvm.guest.agent")


class AgentError(TdxvmError):
    """A request the agent refuses; the message goes back to the controller as ``error``."""

    code = "agent"


class SecretRefused(AgentError, Refused):
    code = "secret-refused"


# -- the guest's public keys -------------------------------------------------------------


def ssh_host_key_blob(path: Path) -> bytes:
    """The OpenSSH wire-format blob of the public key in ``path`` (``ssh-ed25519 AAAA… comment``)."""
    try:
        fields = path.read_text(encoding="ascii").split()
    except (OSError, UnicodeDecodeError) as exc:
        raise AgentError(f"SSH host key {path}: {getattr(exc, 'strerror', None) or exc}", code="ssh-host-key") from None
    try:
        blob = wire.unb64(fields[1] if len(fields) >= 2 else "", "key")
        name_len = int.from_bytes(blob[:4], "big")
        if len(fields) < 2 or blob[4 : 4 + name_len].decode("ascii") != fields[0]:
            raise ValueError
    except (wire.WireError, ValueError, UnicodeDecodeError):
        raise AgentError(f"SSH host key {path}: not an OpenSSH public key line", code="ssh-host-key") from None
    return blob


def tls_spki(path: Path) -> bytes:
    """The DER SubjectPublicKeyInfo of the PEM certificate, public key or private key in ``path``."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AgentError(f"TLS key {path}: {exc.strerror or exc}", code="tls-key") from None
    public: Any
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            public = x509.load_pem_x509_certificate(data).public_key()
        elif b"PRIVATE KEY-----" in data:
            public = serialization.load_pem_private_key(data, password=None).public_key()
        else:
            public = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise AgentError(
            f"TLS key {path}: not a PEM certificate, public key or unencrypted private key", code="tls-key"
        ) from None
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def system_keys(ssh_host_key: Path | None, tls_key: Path | None) -> Callable[[], dict[str, bytes]]:
    """The system agent's long-lived public keys, read again at every attest (they may be
    made after the agent starts): ``ssh-host`` (required when given), ``tls`` (when it exists)."""

    def keys() -> dict[str, bytes]:
        out = {}
        if ssh_host_key is not None:
            out["ssh-host"] = ssh_host_key_blob(ssh_host_key)
        if tls_key is not None and tls_key.exists():
            out["tls"] = tls_spki(tls_key)
        return out

    return keys


def controller_key(path: Path) -> bytes:
    """The controller's release public key (32 bytes) from ``path`` (one line of 64 hex digits)."""
    try:
        text = path.read_text(encoding="ascii").strip()
        raw = bytes.fromhex(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise AgentError(
            f"controller key {path}: {getattr(exc, 'strerror', None) or exc}", code="controller-key"
        ) from None
    if len(raw) != 32:
        raise AgentError(f"controller key {path}: expected 64 hex digits (an X25519 public key)", code="controller-key")
    return raw


# -- where secrets go --------------------------------------------------------------------


class SecretsDir:
    """Secrets as files ``<folder>/<name>``, mode 0600, written atomically (folder 0700)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def __call__(self, name: str, data: bytes) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.folder.is_symlink() or not self.folder.is_dir():
            raise SecretRefused(f"secrets folder {self.folder} is not a folder")
        write_atomic(self.folder / wire.check_secret_name(name), data, mode=0o600)


# -- the protocol ------------------------------------------------------------------------


class Agent:
    """The agent's protocol, without the transport.

    ``controller_key`` is the public half of the controller's release key: a secret opens
    only if that key sealed it. ``public_keys()`` gives the keys bound next to the
    per-attest X25519 key;
    ``on_secret(name, plaintext)`` keeps an opened secret (raise :class:`SecretRefused` to
    refuse it); ``on_delivered(name)`` runs after the controller has been told ``ok``.
    Quotes come from ``provider`` if given, else from :func:`~tdxvm.guest.tdquote.detect`
    under ``root`` with the attest's ``qgs`` (or ``default_qgs``) for an emulated guest.
    """

    def __init__(
        self,
        *,
        on_secret: Callable[[str, bytes], None],
        controller_key: bytes,
        public_keys: Callable[[], dict[str, bytes]] = dict,
        on_delivered: Callable[[str], None] | None = None,
        provider: Any = None,
        root: Path = Path("/"),
        default_qgs: str | None = None,
    ) -> None:
        if len(controller_key) != 32:
            raise AgentError("the controller key must be a 32-byte X25519 public key", code="controller-key")
        self.on_secret, self.public_keys, self.on_delivered = on_secret, public_keys, on_delivered
        self.controller_key = controller_key
        self.provider, self.root, self.default_qgs = provider, Path(root), default_qgs
        self._quote_lock = threading.Lock()  # the device paths take one request at a time
        # Secrets are taken in the order of the attests they were sealed to: a release sealed
        # to an older attest than the one that last delivered the same name is a replay (the
        # host kept an old connection open), and would undo a rotation (an API key set).
        self._attests = 0  # attests completed, all connections together
        self._order_lock = threading.Lock()
        self._delivered: dict[str, int] = {}  # secret name -> number of the attest it last came with
        self._event_log: bytes | None = None
        self._event_log_read = False

    def quote_provider(self, qgs: str | None) -> Any:
        return self.provider if self.provider is not None else detect(qgs or self.default_qgs, self.root)

    def event_log(self) -> bytes | None:
        """The firmware's CC event log (CCEL), read once; None where the guest has none."""
        if not self._event_log_read:
            self._event_log_read = True
            path = self.root / CCEL_DATA
            try:
                self._event_log = path.read_bytes() if path.exists() else None
            except OSError as exc:
                log.warning("event log %s: %s; attestations carry none", path, exc.strerror or exc)
        return self._event_log

    def session(self) -> Session:
        return Session(self)

    def _next_attest(self) -> int:
        with self._order_lock:
            self._attests += 1
            return self._attests


class Session:
    """One connection's state: the X25519 key, nonce and number of its latest attest, and the
    secrets taken with it (each name once: another one of the same name needs a new attest)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._key: X25519PrivateKey | None = None
        self._nonce: bytes | None = None
        self._number = 0
        self._taken: set[str] = set()

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "attest":
            return self.attest(request)
        if op == "secret":
            return self.secret(request)
        if op == "hello":  # is anyone there, and which keys would an attest bind (no quote, no state)
            return {"ok": True, "agent": "tdxvm", "keys": sorted({*self.agent.public_keys(), wire.X25519_KEY})}
        raise wire.WireError(f"unknown op {op!r}: expected 'attest', 'secret' or 'hello'")

    def attest(self, request: dict[str, Any]) -> dict[str, Any]:
        self._key = self._nonce = None  # a secret goes only to the latest attest's key
        nonce_hex, qgs = request.get("nonce"), request.get("qgs")
        if not isinstance(nonce_hex, str) or len(nonce_hex) != 2 * NONCE_SIZE:
            raise wire.WireError(f"nonce: expected {2 * NONCE_SIZE} hex digits")
        try:
            nonce = bytes.fromhex(nonce_hex)
        except ValueError:
            raise wire.WireError(f"nonce: expected {2 * NONCE_SIZE} hex digits") from None
        if qgs is not None and not isinstance(qgs, str):
            raise wire.WireError('qgs: expected "HOST:PORT" or null')
        key = X25519PrivateKey.generate()
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        keys = {**self.agent.public_keys(), wire.X25519_KEY: raw}
        provider = self.agent.quote_provider(qgs)
        with self.agent._quote_lock:
            quote = provider.quote(report_data(nonce, keys))
        self._key, self._nonce, self._number, self._taken = key, nonce, self.agent._next_attest(), set()
        log.info("attested with %s for nonce %s… (keys: %s)", provider.name, nonce_hex[:16], ", ".join(sorted(keys)))
        events = self.agent.event_log()
        return {
            "ok": True,
            "provider": provider.name,
            "quote": wire.b64(quote),
            "keys": {name: wire.b64(value) for name, value in sorted(keys.items())},
            "event_log": None if events is None else wire.b64(events),
        }

    def secret(self, request: dict[str, Any]) -> dict[str, Any]:
        if self._key is None or self._nonce is None:
            raise AgentError(
                "no attest on this connection yet: a secret is sealed to the key of an attest", code="no-attest"
            )
        name = wire.check_secret_name(request.get("name"))
        sealed = wire.unb64(request.get("sealed"), "sealed")
        try:
            plaintext = open_sealed(
                sealed, self._key, info=wire.secret_info(name, self._nonce), sender=self.agent.controller_key
            )
        except EnvelopeError as exc:
            log.warning("refused secret %r: %s", name, exc)
            raise SecretRefused(f"secret {name!r}: {exc}") from None
        agent = self.agent
        with agent._order_lock:  # held while it is kept, so that two releases are kept in attest order
            if name in self._taken:
                log.warning("refused secret %r: a second one on the same attest (a replay?)", name)
                raise SecretRefused(f"secret {name!r}: already received with this attest; attest again to send another")
            if self._number < agent._delivered.get(name, 0):
                log.warning("refused secret %r: sealed to an older attest than the one it last came with", name)
                raise SecretRefused(
                    f"secret {name!r}: sealed to an older attest than the one it last came with (a replay on a "
                    "connection kept open?)"
                )
            agent.on_secret(name, plaintext)
            self._taken.add(name)
            agent._delivered[name] = self._number
        log.info("received secret %r (%d bytes)", name, len(plaintext))
        return {"ok": True}


# -- the server --------------------------------------------------------------------------

_REFUSED = (wire.WireError, AgentError, QuoteError, BindingError)


class _Handler(socketserver.StreamRequestHandler):
    server: AgentServer

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.idle_timeout)

    def handle(self) -> None:
        if not self.server.enter():
            self._send({"ok": False, "error": f"the agent already serves {self.server.max_connections} connections"})
            return
        try:
            self._serve(self.server.agent.session())
        finally:
            self.server.leave()

    def _serve(self, session: Session) -> None:
        while True:
            try:
                line = wire.read_line(self.rfile)
            except wire.WireError as exc:  # cannot find the next line: answer and hang up
                self._send({"ok": False, "error": str(exc)})
                return
            except OSError:  # idle timeout, reset
                return
            if line is None:
                return
            delivered = None
            try:
                request = wire.decode(line)
                answer = session.handle(request)
                if request.get("op") == "secret":
                    delivered = request["name"]
            except _REFUSED as exc:
                answer = {"ok": False, "error": str(exc)}
            except Exception as exc:  # keep serving; the message names the failure, never a secret
                log.error("request failed: %s: %s", type(exc).__name__, exc)
                answer = {"ok": False, "error": f"internal error: {type(exc).__name__}"}
            try:
                if not self._send(answer):
                    return
            finally:
                if delivered is not None and self.server.agent.on_delivered is not None:
                    self.server.agent.on_delivered(delivered)

    def _send(self, answer: dict[str, Any]) -> bool:
        try:
            self.wfile.write(wire.encode(answer))
            return True
        except OSError:
            return False


class AgentServer(socketserver.ThreadingTCPServer):
    """Serves ``agent`` on ``(host, port)`` (port 0: any free one; see :attr:`port`)."""

    allow_reuse_address = True
    daemon_threads = True
    block_on_close = False

    def __init__(
        self,
        agent: Agent,
        host: str = "0.0.0.0",
        port: int = wire.DEFAULT_PORT,
        *,
        idle_timeout: float = IDLE_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.agent, self.idle_timeout, self.max_connections = agent, idle_timeout, max_connections
        self._open, self._count_lock = 0, threading.Lock()
        self._thread: threading.Thread | None = None
        super().__init__((host, port), _Handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def listening(self) -> str:
        host = str(self.server_address[0])
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def enter(self) -> bool:
        with self._count_lock:
            if self._open >= self.max_connections:
                return False
            self._open += 1
            return True

    def leave(self) -> None:
        with self._count_lock:
            self._open -= 1

    def start(self) -> AgentServer:
        """Serve in a background thread."""
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, name="tdxvm-agent", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop accepting; open connections end on their own (their threads are daemons)."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self.server_close()

    def __enter__(self) -> AgentServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- system mode -------------------------------------------------------------------------


def listen_address(text: str) -> tuple[str, int]:
    """``ADDR:PORT`` (``[V6]:PORT``) for ``--listen``; port 0 picks a free one."""
    host, sep, port = text.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ADDR:PORT")
    return host, int(port)


def common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--qgs",
        metavar="HOST:PORT",
        help="emulated quote service, when the guest has neither configfs-tsm nor "
        "/dev/tdx_guest and the controller names none",
    )
    p.add_argument(
        "--controller-key",
        type=Path,
        default=DEFAULT_CONTROLLER_KEY,
        help="the controller's release public key (hex); secrets open only if it sealed them",
    )
    p.add_argument("--root", type=Path, default=Path("/"), help="where the guest's /sys and /dev are (tests)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python3 -m tdxvm.guest.agent", description="tdxvm guest agent: attestation and secrets"
    )
    p.add_argument("--port", type=int, default=wire.DEFAULT_PORT, help="TCP port on every address (default 7300)")
    p.add_argument("--listen", type=listen_address, metavar="ADDR:PORT", help="listen here instead of on --port")
    p.add_argument("--secrets-dir", type=Path, default=DEFAULT_SECRETS_DIR)
    p.add_argument(
        "--ssh-host-key", type=Path, help="OpenSSH public host key to bind (e.g. /etc/ssh/ssh_host_ed25519_key.pub)"
    )
    p.add_argument(
        "--tls-key",
        type=Path,
        default=DEFAULT_TLS_KEY,
        help="PEM certificate or key of the inference service, bound when it exists",
    )
    common_arguments(p)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="tdxvm-agent: %(levelname)s %(message)s"
    )
    try:
        controller = controller_key(args.controller_key)
    except AgentError as exc:
        log.error("%s; no secret can be accepted without it", exc)
        return 2
    agent = Agent(
        on_secret=SecretsDir(args.secrets_dir),
        controller_key=controller,
        public_keys=system_keys(args.ssh_host_key, args.tls_key),
        root=args.root,
        default_qgs=args.qgs,
    )
    host, port = args.listen or ("0.0.0.0", args.port)
    try:
        server = AgentServer(agent, host, port)
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", host, port, exc.strerror or exc)
        return 2
    log.info("listening on %s; secrets go to %s", server.listening, args.secrets_dir)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
