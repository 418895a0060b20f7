"""OpenSSH ``known_hosts`` files, read as ``ssh`` reads them (sshd(8) "SSH_KNOWN_HOSTS FILE
FORMAT"): the host key a libvirt host presents is checked here before anything is sent.

A line is ``[marker] patterns keytype base64-key [comment]``. ``patterns`` is a comma
list of names (``*`` and ``?`` wildcards, ``!`` negates and wins), or one hashed name
``|1|base64(salt)|base64(HMAC-SHA1(salt, name))`` (``HashKnownHosts yes``). A host on
port 22 is looked up as ``host``, on another port as ``[host]:port``. The marker
``@revoked`` refuses that key for every host it names; ``@cert-authority`` lines (host
certificates) are not used here. Parsed from text: the caller reads the files.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

REVOKED = "@revoked"
CERT_AUTHORITY = "@cert-authority"
DEFAULT_PORT = 22


@dataclass(frozen=True, slots=True)
class Entry:
    """One usable line: where it is, whom it names, which key."""

    source: str  # file name, for messages
    line: int
    marker: str | None
    patterns: str
    key_type: str
    blob: bytes


@dataclass(frozen=True, slots=True)
class Lookup:
    """What the files say of one host's key: ``status`` is ``known`` (an entry holds this
    very key), ``changed`` (entries hold other keys of this type, none this one),
    ``revoked`` (an ``@revoked`` entry names it) or ``unknown``; ``entries`` are the
    lines that decided it; ``other_types`` the key types known for the host besides."""

    status: str
    entries: tuple[Entry, ...] = ()
    other_types: tuple[str, ...] = ()


def lookup_name(host: str, port: int) -> str:
    """The name ``ssh`` looks a host up by: ``host``, or ``[host]:port`` off port 22."""
    return host if port == DEFAULT_PORT else f"[{host}]:{port}"


def fingerprint(blob: bytes) -> str:
    """OpenSSH's ``SHA256:<base64, unpadded>`` fingerprint of a public key blob."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def parse(text: str, *, source: str) -> list[Entry]:
    """The usable lines of a known_hosts file (comments, blank and malformed lines skipped,
    as ``ssh`` skips them)."""
    entries = []
    for number, raw in enumerate(text.splitlines(), 1):
        fields = raw.split()
        if not fields or fields[0].startswith("#"):
            continue
        marker = fields.pop(0) if fields[0].startswith("@") else None
        if len(fields) < 3 or marker not in (None, REVOKED, CERT_AUTHORITY):
            continue
        try:
            blob = base64.b64decode(fields[2], validate=True)
        except (binascii.Error, ValueError):
            continue
        entries.append(Entry(source, number, marker, fields[0], fields[1], blob))
    return entries


def _hashed_match(pattern: str, name: str) -> bool:
    parts = pattern.split("|")
    if len(parts) != 4 or parts[1] != "1":
        return False
    try:
        salt, digest = base64.b64decode(parts[2], validate=True), base64.b64decode(parts[3], validate=True)
    except (binascii.Error, ValueError):
        return False
    return hmac.compare_digest(hmac.new(salt, name.encode(), hashlib.sha1).digest(), digest)


def _wildcard(pattern: str, name: str) -> bool:
    """OpenSSH's ``match_pattern``: ``*`` any run, ``?`` one character, all else literal
    (``[`` and ``]`` of ``[host]:port`` included); case-insensitive, as host names are."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, name, re.IGNORECASE | re.DOTALL) is not None


def names_host(patterns: str, name: str) -> bool:
    """Whether a line's host patterns name ``name`` (see the module doc)."""
    if patterns.startswith("|"):
        return _hashed_match(patterns, name)
    matched = False
    for pattern in patterns.split(","):
        negated = pattern.startswith("!")
        if _wildcard(pattern.removeprefix("!"), name):
            if negated:
                return False
            matched = True
    return matched


def check(entries: Iterable[Entry], name: str, key_type: str, blob: bytes) -> Lookup:
    """What ``entries`` say of the key ``blob`` (of ``key_type``) presented by ``name``."""
    entries = list(entries)
    for e in entries:  # a revoked key is refused wherever else it is listed
        if e.marker == REVOKED and hmac.compare_digest(e.blob, blob):
            return Lookup("revoked", (e,))
    same_type: list[Entry] = []
    others: list[str] = []
    for e in entries:
        if e.marker is not None or not names_host(e.patterns, name):
            continue
        if e.key_type != key_type:
            others.append(e.key_type)
        elif hmac.compare_digest(e.blob, blob):
            return Lookup("known", (e,))
        else:
            same_type.append(e)
    if same_type:
        return Lookup("changed", tuple(same_type))
    return Lookup("unknown", other_types=tuple(dict.fromkeys(others)))


def known_types(entries: Iterable[Entry], name: str) -> list[str]:
    """The key types the files hold for ``name``, in file order (``ssh`` asks the server
    for those first, so that a host known by its RSA key is not met with its ED25519 one)."""
    found = [e.key_type for e in entries if e.marker is None and names_host(e.patterns, name)]
    return list(dict.fromkeys(found))


def read_files(paths: Sequence[Path]) -> list[Entry]:
    """Every entry of the files that exist and can be read, in order (``ssh`` skips the others)."""
    entries: list[Entry] = []
    for path in paths:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        entries += parse(text, source=str(path))
    return entries
