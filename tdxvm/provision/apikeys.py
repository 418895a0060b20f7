"""The controller's API keys for the inference services: kept in the secret store as
``api-keys/NAME``, released to attested guests as hashes (:mod:`tdxvm.guest.apikeys`).

``tdxvm apikey create NAME`` makes one; a model spec's ``api_keys:`` (default
``[default]``) names the set a VM's service accepts, and ``tdxvm provision`` releases it
sealed to the attested guest on every run, so a re-provision with another set rotates
the keys of a running service without restarting its model. The key ``default`` is made
on first use; any other name must exist, so a misspelt name never makes a key nobody has.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

from tdxvm.guest.apikeys import ApiKeysError, check_key, check_name, document, generate
from tdxvm.launch.spec import DEFAULT_API_KEY as DEFAULT
from tdxvm.secretstore import SecretExists, SecretStore, SecretStoreError

KIND = "api-keys"
ENV = "TDXVM_API_KEY"  # a client's key given as a value, where it has no secret store


def secret_name(name: str) -> str:
    return f"{KIND}/{check_name(name)}"


def create(store: SecretStore, name: str, *, replace: bool = False) -> str:
    """A new key stored as ``api-keys/NAME`` (refused if it exists, unless ``replace``)."""
    key = generate()
    store.put(secret_name(name), key.encode(), replace=replace)
    return key


def get(store: SecretStore, name: str) -> str:
    """The key ``name`` from the store (:class:`SecretStoreError` if absent)."""
    raw = store.get(secret_name(name))
    try:
        return check_key(raw.decode("ascii").strip(), f"secret {secret_name(name)}")
    except UnicodeDecodeError:
        raise ApiKeysError(f"secret {secret_name(name)}: not a tdxvm API key") from None


def names(store: SecretStore) -> list[str]:
    return store.names(KIND)


def release_set(store: SecretStore, wanted: Sequence[str]) -> tuple[bytes, list[str]]:
    """The secret to release for the keys ``wanted`` (hashes only), and the names it made.

    ``default`` is made if absent; any other missing name is refused with the command that makes it."""
    made = []
    if DEFAULT in wanted and not store.exists(secret_name(DEFAULT)):
        with contextlib.suppress(SecretExists):  # another provision made it meanwhile: that one is the key
            create(store, DEFAULT)
            made.append(DEFAULT)
    keys = {}
    for name in wanted:
        try:
            keys[name] = get(store, name)
        except SecretStoreError:
            raise ApiKeysError(
                f"API key {name} is not in the secret store {store.directory}: "
                f"make it with `tdxvm apikey create {name}`"
            ) from None
    return document(keys), made


def client_key(store: SecretStore, name: str | None, recorded: Sequence[str] = ()) -> str | None:
    """The key a client sends: ``name`` from the store, else ``$TDXVM_API_KEY``, else the
    first of ``recorded`` (the names a VM's service was given) the store holds; None if none."""
    if name is not None:
        return get(store, name)
    if os.environ.get(ENV):
        return check_key(os.environ[ENV].strip(), f"${ENV}")
    for candidate in recorded:
        if store.exists(secret_name(candidate)):
            return get(store, candidate)
    return None
