"""Public-key login to a libvirt host, with the keys ``ssh`` would offer for libvirt.

In order: the URI's ``keyfile`` (or the config's ``IdentityFile`` lines), ssh-agent's
keys (``$SSH_AUTH_SOCK``, unless ``IdentitiesOnly yes``), then, when no key file was
named, ``~/.ssh/id_ed25519``, ``id_ecdsa``, ``id_rsa``. A key file protected by a
passphrase is skipped with a note (nothing can ask for it: libvirt's ssh cannot either;
ssh-agent can hold it). None taken: :class:`~tdxvm.launch.sshtarget.HostSshAuthError`
(exit 2) naming the keys offered and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import paramiko

from tdxvm.launch.sshtarget import DEFAULT_IDENTITIES, HostSshAuthError, HostSshError, HostSshUnreachable, SshTarget


def _load_key(path: str, skipped: list[str], *, required: bool) -> paramiko.PKey | None:
    try:
        return paramiko.PKey.from_path(path)
    except FileNotFoundError:
        if required:
            raise HostSshError(f"keyfile {path} (named by the libvirt URI) does not exist") from None
    except paramiko.PasswordRequiredException:
        skipped.append(f"{path} (protected by a passphrase: load it into ssh-agent, `ssh-add {path}`)")
    except (paramiko.SSHException, OSError, ValueError) as exc:
        skipped.append(f"{path} ({exc})")
    return None


def _candidate_keys(
    target: SshTarget, agent: paramiko.Agent | None, skipped: list[str]
) -> Iterator[tuple[str, paramiko.PKey]]:
    files = [target.keyfile] if target.keyfile else list(target.identity_files)
    for path in files:
        key = _load_key(path, skipped, required=path == target.keyfile)
        if key is not None:
            yield f"{path} ({key.fingerprint})", key
    if agent is not None:
        for key in agent.get_keys():
            yield f"ssh-agent's {key.fingerprint}", key
    if not files:
        for name in DEFAULT_IDENTITIES:
            path = Path.home() / ".ssh" / name
            if path.exists() and (key := _load_key(str(path), skipped, required=False)) is not None:
                yield f"{path} ({key.fingerprint})", key


def authenticate(transport: paramiko.Transport, target: SshTarget) -> None:
    """Log ``target.user`` in on ``transport`` (host key already checked) with the first key
    the host takes (see the module doc); :class:`HostSshAuthError` with the fix if none."""
    tried: list[str] = []
    skipped: list[str] = []
    agent = None
    if os.environ.get("SSH_AUTH_SOCK") and not target.identities_only:
        try:
            agent = paramiko.Agent()
        except (paramiko.SSHException, OSError) as exc:
            skipped.append(f"ssh-agent at $SSH_AUTH_SOCK ({exc})")
    try:
        for label, key in _candidate_keys(target, agent, skipped):
            try:
                rest = transport.auth_publickey(target.user, key)
            except paramiko.AuthenticationException:
                tried.append(label)
                continue
            except (paramiko.SSHException, EOFError, OSError) as exc:
                if transport.is_active():
                    raise HostSshUnreachable(f"ssh {target.where}: authentication broke off: {exc}") from None
                tried.append(f"{label}, after which the server hung up (too many keys for its MaxAuthTries?)")
                break
            if not rest:
                return
            raise HostSshAuthError(
                f"ssh {target.where} took {label} but asks for more ({', '.join(rest)}), which tdxvm (like "
                f"libvirt's ssh, which has no terminal) cannot give\nfix: let that key alone log in"
            )
    finally:
        if agent is not None:
            agent.close()
    offered = "; ".join(tried) or "none: no key file, ssh-agent key or default identity found"
    unusable = f"; not usable: {'; '.join(skipped)}" if skipped else ""
    raise HostSshAuthError(
        f"ssh {target.where} refused every key offered ({offered}){unusable}\n"
        f"fix: put the public key libvirt uses for this host into ~{target.user}/.ssh/authorized_keys on "
        f"{target.host} (`ssh-copy-id -i KEY.pub{'' if target.port == 22 else f' -p {target.port}'} "
        f"{target.user}@{target.host}`), or name the key that is there with ?keyfile=PATH in the URI; "
        f"`{target.ssh_command()} true` must log in without a prompt (libvirt's ssh cannot ask either)"
    )
