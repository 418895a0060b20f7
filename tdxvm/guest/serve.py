"""Run the inference service: ``python -m tdxvm.guest.serve --model DIR --name NAME``.

The HTTP server starts at once and loads the model in a background thread, so
``/health`` answers 503 until the model is ready, then 200. If loading fails the
process exits with status 1 (for systemd to report or restart it).
"""

from __future__ import annotations

import argparse
import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import uvicorn

from tdxvm.guest.engine import DTYPES, Engine, EngineConfig
from tdxvm.guest.server import ModelHolder, create_app

log = logging.getLogger("tdxvm.guest.serve")


def load_in_background(holder: ModelHolder, config: EngineConfig, on_error: threading.Event | None = None) -> threading.Thread:
    """Load ``config``'s model into ``holder`` on the engine's own thread; set ``on_error`` on failure.

    The returned thread is the engine's worker: it lives until the engine is closed.
    """

    def ready(engine: Engine) -> None:
        holder.engine = engine

    def failed(exc: Exception) -> None:
        holder.error = f"{type(exc).__name__}: {exc}"
        if on_error is not None:
            on_error.set()

    return Engine.spawn(config, ready, failed)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tdxvm.guest.serve", description="Serve a causal LM over an OpenAI-compatible HTTP API.")
    p.add_argument("--model", required=True, type=Path, help="Hugging Face model folder (config, safetensors, tokenizer)")
    p.add_argument("--name", required=True, help="model name clients pass as `model`")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--max-waiting", type=int, default=64, help="queued requests beyond which new ones get 503")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.model.is_dir():
        log.error("%s: not a folder", args.model)
        return 2
    holder = ModelHolder(args.name)
    server = uvicorn.Server(uvicorn.Config(create_app(holder), host=args.host, port=args.port, log_level=args.log_level, access_log=False))
    failed = threading.Event()
    config = EngineConfig(model_dir=args.model, name=args.name, dtype=args.dtype, threads=args.threads, max_waiting=args.max_waiting)
    load_in_background(holder, config, failed)

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
