"""Run the inference service: ``python -m tdxvm.guest.serve --model DIR --name NAME``.

The HTTP server starts at once and loads the model in a background thread, so
``/health`` answers 503 until the model is ready, then 200. If loading fails the
process exits with status 1 (for systemd to report or restart it).

With ``--tls-dir DIR`` the service speaks HTTPS only, with a P-256 key made inside the
guest for the model it serves (:mod:`tdxvm.guest.tls`: a start that serves another
model than the key was made for makes a new key), and answers ``GET /v1/attestation``
with quotes that bind that key (:mod:`tdxvm.guest.attestation`). Quotes come from
configfs-tsm or ``/dev/tdx_guest``, or in an emulated guest from the quote service at
``--qgs HOST:PORT`` (:func:`tdxvm.guest.tdquote.detect`).

An attested service measures what it serves before it listens: it takes the model
digest of the files in ``--model`` (with ``--in-memory DIR``, as it copies them into the
TD's memory, from where it loads them: :mod:`tdxvm.guest.inmemory`) and extends RTMR3
with a model event naming that digest, ``--name`` and ``--dtype`` (:func:`tdxvm.guest.rtmr3.measure_model`; nothing new
if the latest model event already names exactly that), keeping the RTMR3 log in
``--rtmr3-log``, which ``/v1/attestation`` returns. Where RTMR3 cannot be extended (a
kernel older than Linux 6.16 has no interface for it) it exits with status 2 and says
so: it never serves a model clients could not check.

With ``--api-keys FILE`` (the set ``tdxvm provision`` releases, :mod:`tdxvm.guest.apikeys`)
every route but ``/health`` and ``/v1/attestation`` needs one of those keys, read again
whenever the file changes. Every request passes :mod:`tdxvm.guest.gate` (requests in
flight, body size); TLS is 1.3, or 1.2 with ECDHE and AEAD ciphers only.
"""

from __future__ import annotations

import argparse
import logging
import ssl
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn

from tdxvm.guest.apikeys import KeyFile
from tdxvm.guest.attestation import CCEL_DATA, Attester
from tdxvm.guest.engine import DTYPES, QUANTIZATION, Engine, EngineConfig
from tdxvm.guest.gate import DEFAULT_MAX_BODY, DEFAULT_MAX_REQUESTS, Limits
from tdxvm.guest.inmemory import InMemoryError, copy_into_memory, release
from tdxvm.guest.modeldigest import ModelDigestError, folder_digest, show
from tdxvm.guest.rtmr3 import DEFAULT_LOG, measure_model
from tdxvm.guest.server import ModelHolder, create_app
from tdxvm.guest.tls import TlsError, TlsIdentity, ensure_identity

if TYPE_CHECKING:
    from tdxvm.guest.tdquote import QuoteProvider

log = logging.getLogger("tdxvm.guest.serve")
# TLS 1.2 suites allowed beside TLS 1.3's (all AEAD): forward-secret ECDHE with AES-GCM or ChaCha20-Poly1305
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def load_in_background(
    holder: ModelHolder,
    config: EngineConfig,
    on_error: threading.Event | None = None,
    loaded: Callable[[], None] | None = None,
) -> threading.Thread:
    """Load ``config``'s model into ``holder`` on the engine's own thread; set ``on_error``
    on failure, call ``loaded`` once it is loaded.

    The returned thread is the engine's worker: it lives until the engine is closed.
    """

    def ready(engine: Engine) -> None:
        if loaded is not None:
            loaded()
        holder.engine = engine  # healthy from here on

    def failed(exc: Exception) -> None:
        holder.error = f"{type(exc).__name__}: {exc}"
        if on_error is not None:
            on_error.set()

    return Engine.spawn(config, ready, failed)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tdxvm.guest.serve", description="Serve a causal LM over an OpenAI-compatible HTTP API."
    )
    p.add_argument(
        "--model", required=True, type=Path, help="Hugging Face model folder (config, safetensors, tokenizer)"
    )
    p.add_argument(
        "--in-memory",
        type=Path,
        metavar="DIR",
        help="a folder on a tmpfs: copy the model there, measure the bytes copied, and load that copy only "
        "(the model's storage may change after it is measured; the TD's memory cannot)",
    )
    p.add_argument("--name", required=True, help="model name clients pass as `model`")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoding together (default 16)")
    p.add_argument(
        "--kv-cache-mib",
        type=int,
        default=None,
        help="memory for the running batch's KV cache at its worst "
        "(default: --max-batch full contexts, at most half the memory free after loading)",
    )
    p.add_argument("--max-waiting", type=int, default=64, help="queued requests beyond which new ones get 429")
    p.add_argument(
        "--max-requests",
        type=int,
        default=DEFAULT_MAX_REQUESTS,
        help=f"HTTP requests in flight beyond which new ones get 429 (default {DEFAULT_MAX_REQUESTS})",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY,
        help=f"largest request body; larger ones get 413 (default {DEFAULT_MAX_BODY})",
    )
    p.add_argument(
        "--api-keys",
        type=Path,
        metavar="FILE",
        help="the released API key set (hashes); every route but /health and /v1/attestation then needs a key",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--tls-dir", type=Path, help="serve HTTPS with the attested key kept here (made on first start)")
    p.add_argument(
        "--tls-name",
        action="append",
        default=None,
        metavar="NAME",
        help="DNS name or IP for the certificate (repeat; default: --host and localhost)",
    )
    p.add_argument(
        "--qgs", metavar="HOST:PORT", help="emulated quote service, used when the guest has no TDX quote device"
    )
    p.add_argument(
        "--rtmr3-log",
        type=Path,
        default=DEFAULT_LOG,
        help=f"the RTMR3 event log kept with --tls-dir (default {DEFAULT_LOG})",
    )
    return p.parse_args(argv)


def quote_provider(args: argparse.Namespace) -> QuoteProvider:
    """The quote provider this guest has (a TDX device, or the emulated ``--qgs``)."""
    from tdxvm.guest.tdquote import detect  # the guest's quote devices; only an attested service needs them

    return detect(args.qgs)


def attested_tls(args: argparse.Namespace, provider: QuoteProvider, serves: bytes) -> tuple[TlsIdentity, Attester]:
    """The TLS identity in ``--tls-dir`` for the measured model event ``serves``, and an attester for it."""
    names = args.tls_name or [n for n in dict.fromkeys([args.host, "localhost"]) if n not in ("0.0.0.0", "::")]
    identity = ensure_identity(args.tls_dir, names, serves=serves)
    if identity.made:
        log.info("made a new TLS key for this model: a client that pinned the key of another model must attest again")
    return identity, Attester(provider, {"tls": identity.spki}, event_log=CCEL_DATA, rtmr3_log=args.rtmr3_log)


def measure(args: argparse.Namespace, provider: QuoteProvider, digest: bytes) -> bytes:
    """Measure the model this service is about to load (its model ``digest``) into RTMR3
    (see the module doc); the model event's payload."""
    done = measure_model(
        provider,
        digest,
        name=args.name,
        dtype=args.dtype,
        quantization=QUANTIZATION[args.dtype],
        log_path=args.rtmr3_log,
    )
    what = f"model {args.name} {show(digest)} ({args.dtype})"
    if done.extended:
        log.info(
            "measured %s into RTMR3 (event %d of the log %s); RTMR3 %s",
            what,
            done.events,
            args.rtmr3_log,
            done.rtmr3.hex(),
        )
    else:
        log.info("%s is what the latest model event in %s already names; RTMR3 unchanged", what, args.rtmr3_log)
    return done.payload


def uvicorn_config(app: Any, args: argparse.Namespace, identity: TlsIdentity | None) -> uvicorn.Config:
    """uvicorn's settings: TLS 1.2 (ECDHE with AEAD ciphers only) or 1.3 on ``identity``'s key,
    and a hard cap on open connections above the gate's bound on requests (kept-alive
    idle connections count too; uvicorn answers those beyond it with a bare 503)."""
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        ssl_keyfile=identity.key_path if identity else None,
        ssl_certfile=identity.cert_path if identity else None,
        ssl_ciphers=TLS12_CIPHERS,
        limit_concurrency=2 * args.max_requests,
    )
    config.load()
    if config.ssl is not None:
        config.ssl.minimum_version = ssl.TLSVersion.TLSv1_2
        config.ssl.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return config


def _release(copy: Path) -> None:
    """The copy in memory is loaded: its files go (pages the model maps stay while mapped)."""
    try:
        release(copy)
    except OSError as exc:
        log.warning("cannot delete the model's copy in %s once loaded: %s", copy, exc)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.model.is_dir():
        log.error("%s: not a folder", args.model)
        return 2
    model_dir, digest = args.model, None
    if args.in_memory is not None:
        try:
            digest = copy_into_memory(args.model, args.in_memory)
        except (InMemoryError, ModelDigestError, OSError) as exc:
            log.error("cannot copy the model %s into memory at %s: %s", args.model, args.in_memory, exc)
            return 2
        model_dir = args.in_memory
        log.info("copied %s into memory at %s (%s)", args.model, model_dir, show(digest))
    identity = attester = None
    if args.tls_dir is not None:
        try:
            provider = quote_provider(args)
        except Exception as exc:  # the quote provider's typed error (no TDX device, no --qgs)
            log.error("cannot serve on an attested TLS key: %s: %s", getattr(exc, "code", type(exc).__name__), exc)
            return 2
        try:
            serves = measure(args, provider, digest if digest is not None else folder_digest(model_dir))
        except Exception as exc:  # Rtmr3Error, ModelDigestError, the provider's QuoteError (no-rtmr-extend), OSError
            log.error(
                "refusing to serve %s: it cannot be measured into RTMR3, so no client could check which model answers: "
                "%s: %s",
                args.model,
                getattr(exc, "code", type(exc).__name__),
                exc,
            )
            return 2
        try:
            identity, attester = attested_tls(args, provider, serves)
        except TlsError as exc:
            log.error("cannot serve on an attested TLS key: %s: %s", exc.code, exc)
            return 2
        log.info("HTTPS with TLS key SPKI SHA-256 %s; quotes from %s", identity.spki_sha256, attester.provider.name)
    keys = KeyFile(args.api_keys) if args.api_keys else None
    if keys is None:
        log.warning("no --api-keys: every route is open to anyone who reaches port %d", args.port)
    holder = ModelHolder(args.name)
    limits = Limits(max_body=args.max_body_bytes, max_requests=args.max_requests)
    app = create_app(holder, attester=attester, keys=keys, limits=limits)
    server = uvicorn.Server(uvicorn_config(app, args, identity))
    failed = threading.Event()
    config = EngineConfig(
        model_dir=model_dir,
        name=args.name,
        dtype=args.dtype,
        threads=args.threads,
        max_batch=args.max_batch,
        kv_cache_mib=args.kv_cache_mib,
        max_waiting=args.max_waiting,
    )
    load_in_background(holder, config, failed, loaded=None if args.in_memory is None else lambda: _release(model_dir))

    def stop_on_failure() -> None:
        failed.wait()
        server.should_exit = True

    threading.Thread(target=stop_on_failure, daemon=True).start()
    try:
        server.run()
    finally:
        if holder.engine is not None:
            holder.engine.close()
    return 1 if failed.is_set() else 0


if __name__ == "__main__":
    raise SystemExit(main())
