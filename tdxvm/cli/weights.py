"""``tdxvm weights``: encrypt a Hugging Face model folder for an attested guest, and back."""

from __future__ import annotations

import time
from pathlib import Path

import click

from tdxvm.cli.output import OUT_FOLDER, OUTPUT_OPTION, CliError, emit_json
from tdxvm.cli.progress import Progress
from tdxvm.fileio import partial_folder
from tdxvm.guest.modeldigest import folder_digest, show
from tdxvm.guest.weights import (
    INDEX_NAME,
    WeightsError,
    decrypt_model,
    encrypt_model,
    generate_model_key,
    model_digest,
    read_index,
)
from tdxvm.secretstore import SecretStore

STORE_OPTION = click.option(
    "--secrets",
    "secrets_dir",
    type=OUT_FOLDER,
    metavar="DIR",
    help="Secret store folder [default: ~/.local/share/tdxvm/secrets].",
)


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


@click.group()
def weights() -> None:
    """Encrypted model weights (chunked AES-256-GCM; the key stays in the secret store)."""


@weights.command("encrypt")
@click.argument("model_dir", metavar="MODEL_DIR")
@click.option(
    "--out", "enc_dir", required=True, type=OUT_FOLDER, metavar="ENC_DIR", help="New folder for the encrypted model."
)
@click.option("--key-name", metavar="NAME", help="Name of the model key in the secret store [default: ENC_DIR's name].")
@STORE_OPTION
@OUTPUT_OPTION
def weights_encrypt(model_dir: str, enc_dir: str, key_name: str | None, secrets_dir: str | None, output: str) -> None:
    """Encrypt MODEL_DIR into ENC_DIR with a new model key kept in the secret store.

    The files go to a hidden folder beside ENC_DIR, which takes ENC_DIR's name only once
    the key is stored: an interrupted run leaves no encrypted folder without its key, and
    no half-written one. The hidden folder of a run that was killed outright (SIGKILL,
    power loss) is removed by the next encrypt into ENC_DIR; never one a run still
    writes.
    """
    src, dst = Path(model_dir), Path(enc_dir)
    name = f"weights/{key_name or dst.resolve().name}"
    store = SecretStore(directory=Path(secrets_dir) if secrets_dir else None)
    if not src.is_dir():
        raise CliError(f"{model_dir}: not a folder")
    if dst.resolve().is_relative_to(src.resolve()):
        raise CliError(f"{enc_dir}: inside the model folder {model_dir}; the encrypted model goes elsewhere")
    if dst.exists() and any(dst.iterdir()):
        raise CliError(f"{enc_dir}: exists and is not empty")
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        # The partial folders of encrypts of ENC_DIR that were killed (a model's size each) go first.
        with partial_folder(dst.parent, f".{dst.name}.partial-") as stage:
            stage.chmod(0o755)  # what a new folder gets: the files in it are ciphertext
            if store.exists(name):
                raise CliError(f"secret {name} already exists; choose another --key-name")
            key = generate_model_key()
            meter = Progress(output, width=10).counter("encrypting", _size(src))
            started = time.monotonic()
            entries = encrypt_model(src, stage, key, progress=meter)
            store.put(name, key)
            try:
                if dst.exists():
                    dst.rmdir()  # empty, checked above
                stage.rename(dst)
            except BaseException:  # no folder the key opens: the key goes, so its name is free again
                store.delete(name)
                raise
    except OSError as exc:  # a model file that cannot be read, a folder that cannot be written
        raise CliError(f"{exc.filename or model_dir}: {exc.strerror or exc}") from None
    seconds = time.monotonic() - started
    total = sum(e.size for e in entries)
    digest = show(model_digest(entries))
    if output == "json":
        emit_json(
            {
                "encrypted": str(dst),
                "key": name,
                "files": len(entries),
                "bytes": total,
                "seconds": round(seconds, 3),
                "model_digest": digest,
            }
        )
    else:
        click.echo(
            f"encrypted {len(entries)} files ({total / 2**20:,.1f} MiB) into {dst} in {seconds:.1f} s; "
            f"key: {name} in {store.directory}"
        )
        click.echo(
            f"model digest: {digest} (recorded in the encrypted index; "
            "`tdxvm verify-endpoint --model-digest` checks it)"
        )


@weights.command("digest")
@click.argument("folder", metavar="DIR")
@click.option(
    "--key-name", metavar="NAME", help="For an encrypted folder: its key in the secret store [default: DIR's name]."
)
@STORE_OPTION
@OUTPUT_OPTION
def weights_digest(folder: str, key_name: str | None, secrets_dir: str | None, output: str) -> None:
    """Print the model digest of DIR: a model folder (hashed now), or an encrypted one (from its index).

    The digest is what a tdxvm inference service measures into RTMR3 before it serves
    the model, and what `tdxvm verify-endpoint --model-digest` expects.
    """
    path = Path(folder)
    try:
        if (path / INDEX_NAME).is_file():
            name = f"weights/{key_name or path.resolve().name}"
            store = SecretStore(directory=Path(secrets_dir) if secrets_dir else None)
            digest, source = model_digest(read_index(path, store.get(name))), f"the encrypted index (key {name})"
        else:
            digest, source = folder_digest(path), "the files"
    except OSError as exc:
        raise CliError(f"{exc.filename or folder}: {exc.strerror or exc}") from None
    if output == "json":
        emit_json({"folder": folder, "model_digest": show(digest), "from": source})
    else:
        click.echo(show(digest))


@weights.command("decrypt")
@click.argument("enc_dir", metavar="ENC_DIR")
@click.option(
    "--out", "out_dir", required=True, type=OUT_FOLDER, metavar="OUT_DIR", help="New folder for the decrypted model."
)
@click.option("--key-name", metavar="NAME", help="Name of the model key in the secret store [default: ENC_DIR's name].")
@STORE_OPTION
@OUTPUT_OPTION
def weights_decrypt(enc_dir: str, out_dir: str, key_name: str | None, secrets_dir: str | None, output: str) -> None:
    """Decrypt and authenticate ENC_DIR into OUT_DIR (all files or none)."""
    src = Path(enc_dir)
    if not (src / INDEX_NAME).is_file():
        raise WeightsError(
            f"{enc_dir}: not an encrypted model folder (no {INDEX_NAME}; `tdxvm weights encrypt` makes one)"
        )
    name = f"weights/{key_name or src.resolve().name}"
    store = SecretStore(directory=Path(secrets_dir) if secrets_dir else None)
    try:
        key = store.get(name)
        meter = Progress(output, width=10).counter("decrypting", _size(src))
        started = time.monotonic()
        entries = decrypt_model(src, Path(out_dir), key, progress=meter)
    except OSError as exc:
        raise CliError(f"{exc.filename or enc_dir}: {exc.strerror or exc}") from None
    seconds = time.monotonic() - started
    total = sum(e.size for e in entries)
    if output == "json":
        emit_json({"decrypted": out_dir, "files": len(entries), "bytes": total, "seconds": round(seconds, 3)})
    else:
        click.echo(
            f"decrypted and authenticated {len(entries)} files ({total / 2**20:,.1f} MiB) "
            f"into {out_dir} in {seconds:.1f} s"
        )
