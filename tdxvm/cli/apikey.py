"""``tdxvm apikey``: the API keys inference services accept, kept in the secret store."""

from __future__ import annotations

from pathlib import Path

import click

from tdxvm.cli.output import OUTPUT_OPTION, CliError, emit_json
from tdxvm.cli.weights import STORE_OPTION
from tdxvm.guest.apikeys import ApiKeysError, key_hash
from tdxvm.provision import apikeys
from tdxvm.secretstore import SecretStore, SecretStoreError


def _store(secrets_dir: str | None) -> SecretStore:
    return SecretStore(directory=Path(secrets_dir) if secrets_dir else None)


def _fingerprint(key: str) -> str:
    """What `list` shows for a key: the start of its SHA-256, the form the guest holds it in."""
    return "sha256:" + key_hash(key).hex()[:16]


@click.group()
def apikey() -> None:
    """API keys for the inference services (secrets api-keys/NAME; guests get their hashes only).

    A model spec's `api_keys:` (default [default]) or `tdxvm provision --api-key` names
    the keys a VM's service accepts; provisioning releases their hashes to the attested
    guest, and provisioning again with other names rotates them without a restart.
    """


@apikey.command("create")
@click.argument("name")
@click.option("--replace", is_flag=True, help="Replace the key NAME if it exists (re-provision to rotate it).")
@STORE_OPTION
@OUTPUT_OPTION
def apikey_create(name: str, replace: bool, secrets_dir: str | None, output: str) -> None:
    """Make a new random API key NAME and print it.

    `tdxvm apikey show NAME` prints it again later.
    """
    store = _store(secrets_dir)
    try:
        if store.exists(apikeys.secret_name(name)) and not replace:
            raise CliError(f"API key {name} exists in {store.directory}; --replace makes a new one")
        key = apikeys.create(store, name, replace=replace)
    except (ApiKeysError, SecretStoreError) as exc:
        raise CliError(str(exc)) from None
    if output == "json":
        emit_json({"name": name, "secret": apikeys.secret_name(name), "key": key, "fingerprint": _fingerprint(key)})
        return
    click.echo(key)
    click.echo(
        f"stored as {apikeys.secret_name(name)} in {store.directory}; a service accepts it once "
        f"`tdxvm provision` releases a set naming it (api_keys: [{name}])",
        err=True,
    )


@apikey.command("show")
@click.argument("name")
@STORE_OPTION
@OUTPUT_OPTION
def apikey_show(name: str, secrets_dir: str | None, output: str) -> None:
    """Print API key NAME (for a client's Authorization: Bearer header)."""
    try:
        key = apikeys.get(_store(secrets_dir), name)
    except (ApiKeysError, SecretStoreError) as exc:
        raise CliError(str(exc)) from None
    if output == "json":
        emit_json({"name": name, "key": key, "fingerprint": _fingerprint(key)})
    else:
        click.echo(key)


@apikey.command("list")
@STORE_OPTION
@OUTPUT_OPTION
def apikey_list(secrets_dir: str | None, output: str) -> None:
    """List the API keys' names and fingerprints (never the keys).

    A fingerprint is the start of the key's SHA-256, the form a guest holds it in.
    """
    store = _store(secrets_dir)
    rows = []
    for name in apikeys.names(store):
        try:
            rows.append({"name": name, "fingerprint": _fingerprint(apikeys.get(store, name))})
        except (ApiKeysError, SecretStoreError) as exc:
            rows.append({"name": name, "fingerprint": None, "error": str(exc)})
    if output == "json":
        emit_json({"store": str(store.directory), "keys": rows})
        return
    if not rows:
        click.echo(f"no API keys in {store.directory} (`tdxvm apikey create NAME` makes one)")
    for row in rows:
        click.echo(f"{row['name']:<24} {row['fingerprint'] or 'unusable: ' + row['error']}")


@apikey.command("delete")
@click.argument("name")
@STORE_OPTION
@OUTPUT_OPTION
def apikey_delete(name: str, secrets_dir: str | None, output: str) -> None:
    """Delete API key NAME from the secret store.

    Services provisioned with it keep accepting it until they are provisioned again
    without it.
    """
    store = _store(secrets_dir)
    try:
        secret = apikeys.secret_name(name)
        if not store.exists(secret):
            raise CliError(f"no API key {name} in {store.directory}")
        store.delete(secret)
    except ApiKeysError as exc:
        raise CliError(str(exc)) from None
    if output == "json":
        emit_json({"name": name, "deleted": True})
    else:
        click.echo(f"deleted {secret}; services provisioned with it accept it until provisioned again without it")
