"""Install a received model and set the inference service up: the guest's half of ``tdxvm provision``.

    python3 -m tdxvm.guest.install --upload DEST/<upload id> --name NAME [--dtype D]
        [--threads N] [--max-batch N] [--kv-cache-mib N] [--qgs HOST:PORT]

Run by the controller over its SSH session to the attested guest, after the model key
arrived through the agent (sealed to this TD's attested key, kept in
``/run/tdxvm/secrets/model-<first 16 hex digits of the upload id>``, in TD memory only).
Under an exclusive lock (an install orphaned by a controller that died goes on to the
end; a second one waits for it, then finds the model installed), it

1. decrypts and authenticates the upload into ``/var/lib/tdxvm/model`` all or nothing
   (:func:`tdxvm.guest.staging.install_model`; a model already there is swapped out
   only once the new one is complete), and records the upload id in
   :data:`INSTALLED` so a repeated provision of the same weights skips the work;
2. removes the key file and the upload (the decrypted model is on the scratch disk,
   under authenticated encryption with a key drawn in the TD, :mod:`tdxvm.guest.scratch`;
   the ciphertext is not needed again);
3. writes ``/etc/tdxvm/serve.env``, the arguments of the ``tdxvm-serve`` unit.

It prints one JSON line, ``{"ok": true, "installed": ..., "files": N, "bytes": N,
"seconds": S}`` or ``{"ok": false, "code": ..., "error": ...}``; exit status 0, 1
(failed) or 2 (bad arguments). ``--check UPLOAD_ID`` prints whether that upload is
the installed model and changes nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tdxvm.errors import TdxvmError
from tdxvm.fileio import lock_exclusive, write_atomic
from tdxvm.guest import scratch
from tdxvm.guest.engine import DTYPES, MAX_BATCH, MAX_KV_CACHE_MIB
from tdxvm.guest.staging import StagingError, install_model
from tdxvm.guest.weights import WeightsError

MODEL_DIR = Path("/var/lib/tdxvm/model")
INSTALLED = Path("/var/lib/tdxvm/model.installed")  # the upload id of the model in MODEL_DIR
SECRETS_DIR = Path("/run/tdxvm/secrets")
LOCK_TIMEOUT = 1800.0  # an install of 13B weights under a slow disk takes minutes
SERVE_ENV = Path("/etc/tdxvm/serve.env")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
_QGS = re.compile(r"[A-Za-z0-9.-]+:[0-9]{1,5}")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class InstallError(TdxvmError):
    code = "install"


@dataclass(frozen=True, kw_only=True)
class Serving:
    """How the service serves the installed model: its name for clients and the engine's settings."""

    name: str
    dtype: str = "float32"
    threads: int | None = None
    max_batch: int | None = None
    kv_cache_mib: int | None = None


def serve_env(serving: Serving, qgs: str | None) -> bytes:
    """The ``tdxvm-serve`` unit's environment file (every value checked: systemd splits on spaces)."""
    name, dtype = serving.name, serving.dtype
    if not _NAME.fullmatch(name):
        raise InstallError(f"model name {name!r}: use letters, digits and . _ : / - (at most 128)", code="usage")
    if dtype not in DTYPES:
        raise InstallError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}", code="usage")
    args = ["--name", name, "--dtype", dtype]
    for option, value, top in (
        ("threads", serving.threads, 1024),
        ("max-batch", serving.max_batch, MAX_BATCH),
        ("kv-cache-mib", serving.kv_cache_mib, MAX_KV_CACHE_MIB),
    ):
        if value is None:
            continue
        if not 0 < value <= top:
            raise InstallError(f"{option.replace('-', '_')} {value}: expected 1 to {top}", code="usage")
        args += [f"--{option}", str(value)]
    if qgs is not None:
        if not _QGS.fullmatch(qgs):
            raise InstallError(f"qgs {qgs!r}: expected HOST:PORT", code="usage")
        args += ["--qgs", qgs]
    return f"TDXVM_SERVE_ARGS={' '.join(args)}\n".encode()


def key_secret_name(upload_id: str) -> str:
    """The agent's name for the model key of one upload (one file per upload: an install
    never deletes the key that a later provision released)."""
    return f"model-{upload_id[:16]}"


@contextlib.contextmanager
def _exclusive(path: Path, timeout: float) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = lock_exclusive(path, timeout)
    except TimeoutError:
        raise InstallError(f"{path}: another install is still running (waited {timeout:.0f} s)", code="busy") from None
    try:
        yield
    finally:
        os.close(fd)


def _tree_size(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def installed_upload(marker: Path | None = None, model_dir: Path | None = None) -> str | None:
    """The upload id of the installed model, if one is installed (defaults: the guest's paths)."""
    marker, model_dir = marker or INSTALLED, model_dir or MODEL_DIR
    try:
        text = marker.read_text().strip()
    except OSError:
        return None
    return text if (model_dir / "config.json").is_file() else None


def install(
    upload: Path,
    *,
    serving: Serving,
    qgs: str | None,
    key_file: Path | None = None,
    model_dir: Path | None = None,
    marker: Path | None = None,
    env_file: Path | None = None,
    lock_timeout: float = LOCK_TIMEOUT,
) -> dict:
    """Install ``upload`` (see the module doc); paths default to the guest's."""
    env = serve_env(serving, qgs)  # refuse bad arguments before touching anything
    key_file = key_file or SECRETS_DIR / key_secret_name(upload.name)
    model_dir, marker, env_file = model_dir or MODEL_DIR, marker or INSTALLED, env_file or SERVE_ENV
    with _exclusive(marker.with_name(".tdxvm-install.lock"), lock_timeout):
        return _install(upload, env, key_file=key_file, model_dir=model_dir, marker=marker, env_file=env_file)


def _install(upload: Path, env: bytes, *, key_file: Path, model_dir: Path, marker: Path, env_file: Path) -> dict:
    started = time.monotonic()
    if installed_upload(marker, model_dir) == upload.name:  # a concurrent install of the same upload finished it
        key_file.unlink(missing_ok=True)
        shutil.rmtree(upload, ignore_errors=True)
        env_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(env_file, env, mode=0o644)
        files, size = _tree_size(model_dir)
        return {
            "ok": True,
            "installed": str(model_dir),
            "upload": upload.name,
            "files": files,
            "bytes": size,
            "seconds": round(time.monotonic() - started, 3),
            "already": True,
        }
    try:
        key = key_file.read_bytes()
    except FileNotFoundError:
        raise InstallError(
            f"{key_file}: no model key (the controller releases it through the agent first)", code="no-key"
        ) from None
    if len(key) != 32:
        raise InstallError(f"{key_file}: {len(key)} bytes, expected a 32-byte model key", code="no-key")
    marker.unlink(missing_ok=True)  # from here until the new marker, no upload counts as installed
    entries = install_model(upload, model_dir, key, replace=True)
    write_atomic(marker, upload.name.encode() + b"\n", mode=0o644)
    key_file.unlink(missing_ok=True)
    shutil.rmtree(upload, ignore_errors=True)
    env_file.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(env_file, env, mode=0o644)
    return {
        "ok": True,
        "installed": str(model_dir),
        "upload": upload.name,
        "files": len(entries),
        "bytes": sum(e.size for e in entries),
        "seconds": round(time.monotonic() - started, 3),
    }


def configure(*, serving: Serving, qgs: str | None, env_file: Path | None = None) -> dict:
    """Only rewrite the service's arguments (the installed model stays); ``changed`` says if they differ."""
    env, env_file = serve_env(serving, qgs), env_file or SERVE_ENV
    try:
        changed = env_file.read_bytes() != env
    except OSError:
        changed = True
    if changed:
        env_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(env_file, env, mode=0o644)
    return {"ok": True, "configured": str(env_file), "changed": changed}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python3 -m tdxvm.guest.install", description="Install a received model (see the module doc)."
    )
    p.add_argument("--upload", type=Path, help="a complete upload folder (DEST/<upload id>)")
    p.add_argument("--check", metavar="UPLOAD_ID", help="only say whether this upload is the installed model")
    p.add_argument("--name", help="model name clients pass as `model`")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int)
    p.add_argument("--max-batch", type=int)
    p.add_argument("--kv-cache-mib", type=int)
    p.add_argument("--qgs", help="emulated quote service for the service's attestations (emulated guests)")
    args = p.parse_args(argv)
    try:
        if MODEL_DIR.is_relative_to(scratch.MOUNT):  # the scratch disk, which the TD formats at boot beside the agent
            scratch.require()
        if args.check is not None:
            result: dict = {"ok": True, "installed": installed_upload() == args.check}
        elif args.name is None:
            raise InstallError("--name is required", code="usage")
        else:
            serving = Serving(
                name=args.name,
                dtype=args.dtype,
                threads=args.threads,
                max_batch=args.max_batch,
                kv_cache_mib=args.kv_cache_mib,
            )
            if args.upload is not None:
                result = install(args.upload, serving=serving, qgs=args.qgs)
            elif installed_upload() is None:
                raise InstallError(f"no model is installed in {MODEL_DIR}", code="no-model")
            else:
                result = configure(serving=serving, qgs=args.qgs)
    except (InstallError, StagingError, WeightsError, scratch.ScratchError, OSError) as exc:
        code = (
            "weights"
            if isinstance(exc, WeightsError)
            else "scratch"
            if isinstance(exc, scratch.ScratchError)
            else getattr(exc, "code", "os-error")
        )
        print(json.dumps({"ok": False, "code": code, "error": str(exc)}), flush=True)
        return EXIT_USAGE if code == "usage" else EXIT_FAILED
    print(json.dumps(result), flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
